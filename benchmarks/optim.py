"""Optimizer update time as a fraction of the full train step, side by side.

  python benchmarks/optim.py --config=experiments/configs/base.py:125m \\
      --optimizers=adamw,muon,namo,namo_d [--set data.batch_size=8] [--out=...]

For each optimizer: the jitted full train step (forward, backward, update) and
the jitted update alone (``tx.update`` + ``apply_updates`` on gradients of the
right shapes) are timed, medians of ``--steps`` calls after warm-up; the table
gives both and their ratio. The target on GPU is Muon/NAMO update <= 3% of the step.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (emit, environment_lines, load_config, median_time,  # noqa: E402
                               zero_aux)


def measure(config, name: str, steps: int, warmup: int) -> dict:
  import jax
  import optax
  from experiments.configs import override
  from lm import experiment
  exp = experiment.build(override(config, {"optimizer.name": name}))
  it = exp.data.train_iterator()
  batch = exp.put_batch(next(it))
  aux = zero_aux(exp)
  holder = {"state": exp.state.init()}

  def full_step():
    holder["state"], m = exp.train_step(holder["state"], batch, aux)
    return m["loss"]

  step_s = median_time(full_step, steps=steps, warmup=warmup)
  tx = exp.optimizer.tx
  shardings = exp.state.shardings

  def update_only(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = holder["state"]["params"], holder["state"]["opt_state"]
  grads = jax.tree.map(lambda p: p * 1e-3, params)
  upd = jax.jit(update_only, in_shardings=(shardings["params"], shardings["opt_state"],
                                           shardings["params"]))
  update_s = median_time(upd, params, opt_state, grads, steps=steps, warmup=warmup)
  return {"name": name, "step_s": step_s, "update_s": update_s, "config": exp.config}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", required=True)
  p.add_argument("--optimizers", default="adamw,muon,namo,namo_d")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--set", action="append", default=[], help="field=value config overrides")
  p.add_argument("--out", default="")
  args = p.parse_args()
  config = load_config(args.config, args.set)
  rows = [measure(config, n, args.steps, args.warmup) for n in args.optimizers.split(",")]
  c = rows[0]["config"]
  m = c.model
  lines = [f"## optimizer update vs. train step: `{args.config}` {' '.join(args.set)}", "",
           *environment_lines(),
           f"- model d={m.d_model} L={m.n_layers} d_ff={m.d_ff}, compute {m.dtype}; batch "
           f"{c.data.batch_size} x {c.data.seq_len}; medians of {args.steps} calls",
           "", "| optimizer | train step ms | update alone ms | update / step | step / adamw step |",
           "| --- | ---: | ---: | ---: | ---: |"]
  base = rows[0]["step_s"]
  for r in rows:
    lines.append(f"| {r['name']} | {1e3 * r['step_s']:.1f} | {1e3 * r['update_s']:.2f} | "
                 f"{100 * r['update_s'] / r['step_s']:.1f}% | {r['step_s'] / base:.2f} |")
  emit(lines, args.out)


if __name__ == "__main__":
  main()
