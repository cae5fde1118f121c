"""The causal / sliding-window mask and the empty-row-safe softmax, once.

Query t attends key s iff ``s <= t`` (causal) and ``t - s < window`` (window > 0).
Every path uses these: the reference (token masks), the block-sparse rule and
kernels (which blocks hold an allowed pair, which need the token mask at all), the
ring (which visiting blocks are live). The functions only use operators, so they
work on numpy arrays, jax arrays and Pallas values alike.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def allowed(q_pos, k_pos, causal: bool, window: int):
  """True where the query at ``q_pos`` may attend the key at ``k_pos`` (broadcasting)."""
  ok = (q_pos >= k_pos) if causal else (q_pos == q_pos) & (k_pos == k_pos)
  if window:
    ok = ok & (q_pos - k_pos < window)
  return ok


def token_mask(causal: bool, window: int, T: int, S: int, q_offset=0, xp=jnp):
  """bool [T, S]: queries at ``q_offset + t``, keys at ``s``. ``xp``: jnp or np."""
  return allowed(q_offset + xp.arange(T)[:, None], xp.arange(S)[None, :], causal, window)


def block_has_allowed(q_first, k_first, bq: int, bk: int, causal: bool, window: int):
  """Whether the block of queries ``q_first ..+ bq`` and keys ``k_first ..+ bk`` holds
  at least one allowed pair (its closest corner is allowed)."""
  live = (q_first == q_first) & (k_first == k_first)
  if causal:
    live = live & (k_first <= q_first + bq - 1)
  if window:  # the smallest q - k of the block
    live = live & (q_first - (k_first + bk - 1) < window)
  return live


def block_needs_mask(q_first, k_first, bq: int, bk: int, causal: bool, window: int):
  """Whether the block holds any forbidden pair (else it is attended whole)."""
  needs = (q_first != q_first) | (k_first != k_first)
  if causal:
    needs = needs | (k_first + bk - 1 > q_first)
  if window:
    needs = needs | ((q_first + bq - 1) - k_first >= window)
  return needs


def valid_blocks(causal: bool, window: int, T: int, S: int, block_q: int, block_k: int,
                 q_offset: int = 0) -> np.ndarray:
  """bool [T / block_q, S / block_k] (numpy): blocks holding at least one allowed pair."""
  q_first = q_offset + np.arange(T // block_q)[:, None] * block_q
  k_first = np.arange(S // block_k)[None, :] * block_k
  return np.asarray(block_has_allowed(q_first, k_first, block_q, block_k, causal, window))


def softmax(*logits):
  """One softmax over the last axes of several logit arrays taken together (masked
  entries are -inf). A row with no finite logit gives zeros, never NaN; the row max
  carries no gradient. Returns one probability array per input, fp32 as given."""
  m = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in logits])
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  ps = [jnp.exp(x - m) for x in logits]
  denom = sum(jnp.sum(p, axis=-1, keepdims=True) for p in ps)
  denom = jnp.where(denom > 0, denom, 1.0)
  return [p / denom for p in ps]


def online_fold(m_BKGt, l_BKGt, acc_BtKGH, s_BKGts, v_BsKH):
  """One step of the blockwise online softmax (Milakov & Gimelshein 2018; FlashAttention):
  fold the scores ``s`` [B, K, G, t, s] (fp32, masked -inf) of a key block and its values
  [B, s, K, H] into the running max ``m``, sum ``l`` [B, K, G, t] and output ``acc``
  [B, t, K, G, H] (fp32). A row with no finite score so far keeps m = -inf and adds 0."""
  m_new = jnp.maximum(m_BKGt, jnp.max(s_BKGts, axis=-1))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  alpha_BKGt = jnp.exp(m_BKGt - m_safe)
  p_BKGts = jnp.exp(s_BKGts - m_safe[..., None])
  l_new = alpha_BKGt * l_BKGt + jnp.sum(p_BKGts, axis=-1)
  pv_BtKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGts.astype(v_BsKH.dtype), v_BsKH,
                        preferred_element_type=jnp.float32)
  return m_new, l_new, jnp.moveaxis(alpha_BKGt, 3, 1)[..., None] * acc_BtKGH + pv_BtKGH
