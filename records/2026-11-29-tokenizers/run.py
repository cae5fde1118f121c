"""Reproduces this record (from the repository root):

  .venv/bin/python records/2026-11-29-tokenizers/run.py [--seeds=0,1,2] [--byte_steps=600]

Part 1, tokenizers at equal training FLOPs: byte, the shipped BPE (4096) and a BPE of
16384 tokens trained here on the same training split (``bpe-16k.json``, written by
``experiments.tokenizer``), on base.py's ``default`` model and the embedded corpus. The
byte run gets ``--byte_steps``; each BPE run gets the steps that spend the same FLOPs
(6 x (non-embedding params + output head) + attention, per token, x tokens per step:
the bigger vocabulary's head costs more per step, so it gets fewer steps). Compared on
held-out bits per byte (``eval_bpb``).

Part 2, data mixtures (``experiments/configs/mixture.py``): prose only, half prose and
half code all along, and a curriculum (prose only, then half and half), at equal steps,
compared on per-source held-out loss.

Both parts are ``experiments.ablate`` grids written into ``tokenizers/`` and
``mixture/`` beside this file; finished runs are not rerun.
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
BASE = "experiments/configs/base.py:default"


def flops_per_token(tokenizer: str) -> float:
  """Training FLOPs per token of the default model with this tokenizer."""
  from experiments.configs import load, override
  from lm import config as config_lib
  from lm.data import tokenizers
  c = config_lib.resolve(override(load(BASE), {"data.tokenizer": tokenizer}))
  m = c.model
  vocab = config_lib.resolve_vocab(m.vocab_size, tokenizers.load(tokenizer).vocab_size)
  d, h = m.d_model, m.n_heads * m.head_size
  kv = m.n_kv_heads * m.head_size
  per_layer = d * h + 2 * d * kv + h * d + 3 * d * m.d_ff
  body = m.n_layers * per_layer
  attention = 12 * m.n_layers * h * c.data.seq_len
  return 6.0 * (body + d * vocab) + attention


def ablate(out: str, spec: str, grids: list[str], seeds: str, extra=()) -> None:
  cmd = [sys.executable, "-m", "experiments.ablate", f"--config={spec}", f"--out={out}",
         f"--seeds={seeds}", *[f"--grid={g}" for g in grids], *extra]
  print(" ".join(cmd), flush=True)
  subprocess.check_call(cmd, cwd=ROOT)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--byte_steps", type=int, default=600)
  parser.add_argument("--mixture_steps", type=int, default=400)
  parser.add_argument("--part", choices=("all", "tokenizers", "mixture"), default="all")
  args = parser.parse_args()
  bpe16 = os.path.join(HERE, "bpe-16k.json")
  if args.part in ("all", "tokenizers"):
    if not os.path.exists(bpe16):
      subprocess.check_call([sys.executable, "-m", "experiments.tokenizer", f"--config={BASE}",
                             "--vocab_size=16384", f"--out={bpe16}"], cwd=ROOT)
    rel16 = os.path.relpath(bpe16, ROOT)
    budget = flops_per_token("byte") * args.byte_steps
    grids = []
    for tok in ("byte", "bpe", rel16):
      steps = round(budget / flops_per_token(tok))
      print(f"{tok}: {flops_per_token(tok) / 1e6:.2f} MFLOP/token -> {steps} steps")
      grids.append(f"data.tokenizer={tok};train.steps={steps};train.eval_every={steps // 6};"
                   f"train.log_every={max(steps // 30, 1)};train.checkpoint_every={steps}")
    ablate(os.path.join(HERE, "tokenizers"), BASE, grids, args.seeds,
           ["--config.train.eval_batches=8", "--title=Tokenizers at equal training FLOPs"])
  if args.part in ("all", "mixture"):
    s = args.mixture_steps
    common = (f"train.steps={s};train.eval_every={s // 4};train.checkpoint_every={s};"
              f"train.log_every={max(s // 30, 1)}")
    grids = [f"data.stages=((0, {{'docs': 1.0}}),);{common}",
             f"data.stages=();{common}",
             f"data.stages=((0, {{'docs': 1.0}}), ({s // 2}, {{'docs': 1.0, 'code': 1.0}}));"
             f"{common}"]
    ablate(os.path.join(HERE, "mixture"), "experiments/configs/mixture.py:mix", grids,
           args.seeds, ["--config.train.eval_batches=8",
                        "--title=One source, a mixture and a curriculum"])


if __name__ == "__main__":
  main()
