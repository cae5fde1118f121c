"""Run a grid of config overrides and write a record folder.

  python -m experiments.ablate --config=experiments/configs/base.py:tiny \\
      --sweep=optimizer.name=adamw,muon --sweep=optimizer.learning_rate=1e-3,3e-3 \\
      --seeds=0,1 --out=records/<date>-<name> [--config.train.steps=200 ...]

Every combination of the sweeps runs once per seed (sequentially, in this
process) in ``<out>/runs/<name>``. The record folder gets ``README.md`` (setup,
commit, hardware and a Markdown table of final train/eval loss and throughput,
per run and averaged over seeds), ``results.json`` and ``loss_curves.png``.
A finished run (it has ``summary.json``) is not run again, so an interrupted
ablation resumes where it stopped. Runs keep ``metrics.jsonl`` and ``config.json``
(no TensorBoard events; checkpoints only with ``--keep_checkpoints``).
"""
import ast
import itertools
import json
import os
import shutil
import sys
import time

from absl import flags

from core.errors import ConfigError
from experiments import cli, record
from experiments.configs import override

_SWEEP = flags.DEFINE_multi_string("sweep", [], "field=v1,v2,... (repeatable; grid = product)")
_GRID = flags.DEFINE_multi_string(
    "grid", [], "A whole grid 'field=v1,v2;field=v3' (product of its sweeps); repeatable: the runs "
    "are the union of the grids, e.g. one learning-rate sweep per optimizer.")
_SEEDS = flags.DEFINE_string("seeds", "0", "Comma-separated seeds; each grid point runs per seed.")
_OUT = flags.DEFINE_string("out", None, "Record folder to write.")
_TITLE = flags.DEFINE_string("title", "", "Title of the record (default: the folder name).")
_KEEP_CKPT = flags.DEFINE_bool("keep_checkpoints", False, "Keep each run's checkpoints.")
_TARGET = flags.DEFINE_float("target_eval_loss", None, "Also report the first step (and wall "
                             "time) at which eval loss reaches this value.")


def parse_sweep(spec: str) -> tuple[str, list]:
  """'a.b=1,2' -> ('a.b', [1, 2]); values are Python literals or bare strings."""
  field, sep, values = spec.partition("=")
  if not sep or not values:
    raise ConfigError("--sweep", spec, "expected field=v1,v2",
                      "write e.g. --sweep=optimizer.name=adamw,muon")
  def literal(v):
    try:
      return ast.literal_eval(v)
    except (ValueError, SyntaxError):
      return {"true": True, "false": False}.get(v.lower(), v)
  return field, [literal(v) for v in _top_level_split(values)]


