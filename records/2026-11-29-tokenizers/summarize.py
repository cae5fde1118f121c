"""Bits per byte against training FLOPs (``bpb_vs_flops.png``) and the per-source table of
the mixture part (``mixture_per_source.md``), from the runs of this record:

  .venv/bin/python records/2026-11-29-tokenizers/summarize.py
"""
import glob
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)


def _evals(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "eval_loss" in r]


def tokenizers_part() -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import run
  from experiments.configs.base import get_config
  c = get_config("default")
  tokens_per_step = c.data.batch_size * c.data.seq_len
  groups = {}
  for d in sorted(glob.glob(os.path.join(HERE, "tokenizers", "runs", "*"))):
    cfg = json.load(open(os.path.join(d, "config.json")))
    groups.setdefault(cfg["data"]["tokenizer"], []).append(d)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  lines = ["| tokenizer | vocab | MFLOP/token | steps | tokens | seeds | eval bpb (mean ± std) "
           "| eval nats/token |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for tok, dirs in groups.items():
    fpt = run.flops_per_token(tok)
    curves = [_evals(d) for d in dirs]
    steps = [e["step"] for e in curves[0]]
    bpb = np.array([[e["eval_bpb"] for e in c_] for c_ in curves])
    nats = np.array([c_[-1]["eval_loss"] for c_ in curves])
    x = np.array(steps) * tokens_per_step * fpt
    label = os.path.basename(tok).replace(".json", "")
    ax.errorbar(x, bpb.mean(0), yerr=bpb.std(0), marker="o", ms=3, capsize=2, label=label)
    from lm.data import tokenizers
    vocab = tokenizers.load(os.path.join(os.path.dirname(os.path.dirname(HERE)), tok)
                            if tok.endswith(".json") else tok).vocab_size
    lines.append(f"| {label} | {vocab} | {fpt / 1e6:.2f} | {steps[-1]} | "
                 f"{steps[-1] * tokens_per_step:,} | {len(dirs)} | "
                 f"{bpb[:, -1].mean():.4f} ± {bpb[:, -1].std():.4f} | {nats.mean():.4f} |")
  ax.set_xlabel("training FLOPs"), ax.set_ylabel("held-out bits per byte")
  ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
  ax.grid(alpha=0.3), ax.legend()
  ax.set_title("base.py:default, embedded corpus: tokenizers at equal training FLOPs")
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "bpb_vs_flops.png"), dpi=100)
  return lines


def mixture_part() -> list[str]:
  rows = {}
  for d in sorted(glob.glob(os.path.join(HERE, "mixture", "runs", "*"))):
    cfg = json.load(open(os.path.join(d, "config.json")))
    stages = cfg["data"]["stages"]
    name = ("docs only" if stages and len(stages) == 1 else
            "curriculum (docs, then half and half)" if stages else "half and half")
    last = _evals(d)[-1]
    rows.setdefault(name, []).append(last)
  lines = ["| setting | seeds | eval bpb docs | eval bpb code | eval nats/token docs "
           "| eval nats/token code |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for name, evs in rows.items():
    cell = lambda k: (f"{np.mean([e[k] for e in evs]):.4f} ± "
                      f"{np.std([e[k] for e in evs]):.4f}")
    lines.append(f"| {name} | {len(evs)} | {cell('eval_bpb/docs')} | {cell('eval_bpb/code')} | "
                 f"{cell('eval_loss/docs')} | {cell('eval_loss/code')} |")
  return lines


if __name__ == "__main__":
  out = tokenizers_part()
  print("\n".join(out))
  with open(os.path.join(HERE, "tokenizers_bpb.md"), "w") as f:
    f.write("\n".join(out) + "\n")
  if glob.glob(os.path.join(HERE, "mixture", "runs", "*")):
    out = mixture_part()
    print("\n".join(out))
    with open(os.path.join(HERE, "mixture_per_source.md"), "w") as f:
      f.write("\n".join(out) + "\n")
