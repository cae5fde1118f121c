"""Trainable block-sparse attention: SpargeAttention2's hybrid top-k + top-p block masks.

Method (Zhang et al., arXiv 2602.13515; ``../shared/REFERENCES.md``): mean-pool each
query block and each key block to one vector, score the blocks with
``P = softmax_row(pool(Q) pool(K)^T * scale)``, and keep in each query-block row the
union of the top-k key blocks and the shortest prefix (by descending P) whose mass
reaches p. The rule has no parameters and no gradient; the model is fine-tuned
under it (distillation from the dense model, ``lm/losses/distill.py``), so gradients flow
through the kept blocks only. The same rule runs in training and inference.

Our adaptation to causal language models (decided here, see REFERENCES.md):
- only causally valid key blocks (and, with a sliding window, those inside it) are
  scored; future blocks get -inf before the row softmax;
- ``top_k`` is a fraction of the row's *valid* blocks, rounded up, at least one
  when positive;
- the diagonal block(s) (key blocks overlapping the query block's positions), the
  first ``sink_blocks`` key blocks and ``local_blocks`` blocks before the diagonal
  are always kept, so every query sees itself;
- with grouped-query attention there is one mask per kv head: the union of the masks
  of its query heads (a kernel then reads each kv block once per group);
- density is reported over the causally valid blocks (``block_density``).

Shapes: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head
dim, Q = T / block_q query blocks, C = S / block_k key blocks.
"""
import jax
import jax.numpy as jnp
import numpy as np

from attention import masks
from attention.spec import AttentionSpec, BlockSparse


def check_blocks(bs: BlockSparse, T: int, S: int) -> None:
  """Raises a clear error when the lengths are not whole numbers of blocks."""
  if T % bs.block_q:
    raise ValueError(
        f"block_q={bs.block_q}: the query length {T} is not divisible by it (config: "
        f"model.sparse.block_q). Fix: choose a block size dividing {T} or pad the "
        f"sequence to a multiple of {bs.block_q}")
  if S % bs.block_k:
    raise ValueError(
        f"block_k={bs.block_k}: the key length {S} is not divisible by it (config: "
        f"model.sparse.block_k). Fix: choose a block size dividing {S} or pad the "
        f"sequence to a multiple of {bs.block_k}")


def forced_blocks(bs: BlockSparse, T: int, S: int, q_offset: int = 0) -> np.ndarray:
  """bool [Q, C]: diagonal, sink and local blocks, kept whatever the scores say."""
  Q, C = T // bs.block_q, S // bs.block_k
  q_first = q_offset + np.arange(Q) * bs.block_q
  q_last = q_first + bs.block_q - 1
  k_first = np.arange(C) * bs.block_k
  k_last = k_first + bs.block_k - 1
  diag = (k_first[None, :] <= q_last[:, None]) & (k_last[None, :] >= q_first[:, None])
  first_diag = q_first // bs.block_k  # key block holding the query block's first token
  j = np.arange(C)[None, :]
  local = (j < first_diag[:, None]) & (j >= first_diag[:, None] - bs.local_blocks)
  sink = j < bs.sink_blocks
  return diag | local | sink


def select_blocks(scores: jax.Array, valid: jax.Array, forced: jax.Array, *,
                  top_k: float, top_p: float, max_blocks: int = 0) -> jax.Array:
  """The hybrid rule on a block score map.

  Args:
    scores: [..., Q, C] block logits (pooled q . pooled k * scale).
    valid: bool, broadcastable to scores: blocks that may be kept at all.
    forced: bool, broadcastable: blocks kept regardless of their score.
    top_k: fraction of each row's valid blocks kept by rank (ceil; >= 1 if > 0).
    top_p: keep the shortest descending-probability prefix of each row whose
      softmax mass (over valid blocks) reaches top_p.
    max_blocks: if > 0, keep at most this many per row: forced blocks first (by
      position), then the highest-probability ones.

  Returns:
    bool [..., Q, C]: (top-k | top-p | forced) & valid.
  """
  valid = jnp.broadcast_to(valid, scores.shape)
  (probs,) = masks.softmax(jnp.where(valid, scores.astype(jnp.float32), -jnp.inf))
  order = jnp.argsort(-probs, axis=-1, stable=True)  # descending, ties by position
  rank = jnp.argsort(order, axis=-1, stable=True)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each rank
  keep_p = jnp.take_along_axis(before < top_p, rank, axis=-1)
  n_valid = jnp.sum(valid, axis=-1, keepdims=True)
  n_k = jnp.where(top_k > 0, jnp.maximum(jnp.ceil(top_k * n_valid), 1), 0)
  keep_k = rank < n_k
  keep = (keep_k | keep_p | forced) & valid
  if max_blocks and max_blocks < scores.shape[-1]:
    C = scores.shape[-1]
    forced = jnp.broadcast_to(forced, scores.shape) & valid
    # Priority: forced (earlier first) > kept by the rule (by probability) > dropped.
    priority = jnp.where(forced, 2.0 + (C - jnp.arange(C)) / C, jnp.where(keep, probs, -1.0))
    order2 = jnp.argsort(-priority, axis=-1, stable=True)
    keep &= jnp.argsort(order2, axis=-1, stable=True) < max_blocks
  return keep


