"""Plain-XLA dense attention: the numerical ground truth for every other backend.

Shapes follow the letters: B batch, T query length, S key length, N query heads,
K key/value heads (grouped-query attention: N is a multiple of K), H head dim.
"""
import jax
import jax.numpy as jnp

from attention import masks
from attention.spec import AttentionSpec


def expand_block_mask(block_mask_BKQC: jax.Array, block_q: int, block_k: int) -> jax.Array:
  """Block mask [B, K, T/block_q, S/block_k] -> token mask [B, K, T, S]."""
  m = jnp.repeat(block_mask_BKQC, block_q, axis=2)
  return jnp.repeat(m, block_k, axis=3)


def attend_reference(q_BTNH, k_BSKH, v_BSKH, spec: AttentionSpec,
                     segment_ids_BT=None, block_mask=None) -> jax.Array:
  """softmax(q k^T * scale + mask) v with fp32 logits and softmax.

  Args:
    q_BTNH: queries [B, T, N, H].
    k_BSKH, v_BSKH: keys and values [B, S, K, H], N % K == 0.
    spec: causal / sliding window / scale.
    segment_ids_BT: optional int [B, T] (T == S); tokens attend only within
      their segment (packed sequences).
    block_mask: optional bool [B, K, T/block_q, S/block_k] (block sizes from
      ``spec.block_sparse``): only kept blocks are attended to, per kv head.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  scale = spec.scale if spec.scale is not None else H ** -0.5
  q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  allowed_BTS = jnp.broadcast_to(masks.token_mask(spec.causal, spec.sliding_window, T, S),
                                 (B, T, S))
  if segment_ids_BT is not None:
    allowed_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  allowed_BKGTS = allowed_BTS[:, None, None]
  if block_mask is not None:
    bs = spec.block_sparse
    if bs is None:
      raise ValueError("block_mask given but spec.block_sparse is None: the block sizes "
                       "are unknown. Fix: pass a spec with block_sparse=BlockSparse(...)")
    allowed_BKGTS = allowed_BKGTS & expand_block_mask(block_mask, bs.block_q, bs.block_k)[:, :, None]
  # A row with no allowed key (possible with segment ids) gives zeros, not NaN.
  (probs,) = masks.softmax(jnp.where(allowed_BKGTS, logits_BKGTS, -jnp.inf))
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v_BSKH.dtype), v_BSKH,
                         preferred_element_type=jnp.float32)
  return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
