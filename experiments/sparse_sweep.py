"""Block-sparse attention: eval loss against measured density, before and after
distillation fine-tuning (``experiments/configs/sparse_attention.py``).

  python -m experiments.sparse_sweep --out=records/2026-11-26-sparse-attention-distill \\
      --seeds=0,1 [--calibrate=top_p=0.1,0.3;sink_blocks=0]

1. trains the dense teacher (``sparse_attention.py:teacher``) in ``<out>/runs/teacher``
   (kept: every student reads it), unless it is finished;
2. evaluates the teacher's weights under each mask of ``DENSITIES`` (no
   fine-tuning): eval loss and the measured block density on the eval batches;
   ``--calibrate`` grids (``field=v1,v2;field=v3``, fields of ``model.sparse``) are
   measured the same way and listed in the record, to choose ``DENSITIES``;
3. distils each setting per seed (``sparse_attention.py:ablation``) in
   ``<out>/runs/<setting>,seed=<s>`` and measures the student the same way, plus its
   KL to the teacher on the eval batches;
4. writes ``README.md`` (tables), ``results.json`` and ``eval_loss_vs_density.png``.

A finished run (``summary.json``) is not run again, so the sweep resumes.
"""
import argparse
import json
import os
import shutil
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="Record folder.")
  p.add_argument("--seeds", default="0,1", help="Comma-separated seeds of the distillation runs.")
  p.add_argument("--settings", default="", help="Comma-separated DENSITIES labels (default: all).")
  p.add_argument("--calibrate", action="append", default=[],
                 help="Extra mask grid to measure on the teacher, 'top_p=0.1,0.3;sink_blocks=0' "
                 "(repeatable).")
  p.add_argument("--calibrate_batches", type=int, default=2,
                 help="Eval batches per calibration point.")
  p.add_argument("--calibrate_only", action="store_true", help="Stop after the calibration.")
  p.add_argument("--steps", type=int, default=None, help="Override the students' train.steps.")
  return p.parse_args(argv)


def measure(exp, model: dict, n_batches: int, aux=None) -> dict:
  """Eval loss (cross-entropy) and mean block density over layers on the first
  ``n_batches`` eval batches (density 1.0 for dense attention); ``model`` is
  ``{"params", "model_state"}``; with ``aux`` (a teacher) also its KL."""
  from lm.loop import evaluate
  evals = evaluate(exp, model["params"], model["model_state"], n_batches, aux)
  out = {"eval_loss": evals["eval_loss"], "density": evals.get("eval_attention/density", 1.0)}
  if "eval_distill/kl" in evals:
    out["kl"] = evals["eval_distill/kl"]
  return out


def _teacher(exp):
  from lm.losses.distill import restore_teacher
  abstract = {"params": exp.state.abstract["params"],
              "model_state": exp.state.abstract["model_state"]}
  model, _, _ = restore_teacher(exp.config.losses["distill"].teacher, abstract)
  return model


def student_config(label_or_overrides, teacher_dir: str, seed: int = 0, steps=None):
  from experiments.configs import sparse_attention as sa
  c = sa.get_config("ablation")
  overrides = (sa.DENSITIES[label_or_overrides] if isinstance(label_or_overrides, str)
               else label_or_overrides)
  c.model.sparse.update(overrides)
  c.distill.teacher = teacher_dir
  c.seed = seed
  if steps:
    c.train.steps = steps
    c.train.checkpoint_every = steps
  c.train.progress = "log"
  c.train.plot = False
  c.train.tensorboard = False
  return c


def before_finetuning(config, n_batches: int) -> dict:
  """The teacher's weights run under ``config``'s mask (0 steps)."""
  from lm import experiment
  exp = experiment.build(config)
  teacher = _teacher(exp)
  return measure(exp, teacher, n_batches, {"distill": teacher} if exp.abstract_aux() else None)


