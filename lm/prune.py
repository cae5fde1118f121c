"""Weight pruning: the ``prune`` config group and its update hook.

``method=magnitude``: in every targeted matrix (each expert of a stacked expert
weight on its own) the ``floor(s n)`` smallest-magnitude weights are zero (ties
broken by position, so the realised sparsity is exact). ``method=nm``: in every group
of ``m`` consecutive weights along the input (contraction) dimension exactly ``n``
are kept, the largest in magnitude (2:4 by default: the pattern sparse tensor cores
accelerate); the sparsity is 1 - n/m.

Schedule: ``oneshot`` sets the masks once, when training reaches step ``begin`` (0:
before the first update, from the starting weights); ``gradual`` is Zhu & Gupta
(2017)'s cubic ramp s_t = s_f (1 - (1 - (t - begin) / (end - begin))^3), masks
recomputed every ``every`` steps from ``begin`` to ``end`` over the weights as they
are then (pruned weights are zero, so a mask only grows). ``nm`` masks are set once
(at ``begin``).

The masks live in the train state (``hooks/prune``, sharded like the weights) and
are applied after every optimizer update, so pruned weights stay exactly zero, through
kill and resume too. ``sparsity_report`` gives the realised sparsity per matrix
(``experiments.evaluate``).
"""
import dataclasses

import jax
import jax.numpy as jnp

from core.errors import ConfigError, check_choice, check_int
from lm import hooks
from lm.quant import ROLES, check_targets, get_path, matrices, merged_shape, set_path

METHODS = ("none", "magnitude", "nm")
SCHEDULES = ("oneshot", "gradual")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """The ``prune`` group (module docstring).

  Attributes:
    method: none | magnitude | nm.
    sparsity: magnitude: the final share of zero weights per matrix, in [0, 1).
    n, m: nm: keep n of every m consecutive inputs (n <= m).
    schedule: oneshot | gradual.
    begin, end, every: the steps of the schedule (gradual: from begin to end, masks
      recomputed every ``every`` steps; oneshot: at begin).
    targets: the roles pruned (``lm.quant.matrices``).
  """
  method: str = "none"
  sparsity: float = 0.5
  n: int = 2
  m: int = 4
  schedule: str = "oneshot"
  begin: int = 0
  end: int = 0
  every: int = 10
  targets: tuple[str, ...] = ("attention", "mlp", "experts", "linear")

  def __post_init__(self):
    check_choice("method", self.method, METHODS)
    check_choice("schedule", self.schedule, SCHEDULES)
    if not 0.0 <= self.sparsity < 1.0:
      raise ConfigError("sparsity", self.sparsity, "must be in [0, 1)",
                        "use e.g. 0.5 for half the weights zero")
    check_int("n", self.n, 1)
    check_int("m", self.m, 1)
    if self.n > self.m:
      raise ConfigError("n", self.n, f"exceeds m={self.m} (keep n of every m weights)",
                        "use n <= m, e.g. n=2, m=4")
    check_int("begin", self.begin, 0)
    check_int("every", self.every, 1)
    if self.schedule == "gradual" and self.method == "magnitude" and self.end <= self.begin:
      raise ConfigError("end", self.end, f"a gradual schedule needs end > begin={self.begin}",
                        "set prune.end to the step the final sparsity is reached")
    check_targets("targets", self.targets, ROLES)

  def sparsity_at(self, step):
    """The magnitude target after ``step`` updates (traced or not)."""
    if self.schedule == "oneshot":
      return jnp.asarray(self.sparsity, jnp.float32)
    t = jnp.clip((jnp.asarray(step, jnp.float32) - self.begin) / (self.end - self.begin), 0, 1)
    return self.sparsity * (1.0 - (1.0 - t) ** 3)


def _rank(x: jax.Array, axis: int) -> jax.Array:
  """The position of every element of x in the ascending order along ``axis`` (stable)."""
  order = jnp.argsort(x, axis=axis, stable=True)
  return jnp.argsort(order, axis=axis, stable=True)


