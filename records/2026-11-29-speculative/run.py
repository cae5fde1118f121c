"""Speculative decoding on a trained model: acceptance, tokens per target call, speed-up.

  python records/2026-11-29-speculative/run.py --target=W --other=W2 [--prompts=12]

``W``: a trained run (README: ``base.py:default``, 360 steps, shipped BPE); ``W2``:
a smaller run with the same tokenizer (the "another checkpoint" draft). Prompts are
the first 32 tokens of held-out documents of the target's corpus; each is continued
by 64 tokens, one prompt at a time (batch 1: the latency case speculative decoding is
for), greedy and sampled (temperature 1, three seeds). Wall-clock speed-up = plain
cached decoding time / speculative time for the same prompts, both compiled
beforehand, measured side by side in this process. Writes results.json and prints
the table that README.md holds.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
HERE = os.path.dirname(os.path.abspath(__file__))


def prompts(w, n: int, length: int = 32) -> list[list[int]]:
  from lm.data import pipeline
  src = pipeline.named_sources(w.config.data)[""]
  _, held = pipeline.text_split(src, "data", w.config.data)
  out = []
  for doc in held:
    ids = w.tokenizer.encode(doc).tolist()
    if len(ids) >= length:
      out.append(ids[:length])
    if len(out) == n:
      break
  return out


def timed(fn):
  t = time.perf_counter()
  r = fn()
  return r, time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--target", required=True)
  ap.add_argument("--other", required=True)
  ap.add_argument("--prompts", type=int, default=12)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--gammas", default="2,4,6")
  ap.add_argument("--sample_gamma", type=int, default=4, help="sampled runs use this gamma only")
  ap.add_argument("--kinds", default="", help="comma-separated drafts (default: all)")
  ap.add_argument("--tag", default="", help="name of this target in results.json")
  ap.add_argument("--greedy_only", action="store_true")
  ap.add_argument("--dtype", default="", help="compute dtype (default: the run's model.dtype)")
  args = ap.parse_args()
  os.chdir(ROOT)
  import jax
  from lm import decode, runs
  from lm.decode import drafts, speculative
  from lm.decode.sampling import Sampling
  w = runs.load_weights(args.target)
  model_cfg = w.config.model
  if args.dtype:
    import dataclasses
    model_cfg = dataclasses.replace(model_cfg, dtype=args.dtype)
  target = decode.Model.from_weights(model_cfg, w.params, w.model_state)
  L = w.config.model.n_layers
  ps = prompts(w, args.prompts)
  max_len = len(ps[0]) + args.new
  kinds = {f"layers:{n}": f"layers:{n}" for n in range(1, L)}
  kinds.update({"sparse:0.5": "sparse:0.5", "other run": args.other})
  if args.kinds:
    kinds = {k: v for k, v in kinds.items() if k in args.kinds.split(",")}
  settings = {"greedy": [Sampling()]}
  if not args.greedy_only:
    settings["sampled T=1"] = [Sampling(temperature=1.0, seed=s) for s in (0, 1, 2)]
  plain = decode.Decoder(target, max_len=max_len)
  results = []

  def plain_run(s):
    out, total = [], 0.0
    for p in ps:
      r, t = timed(lambda: plain.generate(decode.Request([p], args.new, s)))
      out.append(r["tokens"][0])
      total += t
    return out, total

  for setting, samplings in settings.items():
    for s in samplings:
      plain.generate(decode.Request([ps[0]], args.new, s))  # compile
      base_out, base_t = plain_run(s)
      for kind, spec in kinds.items():
        draft = drafts.make(spec, target, {"tokenizer": w.tokenizer})
        gammas = [int(g) for g in args.gammas.split(",")] if s.greedy else [args.sample_gamma]
        for gamma in gammas:
          eng = speculative.Speculative(target, draft, gamma=gamma, max_len=max_len)
          eng.generate(decode.Request([ps[0]], args.new, s))  # compile
          acc, alpha, tpc, total, same, rounds = [], [], [], 0.0, True, 0
          for p, ref in zip(ps, base_out):
            r, t = timed(lambda: eng.generate(decode.Request([p], args.new, s)))
            total += t
            acc.append(r["acceptance_rate"])
            alpha.append(r["alpha"])
            rounds += r["steps"] - 1
            tpc.append(r["tokens_per_target_call"])
            same &= r["tokens"][0] == ref
          row = {"target": args.tag, "setting": setting, "seed": s.seed, "draft": kind, "gamma": gamma,
                 "acceptance_rate": sum(acc) / len(acc), "alpha": sum(alpha) / len(alpha),
                 "tokens_per_target_call": sum(tpc) / len(tpc),
                 "plain_s": base_t, "speculative_s": total, "speedup": base_t / total,
                 "round_cost": (total / max(rounds, 1)) / (base_t / (len(ps) * args.new)),
                 "equal_to_plain": bool(same) if s.greedy else None}
          results.append(row)
          print(json.dumps(row), flush=True)
  meta = {"target": os.path.abspath(args.target), "other": os.path.abspath(args.other),
          "compute_dtype": model_cfg.dtype,
          "target_layers": L, "prompts": len(ps), "prompt_tokens": len(ps[0]),
          "new_tokens": args.new, "jax": jax.__version__,
          "device": jax.devices()[0].device_kind, "cores": os.cpu_count()}
  path = os.path.join(HERE, "results.json")
  old = json.load(open(path)) if os.path.exists(path) else {"targets": {}, "rows": []}
  old["targets"][args.tag] = meta
  old["rows"] = [r for r in old["rows"] if r.get("target") != args.tag] + results
  with open(path, "w") as f:
    json.dump(old, f, indent=1)


if __name__ == "__main__":
  main()
