"""Per-device memory and FLOPs of the pod configs, from real TPU compiles on this host.

  python benchmarks/compile_memory.py [--out=benchmarks/results/compile_memory.md]

Each row lowers and compiles the full train step (lm/aot.py) for a topology and
prints parameter / optimizer / temporary memory per device against HBM, and the
compiler's FLOPs per step beside the model count (lm/flops.py: every matmul, causal
attention counted by half, MoE by its active experts; recorded tables before 2026-11-29
used 6N + full-square attention).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment_lines  # noqa: E402

# (config, topology, slices, overrides)
CASES = [
    ("125m-v5e8", "v5e:2x4", 1, {}),
    ("125m-v5e8", "v6e:2x4", 1, {}),
    ("1b-v5p64", "v5p:4x4x2", 1, {}),
    ("1b-v5p64", "tpu7x:4x4x2", 1, {"mesh.data": 4}),
    ("1b-v5p64", "v5p:4x4x2", 2, {"mesh.dcn": 2}),
    ("1b-v5e256", "v5e:16x16", 1, {}),
]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="")
  p.add_argument("--only", default="", help="comma-separated case indices")
  p.add_argument("--remat", default="", help="comma-separated model.remat policies: a row "
                 "each (lm.config.REMAT_POLICIES); default: the config's own")
  args = p.parse_args()
  from experiments.configs import override, pod
  from lm import aot
  gib = lambda b: f"{b / 2**30:.2f}"
  picked = [int(i) for i in args.only.split(",")] if args.only else range(len(CASES))
  topologies = ", ".join(dict.fromkeys(CASES[i][1] for i in picked))
  lines = ["## Pod configs compiled for TPU topologies", "",
           *environment_lines(aot_topology=topologies), "",
           "Per device. Peak = arguments + unaliased outputs + temporaries + code.", "",
           "| config | topology | remat | devices | mesh | params GiB | optimizer GiB | temp GiB |"
           " peak GiB | HBM GiB | HBM used | compiler TFLOP/step | model TFLOP/step | ratio |"
           " compile s |",
           "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
           " ---: | ---: |"]
  print("\n".join(lines), flush=True)
  runs = [(i, remat) for i in picked for remat in (args.remat.split(",") if args.remat
                                                    else [None])]
  for i, remat in runs:
    name, topology, slices, overrides = CASES[i]
    c = override(pod.get_config(name), overrides | ({"model.remat": remat} if remat else {}))
    remat = c.model.remat
    t = time.perf_counter()
    try:
      r = aot.compile_train_step(c, topology, slices)
    except aot.DoesNotFit as e:
      row = f"| {name} | {topology} x{slices} | {remat} | | | | | | | | does not fit: {e} | | | | |"
    else:
      mesh = " x ".join(f"{a}={s}" for a, s in r.mesh.items() if s > 1)
      row = (f"| {name} | {topology} x{slices} | {remat} | {r.devices} | {mesh} | "
             f"{gib(r.param_bytes)} | "
             f"{gib(r.opt_bytes)} | {gib(r.temp_bytes)} | {gib(r.peak_bytes)} | {gib(r.hbm_bytes)} | "
             f"{100 * r.peak_bytes / r.hbm_bytes:.0f}% | {r.compiler_flops / 1e12:.1f} | "
             f"{r.model_flops / 1e12:.1f} | {r.compiler_flops / r.model_flops:.2f} | "
             f"{time.perf_counter() - t:.0f} |")
    lines.append(row)
    print(row, flush=True)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
  main()
