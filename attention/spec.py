"""What an attention call computes, independent of how (see ``attention.ops``)."""
import dataclasses

from core.errors import ConfigError

# The ``jax.checkpoint`` name of a flash backend's saved attention output and
# log-sum-exp (splash, our Pallas kernel): a policy that saves this name keeps them
# and skips the attention forward when it recomputes (``attention.upipe``).
RESIDUALS = "attention_residuals"


@dataclasses.dataclass(frozen=True)
class BlockSparse:
  """A predicted block-sparse mask (SpargeAttention2's hybrid top-k + top-p rule).

  Queries are cut into blocks of ``block_q`` tokens and keys into blocks of
  ``block_k``; ``attention.sparse.predict_block_mask`` keeps, per (batch, kv head,
  query block), the union of the top ``top_k`` fraction of the causally valid key
  blocks, the smallest set whose pooled softmax mass reaches ``top_p``, the diagonal
  block(s), the first ``sink_blocks`` and the ``local_blocks`` before the diagonal.

  Attributes:
    block_q, block_k: block sizes in tokens (TPU kernels prefer multiples of 128).
    top_k: fraction in [0, 1] of a row's valid key blocks always kept (0: none;
      otherwise at least one).
    top_p: cumulative pooled-probability mass in [0, 1] to keep (0: none).
    sink_blocks: leading key blocks always kept (the first-token sink).
    local_blocks: key blocks just before the diagonal always kept.
    max_blocks: if > 0, a cap on kept key blocks per row (forced blocks first, then
      by score), so implementations can use static shapes (``gather``); 0: no cap.
  """
  block_q: int = 128
  block_k: int = 128
  top_k: float = 0.03
  top_p: float = 0.2
  sink_blocks: int = 1
  local_blocks: int = 0
  max_blocks: int = 0

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      if getattr(self, name) <= 0:
        raise ConfigError(name, getattr(self, name), "must be a positive number of tokens",
                          "use e.g. 64 or 128")
    for name in ("top_k", "top_p"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ConfigError(name, value, "out of range; it is a fraction",
                          f"choose {name} in [0, 1]")
    for name in ("sink_blocks", "local_blocks", "max_blocks"):
      if getattr(self, name) < 0:
        raise ConfigError(name, getattr(self, name), "must be >= 0", "use 0 to keep none")


@dataclasses.dataclass(frozen=True)
class Hierarchical:
  """Local tokens plus pooled summaries of distant blocks (``attention.hierarchical``).

  Attributes:
    block: block size in tokens.
    local_blocks: whole blocks before a query's own block seen token by token;
      older blocks are seen as one summary each (mean key, mean value).
  """
  block: int = 64
  local_blocks: int = 1

  def __post_init__(self):
    if self.block <= 0:
      raise ConfigError("block", self.block, "must be a positive number of tokens",
                        "use e.g. 64")
    if self.local_blocks < 0:
      raise ConfigError("local_blocks", self.local_blocks, "must be >= 0",
                        "use 0 for the own block only")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """The mask and scale of one attention call.

  Attributes:
    causal: query t attends to keys s <= t.
    sliding_window: if > 0, query t attends only to keys with t - s < window.
    scale: logit scale; None means 1/sqrt(head_dim).
    block_sparse: if set, a data-dependent block mask (``BlockSparse``) is predicted
      from q and k and intersected with the mask above.
    hierarchical: if set, causal attention to nearby tokens plus one pooled summary
      per distant block (``Hierarchical``); excludes block_sparse.
  """
  causal: bool = True
  sliding_window: int = 0
  scale: float | None = None
  block_sparse: BlockSparse | None = None
  hierarchical: Hierarchical | None = None

  def __post_init__(self):
    if self.hierarchical is not None and (self.block_sparse is not None or not self.causal
                                          or self.sliding_window):
      raise ValueError("hierarchical attention is causal and excludes block_sparse and "
                       "sliding_window. Fix: set only one of them")
    if self.sliding_window < 0:
      raise ValueError(
          f"sliding_window={self.sliding_window!r}: must be >= 0. Fix: use 0 for "
          "full attention or a positive window length")
