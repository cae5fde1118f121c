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

The fields come from ``optim.chain.OptimizerConfig`` (validated there); what
depends on the run length (the warmup fits, the decay does not overlap it) is
checked here, with one-line ``core.errors.ConfigError``s naming the optimizer
config's fields.
"""

from typing import Any, Callable

import optax

from core.errors import ConfigError

Schedule = Callable[[Any], Any]

SCHEDULES = ("cosine", "wsd", "constant")


def _check_steps(total_steps: int, warmup_steps: int) -> None:
  if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
    raise ValueError(f"total_steps={total_steps!r}: must be an int >= 1. Fix: pass the "
                     "number of training steps")
  if not 0 <= warmup_steps < total_steps:
    raise ConfigError("warmup_steps", warmup_steps,
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


def make_schedule(peak: float, cfg: Any, total_steps: int) -> Schedule:
  """Builds the learning-rate schedule named by ``cfg.schedule``.

  Args:
    peak: peak learning rate (> 0), reached at the end of the warmup.
    cfg: the optimizer config (``optim.chain.OptimizerConfig``): reads
      ``schedule``, ``warmup_steps``, ``min_lr_ratio`` and, for ``wsd``,
      ``decay_fraction``.
    total_steps: number of optimizer steps of the run (>= 1).

  Returns:
    An optax schedule: step (int or int array) -> learning rate.
  """
  _check_steps(total_steps, cfg.warmup_steps)
  warmup_steps = int(cfg.warmup_steps)
  if cfg.schedule == "constant":
    return _warmup_then(peak, warmup_steps, [optax.constant_schedule(peak)], [])
  end = cfg.min_lr_ratio * peak
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps, decay_steps=total_steps, end_value=end)
  decay_steps = max(1, round(cfg.decay_fraction * total_steps))  # wsd
  decay_start = total_steps - decay_steps
  if decay_start < warmup_steps:
    raise ConfigError(
        "decay_fraction", cfg.decay_fraction,
        f"decay ({decay_steps} steps) overlaps the warmup ({warmup_steps} steps) within "
        f"total_steps={total_steps}", "lower decay_fraction or warmup_steps")
  decay = optax.linear_schedule(peak, end, decay_steps)
  if decay_start == warmup_steps:
    return _warmup_then(peak, warmup_steps, [decay], [])
  return _warmup_then(peak, warmup_steps, [optax.constant_schedule(peak), decay],
                      [decay_start])
