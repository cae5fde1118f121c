"""AOT-compile a config's train step for a TPU topology from any host:

  python -m experiments.compile --config=experiments/configs/pod.py:1b-v5p64 \\
      --topology=v5p:4x4x2 [--num_slices=2] [--config.a.b=value ...]

Prints per-device parameter, optimizer and temporary memory against the chip's
HBM and FLOPs per step (compiler vs. model estimate); exits 1 when the step
does not fit in HBM, 2 on a bad config or topology.
"""
import sys

from absl import flags

from experiments import cli

_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v5e:16x16.")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Number of slices (multi-slice over DCN).")


def main(config, spec):
  del spec
  from lm import aot
  fix = ("Fix: shard more (larger mesh.fsdp), a smaller data.batch_size or model, or a "
         "larger topology")
  try:
    report = aot.compile_train_step(config, _TOPOLOGY.value, _SLICES.value)
  except aot.DoesNotFit as e:
    print(f"error: does not fit: {e}. {fix}", file=sys.stderr)
    sys.exit(1)
  print(aot.format_report(report))
  if not report.fits:
    print(f"error: does not fit: the step needs ~{report.peak_bytes / 2**30:.2f} GiB per device, "
          f"the {_TOPOLOGY.value} devices have {report.hbm_bytes / 2**30:.2f} GiB. {fix}",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["topology"])
  cli.run(main)