def train_teacher(out: str) -> dict:
  from experiments.ablate import summarise
  from experiments.configs import sparse_attention as sa
  from lm import loop
  workdir = os.path.join(out, "runs", "teacher")
  path = os.path.join(workdir, "summary.json")
  # The checkpoint is not committed with the record: retrain it when it is missing.
  if os.path.exists(path) and os.path.isdir(os.path.join(workdir, "checkpoints")):
    return json.load(open(path))
  c = sa.get_config("teacher")
  c.train.progress, c.train.plot, c.train.tensorboard = "log", False, False
  print("[sweep] teacher", flush=True)
  result = loop.run(c, workdir)
  # Wall time from the log (the teacher may have been trained by experiments.train).
  from lm.metrics import read_metrics
  seconds = max(r.get("elapsed_s", 0.0) for r in read_metrics(os.path.join(workdir, "metrics.jsonl")))
  summary = summarise(workdir, seconds, result["params"])
  json.dump(summary, open(path, "w"), indent=2)
  return summary


def group_name(label: str, steps=None) -> str:
  return label if not steps else f"{label},steps={steps}"


def distil(out: str, label: str, seed: int, teacher_dir: str, steps=None) -> dict:
  from experiments.ablate import summarise
  from lm import experiment, loop
  name = f"{group_name(label, steps)},seed={seed}"
  workdir = os.path.join(out, "runs", name)
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    return json.load(open(path))
  c = student_config(label, teacher_dir, seed, steps)
  print(f"[sweep] {name}", flush=True)
  start = time.perf_counter()
  result = loop.run(c, workdir)
  seconds = time.perf_counter() - start
  summary = summarise(workdir, seconds, result["params"])
  summary.update(label=label, name=name)
  exp = experiment.build(c)
  teacher = _teacher(exp)
  aux = {"distill": teacher} if exp.abstract_aux() else None
  student = {k: result["state"][k] for k in ("params", "model_state")}
  summary["after"] = measure(exp, student, c.train.eval_batches, aux)
  summary["before_kl"] = measure(exp, teacher, c.train.eval_batches, aux).get("kl")
  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  json.dump(summary, open(path, "w"), indent=2)
  return summary


def _grid(spec: str) -> list[dict]:
  from experiments.ablate import grid, parse_sweep
  return grid([parse_sweep(s) for s in spec.split(";") if s.strip()])


def finished_runs(out: str) -> dict:
  """Every finished student under ``<out>/runs``, grouped by setting (name less seed)."""
  from experiments.configs import sparse_attention as sa
  groups = {}
  for name in os.listdir(os.path.join(out, "runs")):
    path = os.path.join(out, "runs", name, "summary.json")
    if name == "teacher" or not os.path.exists(path):
      continue
    summary = json.load(open(path))
    summary.setdefault("name", name)
    summary.setdefault("label", name.split(",")[0])
    groups.setdefault(name.rsplit(",seed=", 1)[0], []).append(summary)
  order = lambda g: (list(sa.DENSITIES).index(g.split(",")[0]), g)
  return {g: sorted(groups[g], key=lambda r: r["name"]) for g in sorted(groups, key=order)}


