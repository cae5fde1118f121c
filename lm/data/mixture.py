"""Which source fills each row of each global batch: mixtures by weight and curricula.

Slot ``j`` of global batch ``t`` draws its source from the weights in force at step ``t``
(``data.mixture.<name>.weight`` until the first of ``data.stages``, then each stage's;
a stage at step 0 replaces the mixture's weights from the start)
with ``np.random.default_rng([seed, t])``; that source's next row is its count of
earlier draws. Everything is a pure function of ``t``: a run resumed anywhere, in a stage
or across a switch, sees the batches a straight run sees, for any process count.
(grain's ``mix`` is not used because its weights cannot change during a run.)
"""
import numpy as np

from core.errors import ConfigError

_CHECKPOINT_EVERY = 512  # steps between cached draw counts


def check_stages(stages, names: tuple[str, ...]) -> tuple[tuple[int, np.ndarray], ...]:
  """``data.stages`` as ((first step, normalized weights [S]), ...) in order.

  Each stage is ``(step, {name: weight})``; names left out get weight 0.

  Raises:
    ConfigError: not pairs, steps not increasing from >= 0, unknown names, negative
      weights or a stage whose weights sum to 0.
  """
  fix = "use e.g. ((1000, {'code': 0.5, 'prose': 0.5}), (2000, {'code': 1.0}))"
  out, last = [], -1
  for i, stage in enumerate(stages):
    if not (isinstance(stage, (tuple, list)) and len(stage) == 2 and isinstance(stage[1], dict)
            and isinstance(stage[0], int) and not isinstance(stage[0], bool)):
      raise ConfigError("data.stages", stage, f"stage {i} is not (step, {{name: weight}})", fix)
    step, weights = stage
    if step <= last:
      raise ConfigError("data.stages", stages, f"stage steps must increase from 0 (stage "
                        f"{i} starts at {step}{f', after {last}' if last >= 0 else ''})", fix)
    unknown = sorted(set(weights) - set(names))
    if unknown:
      raise ConfigError("data.stages", stage, f"names {unknown}, which are not in "
                        f"data.mixture ({', '.join(names)})", fix)
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    if (w < 0).any() or w.sum() <= 0:
      raise ConfigError("data.stages", stage, "weights must be >= 0 with a positive sum", fix)
    out.append((step, w / w.sum()))
    last = step
  return tuple(out)


class Schedule:
  """Source draws per step for ``weights`` (step 0 on) and ``stages``."""

  def __init__(self, weights, stages, *, batch: int, seed: int):
    w = np.asarray(weights, np.float64)
    self.stages = ((0, w / w.sum()),) + tuple(stages)
    self.n_sources, self.batch, self.seed = len(w), batch, seed
    self._counts = {0: np.zeros(len(w), np.int64)}  # step -> draws per source before it
    self._last = (None, None)  # the latest step asked for: sequential reads cost one draw

  def weights_at(self, step: int) -> np.ndarray:
    """The normalized weights in force at ``step``."""
    return next(w for s, w in reversed(self.stages) if s <= step)

  def draws(self, step: int) -> np.ndarray:
    """int [batch]: the source of each slot of global batch ``step``."""
    if self.n_sources == 1:
      return np.zeros(self.batch, np.int64)
    rng = np.random.default_rng([self.seed, step])
    return rng.choice(self.n_sources, size=self.batch, p=self.weights_at(step))

  def counts_before(self, step: int) -> np.ndarray:
    """int [S]: how many rows each source gave to batches ``0 .. step - 1``."""
    if self.n_sources == 1:
      return np.array([step * self.batch], np.int64)
    start = max(s for s in self._counts if s <= step)
    if self._last[0] is not None and start <= self._last[0] <= step:
      start = self._last[0]
      counts = self._last[1].copy()
    else:
      counts = self._counts[start].copy()
    for t in range(start, step):
      counts += np.bincount(self.draws(t), minlength=self.n_sources)
      if (t + 1) % _CHECKPOINT_EVERY == 0:
        self._counts[t + 1] = counts.copy()
    self._last = (step, counts.copy())
    return counts

  def assignment(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(source [batch], that source's row index [batch]) for global batch ``step``."""
    src = self.draws(step)
    row = self.counts_before(step)[src].copy()
    for s in range(self.n_sources):
      mask = src == s
      row[mask] += np.arange(mask.sum())
    return src, row
