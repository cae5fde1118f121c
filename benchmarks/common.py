"""What every benchmark script shares: timing, the table header and writing its table.

Nothing here imports jax at module level: scripts set ``XLA_FLAGS`` and
``JAX_PLATFORMS`` after importing this module and before jax starts.
"""
import datetime
import os
import statistics
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_time(fn, *args, steps: int, warmup: int = 1) -> float:
  """Median wall time of ``fn(*args)`` over ``steps`` calls after ``warmup`` calls,
  waiting for the device each time."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def git_commit() -> str:
  """The checkout's short commit hash, with ``+dirty`` when tracked files have
  uncommitted changes (untracked files do not count); ``unknown`` outside git."""
  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
  try:
    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return commit + ("+dirty" if dirty else "")


def environment_lines(aot_topology: str = "") -> list[str]:
  """The header lines every benchmark table starts with (markdown bullets): date,
  git commit, jax version, and the hardware (device kind and count, host cores).

  Args:
    aot_topology: for tables compiled ahead of time on this host for TPU
      topologies: those topologies, named (with libtpu's version) beside the host.
  """
  import jax
  dev = jax.devices()[0]
  hardware = (f"{dev.device_kind} x{jax.device_count()} ({dev.platform}), "
              f"{os.cpu_count()} host cores")
  if aot_topology:
    from importlib import metadata
    try:
      libtpu = f"libtpu {metadata.version('libtpu')}"
    except metadata.PackageNotFoundError:
      libtpu = "libtpu"
    hardware += f"; TPU {aot_topology} compiled ahead of time here ({libtpu}), nothing run"
  return [f"- date {datetime.date.today()}, commit {git_commit()}, jax {jax.__version__}",
          f"- hardware: {hardware}"]


def load_config(spec: str, assignments: list[str]):
  """The config ``spec`` (``path/to/config.py[:arg]``) with the scripts' ``--set
  a.b=value`` overrides, each value parsed as the type of the field it replaces."""
  from core.errors import ConfigError
  from experiments.configs import load, override
  fields = {}
  for assignment in assignments:
    field, sep, value = assignment.partition("=")
    if not sep:
      raise ConfigError(f"--set {field}", None, "has no value", f"write --set {field}=<value>")
    fields[field] = value
  return override(load(spec), fields, flag="--set")


def zero_aux(exp) -> dict:
  """The train step's ``aux`` for ``exp`` (an ``lm.experiment.Experiment``): ``{}``
  unless a loss term takes extra inputs (a distillation teacher), then zeros of
  their shapes and shardings (the step's time does not depend on their values)."""
  import jax
  import jax.numpy as jnp
  abstract = exp.abstract_aux()
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  return jax.jit(zeros, out_shardings=jax.tree.map(lambda s: s.sharding, abstract))()


def emit(lines: list[str], out: str = "") -> None:
  """Prints the table and, with ``out``, appends it to that record file."""
  text = "\n".join(lines) + "\n"
  print(text)
  if out:
    with open(out, "a") as f:
      f.write(text + "\n")
