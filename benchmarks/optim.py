"""Optimizer update time as a fraction of the full train step, side by side.

  python benchmarks/optim.py --config=experiments/configs/base.py:125m \\
      --optimizers=adamw,muon,namo,namo_d [--set data.batch_size=8] [--out=...]

For each optimizer: the jitted full train step (forward, backward, update) and
the jitted update alone (``tx.update`` + ``apply_updates`` on gradients of the
right shapes) are timed, medians of ``--steps`` calls after warm-up; the table
gives both and their ratio. The target on GPU is Muon/NAMO update <= 3% of the step.
"""
import argparse
import math
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


def measure_ns(config, steps: int, warmup: int) -> tuple[list, dict]:
  import jax
  import jax.numpy as jnp
  from experiments.configs import override
  from lm import experiment, sharding
  from optim import chain, namo
  exp = experiment.build(override(config, {"optimizer.name": "muon"}))
  cfg = exp.config.optimizer.muon
  dims = chain.muon_dimension_tree(exp.model.axes["params"], cfg.per_head)
  params = exp.state.abstract["params"]
  leaves, stacks = [], []
  flat_params, treedef = jax.tree.flatten(params)
  flat_dims = treedef.flatten_up_to(dims)
  for p, d in zip(flat_params, flat_dims):
    if isinstance(d, chain.MuonDimensionNumbers):
      lay = namo._layout(p.shape, d)
      leaves.append(p)
      stacks.append((lay, p.sharding))
  key = jax.random.key(0)
  make = jax.jit(lambda k: [jax.random.normal(jax.random.fold_in(k, i), p.shape, jnp.float32)
                            for i, p in enumerate(leaves)],
                 out_shardings=[p.sharding for p in leaves])
  grads = make(key)
  dtype = namo.NS_DTYPES[cfg.ns_dtype]
  spread = sharding.optimizer_spread(exp.mesh)

  def per_matrix(gs):
    ns = jax.vmap(lambda x: namo.newton_schulz(x, cfg.ns_steps, dtype=dtype))
    return [lay.unflat(ns(lay.flat(g))) for (lay, _), g in zip(stacks, gs)]

  def batched(gs, sp=None):
    done = namo.newton_schulz_many([lay.flat(g) for (lay, _), g in zip(stacks, gs)],
                                   cfg.ns_steps, dtype, sp)
    return [lay.unflat(o) for (lay, _), o in zip(stacks, done)]

  outs = [p.sharding for p in leaves]
  ways = {"one matrix at a time": per_matrix, "batched per shape": batched}
  if spread is not None:
    ways[f"batched, split over {spread.size} devices"] = lambda gs: batched(gs, spread)
  rows = []
  with jax.set_mesh(exp.mesh):
    for name, fn in ways.items():
      f = jax.jit(fn, out_shardings=outs)
      rows.append({"name": name, "s": median_time(f, grads, steps=steps, warmup=warmup)})
  shapes = {}
  for (lay, _), p in zip(stacks, leaves):
    r, o = sorted((math.prod(lay.reduction), math.prod(lay.output)))
    shapes[(r, o)] = shapes.get((r, o), 0) + math.prod(lay.batch)
  return rows, {"shapes": shapes, "mesh": dict(exp.mesh.shape), "config": exp.config}


def measure_aot(config, topology: str, names: list[str]) -> list[str]:
  from experiments.configs import override
  from lm import aot
  rows, base = [], None
  for name in names:
    for dist in ([None] if name == "adamw" else [False, True]):
      fields = {"optimizer.name": name}
      if dist is not None:
        fields[f"optimizer.{'muon' if name == 'muon' else 'namo'}.distribute"] = dist
      r = aot.compile_train_step(override(config, fields), topology)
      base = base or r.compiler_flops
      label = name if dist is None else f"{name}, distribute={dist}"
      rows.append(f"| {label} | {r.compiler_flops / 1e12:.2f} | "
                  f"{100 * (r.compiler_flops / base - 1):+.1f}% | {r.temp_bytes / 2**30:.2f} | "
                  f"{r.peak_bytes / 2**30:.2f} |")
  return (["", f"TPU compiler ({topology}, per device, one train step):", "",
           "| optimizer | compiler TFLOPs | vs first | temp GiB | peak GiB |",
           "| --- | ---: | ---: | ---: | ---: |"] + rows)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", required=True)
  p.add_argument("--optimizers", default="adamw,muon,namo,namo_d")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--set", action="append", default=[], help="field=value config overrides")
  p.add_argument("--out", default="")
  p.add_argument("--ns", action="store_true", help="also time the orthogonalisation alone")
  p.add_argument("--devices", type=int, default=0, help="simulate this many CPU devices")
  p.add_argument("--aot", default="", help="a TPU topology: compile there instead of timing")
  args = p.parse_args()
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  config = load_config(args.config, args.set)
  from lm.loop import apply_xla_flags
  apply_xla_flags(config.train.xla_flags)
  if args.aot:
    m = config.model
    emit([f"## optimizer cost on {args.aot}: `{args.config}` {' '.join(args.set)}", "",
          *environment_lines(aot_topology=args.aot),
          f"- model d={m.d_model} L={m.n_layers} d_ff={m.d_ff}; batch "
          f"{config.data.batch_size} x {config.data.seq_len}"]
         + measure_aot(config, args.aot, args.optimizers.split(",")), args.out)
    return
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
  if args.ns:
    ns_rows, info = measure_ns(config, args.steps, args.warmup)
    shapes = ", ".join(f"{n} x {r}x{o}" for (r, o), n in sorted(info["shapes"].items()))
    mesh = " x ".join(f"{a}={s}" for a, s in info["mesh"].items() if s > 1) or "1 device"
    lines += ["", f"Newton-Schulz of the Muon group alone ({c.optimizer.muon.ns_steps} steps, "
              f"{c.optimizer.muon.ns_dtype}), mesh {mesh}; matrices (wide orientation): {shapes}",
              "", "| orthogonalisation | ms | / one matrix at a time |", "| --- | ---: | ---: |"]
    first = ns_rows[0]["s"]
    lines += [f"| {r['name']} | {1e3 * r['s']:.2f} | {r['s'] / first:.2f} |" for r in ns_rows]
  emit(lines, args.out)


if __name__ == "__main__":
  main()