def _top_level_split(text: str) -> list[str]:
  """``text`` split at the commas outside brackets and quotes (values may be tuples)."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return parts + [text[start:]]


def grid(sweeps: list[tuple[str, list]]) -> list[dict]:
  if not sweeps:
    return [{}]
  fields = [f for f, _ in sweeps]
  return [dict(zip(fields, combo)) for combo in itertools.product(*(v for _, v in sweeps))]


def run_name(overrides: dict, seed: int) -> str:
  parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()] + [f"seed={seed}"]
  return ",".join(parts).replace("/", "_").replace(" ", "").replace("'", "")


# Logged metrics that become record columns when a run has them (label: metrics key).
EXTRA_COLUMNS = {"moe/load_cv": "load CV", "moe/dropped": "dropped",
                 "attention/density": "density", "distill/kl": "distill KL"}


def summarise(workdir: str, seconds: float, n_params: int) -> dict:
  from lm.metrics import read_metrics
  records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  rates = sorted(r["tokens_per_sec"] for r in train[1:]) or [float("nan")]
  # MoE runs: expert-load balance and drops, averaged over the last quarter of the logs.
  tail = train[len(train) * 3 // 4:]
  extra = {k: sum(r[k] for r in tail) / len(tail) for k in EXTRA_COLUMNS
           if tail and all(k in r for r in tail)}
  # Bits per byte and per-source eval losses (mixtures) of the last eval.
  extra.update({k: v for k, v in (evals[-1] if evals else {}).items()
                if k.startswith(("eval_bpb", "eval_loss/")) and v == v})
  if evals and "eval_accuracy" in evals[-1] and extra.get("eval_bpb") is None:
    extra["eval_accuracy"] = evals[-1]["eval_accuracy"]  # synthetic tasks: exact recall
  return {"extra": extra, "step": train[-1]["step"] if train else 0,
          "loss": train[-1]["loss"] if train else float("nan"),
          "eval_loss": evals[-1]["eval_loss"] if evals else float("nan"),
          "evals": [[r["step"], r["eval_loss"], r.get("elapsed_s", float("nan"))] for r in evals],
          "tokens_per_sec": rates[len(rates) // 2], "seconds": seconds, "params": n_params}


def to_target(summary: dict, target: float) -> tuple[float, float]:
  """(first eval step with eval loss <= target, its wall seconds); nan when never reached."""
  for step, loss, elapsed in summary.get("evals", []):
    if loss <= target:
      return step, elapsed
  return float("nan"), float("nan")


def write_record(out: str, title: str, base_spec: str, argv: list[str], results: list[dict],
                 target: float | None = None) -> None:
  import numpy as np
  from lm.metrics import read_metrics
  env = record.environment()
  extras = [k for k in EXTRA_COLUMNS if any(k in r["summary"].get("extra", {}) for r in results)]
  extras += sorted({k for r in results for k in r["summary"].get("extra", {})
                    if k.startswith(("eval_bpb", "eval_loss/", "eval_accuracy"))})
  label = lambda k: EXTRA_COLUMNS.get(k, k.replace("eval_", "eval "))
  extra_cells = lambda s: [record.fmt(s.get("extra", {}).get(k, float("nan")), 3) for k in extras]
  head = ["run", "steps", "train loss", "eval loss", "tokens/s", "params", "wall s"]
  head += [label(k) for k in extras]
  head += [f"steps to eval {target}", f"s to eval {target}"] if target else []
  rows = []
  for r in results:
    s = r["summary"]
    row = [r["name"], s["step"], record.fmt(s["loss"]), record.fmt(s["eval_loss"]),
           f"{s['tokens_per_sec']:,.0f}", f"{s['params'] / 1e6:.2f}M", f"{s['seconds']:.0f}",
           *extra_cells(s)]
    if target:
      st, sec = to_target(s, target)
      row += [record.fmt(st, 0), record.fmt(sec, 0)]
    rows.append(row)
  groups: dict[str, list] = {}
  for r in results:
    groups.setdefault(run_name(r["overrides"], 0).rsplit(",seed=", 1)[0] or "base", []).append(r)
  mean_head = ["setting", "seeds", "train loss", "eval loss", "tokens/s"]
  mean_head += [label(k) for k in extras]
  mean_head += [f"steps to eval {target} (mean; runs that reached it)"] if target else []
  mean_rows = []
  for name, rs in groups.items():
    col = lambda k: np.array([x["summary"][k] for x in rs], dtype=float)
    ev, tr = col("eval_loss"), col("loss")
    row = [name, len(rs), f"{record.fmt(tr.mean())} ± {record.fmt(tr.std(), 3)}",
           f"{record.fmt(ev.mean())} ± {record.fmt(ev.std(), 3)}",
           f"{col('tokens_per_sec').mean():,.0f}"]
    for k in extras:
      v = np.array([x["summary"].get("extra", {}).get(k, float("nan")) for x in rs], float)
      row.append(f"{record.fmt(v.mean())} ± {record.fmt(v.std(), 3)}" if k.startswith("eval_")
                 else record.fmt(v.mean(), 3))
    if target:
      reached = [to_target(x["summary"], target)[0] for x in rs]
      hit = [s for s in reached if s == s]
      row.append(f"{np.mean(hit):.0f} ({len(hit)}/{len(rs)})" if hit else f"never (0/{len(rs)})")
    mean_rows.append(row)
  lines = record.header(title, env, [
      f"base config: `{base_spec}`",
      f"command: `python -m experiments.ablate {' '.join(argv)}`"])
  lines += ["## Runs", "", *record.table(head, rows), "",
            "## Mean over seeds (± std)", "", *record.table(mean_head, mean_rows), "",
            "![loss curves](loss_curves.png)"]
  record.write(out, lines, {"environment": env, "base_config": base_spec, "runs": [
      {k: r[k] for k in ("name", "overrides", "seed", "summary")} for r in results]})

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  # One line per setting: the mean over its seeds (train: the per-interval mean loss).
  fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(13, 4.5))
  for i, (name, rs) in enumerate(groups.items()):
    color = plt.cm.tab20(i % 20)
    curves_t, curves_e = [], []
    for r in rs:
      recs = read_metrics(os.path.join(out, "runs", r["name"], "metrics.jsonl"))
      curves_t.append({x["step"]: x.get("loss_avg", x["loss"]) for x in recs if "loss" in x})
      curves_e.append({x["step"]: x["eval_loss"] for x in recs if "eval_loss" in x})
    for ax, curves in ((ax_t, curves_t), (ax_e, curves_e)):
      steps = sorted(set.intersection(*(set(c) for c in curves)))
      ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], "o-" if ax is ax_e else "-",
              label=name, lw=1.2, ms=3, color=color)
  for ax, name in ((ax_t, "train loss (mean over seeds)"), (ax_e, "eval loss (mean over seeds)")):
    ax.set_xlabel("step"), ax.set_ylabel(name), ax.grid(alpha=0.3)
  lo = min(min(x["summary"]["eval_loss"] for x in results) - 0.1, 10.0)
  ax_e.set_ylim(lo, lo + 1.5)
  ax_t.set_ylim(lo - 0.3, lo + 2.0)
  ax_e.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "loss_curves.png"), dpi=100)
  plt.close(fig)


def run_grid(base_config, sweeps: list[str], seeds: list[int], out: str, *,
             keep_checkpoints: bool = False, grids: list[str] = ()) -> list[dict]:
  """Runs every grid point per seed; returns [{name, overrides, seed, summary}].

  ``sweeps`` form one grid (their product); each entry of ``grids`` is another
  grid written ``'a=1,2;b=x'``; the runs are the union of all grids.
  """
  from lm import loop
  points = grid([parse_sweep(s) for s in sweeps]) if sweeps or not grids else []
  for g in grids:
    points += grid([parse_sweep(s) for s in g.split(";") if s.strip()])
  results = []
  for overrides in points:
    for seed in seeds:
      name = run_name(overrides, seed)
      workdir = os.path.join(out, "runs", name)
      summary_path = os.path.join(workdir, "summary.json")
      if os.path.exists(summary_path):
        with open(summary_path) as f:
          summary = json.load(f)
      else:
        config = override(base_config, {**overrides, "seed": seed, "train.tensorboard": False},
                          flag="--sweep")
        print(f"[ablate] {name}", flush=True)
        start = time.perf_counter()
        result = loop.run(config, workdir)
        if result["step"] < config.train.steps:  # preempted (SIGTERM): resumable, not finished
          print(f"[ablate] {name} stopped at step {result['step']}; run the same command again "
                "to resume it", flush=True)
          sys.exit(143)
        summary = summarise(workdir, time.perf_counter() - start, result["params"])
        if not keep_checkpoints:  # and the copy of the tokenizer: the config names it
          shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
          for copy in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(workdir, copy)):
              os.remove(os.path.join(workdir, copy))
        with open(summary_path, "w") as f:
          json.dump(summary, f, indent=2)
      results.append({"name": name, "overrides": overrides, "seed": seed, "summary": summary})
  return results


def main(config, spec):
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
  results = run_grid(config, _SWEEP.value, seeds, out, keep_checkpoints=_KEEP_CKPT.value,
                     grids=_GRID.value)
  write_record(out, _TITLE.value or os.path.basename(os.path.normpath(out)), spec, sys.argv[1:],
               results, target=_TARGET.value)
  print(f"[ablate] record written to {out}/README.md")


if __name__ == "__main__":
  flags.mark_flags_as_required(["out"])
  cli.run(main)
