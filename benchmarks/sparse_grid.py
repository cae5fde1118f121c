"""Grid steps and compiled cost of the TPU block-sparse kernel (visit lists over the kept
blocks), AOT for one v5e chip from this host.

  JAX_PLATFORMS=cpu python benchmarks/sparse_grid.py [--densities=0.1,0.25,1]

Per mask density: the kept block pairs, the grid a dense-bounded kernel would walk
(B x N x Q x C steps, skipped ones included), and the visit-list grid the kernel
walks now (B x N x the longest visit list; dk/dv: B x K x G x the longest transposed
list). Then the compiled FLOPs / bytes / temporary memory of the forward and of
forward + backward (the kernels' own cost estimates; one compile serves every mask).
benchmarks/results/attention.md holds the table recorded with the dense-bounded
kernel it replaced.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment_lines  # noqa: E402


def mask_of(density: float, B: int, K: int, Q: int, valid, seed: int = 0):
  """The diagonal + the first block + random valid blocks: ``density`` of the causal
  triangle kept."""
  import numpy as np
  rng = np.random.default_rng(seed)
  forced = np.eye(Q, dtype=bool) | (np.arange(Q) == 0)[None, :]
  rate = max(0.0, (density * valid.sum() - forced.sum()) / (valid.sum() - forced.sum()))
  m = (rng.random((B, K, Q, Q)) < rate) & valid
  return m | forced


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--densities", default="0.1,0.25,1")
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--out", default="")
  args = p.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from attention import masks
  from attention.kernels import block_sparse_tpu as kernel
  from lm import aot
  B, N, K, H, b, T = 1, 8, 2, 128, 128, args.seq
  Q, G = T // b, N // K
  valid = masks.valid_blocks(True, 0, T, T, b, b)
  lines = ["## Block-sparse TPU kernel: grid steps and compiled cost (AOT, nothing run)", "",
           *environment_lines(aot_topology="v5e:2x2"), "",
           f"q [{B}, {T}, {N}, {H}], k, v [{B}, {T}, {K}, {H}], bf16, causal, {b} x {b} blocks.",
           "", "| density | kept pairs | dense-bounded grid | visit-list grid (fwd, dq) | "
           "visit-list grid (dk/dv) | ratio |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
  for d in (float(x) for x in args.densities.split(",")):
    m = jnp.asarray(mask_of(d, B, K, Q, valid))
    nvis, _ = kernel.visit_lists(m, valid)
    tnvis, _ = kernel.visit_lists(jnp.swapaxes(m, -1, -2), valid.T)
    dense = B * N * Q * Q
    fwd, dkv = B * N * int(nvis.max()), B * K * G * int(tnvis.max())
    kept = int(np.asarray(m & valid).sum()) * G
    lines.append(f"| {kept / (B * N * valid.sum()):.3f} | {kept} | {dense} | {fwd} | {dkv} | "
                 f"{fwd / dense:.3f} |")
    print(lines[-1], flush=True)
  devices = aot.topology_devices("v5e:2x2")
  rep = NamedSharding(Mesh(np.array(devices[:1]), ("d",)), P())
  shapes = [((B, T, N, H), jnp.bfloat16), ((B, T, K, H), jnp.bfloat16),
            ((B, T, K, H), jnp.bfloat16), ((B, K, Q, Q), jnp.bool_)]
  abstract = [jax.ShapeDtypeStruct(s, t, sharding=rep) for s, t in shapes]
  fwd = lambda q, k, v, m: kernel.block_sparse_attention(q, k, v, m, block_q=b, block_k=b,
                                                          causal=True)
  loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32))
  lines += ["", "| program | FLOPs | bytes | temp MiB | compile s |", "| --- | ---: | ---: | ---: | ---: |"]
  for name, f in (("forward", fwd), ("forward + backward", jax.grad(loss, argnums=(0, 1, 2)))):
    t = time.perf_counter()
    compiled = jax.jit(f).lower(*abstract).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    lines.append(f"| {name} | {cost['flops']:.3e} | {cost['bytes accessed'] / 1e9:.3f} GB | "
                 f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f} | "
                 f"{time.perf_counter() - t:.1f} |")
    print(lines[-1], flush=True)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
  main()
