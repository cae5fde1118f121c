"""Learning-rate schedules from the ``optimizer`` config: cosine, wsd, constant.

Every schedule starts with a linear warmup from 0 to ``peak`` over
``warmup_steps`` steps (optax counts steps from 0, so the first update uses
``schedule(0) == 0`` when there is a warmup). Then:

* ``cosine``: cosine decay to ``min_lr_ratio * peak`` at ``total_steps``
  (Loshchilov & Hutter, "SGDR", 2017).
* ``wsd``: warmup-stable-decay; hold ``peak``, then decay linearly to
  ``min_lr_ratio * peak`` over the last ``decay_fraction`` of the steps
  (Hu et al., "MiniCPM", 2024; Hägele et al., "Scaling Laws and Compute-Optimal
  Training Beyond Fixed Training Durations", 2024).
* ``constant``: hold ``peak`` after the warmup.

Bad values raise ``ValueError`` with one line:
``<field>=<value!r>: <problem>. Fix: <fix>``.
"""

import numbers
from typing import Any, Callable

import optax

Schedule = Callable[[Any], Any]

SCHEDULES = ("cosine", "wsd", "constant")


def config_error(field: str, value: Any, problem: str, fix: str) -> ValueError:
  """Returns a one-line ``ValueError`` naming a config field, its value and a fix.

  Same message format as ``lm.errors.ConfigError`` (which ``optim`` may not
  import): ``<field>=<value!r>: <problem>. Fix: <fix>``.

  Args:
    field: dotted config path, e.g. ``"optimizer.warmup_steps"``.
    value: the offending value.
    problem: what is wrong, without a trailing period.
    fix: what to do instead.

  Returns:
    The error, for the caller to raise.
  """
  return ValueError(f"{field}={value!r}: {problem}. Fix: {fix}")


def get_field(cfg: Any, name: str, prefix: str = "optimizer") -> Any:
  """Reads ``cfg.<name>`` (a ConfigDict or any attribute/mapping container).

  Args:
    cfg: the config node.
    name: the field name.
    prefix: dotted path of ``cfg`` for the error message.

  Returns:
    The value.

  Raises:
    ValueError: if the field is missing.
  """
  try:
    return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)
  except (AttributeError, KeyError):
    raise config_error(f"{prefix}.{name}", None, "missing field",
                       "add it to the config (see experiments/configs/base.py)"
                       ) from None


def check_positive(field: str, value: Any) -> float:
  """Returns ``float(value)`` if it is a number > 0, else raises ``ValueError``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
    raise config_error(field, value, "must be a number > 0",
                       "set a positive value")
  return float(value)


def check_range(field: str, value: Any, lo: float, hi: float,
                lo_open: bool = False, hi_open: bool = False) -> float:
  """Returns ``float(value)`` if it lies in the given interval, else raises.

  Args:
    field: dotted config path for the error message.
    value: the value to check.
    lo: lower bound.
    hi: upper bound.
    lo_open: exclude ``lo``.
    hi_open: exclude ``hi``.

  Returns:
    The value as a float.

  Raises:
    ValueError: if ``value`` is not a number in the interval.
  """
  interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if ok:
    ok = (value > lo if lo_open else value >= lo) and (
        value < hi if hi_open else value <= hi)
  if not ok:
    raise config_error(field, value, f"must lie in {interval}",
                       f"choose a value in {interval}")
  return float(value)


def is_int(value: Any) -> bool:
  """True for Python / NumPy integers (not bools)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_steps(total_steps: Any, warmup_steps: Any, prefix: str) -> None:
  if not is_int(total_steps) or total_steps < 1:
    raise config_error("total_steps", total_steps, "must be an int >= 1",
                       "pass the number of training steps (train.steps)")
  if not is_int(warmup_steps) or not 0 <= warmup_steps < total_steps:
    raise config_error(f"{prefix}.warmup_steps", warmup_steps,
                       f"must be an int in [0, total_steps={total_steps})",
                       f"use 0 <= warmup_steps < {total_steps}")


def _warmup_then(peak: float, warmup_steps: int, schedules: list[Schedule],
                 boundaries: list[int]) -> Schedule:
  """Prepends a linear 0 -> peak warmup to ``schedules`` (boundaries absolute)."""
  if warmup_steps > 0:
    schedules = [optax.linear_schedule(0.0, peak, warmup_steps)] + schedules
    boundaries = [warmup_steps] + boundaries
  if len(schedules) == 1:
    return schedules[0]
  return optax.join_schedules(schedules, boundaries)


def make_schedule(peak: float, cfg: Any, total_steps: int,
                  field: str = "optimizer.learning_rate") -> Schedule:
  """Builds the learning-rate schedule named by ``cfg.schedule``.

  Args:
    peak: peak learning rate (> 0), reached at the end of the warmup.
    cfg: the ``optimizer`` config node: reads ``schedule``, ``warmup_steps``,
      ``min_lr_ratio`` and, for ``wsd``, ``decay_fraction``.
    total_steps: number of optimizer steps of the run (>= 1).
    field: config path of ``peak``, for error messages.

  Returns:
    An optax schedule: step (int or int array) -> learning rate.

  Raises:
    ValueError: unknown schedule or out-of-range values (one line naming the
      field, the value and the fix).
  """
  peak = check_positive(field, peak)
  name = get_field(cfg, "schedule")
  warmup_steps = get_field(cfg, "warmup_steps")
  _check_steps(total_steps, warmup_steps, "optimizer")
  total_steps, warmup_steps = int(total_steps), int(warmup_steps)
  if name == "constant":
    return _warmup_then(peak, warmup_steps, [optax.constant_schedule(peak)], [])
  ratio = check_range("optimizer.min_lr_ratio", get_field(cfg, "min_lr_ratio"),
                      0.0, 1.0)
  end = ratio * peak
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps, decay_steps=total_steps, end_value=end)
  if name == "wsd":
    frac = check_range("optimizer.decay_fraction",
                       get_field(cfg, "decay_fraction"), 0.0, 1.0, lo_open=True)
    decay_steps = max(1, round(frac * total_steps))
    decay_start = total_steps - decay_steps
    if decay_start < warmup_steps:
      raise config_error(
          "optimizer.decay_fraction", frac,
          f"decay ({decay_steps} steps) overlaps the warmup ({warmup_steps} "
          f"steps) within total_steps={total_steps}",
          "lower decay_fraction or warmup_steps")
    stable = optax.constant_schedule(peak)
    decay = optax.linear_schedule(peak, end, decay_steps)
    if decay_start == warmup_steps:
      return _warmup_then(peak, warmup_steps, [decay], [])
    return _warmup_then(peak, warmup_steps, [stable, decay], [decay_start])
  raise config_error("optimizer.schedule", name, "unknown schedule",
                     f"use one of {', '.join(SCHEDULES)}")
