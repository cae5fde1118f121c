"""Dense and block-sparse attention, forward+backward, across sequence lengths and
densities, side by side in one run.

  python benchmarks/attention.py [--lengths=1024,2048,4096,8192,16384]
      [--densities=0.5,0.25,0.1] [--heads=4] [--kv_heads=2] [--head_dim=64]
      [--block=128] [--dtype=float32] [--steps=3] [--out=FILE]

For each length, the median time of ``jit(grad)`` of a sum of the attention output
with respect to q, k, v on [1, T, N, H] inputs (no projections), causal:
- dense: the XLA reference (``xla``), ``jax.nn.dot_product_attention`` (cuDNN on
  GPU), splash attention (TPU), our Pallas kernel with its static causal block mask
  (``pallas`` on TPU, ``pallas_gpu`` on GPU), and our XLA gather path at density 1;
- block-sparse at each density: the same block mask (per row the diagonal block
  plus random causally valid blocks, to the density of the causal triangle that
  ``attention.sparse.block_density`` reports) through ``xla`` (masked dense
  compute: no saving), ``gather`` (ours, XLA, computes the kept blocks only) and
  our kernels where the platform runs them.
``gather`` pads each row to the longest kept row (at density 1: the full square).
Ratios: each time over the XLA dense reference at that length, and each sparse
time over our dense time with the same implementation (the issue's GPU target:
sparse <= (density + 0.05) x our dense). Mask prediction is not timed here.
Kernels that the platform cannot run (interpreted off their hardware) are skipped.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, environment_lines, median_time  # noqa: E402


def random_block_mask(key, B, K, Q, density):
  """bool [B, K, Q, Q]: per row the diagonal block plus random earlier blocks, so
  that each row keeps round(density x its valid blocks) (at least the diagonal)."""
  import jax
  import jax.numpy as jnp
  i = jnp.arange(Q)[:, None]
  j = jnp.arange(Q)[None, :]
  valid = j <= i
  want = jnp.maximum(jnp.round(density * (i + 1)), 1)  # [Q, 1]
  noise = jax.random.uniform(key, (B, K, Q, Q))
  score = jnp.where(j == i, 2.0, jnp.where(valid, noise, -1.0))  # diagonal first
  rank = jnp.argsort(jnp.argsort(-score, axis=-1), axis=-1)
  return (rank < want) & valid


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  p.add_argument("--densities", default="0.5,0.25,0.1")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--block", type=int, default=128)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dense_max_len", type=int, default=8192,
                 help="skip the masked-dense paths (xla, jax.nn) above this length")
  p.add_argument("--aot", default="",
                 help="a TPU topology (e.g. v5e:2x2): instead of timing here, compile each "
                 "implementation for one chip of it and report its temporary memory")
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.aot:
    return aot_table(args)
  import jax
  import jax.numpy as jnp
  from attention import ops, sparse
  from attention.spec import AttentionSpec, BlockSparse

  platform = jax.default_backend()
  dt = jnp.dtype(args.dtype)
  N, K, H, b = args.heads, args.kv_heads, args.head_dim, args.block
  ours = {"tpu": "pallas", "gpu": "pallas_gpu"}.get(platform)
  dense_impls = ["xla", "jax_nn"] + (["splash"] if platform == "tpu" else []) + \
      ([ours] if ours else []) + ["gather"]
  sparse_impls = ["xla", "gather"] + ([ours] if ours else [])
  densities = [float(d) for d in args.densities.split(",")]
  lengths = [int(t) for t in args.lengths.split(",")]
  rows = []  # (T, label, impl, density, ms)

  def timed(f, *a):
    try:
      return median_time(jax.jit(f), *a, steps=args.steps)
    except Exception as e:  # noqa: BLE001 - out of memory or unsupported is a table cell
      print(f"  failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
      return float("nan")

  for T in lengths:
    keys = jax.random.split(jax.random.key(T), 4)
    q = jax.random.normal(keys[0], (1, T, N, H), dt)
    k, v = (jax.random.normal(kk, (1, T, K, H), dt) for kk in keys[1:3])
    Q = T // b
    for impl in dense_impls:
      if impl in ("xla", "jax_nn") and T > args.dense_max_len:
        continue
      if impl == "gather":
        spec = AttentionSpec(block_sparse=BlockSparse(b, b))
        mask = random_block_mask(keys[3], 1, K, Q, 1.0)
        f = jax.grad(lambda q, k, v, m: jnp.sum(ops.attend(q, k, v, spec, block_mask=m,
                                                           implementation="gather")),
                     argnums=(0, 1, 2))
        ms = timed(f, q, k, v, mask) * 1e3
      else:
        f = jax.grad(lambda q, k, v, impl=impl: jnp.sum(ops.attend(
            q, k, v, AttentionSpec(), implementation=impl)), argnums=(0, 1, 2))
        ms = timed(f, q, k, v) * 1e3
      rows.append((T, "dense", impl, 1.0, ms))
      print(f"T={T} dense {impl}: {ms:.1f} ms", flush=True)
    for d in densities:
      mask = random_block_mask(jax.random.fold_in(keys[3], int(d * 1000)), 1, K, Q, d)
      M = int(jnp.max(jnp.sum(mask, -1)))
      spec = AttentionSpec(block_sparse=BlockSparse(b, b, max_blocks=M))
      measured = float(sparse.block_density(mask, spec))
      for impl in sparse_impls:
        if impl == "xla" and T > args.dense_max_len:
          continue
        f = jax.grad(lambda q, k, v, m, impl=impl: jnp.sum(ops.attend(
            q, k, v, spec, block_mask=m, implementation=impl)), argnums=(0, 1, 2))
        ms = timed(f, q, k, v, mask) * 1e3
        rows.append((T, f"sparse {d:g}", impl, measured, ms))
        print(f"T={T} sparse {d:g} (measured {measured:.3f}, max {M}/{Q} blocks) {impl}: "
              f"{ms:.1f} ms", flush=True)

  base = {T: ms for T, label, impl, _, ms in rows if label == "dense" and impl == "xla"}
  own_dense = {(T, impl): ms for T, label, impl, _, ms in rows if label == "dense"}
  lines = [f"## Block-sparse attention, forward+backward ({platform})", "",
           *environment_lines(),
           f"- inputs [1, T, {N} heads ({K} kv heads), {H}], {args.dtype}, causal, blocks {b}; "
           f"medians of {args.steps} after one warm-up call; masks: diagonal + random valid "
           "blocks; density = kept share of the causal triangle", "",
           "| T | mask | impl | density | ms | / dense xla | / own dense | target (d + 0.05) |",
           "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for T, label, impl, d, ms in rows:
    rel = ms / base[T] if T in base else float("nan")
    own = own_dense.get((T, impl))
    own_rel = f"{ms / own:.3f}" if own and label != "dense" else ""
    target = f"{d + 0.05:.2f}" if label != "dense" else ""
    lines.append(f"| {T} | {label} | {impl} | {d:.3f} | {ms:.1f} | {rel:.3f} | {own_rel} | {target} |")
  emit(lines, args.out)


def aot_table(args):
  """Compiles fwd+bwd for one TPU chip (jax[tpu]'s compiler on this host) and reports
  each implementation's temporary (activation) memory: what materialising the T x T
  matrix costs, and what the flash kernels save. Nothing runs."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from attention import ops
  from attention.spec import AttentionSpec, BlockSparse
  from core import platform
  from lm.aot import topology_devices
  dev = topology_devices(args.aot)[0]
  sh = NamedSharding(Mesh(np.array([dev]), ("d",)), P())
  dt = jnp.dtype(args.dtype)
  N, K, H, b = args.heads, args.kv_heads, args.head_dim, args.block
  lines = [f"## Attention fwd+bwd compiled for one {args.aot} chip (AOT, nothing run)", "",
           *environment_lines(aot_topology=args.aot),
           f"- inputs [1, T, {N} heads ({K} kv), {H}], {args.dtype}, causal, blocks {b}; temp = "
           "the compiler's temporary HBM bytes (activations; what fits in VMEM is not counted)",
           "",
           "| T | impl | mask | temp MiB |", "| ---: | --- | --- | ---: |"]
  for T in [int(t) for t in args.lengths.split(",")]:
    q = jax.ShapeDtypeStruct((1, T, N, H), dt, sharding=sh)
    kv = jax.ShapeDtypeStruct((1, T, K, H), dt, sharding=sh)
    m = jax.ShapeDtypeStruct((1, K, T // b, T // b), jnp.bool_, sharding=sh)
    cases = [("xla", "dense", AttentionSpec(), False), ("splash", "dense", AttentionSpec(), False),
             ("pallas", "dense", AttentionSpec(), False),
             ("xla", "block mask", AttentionSpec(block_sparse=BlockSparse(b, b)), True),
             ("pallas", "block mask", AttentionSpec(block_sparse=BlockSparse(b, b)), True)]
    for impl, label, spec, masked in cases:
      def loss(q, k, v, *mask, impl=impl, spec=spec):
        return jnp.sum(ops.attend(q, k, v, spec, block_mask=mask[0] if mask else None,
                                  implementation=impl).astype(jnp.float32))
      f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      try:
        with platform.target("tpu"):
          c = f.lower(q, kv, kv, *([m] if masked else [])).compile()
        mib = f"{c.memory_analysis().temp_size_in_bytes / 2**20:.1f}"
      except Exception as e:  # noqa: BLE001 - a table cell
        mib = f"failed: {type(e).__name__}"
      lines.append(f"| {T} | {impl} | {label} | {mib} |")
      print(lines[-1], flush=True)
  emit(lines, args.out)


if __name__ == "__main__":
  main()
