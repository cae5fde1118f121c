"""Peak memory of Ulysses vs. headwise chunking vs. ring, read from compiled programs.

  python benchmarks/context_memory.py [--cpu_seq=8192] [--topology=v5p:4x4x2] [--out=FILE]

Two tables, each from ``compiled.memory_analysis()`` (no run):
- CPU, 8 simulated devices on the ``sequence`` axis: the attention op alone
  (``attention.context.context_attend``, forward + backward), one layer's worth of
  heads, at ``--cpu_seq`` tokens.
- A TPU topology (libtpu's compiler on this host): the whole train step of
  ``experiments/configs/long_context.py:v5p`` with each strategy.

``temp`` is the compiler's temporary buffers per device (activations, the
exchanged q/k/v, the score blocks); ``peak`` adds arguments and outputs.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, environment_lines  # noqa: E402
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

STRATEGIES = ("none", "ulysses", "headwise", "ring")
MIB = 2 ** 20


def cpu_table(seq: int, heads: int, head_dim: int) -> list[str]:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from attention.context import context_attend
  from attention.reference import attend_reference
  from attention.spec import AttentionSpec
  from lm import sharding
  mesh = jax.make_mesh((8,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = AttentionSpec(causal=True)
  shape = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.float32,
                               sharding=NamedSharding(mesh, P(None, "sequence")))
  rows = ["| strategy | forward+backward temp MiB / device | peak MiB / device |",
          "| --- | ---: | ---: |"]
  for strategy in STRATEGIES:
    if strategy == "none":  # XLA's own partitioning of the dense reference
      attend = lambda q, k, v: attend_reference(q, k, v, spec)
    else:
      attend = lambda q, k, v, s=strategy: context_attend(q, k, v, spec, strategy=s)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v) ** 2)
    with sharding.placed(mesh):  # context_attend reads the mesh and its axes from here
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    m = compiled.memory_analysis()
    peak = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    rows.append(f"| {strategy} | {m.temp_size_in_bytes / MIB:.1f} | {peak / MIB:.1f} |")
  return rows


def tpu_table(topology: str, layers: int) -> list[str]:
  from experiments.configs import long_context, override
  from lm import aot
  rows = ["| strategy | temp GiB / device | peak GiB / device | HBM GiB | fits | TFLOPs / device |",
          "| --- | ---: | ---: | ---: | --- | ---: |"]
  for strategy in STRATEGIES[1:]:
    c = override(long_context.get_config("v5p"),
                 {"model.context_parallel": strategy, "model.n_layers": layers})
    try:
      r = aot.compile_train_step(c, topology)
    except Exception as e:  # noqa: BLE001 - a strategy that does not compile is a row
      rows.append(f"| {strategy} | failed: {type(e).__name__}: {str(e)[:120]} | | | | |")
      continue
    peak = r.temp_bytes + r.argument_bytes + r.output_bytes - r.alias_bytes
    rows.append(f"| {strategy} | {r.temp_bytes / 2**30:.2f} | {peak / 2**30:.2f} | "
                f"{r.hbm_bytes / 2**30:.0f} | {r.fits} | {r.compiler_flops / 1e12:.1f} |")
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--cpu_seq", type=int, default=8192)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--topology", default="v5p:4x4x2")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--out", default="")
  args = p.parse_args()
  from experiments.configs import long_context
  c = long_context.get_config("v5p")
  lines = ["## Context parallelism: compiled memory", "",
           *environment_lines(aot_topology=args.topology),
           f"- `python benchmarks/context_memory.py --cpu_seq={args.cpu_seq} "
           f"--topology={args.topology} --layers={args.layers}`", "",
           f"### CPU, 8 simulated devices on `sequence`: attention op, causal, 1 x {args.cpu_seq} "
           f"tokens, {args.heads} heads of {args.head_dim}, fp32", ""]
  lines += cpu_table(args.cpu_seq, args.heads, args.head_dim)
  m = c.model
  lines += ["", f"### {args.topology} (TPU compiler, AOT): train step of `long_context.py:v5p` "
            f"with {args.layers} layers (d_model {m.d_model}, {m.n_heads} heads of {m.head_dim}, "
            f"{m.n_kv_heads} kv heads, remat), batch {c.data.batch_size} x {c.data.seq_len} tokens",
            ""]
  lines += tpu_table(args.topology, args.layers)
  emit(lines, args.out)


if __name__ == "__main__":
  main()
