"""TPU compile time and memory against depth, layers unrolled vs scanned (model.scan_layers).

  python benchmarks/compile_time.py [--config=125m-v5e8] [--layers=6,24,48,96]
      [--out=benchmarks/results/compile_time.md]

Each row builds the pod config with ``model.n_layers`` set, lowers its full train step
and compiles it for the config's TPU topology on this host (lm/aot.py), once with the
blocks unrolled and once scanned. Lowering (tracing to StableHLO) and compiling are
timed apart; peak is the compiler's per-device memory. The compiler's FLOP count is
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
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "peak_gib": peak / 2**30,
          "temp_gib": mem.temp_size_in_bytes / 2**30}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="125m-v5e8", help="a pod.py config name")
  p.add_argument("--layers", default="6,24,48,96")
  p.add_argument("--modes", default="unrolled,scanned")
  p.add_argument("--out", default="")
  args = p.parse_args()
  from experiments.configs import override, pod
  topology = pod.PODS[args.config][2]
  lines = [f"## Compile time vs depth: {args.config} on {topology}", "",
           *environment_lines(aot_topology=topology), "",
           f"`python benchmarks/compile_time.py --config={args.config} --layers={args.layers}`. "
           "Per device; lower = tracing to StableHLO, compile = the TPU compiler.", "",
           "| layers | layout | lower s | compile s | total s | temp GiB | peak GiB |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
  print("\n".join(lines), flush=True)
  totals = {}
  for n in (int(x) for x in args.layers.split(",")):
    for mode in args.modes.split(","):
      c = override(pod.get_config(args.config),
                   {"model.n_layers": n, "model.scan_layers": mode == "scanned"})
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
