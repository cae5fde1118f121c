"""What an attention call computes, independent of how (see ``attention.ops``)."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """The mask and scale of one attention call.

  Attributes:
    causal: query t attends to keys s <= t.
    sliding_window: if > 0, query t attends only to keys with t - s < window.
    scale: logit scale; None means 1/sqrt(head_dim).
  """
  causal: bool = True
  sliding_window: int = 0
  scale: float | None = None

  def __post_init__(self):
    if self.sliding_window < 0:
      raise ValueError(
          f"sliding_window={self.sliding_window!r}: must be >= 0. Fix: use 0 for "
          "full attention or a positive window length")