def write_record(out: str, commands: list[str], teacher: dict, before: dict, runs: dict,
                 calibration: list[dict], seconds: float, calibrate_batches: int = 2) -> None:
  import numpy as np
  from experiments import record
  from experiments.configs import sparse_attention as sa
  fmt = record.fmt
  env = record.environment()
  steps = runs[next(iter(runs))][0]["step"] if runs else 0
  t, a = sa.get_config("teacher"), sa.get_config("ablation")
  m = t.model
  setup = (f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), "
           f"d_ff {m.d_ff}, {teacher['params'] / 1e6:.2f}M parameters; byte tokens of the embedded "
           f"corpus, seq {t.data.seq_len}, batch {t.data.batch_size}; blocks "
           f"{a.model.sparse.block_q}x{a.model.sparse.block_k} ({t.data.seq_len // a.model.sparse.block_k} "
           f"key blocks per row); teacher {t.optimizer.name} lr {t.optimizer.learning_rate:g} "
           f"{t.optimizer.schedule}; students {a.optimizer.name} lr {a.optimizer.learning_rate:g} "
           f"{a.optimizer.schedule} (warmup {a.optimizer.warmup_steps}), distill.loss="
           f"{a.distill.loss}, temperature {a.distill.temperature:g}; the seed changes the "
           "students' data order only (their start is the teacher)")
  lines = record.header(
      "Block-sparse attention: eval loss vs density, before and after distillation", env, [
          "commands (in this order; a finished run is not rerun, the record lists every "
          "finished run):\n" + "\n".join(f"  - `python -m experiments.sparse_sweep {c}`"
                                          for c in commands),
          f"wall time: teacher {teacher['seconds'] / 60:.1f} min, students "
          f"{sum(r['seconds'] for rs in runs.values() for r in rs) / 60:.1f} min in all "
          "(each run's wall time, compilation included; the calibration and the "
          "before/after measurements add about a minute)",
          "teacher: `experiments/configs/sparse_attention.py:teacher` "
          f"({teacher['step']} steps, {teacher['seconds'] / 60:.1f} min, eval loss "
          f"{fmt(teacher['eval_loss'])}); students: `sparse_attention.py:ablation`, "
          f"{steps} steps (unless the setting says otherwise) of KL(teacher || student) from "
          "the teacher's weights, per seed",
          f"model: {setup}",
          "the teacher's checkpoint (`runs/teacher/checkpoints/`, 4 MB) is not committed; the "
          "sweep retrains it when it is missing (its numbers may then differ slightly from these)",
          "density: kept share of the causally valid 16x16 blocks (mean over layers, batch, kv "
          "heads) on the 8 eval batches; eval loss: cross-entropy (nats/byte) on the same batches"])
  rows = [["teacher (dense)", "-", "1.000", fmt(teacher["eval_loss"]), "-", "-", "-", "-"]]
  for group, rs in runs.items():
    label = rs[0]["label"]
    mask = ", ".join(f"{k}={v}" for k, v in sa.DENSITIES[label].items() if k != "enabled") or "off"
    ev = np.array([r["after"]["eval_loss"] for r in rs])
    kl = lambda key: [x for x in key if x is not None]
    kl_b, kl_a = kl(r.get("before_kl") for r in rs), kl(r["after"].get("kl") for r in rs)
    b = before[label]
    rows.append([group, mask, f"{b['density']:.3f}", fmt(b["eval_loss"]),
                 f"{np.mean([r['after']['density'] for r in rs]):.3f}",
                 f"{fmt(ev.mean())} ± {fmt(ev.std(), 3)}",
                 f"{fmt(np.mean(kl_b) if kl_b else None, 3)} → "
                 f"{fmt(np.mean(kl_a) if kl_a else None, 3)}", len(rs)])
  lines += ["## Eval loss vs density", "", *record.table(
      ["setting", "mask (model.sparse)", "density, teacher's mask", "eval loss, no fine-tuning",
       "density after", "eval loss after (mean ± std)", "eval KL before → after", "seeds"],
      rows, numeric_from=2)]
  lines += ["", "![eval loss vs density](eval_loss_vs_density.png)", "", "## Runs", ""]
  lines += record.table(
      ["run", "steps", "train loss", "eval loss", "density (train, last quarter)",
       "distill/kl (train, last quarter)", "tokens/s", "wall s"],
      [[r["name"], r["step"], fmt(r["loss"]), fmt(r["eval_loss"]),
        fmt(r["extra"].get("attention/density", 1.0), 3), fmt(r["extra"].get("distill/kl"), 4),
        f"{r['tokens_per_sec']:,.0f}", f"{r['seconds']:.0f}"] for rs in runs.values() for r in rs])
  if calibration:
    lines += ["", "## Calibration: the teacher's weights under candidate masks (no fine-tuning)",
              "", f"{calibrate_batches} eval batches each.", ""]
    lines += record.table(["mask", "density", "eval loss"], [
        [", ".join(f"{k}={v}" for k, v in c["mask"].items()), f"{c['density']:.3f}",
         fmt(c["eval_loss"])] for c in sorted(calibration, key=lambda c: -c["density"])])
  record.write(out, lines, {"environment": env, "commands": commands, "teacher": teacher,
                            "before": before, "runs": runs, "calibration": calibration,
                            "densities": sa.DENSITIES})

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from lm.metrics import read_metrics
  fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(12, 4.5))
  ax.axhline(teacher["eval_loss"], color="gray", ls="--", lw=1, label="teacher (dense)")
  main = [g for g in runs if "," not in g]  # the sweep at the default steps
  extra = [g for g in runs if "," in g]
  ax.plot([before[g]["density"] for g in main], [before[g]["eval_loss"] for g in main],
          "s:", color="tab:red", label="sparse mask, no fine-tuning")
  for groups, style, color, what in ((main, "o-", "tab:blue",
                                      f"after distillation ({steps} steps, mean ± std over seeds)"),
                                     (extra, "D", "tab:green", "after longer distillation")):
    if not groups:
      continue
    dens = [np.mean([r["after"]["density"] for r in runs[g]]) for g in groups]
    ev = [np.mean([r["after"]["eval_loss"] for r in runs[g]]) for g in groups]
    err = [np.std([r["after"]["eval_loss"] for r in runs[g]]) for g in groups]
    ax.errorbar(dens, ev, yerr=err, fmt=style, color=color, capsize=3, label=what)
    for g, x, y in zip(groups, dens, ev):
      ax.annotate(g, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set_xlabel("measured block density (share of causal blocks kept)")
  ax.set_ylabel("eval loss (nats/byte)")
  ax.set_xlim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  for i, g in enumerate(runs):
    curves = [{x["step"]: x["distill/kl"] for x in read_metrics(
        os.path.join(out, "runs", r["name"], "metrics.jsonl")) if "distill/kl" in x}
        for r in runs[g]]
    common = sorted(set.intersection(*(set(c) for c in curves)))
    ax_kl.plot(common, [np.mean([c[s] for c in curves]) for s in common], "-", lw=1.2,
               color=plt.cm.tab10(i), label=g)
  ax_kl.set_yscale("log")
  ax_kl.set_xlabel("distillation step")
  ax_kl.set_ylabel("train KL(teacher || student), mean over seeds")
  ax_kl.grid(alpha=0.3)
  ax_kl.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "eval_loss_vs_density.png"), dpi=100)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # orbax's notes on the read-only teacher folder
  from experiments.configs import sparse_attention as sa
  out = args.out
  os.makedirs(os.path.join(out, "runs"), exist_ok=True)
  start = time.perf_counter()
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  labels = [s for s in args.settings.split(",") if s] or list(sa.DENSITIES)
  commands_path = os.path.join(out, "commands.json")
  commands = json.load(open(commands_path)) if os.path.exists(commands_path) else []
  command = " ".join(a if ";" not in a else f"'{a}'" for a in sys.argv[1:])
  if command not in commands:
    commands.append(command)
    json.dump(commands, open(commands_path, "w"), indent=2)
  teacher = train_teacher(out)
  teacher_dir = os.path.join(out, "runs", "teacher")

  cache_path = os.path.join(out, "before.json")
  cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
  def measured(overrides, n):
    key = json.dumps([overrides, n], sort_keys=True)
    if key not in cache:
      cache[key] = before_finetuning(student_config(overrides, teacher_dir), n)
      json.dump(cache, open(cache_path, "w"), indent=2)
    return cache[key]

  for spec in args.calibrate:
    for point in _grid(spec):
      m = measured(dict(point, enabled=True), args.calibrate_batches)
      print(f"[sweep] calibrate {point}: density {m['density']:.3f}, eval loss "
            f"{m['eval_loss']:.4f}", flush=True)
  # Every calibration point measured so far in this record (cached in before.json).
  calibration = [dict(m, mask={k: v for k, v in json.loads(key)[0].items() if k != "enabled"})
                 for key, m in cache.items() if json.loads(key)[1] == args.calibrate_batches]
  if args.calibrate_only:
    return
  before = {}
  for label in sa.DENSITIES:  # all of them (cached): the record lists every finished run
    before[label] = measured(sa.DENSITIES[label], sa.get_config("ablation").train.eval_batches)
    print(f"[sweep] {label} before fine-tuning: {before[label]}", flush=True)
  for label in labels:
    for seed in seeds:
      distil(out, label, seed, teacher_dir, args.steps)
  write_record(out, commands, teacher, before, finished_runs(out), calibration,
               time.perf_counter() - start, args.calibrate_batches)
  print(f"[sweep] record written to {out}/README.md")


if __name__ == "__main__":
  main()
