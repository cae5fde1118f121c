"""Linear attention (chunked SSD / 2Mamba) vs. softmax attention, forward+backward,
across sequence lengths, side by side in one run.

  python benchmarks/linear_attention.py [--lengths=1024,2048,4096,8192,16384]
      [--heads=4] [--head_dim=64] [--chunk=64] [--dtype=float32] [--out=FILE]

For each length: the median time of ``jit(grad)`` of the core ops on [1, T, N, H]
inputs (no projections): softmax attention (the XLA reference, and
``jax.nn.dot_product_attention``), and ``attention.linear.linear_attend`` chunked
for ``ssd`` and ``2mamba``. Ratios: each op's time over its own time at the first
length (the issue's target: SSD time(16k) / time(1k) <= 18, where softmax grows
quadratically), and SSD over softmax at the same length.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, environment_lines, median_time  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--out", default="")
  args = p.parse_args()
  import jax
  import jax.numpy as jnp
  from attention.linear import linear_attend
  from attention.reference import attend_reference
  from attention.spec import AttentionSpec
  dt = jnp.dtype(args.dtype)
  N, H = args.heads, args.head_dim
  ops = {
      "softmax (xla)": lambda q, k, v, a: attend_reference(q, k, v, AttentionSpec(causal=True)),
      "softmax (jax.nn)": lambda q, k, v, a: jax.nn.dot_product_attention(q, k, v, is_causal=True),
      "ssd (chunked)": lambda q, k, v, a: linear_attend(q, k, v, a, variant="ssd",
                                                        chunk_size=args.chunk),
      "2mamba (chunked)": lambda q, k, v, a: linear_attend(q, k, v, a, variant="2mamba",
                                                           chunk_size=args.chunk),
  }
  lengths = [int(t) for t in args.lengths.split(",")]
  times = {name: {} for name in ops}
  for T in lengths:
    keys = jax.random.split(jax.random.key(T), 4)
    q, k, v = (jax.random.normal(kk, (1, T, N, H), dt) / H ** 0.25 for kk in keys[:3])
    a = -jax.nn.softplus(jax.random.normal(keys[3], (1, T, N), jnp.float32))
    for name, op in ops.items():
      f = jax.jit(jax.grad(lambda q, k, v, a, op=op: jnp.sum(op(q, k, v, a).astype(jnp.float32)),
                           argnums=(0, 1, 2)))
      try:
        times[name][T] = median_time(f, q, k, v, a, steps=args.steps)
      except Exception as e:  # noqa: BLE001 - out of memory at long lengths is a table cell
        print(f"{name} T={T}: {type(e).__name__}: {str(e)[:160]}")
        times[name][T] = float("nan")
      print(f"{name} T={T}: {times[name][T] * 1e3:.1f} ms", flush=True)
  first = lengths[0]
  lines = [f"## Linear vs. softmax attention, forward+backward ({jax.default_backend()})", "",
           *environment_lines(),
           f"- inputs [1, T, {N} heads, {H}], {args.dtype}, causal; chunk {args.chunk}; "
           f"medians of {args.steps} after one warm-up call", "",
           "| T | " + " | ".join(f"{n} ms" for n in ops) + " | " +
           " | ".join(f"{n} / own T={first}" for n in ops) + " | ssd / softmax (xla) |",
           "| ---: |" + " ---: |" * (2 * len(ops) + 1)]
  for T in lengths:
    cells = [f"{times[n][T] * 1e3:.1f}" for n in ops]
    cells += [f"{times[n][T] / times[n][first]:.1f}" for n in ops]
    cells.append(f"{times['ssd (chunked)'][T] / times['softmax (xla)'][T]:.4f}")
    lines.append(f"| {T} | " + " | ".join(cells) + " |")
  emit(lines, args.out)


if __name__ == "__main__":
  main()