def pool_blocks(x_BTNH: jax.Array, block: int) -> jax.Array:
  """Mean over each block of tokens: [B, T, N, H] -> [B, T/block, N, H] (fp32)."""
  B, T, N, H = x_BTNH.shape
  return jnp.mean(x_BTNH.astype(jnp.float32).reshape(B, T // block, block, N, H), axis=2)


def block_scores(q_BTNH, k_BSKH, spec: AttentionSpec) -> jax.Array:
  """Pooled block logits [B, K, G, Q, C] (fp32), no gradient."""
  bs = spec.block_sparse
  q_BTNH, k_BSKH = jax.lax.stop_gradient(q_BTNH), jax.lax.stop_gradient(k_BSKH)
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  scale = spec.scale if spec.scale is not None else H ** -0.5
  qp_BQKGH = pool_blocks(q_BTNH, bs.block_q).reshape(B, T // bs.block_q, K, N // K, H)
  kp_BCKH = pool_blocks(k_BSKH, bs.block_k)
  return jnp.einsum("bqkgh,bckh->bkgqc", qp_BQKGH, kp_BCKH) * scale


def group_union(keep_BKGQC: jax.Array, forced, max_blocks: int) -> jax.Array:
  """One mask per kv head: the union over its query heads [B, K, Q, C]. With a cap
  (``max_blocks`` > 0) the union can exceed it: the blocks most heads chose are kept
  (forced blocks count as chosen by all)."""
  keep_BKQC = jnp.any(keep_BKGQC, axis=2)
  if max_blocks and keep_BKGQC.shape[2] > 1:
    G = keep_BKGQC.shape[2]
    votes = jnp.sum(keep_BKGQC, axis=2) + jnp.asarray(forced, jnp.int32) * G
    C = votes.shape[-1]
    pri = jnp.where(keep_BKQC, votes * C + (C - jnp.arange(C)), -1)
    order = jnp.argsort(-pri, axis=-1, stable=True)
    keep_BKQC &= jnp.argsort(order, axis=-1, stable=True) < max_blocks
  return keep_BKQC


def predict_block_mask(q_BTNH: jax.Array, k_BSKH: jax.Array, spec: AttentionSpec,
                       q_offset: int = 0) -> jax.Array:
  """SpargeAttention2's mask for ``spec.block_sparse``: bool [B, K, Q, C].

  One mask per kv head (the union over its query heads); already intersected with
  the causal / sliding-window block structure. Built without gradient.
  """
  bs = spec.block_sparse
  if bs is None:
    raise ValueError("spec.block_sparse is None: there is no block-sparse rule to apply. "
                     "Fix: set AttentionSpec(block_sparse=BlockSparse(...))")
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  check_blocks(bs, T, S)
  valid = masks.valid_blocks(spec.causal, spec.sliding_window, T, S, bs.block_q, bs.block_k,
                             q_offset)
  forced = forced_blocks(bs, T, S, q_offset)
  keep_BKGQC = select_blocks(block_scores(q_BTNH, k_BSKH, spec), jnp.asarray(valid),
                             jnp.asarray(forced), top_k=bs.top_k, top_p=bs.top_p,
                             max_blocks=bs.max_blocks)
  return group_union(keep_BKGQC, jnp.asarray(forced), bs.max_blocks)


def block_density(block_mask_BKQC: jax.Array, spec: AttentionSpec, q_offset: int = 0):
  """Kept share of the valid blocks (the causal triangle): a float in (0, 1]."""
  bs = spec.block_sparse
  Q, C = block_mask_BKQC.shape[-2:]
  valid = masks.valid_blocks(spec.causal, spec.sliding_window, Q * bs.block_q, C * bs.block_k,
                             bs.block_q, bs.block_k, q_offset)
  kept = jnp.sum(block_mask_BKQC & jnp.asarray(valid), axis=(-2, -1))
  return jnp.mean(kept / max(int(valid.sum()), 1))


def block_sparse_reference(q_BTNH, k_BSKH, v_BSKH, block_mask_BKQC, spec: AttentionSpec):
  """The slow twin of every block-sparse kernel: dense attention, masked to the
  kept blocks (and the causal / window mask), fp32 softmax."""
  from attention.reference import attend_reference
  return attend_reference(q_BTNH, k_BSKH, v_BSKH, spec, block_mask=block_mask_BKQC)


def block_indices(block_mask_BKQC: jax.Array):
  """Compacts a block mask into what a kernel prefetches as scalars.

  Returns:
    counts [B, K, Q] int32: kept key blocks per query-block row;
    indices [B, K, Q, C] int32: their key-block indices in ascending order, the
      tail padded by repeating the last kept index (so a kernel that reads past
      ``counts`` re-reads a block it already holds: no new copy).
  """
  C = block_mask_BKQC.shape[-1]
  m = block_mask_BKQC.astype(jnp.int32)
  counts = jnp.sum(m, axis=-1)
  # Kept blocks first, in ascending order: sort by (not kept, index).
  key = (1 - m) * C + jnp.arange(C, dtype=jnp.int32)
  idx = jnp.argsort(key, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(idx, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  pos = jnp.arange(C, dtype=jnp.int32)
  return counts.astype(jnp.int32), jnp.where(pos < counts[..., None], idx, last)


def block_sparse_gather(q_BTNH, k_BSKH, v_BSKH, block_mask_BKQC, spec: AttentionSpec,
                        max_blocks: int | None = None):
  """Block-sparse attention in plain XLA that computes only kept blocks.

  Each query block gathers its kept key blocks (``block_indices``; at most
  ``max_blocks`` of them, default ``spec.block_sparse.max_blocks`` or all) and
  attends to them densely: work scales with the kept blocks instead of T x S.
  Padding slots repeat a kept block and are masked out. Exact (equals
  ``block_sparse_reference``) when no row keeps more than ``max_blocks``.
  """
  bs = spec.block_sparse
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G, Q, C = N // K, T // bs.block_q, S // bs.block_k
  M = max_blocks or bs.max_blocks or C
  counts_BKQ, idx_BKQC = block_indices(block_mask_BKQC)
  idx_BKQM = idx_BKQC[..., :M]
  slot_ok_BKQM = jnp.arange(M) < counts_BKQ[..., None]
  scale = spec.scale if spec.scale is not None else H ** -0.5
  kb_BKCbH = k_BSKH.reshape(B, C, bs.block_k, K, H).transpose(0, 3, 1, 2, 4)
  vb_BKCbH = v_BSKH.reshape(B, C, bs.block_k, K, H).transpose(0, 3, 1, 2, 4)
  take = jax.vmap(jax.vmap(lambda x, i: x[i]))  # over B, K: [C, b, H][Q, M] -> [Q, M, b, H]
  kg = take(kb_BKCbH, idx_BKQM).reshape(B, K, Q, M * bs.block_k, H)
  vg = take(vb_BKCbH, idx_BKQM).reshape(B, K, Q, M * bs.block_k, H)
  q_BKGQbH = q_BTNH.reshape(B, Q, bs.block_q, K, G, H).transpose(0, 3, 4, 1, 2, 5)
  logits = jnp.einsum("bkgqth,bkqsh->bkgqts", q_BKGQbH, kg,
                      preferred_element_type=jnp.float32) * scale
  q_pos = (jnp.arange(Q)[:, None] * bs.block_q + jnp.arange(bs.block_q)[None, :])  # [Q, bq]
  k_pos = (idx_BKQM[..., None] * bs.block_k + jnp.arange(bs.block_k)).reshape(B, K, Q, -1)
  ok = jnp.repeat(slot_ok_BKQM, bs.block_k, axis=-1)[:, :, :, None, :]  # [B, K, Q, 1, Mb]
  ok &= masks.allowed(q_pos[None, None, :, :, None], k_pos[:, :, :, None, :], spec.causal,
                      spec.sliding_window)
  (probs,) = masks.softmax(jnp.where(ok[:, :, None], logits, -jnp.inf))
  out = jnp.einsum("bkgqts,bkqsh->bqtkgh", probs.astype(v_BSKH.dtype), vg,
                   preferred_element_type=jnp.float32)
  return out.reshape(B, T, N, H).astype(q_BTNH.dtype)
