"""TPU compile time and memory against depth, layers unrolled vs scanned (model.scan_layers).

  python benchmarks/compile_time.py [--config=125m-v5e8] [--layers=6,24,48,96]
      [--remat=full] [--out=benchmarks/results/compile_time.md]
  python benchmarks/compile_time.py --toy   # why scan needs a remat policy

Each row builds the pod config with ``model.n_layers`` set, lowers its full train step
and compiles it for the config's TPU topology on this host (lm/aot.py), once with the
blocks unrolled and once scanned. Lowering (tracing to StableHLO) and compiling are
timed apart; peak is the compiler's per-device memory (nan: the compiler ran out of
HBM, and the time is until it said so). The compiler's FLOP count is
not shown: XLA's cost analysis counts a scanned loop's body once, not per iteration.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment_lines  # noqa: E402


def measure(config, topology: str) -> dict:
  from lm import aot
  devices = aot.topology_devices(topology)
  t0 = time.perf_counter()
  exp, lowered = aot.lower_train_step(config, devices)
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - the compiler's out-of-HBM error: timed anyway
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "peak_gib": float("nan"),
            "temp_gib": float("nan")}
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "peak_gib": peak / 2**30,
          "temp_gib": mem.temp_size_in_bytes / 2**30}


def toy() -> None:
  """Why a scan needs a remat policy: a 6-layer MLP's gradient on one v5e chip,
  unrolled vs scanned, per policy (temp MiB from the TPU compiler)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from lm import aot
  rep = NamedSharding(Mesh(np.array(aot.topology_devices("v5e:2x2")[:1]), ("d",)), P())
  G, B, T, D, F = 6, 8, 1024, 768, 3072

  def layer(x, w):
    return x + jax.nn.silu(x @ w[0].astype(jnp.bfloat16)) @ w[1].astype(jnp.bfloat16)

  def loss(policy, scan):
    lay = layer if policy is None else jax.checkpoint(layer, policy=policy)
    def f(ws, x):
      if scan:
        x, _ = jax.lax.scan(lambda x, w: (lay(x, w), None), x, ws)
      else:
        for i in range(G):
          x = lay(x, (ws[0][i], ws[1][i]))
      return jnp.sum(x.astype(jnp.float32))
    return f

  ws = (jax.ShapeDtypeStruct((G, D, F), jnp.float32, sharding=rep),
        jax.ShapeDtypeStruct((G, F, D), jnp.float32, sharding=rep))
  x = jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16, sharding=rep)
  pol = jax.checkpoint_policies
  print("| policy | unrolled MiB | scanned MiB |\n| --- | ---: | ---: |")
  for name, policy in (("none", None), ("everything", pol.everything_saveable),
                       ("dots", pol.dots_saveable), ("full", pol.nothing_saveable)):
    mib = [jax.jit(jax.grad(loss(policy, scan))).lower(ws, x).compile().memory_analysis()
           .temp_size_in_bytes / 2**20 for scan in (False, True)]
    print(f"| {name} | {mib[0]:.0f} | {mib[1]:.0f} |", flush=True)


def main():
  if "--toy" in sys.argv:
    return toy()
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="125m-v5e8", help="a pod.py config name")
  p.add_argument("--layers", default="6,24,48,96")
  p.add_argument("--modes", default="unrolled,scanned")
  p.add_argument("--remat", default="", help="model.remat for every row (default: the "
                 "config's own)")
  p.add_argument("--set", default="", help="more overrides: a.b=v,c.d=w (e.g. "
                 "mesh.data=1,mesh.fsdp=8 so deep models' weights fit)")
  p.add_argument("--out", default="")
  args = p.parse_args()
  import ast
  from experiments.configs import override, pod
  extra = {}
  for item in filter(None, args.set.split(",")):
    key, _, value = item.partition("=")
    try:
      extra[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      extra[key] = value
  topology = pod.PODS[args.config][2]
  remat = args.remat or pod.get_config(args.config).model.remat
  lines = [f"## Compile time vs depth: {args.config} on {topology}, remat {remat}", "",
           *environment_lines(aot_topology=topology), "",
           f"`python benchmarks/compile_time.py --config={args.config} --layers={args.layers}"
           f"{' --remat=' + args.remat if args.remat else ''}"
           f"{' --set=' + args.set if args.set else ''}`. "
           "Per device; lower = tracing to StableHLO, compile = the TPU compiler.", "",
           "| layers | layout | lower s | compile s | total s | temp GiB | peak GiB |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
  print("\n".join(lines), flush=True)
  totals = {}
  for n in (int(x) for x in args.layers.split(",")):
    for mode in args.modes.split(","):
      fields = {"model.n_layers": n, "model.scan_layers": mode == "scanned", **extra}
      c = override(pod.get_config(args.config),
                   fields | ({"model.remat": args.remat} if args.remat else {}))
      r = measure(c, topology)
      totals[(mode, n)] = r["lower_s"] + r["compile_s"]
      row = (f"| {n} | {mode} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
             f"{totals[(mode, n)]:.1f} | {r['temp_gib']:.2f} | {r['peak_gib']:.2f} |")
      lines.append(row)
      print(row, flush=True)
  depths = sorted({n for _, n in totals})
  for mode in args.modes.split(","):
    if (mode, depths[0]) in totals and (mode, depths[-1]) in totals:
      ratio = totals[(mode, depths[-1])] / totals[(mode, depths[0])]
      line = f"- {mode}: {depths[-1]} layers take {ratio:.2f}x the time of {depths[0]}"
      lines.append(line)
      print(line, flush=True)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
  main()
