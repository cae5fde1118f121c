"""Memory per device of Ulysses vs. headwise (UPipe) vs. ring, from the TPU compiler.

  python benchmarks/context_memory.py [--topology=v5p:2x2x2] [--seqs=262144,1048576]
      [--search] [--out=FILE]

One attention layer (``attention.layer.Attention``: projections, RoPE, causal
attention, output projection) forward + backward (``jax.vjp``: its output and the
gradients of x and of the four weights) on a TPU topology, compiled by libtpu on
this host and read with ``compiled.memory_analysis()``; nothing runs. The sequence
is sharded over all devices (``sequence``), batch 1, bf16 compute, fp32 weights
(replicated: 0.6 GiB, and their fp32 gradients as outputs). Ulysses and headwise
attend with ``--implementation`` (default ``flash``: ``attention.flash``, blockwise in
XLA, O(T) memory, its output and LSE saved for the backward as splash saves them);
ring with its own blocks. (Splash itself is not usable here: its mask tables are
built on the host in O(T^2) numpy time, 100 s at 128K tokens, hours at millions.)

``temp`` is the compiler's temporaries per device; ``peak`` adds arguments, outputs
not aliased to them and generated code. ``--search`` finds the longest sequence
whose peak fits the chip's HBM: memory is affine in T for Ulysses and headwise and
quadratic for ring (its score blocks are [N, T/C, T/C]), so it fits that model
through the table's points, then compiles around the predicted limit (a step of
``--step`` tokens) to bracket it: a fit is a compile whose peak is within HBM.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, environment_lines  # noqa: E402
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

STRATEGIES = ("ulysses", "headwise", "ring")
GIB = 2 ** 30


def compile_layer(strategy: str, T: int, topology: str, d_model: int, heads: int,
                  kv_heads: int, head_dim: int, implementation: str,
                  heads_per_stage: int = 1) -> dict:
  """Compiles one layer's forward + backward; per-device bytes and compile seconds."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from attention.layer import Attention
  from lm import aot, sharding
  devices = aot.topology_devices(topology)
  mesh = jax.make_mesh((len(devices),), ("sequence",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  layer = nnx.eval_shape(lambda: Attention(
      d_model, heads, kv_heads, head_dim, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
      param_dtype=jnp.float32, context_parallel=strategy, heads_per_stage=heads_per_stage,
      implementation=implementation))
  graph, params = nnx.split(layer)
  put = lambda s, spec: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec))
  params = jax.tree.map(lambda s: put(s, P()), params)
  x = put(jax.ShapeDtypeStruct((1, T, d_model), jnp.bfloat16), P(None, "sequence"))
  pos = put(jax.ShapeDtypeStruct((1, T), jnp.int32), P(None, "sequence"))

  def step(params, x, pos, ct):
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graph, p)(x, pos), params, x)
    return y, vjp(ct)

  t0, c0 = time.time(), time.process_time()
  with sharding.placed(mesh):
    compiled = jax.jit(step).lower(params, x, pos, x).compile()
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  gen, chips = aot.parse_topology(topology)
  return dict(temp=m.temp_size_in_bytes, peak=peak,
              hbm=aot.HBM_GIB_PER_CHIP[gen] * GIB, wall=time.time() - t0,
              cpu=time.process_time() - c0)


def _try(strategy, T, args) -> dict:
  try:
    return compile_layer(strategy, T, args.topology, args.d_model, args.heads,
                         args.kv_heads, args.head_dim, args.implementation)
  except Exception as e:  # noqa: BLE001 - a compile that fails (out of memory) is a row
    return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")


def _fit_limit(points: dict, degree: int, hbm: float) -> float:
  """T where the polynomial (affine or quadratic) through (T, peak) points meets HBM."""
  import numpy as np
  Ts = sorted(points)
  coef = np.polyfit(Ts, [points[t] for t in Ts], min(degree, len(Ts) - 1))
  coef[-1] -= hbm
  roots = [r.real for r in np.roots(coef) if abs(r.imag) < 1e-9 and r.real > 0]
  return min(roots) if roots else float("nan")


