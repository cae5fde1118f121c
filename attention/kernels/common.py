"""What the TPU and GPU block-sparse kernels' registry entries share."""
import jax.numpy as jnp

from attention import sparse
from attention.spec import AttentionSpec


def resolve_block_mask(q_BTNH, k_BSKH, spec: AttentionSpec, segment_ids_BT, block_mask,
                       default_block: int, unsupported):
  """Block sizes and the block mask a kernel should run for ``spec``.

  - ``block_mask`` given: block sizes from ``spec.block_sparse``; the mask is
    intersected with the static causal / window block structure (no visits to
    blocks that hold no allowed pair).
  - ``block_mask`` None and ``spec.block_sparse`` set: the mask is predicted
    (``attention.sparse.predict_block_mask``).
  - otherwise (dense causal / sliding-window / full attention): blocks of
    ``min(default_block, T)`` queries and ``min(default_block, S)`` keys, and the
    static mask ``attention.sparse.valid_blocks``, so fully masked blocks are skipped.

  Returns (block_q, block_k, mask [B, K, T/block_q, S/block_k]); raises
  ``unsupported(message)`` for segment ids and lengths that are not whole blocks.
  """
  if segment_ids_BT is not None:
    raise unsupported("segment ids (packed sequences) are not supported. Fix: use "
                      "implementation='xla', or unpack the sequences")
  B, T = q_BTNH.shape[:2]
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  bs = spec.block_sparse
  if block_mask is None and bs is None:
    bq, bk = min(default_block, T), min(default_block, S)
    if T % bq or S % bk:
      raise unsupported(f"T={T}, S={S}: not multiples of the default block {default_block}. "
                        f"Fix: pad the sequence to a multiple of {default_block}, or use "
                        "implementation='xla'")
  else:
    if bs is None:
      raise ValueError("block_mask given but spec.block_sparse is None: the block sizes are "
                       "unknown. Fix: pass a spec with block_sparse=BlockSparse(...)")
    bq, bk = bs.block_q, bs.block_k
    if T % bq or S % bk:
      raise unsupported(f"block_q={bq}, block_k={bk}: T={T} and S={S} must be whole numbers "
                        "of blocks. Fix: choose block sizes dividing the lengths, or pad")
    if block_mask is None:
      block_mask = sparse.predict_block_mask(q_BTNH, k_BSKH, spec)
  valid_QC = jnp.asarray(sparse.valid_blocks(spec, T, S, bq, bk))
  if block_mask is None:
    return bq, bk, jnp.broadcast_to(valid_QC, (B, K) + valid_QC.shape)
  return bq, bk, block_mask & valid_QC
