"""Run a grid of config overrides and write a record folder.

  python -m experiments.ablate --config=experiments/configs/base.py:tiny \\
      --sweep=optimizer.name=adamw,muon --sweep=optimizer.learning_rate=1e-3,3e-3 \\
      --seeds=0,1 --out=records/<date>-<name> [--config.train.steps=200 ...]

Every combination of the sweeps runs once per seed (sequentially, in this
process) in ``<out>/runs/<name>``. The record folder gets ``README.md`` (setup,
commit, hardware and a Markdown table of final train/eval loss and throughput,
per run and averaged over seeds), ``results.json`` and ``loss_curves.png``.
A finished run (it has ``summary.json``) is not run again, so an interrupted
ablation resumes where it stopped.
"""
import ast
import copy
import datetime
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file[:arg].")
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
    raise ValueError(f"--sweep={spec!r}: expected field=v1,v2. Fix: e.g. --sweep=optimizer.name=adamw,muon")
  def literal(v):
    try:
      return ast.literal_eval(v)
    except (ValueError, SyntaxError):
      return {"true": True, "false": False}.get(v.lower(), v)
  return field, [literal(v) for v in values.split(",")]


def grid(sweeps: list[tuple[str, list]]) -> list[dict]:
  if not sweeps:
    return [{}]
  fields = [f for f, _ in sweeps]
  return [dict(zip(fields, combo)) for combo in itertools.product(*(v for _, v in sweeps))]


def run_name(overrides: dict, seed: int) -> str:
  parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()] + [f"seed={seed}"]
  return ",".join(parts).replace("/", "_")


def apply_overrides(config, overrides: dict):
  from experiments.configs import unknown_override
  config = copy.deepcopy(config)  # keeps field references (e.g. warmup follows steps)
  for field, value in overrides.items():
    message = unknown_override(config, field)
    if message:
      raise ValueError(message.replace("--config.", "--sweep="))
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
      node = node[p]
    if isinstance(node[leaf], float) and isinstance(value, int):
      value = float(value)
    node[leaf] = value
  return config


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


def environment() -> dict:
  import jax
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = "unknown"
  dev = jax.devices()[0]
  return {"date": datetime.date.today().isoformat(), "commit": commit,
          "hardware": f"{dev.platform}: {getattr(dev, 'device_kind', '?')} x{jax.device_count()}, "
                      f"{os.cpu_count()} host cores ({platform.machine()})",
          "jax": jax.__version__, "python": platform.python_version()}


def _fmt(x, digits=4):
  return "nan" if x != x else f"{x:.{digits}f}"


def write_record(out: str, title: str, base_spec: str, argv: list[str], results: list[dict],
                 target: float | None = None) -> None:
  import numpy as np
  from lm.metrics import read_metrics
  env = environment()
  extras = [k for k in EXTRA_COLUMNS if any(k in r["summary"].get("extra", {}) for r in results)]
  extra_head = "".join(f" {EXTRA_COLUMNS[k]} |" for k in extras)
  extra_rule = " ---: |" * len(extras)
  extra_cells = lambda s: "".join(
      f" {_fmt(s.get('extra', {}).get(k, float('nan')), 3)} |" for k in extras)
  lines = [f"# {title}", "",
           f"- date: {env['date']}, commit: {env['commit']}",
           f"- hardware: {env['hardware']}; jax {env['jax']}, python {env['python']}",
           f"- base config: `{base_spec}`",
           f"- command: `python -m experiments.ablate {' '.join(argv)}`", "",
           "## Runs", "",
           "| run | steps | train loss | eval loss | tokens/s | params | wall s |" + extra_head
           + (f" steps to eval {target} | s to eval {target} |" if target else ""),
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + extra_rule
           + (" ---: | ---: |" if target else "")]
  for r in results:
    s = r["summary"]
    row = (f"| {r['name']} | {s['step']} | {_fmt(s['loss'])} | {_fmt(s['eval_loss'])} | "
           f"{s['tokens_per_sec']:,.0f} | {s['params'] / 1e6:.2f}M | {s['seconds']:.0f} |"
           + extra_cells(s))
    if target:
      st, sec = to_target(s, target)
      row += f" {_fmt(st, 0)} | {_fmt(sec, 0)} |"
    lines.append(row)
  groups: dict[str, list] = {}
  for r in results:
    groups.setdefault(run_name(r["overrides"], 0).rsplit(",seed=", 1)[0] or "base", []).append(r)
  lines += ["", "## Mean over seeds (± std)", "",
            "| setting | seeds | train loss | eval loss | tokens/s |" + extra_head
            + (f" steps to eval {target} (mean; runs that reached it) |" if target else ""),
            "| --- | ---: | ---: | ---: | ---: |" + extra_rule + (" ---: |" if target else "")]
  for name, rs in groups.items():
    col = lambda k: np.array([x["summary"][k] for x in rs], dtype=float)
    ev, tr = col("eval_loss"), col("loss")
    row = (f"| {name} | {len(rs)} | {_fmt(tr.mean())} ± {_fmt(tr.std(), 3)} | "
           f"{_fmt(ev.mean())} ± {_fmt(ev.std(), 3)} | {col('tokens_per_sec').mean():,.0f} |")
    row += "".join(f" {_fmt(np.mean([x['summary'].get('extra', {}).get(k, float('nan')) for x in rs]), 3)} |"
                   for k in extras)
    if target:
      reached = [to_target(x["summary"], target)[0] for x in rs]
      hit = [s for s in reached if s == s]
      row += f" {np.mean(hit):.0f} ({len(hit)}/{len(rs)}) |" if hit else f" never (0/{len(rs)}) |"
    lines.append(row)
  lines += ["", "![loss curves](loss_curves.png)", ""]
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"environment": env, "base_config": base_spec, "runs": [
        {k: r[k] for k in ("name", "overrides", "seed", "summary")} for r in results]}, f, indent=2)

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
  from lm import train
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
        config = apply_overrides(base_config, {**overrides, "seed": seed})
        print(f"[ablate] {name}", flush=True)
        start = time.perf_counter()
        result = train.run(config, workdir)
        summary = summarise(workdir, time.perf_counter() - start, result["params"])
        if not keep_checkpoints:
          shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
        with open(summary_path, "w") as f:
          json.dump(summary, f, indent=2)
      results.append({"name": name, "overrides": overrides, "seed": seed, "summary": summary})
  return results


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from lm.errors import ConfigError
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
  base = _CONFIG.value
  try:
    results = run_grid(base, _SWEEP.value, seeds, out, keep_checkpoints=_KEEP_CKPT.value,
                       grids=_GRID.value)
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  spec = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "?")
  write_record(out, _TITLE.value or os.path.basename(os.path.normpath(out)), spec, sys.argv[1:],
               results, target=_TARGET.value)
  print(f"[ablate] record written to {out}/README.md")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "out"])
  from experiments.configs import check_overrides
  check_overrides(sys.argv)
  app.run(main)
