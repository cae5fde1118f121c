"""Generate text from a trained run with a KV cache, optionally with a speculative draft.

  python -m experiments.generate --workdir=W --prompt="def " --max_new_tokens=64 \\
      [--temperature=0 --top_k=0 --top_p=1 --seed=0] [--draft=layers:2|sparse|<workdir>] \\
      [--draft_tokens=4] [--stop=STRING] [--dtr] [--json] [--config.a.b=v ...]

``--prompt_file`` holds one prompt per line (one batch). Text goes to stdout, one
continuation per prompt; ``--json`` prints one object instead: ``text`` (a list when
several prompts), ``tokens``, ``tokens_per_sec`` and, with a draft,
``acceptance_rate`` and ``tokens_per_target_call``; ``--dtr`` adds the Deep-Thinking
Ratio of each continuation. Config overrides apply to the target (e.g. another
attention implementation). Bad input: one line, exit 2.
"""
import json
import sys
import time

from absl import flags

from core.errors import ConfigError
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's workdir.")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Longest prompt + continuation (0: data.seq_len).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens of this mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop a row at this string (repeatable).")
_DRAFT = flags.DEFINE_string("draft", "", "Speculative draft: layers:N, sparse[:P] or a workdir.")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", 4, "Draft proposals per round (gamma).")
_CACHE_DTYPE = flags.DEFINE_string("cache_dtype", "bfloat16", "KV cache dtype: bfloat16, float32 or int8 (a scale per token and kv head).")
_DTR = flags.DEFINE_bool("dtr", False, "Add the Deep-Thinking Ratio of each continuation.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def _prompts() -> list[str]:
  if _PROMPT.value is not None and _PROMPT_FILE.value:
    raise ConfigError("--prompt_file", _PROMPT_FILE.value, "given together with --prompt",
                      "pass one of them")
  if _PROMPT_FILE.value:
    try:
      with open(_PROMPT_FILE.value, encoding="utf-8") as f:
        lines = [line.rstrip("\n").replace("\\n", "\n") for line in f]
    except OSError as e:
      raise ConfigError("--prompt_file", _PROMPT_FILE.value, f"cannot be read ({e.strerror})",
                        "pass a text file with one prompt per line") from None
    lines = [line for line in lines if line]
    if not lines:
      raise ConfigError("--prompt_file", _PROMPT_FILE.value, "holds no prompt",
                        "write one prompt per line")
    return lines
  if not _PROMPT.value:
    raise ConfigError("--prompt", _PROMPT.value or "", "empty",
                      "pass --prompt=<text> or --prompt_file=<file>")
  return [_PROMPT.value.replace("\\n", "\n")]


def generate(workdir: str, prompts: list[str], overrides: dict) -> dict:
  from lm import decode, runs
  from lm.decode import drafts, speculative
  from lm.decode.sampling import Sampling
  if _MAX_NEW.value < 1:
    raise ConfigError("--max_new_tokens", _MAX_NEW.value, "must be >= 1", "use e.g. 64")
  sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _SEED.value)
  w = runs.load_weights(workdir, overrides)
  tok = w.tokenizer
  if tok is None:
    raise ConfigError("--workdir", workdir, "is a synthetic-task run (no tokenizer, no text)",
                      "evaluate it with experiments.evaluate")
  max_len = _MAX_LEN.value or w.config.data.seq_len
  target = decode.Model.from_weights(w.config.model, w.params, w.model_state)
  ids = [tok.encode(p).tolist() for p in prompts]
  req = decode.Request(ids, _MAX_NEW.value, sampling, eos_id=tok.eos_id)
  stops = [s.replace("\\n", "\n") for s in _STOP.value]
  stop = (lambda b, t: any(s in tok.decode(t) for s in stops)) if stops else None
  if _DRAFT.value:
    draft = drafts.make(_DRAFT.value, target, {"tokenizer": tok, "devices": None})
    engine = speculative.Speculative(target, draft, gamma=_DRAFT_TOKENS.value, max_len=max_len,
                                     cache_dtype=_CACHE_DTYPE.value, mesh=w.mesh)
    engine.target.check_request(req)
    engine.generate(decode.Request(ids, min(2, _MAX_NEW.value), sampling, tok.eos_id))  # compile
    t0 = time.perf_counter()
    result = engine.generate(req)
  else:
    engine = decode.Decoder(target, max_len=max_len, cache_dtype=_CACHE_DTYPE.value,
                            mesh=w.mesh)
    engine.check_request(req)
    engine.generate(decode.Request(ids, min(2, _MAX_NEW.value), sampling, tok.eos_id),
                    stop=stop)  # compile
    t0 = time.perf_counter()
    result = engine.generate(req, stop=stop)
  seconds = time.perf_counter() - t0
  texts = []
  for t in result["tokens"]:
    text = tok.decode(t)
    for s in stops:
      if s in text:
        text = text[:text.index(s)]
    texts.append(text)
  n_tokens = sum(len(t) for t in result["tokens"])
  out = {"text": texts[0] if len(texts) == 1 else texts,
         "tokens": result["tokens"][0] if len(texts) == 1 else result["tokens"],
         "tokens_per_sec": round(n_tokens / max(seconds, 1e-9), 2), "step": w.step}
  if _DRAFT.value:
    out["acceptance_rate"] = round(result["acceptance_rate"], 4)
    out["alpha"] = round(result["alpha"], 4)
    out["tokens_per_target_call"] = round(result["tokens_per_target_call"], 4)
  if _DTR.value:
    d = decode.deep_thinking(target, ids, result["tokens"])
    out["dtr"] = d[0] if len(d) == 1 else d
  return out


def main(argv_overrides, _spec):
  if not _WORKDIR.value:
    raise ConfigError("--workdir", None, "missing", "pass --workdir=<a trained run>")
  out = generate(_WORKDIR.value, _prompts(), argv_overrides)
  if _JSON.value:
    print(json.dumps(out))
  else:
    for text in ([out["text"]] if isinstance(out["text"], str) else out["text"]):
      print(text)
    note = f"{out['tokens_per_sec']} tokens/s"
    if "acceptance_rate" in out:
      note += (f", acceptance {out['acceptance_rate']:.2f}, "
               f"{out['tokens_per_target_call']:.2f} tokens per target call")
    print(note, file=sys.stderr)


if __name__ == "__main__":
  cli.run_workdir(main)
