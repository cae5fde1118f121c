"""Ring vs. zigzag attention FLOPs per device, read from compiled programs (no run).

  JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/context_flops.py \
      [--seq=32768] [--topology=v5p:4x4x2] [--out=FILE]

The causal attention op (``attention.context.context_attend``, forward + backward)
with every device on the ``sequence`` axis: 8 simulated CPU devices, then the chips of
``--topology`` (libtpu's compiler on this host; '' to skip).

XLA's cost analysis counts a while loop's body once and a ``lax.switch`` as its
largest branch. The ring's steps are a scan, so each program is compiled twice: as is
(one step counted) and with the scan unrolled (every step counted: the busiest
device's FLOPs per step, summed). The live sub-blocks per device
(``context.ring_blocks``: the plans the program switches over) give each device's own
attention matmuls: 7 per sub-block (forward: scores, p @ v; backward: scores again,
dv, dp, dq, dk), 2 * B * N * c^2 * H FLOPs each for sub-blocks of c tokens.
"""
import argparse
import functools
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, environment_lines  # noqa: E402
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

MIB = 2 ** 20


def flops_table(devices, seq: int, heads: int, kv_heads: int, head_dim: int) -> list[str]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from attention import context
  from attention.spec import AttentionSpec
  from lm import sharding
  C = len(devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("sequence",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  spec = AttentionSpec(causal=True)
  q = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.float32,
                           sharding=NamedSharding(mesh, P(None, "sequence")))
  kv = jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), jnp.float32, sharding=q.sharding)
  rows = ["| strategy | compiled GFLOPs / device, loop once | compiled, every step | "
          "live sub-blocks / device (min-max) | attention matmul GFLOPs / device (min-max) | "
          "temp MiB / device |", "| --- | ---: | ---: | --- | --- | ---: |"]
  scan = jax.lax.scan
  for strategy in ("ring", "zigzag"):
    loss = lambda q, k, v, s=strategy: jnp.sum(context.context_attend(q, k, v, spec,
                                                                      strategy=s) ** 2)
    flops = []
    for unroll in (False, True):  # the scans of context.py (the ring steps), unrolled
      grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))  # a new jit: traced afresh
      with sharding.placed(mesh), mock.patch.object(
          jax.lax, "scan", functools.partial(scan, unroll=True) if unroll else scan):
        compiled = grad.lower(q, kv, kv).compile()
      cost = compiled.cost_analysis()
      flops.append((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] / 1e9)
      if not unroll:
        temp = compiled.memory_analysis().temp_size_in_bytes / MIB
    zigzag = strategy == "zigzag"
    blocks = context.ring_blocks(spec, C, seq, zigzag)
    c = seq // C // (2 if zigzag else 1)
    live = 7 * 2 * heads * c * c * head_dim * blocks / 1e9
    rows.append(f"| {strategy} | {flops[0]:.2f} | {flops[1]:.2f} | {blocks.min()}-{blocks.max()} "
                f"of {c}^2 | {live.min():.2f}-{live.max():.2f} | {temp:.1f} |")
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seq", type=int, default=32768)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--topology", default="v5p:4x4x2", help="'' for CPU only")
  p.add_argument("--out", default="")
  args = p.parse_args()
  import jax
  lines = ["## Context parallelism: ring vs. zigzag FLOPs per device", "",
           *environment_lines(aot_topology=args.topology),
           f"- `python benchmarks/context_flops.py --seq={args.seq} --heads={args.heads} "
           f"--kv_heads={args.kv_heads} --head_dim={args.head_dim} --topology={args.topology}`"]
  shape = (f"causal, 1 x {args.seq} tokens, {args.heads} heads of {args.head_dim}, "
           f"{args.kv_heads} kv heads, fp32, forward + backward")
  lines += ["", f"### CPU, {jax.device_count()} simulated devices on `sequence`: {shape}", ""]
  lines += flops_table(jax.devices(), args.seq, args.heads, args.kv_heads, args.head_dim)
  if args.topology:
    from lm import aot
    devices = aot.topology_devices(args.topology)
    lines += ["", f"### {args.topology} (TPU compiler, AOT), {len(devices)} chips on "
              f"`sequence`: {shape}", ""]
    lines += flops_table(devices, args.seq, args.heads, args.kv_heads, args.head_dim)
  emit(lines, args.out)


if __name__ == "__main__":
  main()
