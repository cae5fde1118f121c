"""MoE layer forward+backward time against a dense SwiGLU FFN of equal active FLOPs.

  python benchmarks/moe.py [--experts=8,64] [--tokens=4096] [--d_model=256]
      [--d_ff=512] [--top_k=2] [--dtype=float32] [--impls=ragged_dot,pallas,...] [--out=FILE]

Every routed token meets ``top_k`` experts of width ``d_ff``; the dense baseline
is one SwiGLU of width ``top_k * d_ff``, so both do the same matmul FLOPs per
token (the MoE adds the router, the sort/unsort or the one-hot einsums). For each
expert count, the table gives the median time of ``jit(grad)`` over the layer
(router, experts, and the input) for every dispatch strategy and grouped-matmul
implementation, and its ratio to the dense FFN measured in the same run.

On CPU the Pallas kernels (``pallas``, ``megablox``) only run interpreted, which
says nothing about speed: they are left out unless ``--impls`` names them.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, environment_lines, median_time  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--experts", default="8,64")
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--d_ff", type=int, default=512)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--impls", default="")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--out", default="")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  from moe import dispatch, router
  platform = jax.default_backend()
  impls = (args.impls.split(",") if args.impls else
           ["ragged_dot"] if platform == "cpu" else ["ragged_dot", "pallas", "megablox"])
  dt = jnp.dtype(args.dtype)
  T, D, F, K = args.tokens, args.d_model, args.d_ff, args.top_k
  keys = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(keys[0], (1, T, D), dt)
  dense_w = [jax.random.normal(keys[1], (D, K * F), dt) / D ** 0.5,
             jax.random.normal(keys[2], (D, K * F), dt) / D ** 0.5,
             jax.random.normal(keys[3], (K * F, D), dt) / (K * F) ** 0.5]

  def dense(x, w):
    g, u, d = w
    return (jax.nn.silu(x @ g) * (x @ u)) @ d

  def grad_fn(layer):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(layer(x, w).astype(jnp.float32)), argnums=(0, 1)))

  dense_s = median_time(grad_fn(dense), x, dense_w, steps=args.steps, warmup=2)
  flops = 3 * 2 * T * D * K * F * 3  # 3 matmuls, forward + 2 backward products
  rows = [("dense SwiGLU (width k*F)", "-", dense_s)]
  for E in [int(e) for e in args.experts.split(",")]:
    w = dict(router=jax.random.normal(keys[4], (D, E), jnp.float32) / D ** 0.5,
             experts=dispatch.ExpertWeights(
                 jax.random.normal(keys[5], (E, D, F), dt) / D ** 0.5,
                 jax.random.normal(keys[6], (E, D, F), dt) / D ** 0.5,
                 jax.random.normal(keys[7], (E, F, D), dt) / F ** 0.5))
    variants = [("dropping", None)] + [("dropless", i) for i in impls]
    for strategy, impl in variants:
      def layer(x, w, strategy=strategy, impl=impl):
        r = router.route(x, w["router"], top_k=K)
        y, _ = dispatch.moe_ffn(x, r, w["experts"], strategy=strategy, dtype=dt, gmm_impl=impl,
                                capacity_factor=args.capacity_factor)
        return y
      try:
        s = median_time(grad_fn(layer), x, w, steps=args.steps, warmup=2)
      except Exception as e:  # noqa: BLE001 - a failing implementation is a table row
        print(f"E={E} {strategy} {impl}: failed: {type(e).__name__}: {str(e)[:200]}")
        s = float("nan")
      rows.append((f"E={E} top-{K} {strategy}", impl or "-", s))

  lines = [f"## MoE layer vs. dense FFN, forward+backward ({platform})", "",
           *environment_lines(),
           f"- tokens {T}, d_model {D}, expert d_ff {F}, top-{K}, dtype {args.dtype}, "
           f"dropping capacity factor {args.capacity_factor}; dense width {K * F} "
           f"(equal active matmul FLOPs: {flops / 1e9:.2f} GFLOP per call); medians of {args.steps}",
           "", "| layer | grouped matmul | ms | / dense |", "| --- | --- | ---: | ---: |"]
  for name, impl, s in rows:
    lines.append(f"| {name} | {impl} | {1e3 * s:.2f} | {s / dense_s:.2f} |")
  emit(lines, args.out)


if __name__ == "__main__":
  main()