def magnitude_mask(w: jax.Array, m, sparsity) -> jax.Array:
  """Bool mask keeping all but the floor(sparsity n) smallest |w| of each matrix
  (per expert for stacked experts)."""
  batch = m.batch
  lead = tuple(w.shape[a] for a in batch)
  moved = jnp.moveaxis(w, batch, tuple(range(len(batch))))
  flat = jnp.abs(moved.astype(jnp.float32)).reshape(lead + (-1,))
  n = flat.shape[-1]
  k = jnp.floor(sparsity * n + 1e-6).astype(jnp.int32)
  keep = (_rank(flat, -1) >= k).reshape(moved.shape)
  return jnp.moveaxis(keep, tuple(range(len(batch))), batch)


def nm_mask(w: jax.Array, m, n_keep: int, group: int) -> jax.Array:
  """Bool mask keeping the ``n_keep`` largest |w| of every ``group`` consecutive
  inputs (the merged contraction axis)."""
  shape, c = merged_shape(w.shape, m)
  if shape[c] % group:
    raise ConfigError("prune.m", group, f"does not divide the input dimension {shape[c]}",
                      f"use an m dividing {shape[c]}")
  x = jnp.moveaxis(jnp.abs(w.astype(jnp.float32)).reshape(shape), c, -1)
  g = x.reshape(x.shape[:-1] + (shape[c] // group, group))
  keep = _rank(-g, -1) < n_keep  # ties: the earlier position is kept
  keep = jnp.moveaxis(keep.reshape(x.shape), -1, c)
  return keep.reshape(w.shape)


class Prune(hooks.Hook):
  """``prune.method`` set: masks in the train state, applied after every update."""
  name = "prune"

  def __init__(self, cfg: PruneConfig, axes: dict):
    self.cfg = cfg
    self.mats = matrices(axes, cfg.targets)
    if not self.mats:
      raise ConfigError("prune.targets", cfg.targets, "names no matrix of this model",
                        f"use some of {', '.join(ROLES)}")

  @classmethod
  def build(cls, config, model):
    if config.prune.method == "none":
      return None
    return cls(config.prune, model.axes["params"])

  def masks(self, params: dict, step) -> dict:
    """{path: bool mask} of the schedule's target at ``step`` over ``params``."""
    out = {}
    for path, m in self.mats.items():
      w = get_path(params, path)
      if self.cfg.method == "nm":
        out[path] = nm_mask(w, m, self.cfg.n, self.cfg.m)
      else:
        out[path] = magnitude_mask(w, m, self.cfg.sparsity_at(step))
    return out

  def _apply(self, params: dict, masks: dict) -> dict:
    for path, mask in masks.items():
      w = get_path(params, path)
      params = set_path(params, path, jnp.where(mask, w, jnp.zeros_like(w)))
    return params

  def _tree(self, masks: dict) -> dict:
    return {"/".join(p): v for p, v in masks.items()}

  def _untree(self, tree: dict) -> dict:
    return {p: tree["/".join(p)] for p in self.mats}

  def init(self, params):
    if self.cfg.begin == 0:
      masks = self.masks(params, 0)
      return self._apply(params, masks), self._tree(masks)
    ones = {p: jnp.ones(get_path(params, p).shape, bool) for p in self.mats}
    return params, self._tree(ones)

  def state_axes(self, param_axes):
    return {"/".join(p): get_path(param_axes, p) for p in self.mats}

  def _event(self, step):
    c = self.cfg
    if c.schedule == "oneshot" or c.method == "nm":
      return step == c.begin
    return (step >= c.begin) & (step <= c.end) & ((step - c.begin) % c.every == 0)

  def update(self, params, state, step):
    masks = self._untree(state)
    masks = jax.lax.cond(self._event(step), lambda: self.masks(self._apply(params, masks), step),
                         lambda: masks)
    return self._apply(params, masks), self._tree(masks)


def sparsity_report(params: dict, axes: dict, targets: tuple = ROLES) -> dict:
  """{"a/b/c": share of exact zeros} of every matrix of ``targets`` roles, and
  ``"all"``: over them together."""
  report, zeros, total = {}, 0, 0
  for path, _ in sorted(matrices(axes, targets).items()):
    w = jax.device_get(get_path(params, path))
    z = int((w == 0).sum())
    report["/".join(path)] = z / w.size
    zeros, total = zeros + z, total + w.size
  report["all"] = zeros / max(total, 1)
  return report