def search(strategy, points: dict, args, log) -> tuple[int, int]:
  """(longest T that fits, shortest T seen not to), on a grid of ``args.step``."""
  hbm = None
  fits, fails = 0, None
  for T, r in points.items():
    if "error" in r or r["peak"] > r["hbm"]:
      fails = T if fails is None else min(fails, T)
    else:
      fits, hbm = max(fits, T), r["hbm"]
  ok = {T: r["peak"] for T, r in points.items() if "error" not in r}
  guess = _fit_limit(ok, 2 if strategy == "ring" else 1, hbm or 95 * GIB)
  step = args.step if strategy != "ring" else args.step // 16
  T = int(guess // step) * step
  for _ in range(args.probes):
    if T <= fits or (fails is not None and T >= fails):
      break
    r = _try(strategy, T, args)
    log(strategy, T, r)
    if "error" in r or r["peak"] > r["hbm"]:
      fails, T = T, T - step
    else:
      fits, T = T, T + step
  return fits, fails


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--topology", default="v5p:2x2x2")
  p.add_argument("--d_model", type=int, default=8192)
  p.add_argument("--heads", type=int, default=64)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--seqs", default="262144,1048576")
  p.add_argument("--ring_seqs", default="32768,49152,65536")
  p.add_argument("--implementation", default="flash")
  p.add_argument("--search", action="store_true")
  p.add_argument("--step", type=int, default=262144)
  p.add_argument("--probes", type=int, default=2)
  p.add_argument("--out", default="")
  args = p.parse_args()
  rows, cpu = {}, [0.0]

  def log(strategy, T, r):
    cpu[0] += r.get("cpu", 0.0)
    rows[(strategy, T)] = r
    print(strategy, T, {k: (f"{v / GIB:.2f}" if k in ("temp", "peak") else v)
                        for k, v in r.items()}, flush=True, file=sys.stderr)

  for strategy in STRATEGIES:
    for T in map(int, (args.ring_seqs if strategy == "ring" else args.seqs).split(",")):
      log(strategy, T, _try(strategy, T, args))
  limits = {}
  if args.search:
    for strategy in STRATEGIES:
      points = {T: r for (s, T), r in rows.items() if s == strategy}
      limits[strategy] = search(strategy, points, args, log)

  lines = ["## Context parallelism: memory per device from the TPU compiler", "",
           *environment_lines(aot_topology=args.topology),
           f"- `python benchmarks/context_memory.py --topology={args.topology} "
           f"--seqs={args.seqs} --ring_seqs={args.ring_seqs}"
           f"{' --search' if args.search else ''}`; compiles took {cpu[0] / 60:.1f} CPU "
           "minutes", "",
           f"One attention layer, forward + backward, d_model {args.d_model}, {args.heads} "
           f"query / {args.kv_heads} kv heads of {args.head_dim}, causal, batch 1, bf16 "
           f"compute, fp32 weights; the sequence over the {args.topology} devices.", "",
           "| strategy | tokens | temp GiB / device | peak GiB / device | fits |",
           "| --- | ---: | ---: | ---: | --- |"]
  for (strategy, T), r in sorted(rows.items(), key=lambda kv: (STRATEGIES.index(kv[0][0]),
                                                                kv[0][1])):
    if "error" in r:
      lines.append(f"| {strategy} | {T:,} | failed: {r['error']} | | no |")
    else:
      lines.append(f"| {strategy} | {T:,} | {r['temp'] / GIB:.2f} | {r['peak'] / GIB:.2f} | "
                   f"{'yes' if r['peak'] <= r['hbm'] else 'no'} |")
  slopes = {}
  for strategy in ("ulysses", "headwise"):
    pts = sorted((T, r["temp"]) for (s, T), r in rows.items() if s == strategy and "error" not in r)
    if len(pts) >= 2:   # temp per token of the sequence, between the two longest compiles
      (t0, b0), (t1, b1) = pts[-2], pts[-1]
      slopes[strategy] = (b1 - b0) / (t1 - t0)
  if len(slopes) == 2:
    u, h = slopes["ulysses"], slopes["headwise"]
    lines += ["", f"Temp per token (slope between the two longest compiles): ulysses "
              f"{u / 1024:.1f} KiB, headwise {h / 1024:.1f} KiB per token of the sequence "
              f"(per device): headwise {100 * (1 - h / u):.1f}% less."]
  if limits:
    lines += ["", "| strategy | longest fitting sequence | first seen not to fit |",
              "| --- | ---: | ---: |"]
    for strategy, (fits, fails) in limits.items():
      lines.append(f"| {strategy} | {fits:,} | {'-' if fails is None else f'{fails:,}'} |")
  emit(lines, args.out)


if __name__ == "__main__":
  main()
