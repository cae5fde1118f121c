"""Train-step throughput of a config, per attention implementation, measured side by side.

  python benchmarks/train_step.py --config=experiments/configs/base.py:125m \\
      --impls=xla,jax_nn --steps=20 [--out=benchmarks/results/train_step.md]

For each implementation: build the experiment on all local devices, run warm-up
steps (compilation), then time ``--steps`` steps (each blocked on), and print
median step time, tokens/s, model TFLOP/s per device (lm/flops.py: every matmul, causal
attention by half; tables before 2026-11-29 used 6N + full-square attention), MFU
against the device's peak (lm.flops.PEAK_TFLOPS) and the ratio of step time to the first
implementation's.
"""
import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, environment_lines, load_config, zero_aux  # noqa: E402


def measure(config, impl: str, steps: int, warmup: int) -> dict:
  import jax
  from experiments.configs import override
  from lm import experiment
  from lm.flops import device_peak_tflops, train_flops
  exp = experiment.build(override(config, {"model.attention_impl": impl}))
  c = exp.config
  it = exp.data.train_iterator()
  batches = [exp.put_batch(next(it)) for _ in range(4)]
  aux = zero_aux(exp)
  state = exp.state.init()
  for i in range(warmup):
    state, m = exp.train_step(state, batches[i % 4], aux)
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = exp.train_step(state, batches[i % 4], aux)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))
  step = statistics.median(times)
  tokens = c.data.batch_size * c.data.seq_len
  # Block-sparse layers sow {"attention": {block: {"density": ...}}}: their mean.
  sown = jax.tree.leaves(m.get("attention", {}))
  density = float(sum(map(float, sown)) / len(sown)) if sown else None
  flops = train_flops(c.model, c.data.batch_size, c.data.seq_len, density=density)
  per_device = flops / step / 1e12 / exp.mesh.size
  peak = device_peak_tflops(0.0, list(exp.mesh.devices.flat))
  return {"impl": impl, "step_s": step, "tokens_per_s": tokens / step,
          "tflops": per_device, "mfu": per_device / peak if peak else None,
          "params": params, "loss": float(m["loss"]), "config": c}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", required=True)
  p.add_argument("--impls", default="xla,jax_nn")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--set", action="append", default=[], help="field=value config overrides")
  p.add_argument("--out", default="")
  args = p.parse_args()
  config = load_config(args.config, args.set)
  from lm.loop import apply_xla_flags
  apply_xla_flags(config.train.xla_flags)  # before JAX starts: the flags a run would use
  rows = [measure(config, impl, args.steps, args.warmup) for impl in args.impls.split(",")]
  base = rows[0]["step_s"]
  c = rows[0]["config"]
  m = c.model
  header = [
      f"## train step: `{args.config}` {' '.join(args.set)}",
      "",
      *environment_lines(),
      f"- model d={m.d_model} L={m.n_layers} heads={m.n_heads}/{m.n_kv_heads} d_ff={m.d_ff}, "
      f"{rows[0]['params'] / 1e6:.1f}M params, compute {m.dtype}, params {m.param_dtype}; "
      f"batch {c.data.batch_size} x {c.data.seq_len} tokens; optimizer "
      f"{c.optimizer.name}; median of {args.steps} steps after {args.warmup} warm-up",
      f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`",
      "",
      "| attention impl | step ms | tokens/s | model TFLOP/s/device | MFU | step time / first |",
      "| --- | ---: | ---: | ---: | ---: | ---: |"]
  mfu = lambda r: f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
  lines = header + [f"| {r['impl']} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['tflops']:.3g} | {mfu(r)} | {r['step_s'] / base:.2f} |" for r in rows]
  emit(lines, args.out)


if __name__ == "__main__":
  main()
