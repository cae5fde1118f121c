"""Tokens per second the input pipeline delivers per process, against what a step eats.

  python benchmarks/data.py [--batches=200] [--out=benchmarks/results/data.md]

Rows, each timed in this one run on this host:
- tokenizers: ``encode_batch`` over the embedded corpus (1.4 MB), tokens and MB per s;
- pipelines: batches drawn from ``make_data``'s train iterator (after building it), for
  text (tokenized in memory at build time), pretokenized ArrayRecord (documents read on
  demand), a two-source mixture, and with grain worker processes (``data.workers``);
- the train step of ``base.py:default`` on this host's devices, for scale; the pipeline
  must never be the bottleneck (the 125M model at 45 % MFU on one H100 eats ~0.6M
  tokens/s, so the target is >= 1M tokens/s per process for pretokenized data).
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, environment_lines, load_config  # noqa: E402


def _cfg(**fields):
  from experiments.configs import override
  from experiments.configs.base import get_config
  return override(get_config("default"), fields)


def _iterate(data, batches: int) -> float:
  """Tokens per second of ``batches`` train batches (after one warm-up batch)."""
  it = data.train_iterator()
  next(it)
  t = time.perf_counter()
  tokens = 0
  for _ in range(batches):
    tokens += next(it)["inputs"].size
  return tokens / (time.perf_counter() - t)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from lm import data as D
  from lm.data import sources, tokenizers

  lines = ["## Input pipeline throughput (tokens per second, one process)", "",
           *environment_lines(),
           f"- train batches of {args.batch_size} x {args.seq_len} tokens, {args.batches} "
           "batches per row after one warm-up batch", ""]
  docs = D.embedded_documents()
  n_bytes = sum(len(d.encode()) for d in docs)
  lines += ["| tokenizer | tokens | MB/s | tokens/s |", "| --- | ---: | ---: | ---: |"]
  for name in ("byte", "bpe"):
    tok = tokenizers.load(name)
    t = time.perf_counter()
    n = sum(len(x) for x in tok.encode_batch(docs))
    dt = time.perf_counter() - t
    lines.append(f"| {name} | {n:,} | {n_bytes / dt / 1e6:.1f} | {n / dt:,.0f} |")
  lines += [""]

  shape = {"data.seq_len": args.seq_len, "data.batch_size": args.batch_size}
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in ("python_docs", "python_code"):
      tok = tokenizers.load("bpe")
      src = D.named_sources(_cfg(**{"data.path": name}).data)[""]
      train, val = D.text_split(src, "data", _cfg().data)
      sources.write_pretokenized(os.path.join(tmp, name), {
          "train": tok.encode_batch(train), "val": tok.encode_batch(val)},
          {"train": 0, "val": 0}, tok, shards=4)
    cases = [
        ("text, byte", {"data.tokenizer": "byte"}),
        ("text, bpe", {"data.tokenizer": "bpe"}),
        ("arrayrecord, bpe", {"data.tokenizer": "bpe", "data.source": "arrayrecord",
                              "data.path": os.path.join(tmp, "python_docs")}),
        ("arrayrecord, bpe, 2 grain workers", {
            "data.tokenizer": "bpe", "data.source": "arrayrecord", "data.workers": 2,
            "data.path": os.path.join(tmp, "python_docs")}),
    ]
    for label, fields in cases:
      t = time.perf_counter()
      data = D.make_data(_cfg(**shape, **fields).data, seed=0)
      built = time.perf_counter() - t
      rows.append((label, built, _iterate(data, args.batches)))
    mix = load_config("experiments/configs/mixture.py:mix", [])
    from experiments.configs import override
    for k, name in (("docs", "python_docs"), ("code", "python_code")):
      mix.data.mixture[k].source = "arrayrecord"
      mix.data.mixture[k].path = os.path.join(tmp, name)
    mix = override(mix, shape)
    t = time.perf_counter()
    data = D.make_data(mix.data, seed=0)
    rows.append(("mixture of 2 arrayrecord sources, bpe", time.perf_counter() - t,
                 _iterate(data, args.batches)))

  import jax
  from benchmarks.common import median_time
  from lm import experiment
  exp = experiment.build(_cfg(**{"data.tokenizer": "bpe"}))
  batch = exp.put_batch(next(exp.data.train_iterator()))
  holder = {"state": exp.state.init()}

  def step():
    holder["state"], m = exp.train_step(holder["state"], batch, {})
    return m["loss"]

  step_s = median_time(step, steps=5, warmup=2)
  consumed = exp.config.data.batch_size * exp.config.data.seq_len / step_s
  lines += ["| pipeline | build s | tokens/s | x the default step's need here |",
            "| --- | ---: | ---: | ---: |"]
  for label, built, rate in rows:
    lines.append(f"| {label} | {built:.2f} | {rate:,.0f} | {rate / consumed:,.0f} |")
  lines += ["", f"The `base.py:default` train step (shipped BPE) on {jax.devices()[0].device_kind} consumes "
            f"{consumed:,.0f} tokens/s ({step_s * 1e3:.0f} ms per step of "
            f"{exp.config.data.batch_size} x {exp.config.data.seq_len})."]
  emit(lines, args.out)


if __name__ == "__main__":
  main()
