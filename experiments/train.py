"""Train a config: ``python -m experiments.train --config=experiments/configs/base.py:tiny
--workdir=runs/x [--config.a.b=value ...]``.

Writes metrics.jsonl, config.json, checkpoints/, tensorboard/ and loss_curve.png into
the workdir; running again with the same workdir resumes from the last checkpoint.
A bad config, flag or workdir stops with one line (exit status 2) before anything
is written.
"""
import os

from absl import flags

from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has a checkpoint).")
_STOP_AT = flags.DEFINE_integer("stop_at", None, "Stop and checkpoint after this step "
                                "(the schedule still spans train.steps).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects TPU pods, SLURM, "
    "...). Implied by --coordinator_address or the JAX_COORDINATOR_ADDRESS variable.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None,
    "Number of processes (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
    "This process's index (default: $JAX_PROCESS_ID).")


def initialize_distributed() -> None:
  """Joins a multi-process run when asked to; must precede any use of a device."""
  if not (_DISTRIBUTED.value or _COORDINATOR.value):
    return
  import jax
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(config, spec):
  del spec
  from lm import loop
  loop.apply_xla_flags(config.train.get("xla_flags", ""))  # before JAX starts its backend
  initialize_distributed()
  summary = loop.run(config, _WORKDIR.value, stop_at=_STOP_AT.value)
  eval_loss = summary["eval_loss"]
  print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, "
        f"eval_loss {eval_loss if eval_loss is None else round(eval_loss, 4)}; "
        f"workdir {os.path.abspath(_WORKDIR.value)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
