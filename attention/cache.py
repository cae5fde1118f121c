"""Key/value caches for decoding softmax attention, and attention over them.

A layer's cache is ``{"k", "v"}``, each [B, R, K, H] (kv heads only: grouped-query
attention stores K of them, not N). Rows decode independently: row b's next token
sits at position ``start_b`` (its own length), so prompts of different lengths share
one batch without padding on the left; positions are the same as in training.

Slots. A full cache (R >= the longest sequence) keeps position p in slot p. A
sliding-window layer keeps a ring of R = window + slack slots, position p in slot
p mod R; ``slack`` (the most tokens one call adds, less one; a speculative
verification adds gamma + 1) keeps every key a query of the call needs from being
overwritten by a later token of the same call, and keeps keys of rejected draft
tokens (written, then rolled back by lowering the length) out of every later
query's window. Slot s of a ring last written up to position ``last`` holds
``last - ((last - s) mod R)`` (negative: never written).

``write`` scatters only the valid new tokens (``n_b`` of the call's T; of those
only the last R when a prompt is longer than the ring), so padding never
overwrites a key. ``attend_cached`` is attention of the call's queries over the
slots with the mask of the spec:

- causal / sliding window: ``masks.allowed`` on positions;
- hierarchical (``attention.hierarchical``): tokens of the own and ``local_blocks``
  previous blocks, plus the mean key / value of each older block, computed from the
  (full) cache, with the same log(block) weight as in training;
- block-sparse: SpargeAttention2's rule applied per query token (``causal_token_rule``).

Block-sparse decoding (our decision). The training rule scores a whole query block
(the mean of its queries, later ones included) against whole key blocks (the
diagonal block's later keys included), so no causal decoder can reproduce it. The
decoder applies the rule causally per token: query t is scored against the mean of
each complete key block before its own and against the mean of its own block's keys
up to t; top-k, top-p, sink, local and the diagonal block are as in training, the
union over a kv head's query heads is kept, and attention is masked to the kept
blocks. This is SpargeAttention2's rule at block_q = 1 without look-ahead; a prompt
is processed under the same rule, so prefill and decoding agree with
``causal_token_rule`` on the whole sequence.
"""
import math

import jax
import jax.numpy as jnp

from attention import masks, sparse
from attention.spec import AttentionSpec


def init(batch: int, slots: int, kv_heads: int, head_dim: int, dtype) -> dict:
  """Empty K/V slots [B, R, K, H] of ``dtype``; int8 adds fp32 scales [B, R, K] (one per
  token and kv head: absmax / 127 over head_dim, ``write``)."""
  shape = (batch, slots, kv_heads, head_dim)
  cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  if jnp.dtype(dtype) == jnp.int8:
    cache.update(k_scale=jnp.zeros(shape[:3], jnp.float32),
                 v_scale=jnp.zeros(shape[:3], jnp.float32))
  return cache


def _int8(x_BTKH: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-(token, head) int8: (values, scale = absmax / 127)."""
  x = x_BTKH.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale


def read(cache: dict, dtype) -> tuple[jax.Array, jax.Array]:
  """The cached (k, v) in ``dtype`` (int8 caches dequantized)."""
  if "k_scale" not in cache:
    return cache["k"], cache["v"]
  deq = lambda x, s: (x.astype(jnp.float32) * s[..., None]).astype(dtype)
  return deq(cache["k"], cache["k_scale"]), deq(cache["v"], cache["v_scale"])


def slot_positions(last_B: jax.Array, slots: int) -> jax.Array:
  """Position held by each slot [B, R] when positions up to ``last_B`` were written
  (p mod R layout); negative for slots never written."""
  s = jnp.arange(slots)[None, :]
  last = last_B[:, None]
  return last - jnp.mod(last - s, slots)


def write(cache: dict, k_BTKH: jax.Array, v_BTKH: jax.Array, start_B: jax.Array,
          n_B: jax.Array) -> dict:
  """Writes tokens i < n_b of the call (position start_b + i) into slot (position mod R);
  of a call longer than the ring only the last R valid tokens are written."""
  B, T = k_BTKH.shape[:2]
  R = cache["k"].shape[1]
  i = jnp.arange(T)[None, :]
  keep = (i < n_B[:, None]) & (i >= n_B[:, None] - R)
  slot = jnp.where(keep, jnp.mod(start_B[:, None] + i, R), R)  # R: out of range, dropped
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  put = lambda c, x: c.at[rows, slot].set(x.astype(c.dtype), mode="drop")
  if "k_scale" in cache:
    (kq, ks), (vq, vs) = _int8(k_BTKH), _int8(v_BTKH)
    return {"k": put(cache["k"], kq), "v": put(cache["v"], vq),
            "k_scale": put(cache["k_scale"], ks), "v_scale": put(cache["v_scale"], vs)}
  return {"k": put(cache["k"], k_BTKH), "v": put(cache["v"], v_BTKH)}


def _dense(q_BTNH, k_BSKH, v_BSKH, ok, scale, extra=None):
  """Softmax attention with a boolean mask ``ok`` broadcastable to [B, K, G, T, S]; ``extra``
  = (logits [B, K, G, T, C], values [B, C, K, H]) joins the same softmax."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q = q_BTNH.reshape(B, T, K, N // K, H)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k_BSKH.astype(q.dtype),
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(ok, logits, -jnp.inf)
  if extra is None:
    (p,) = masks.softmax(logits)
    out = jnp.einsum("bkgts,bskh->btkgh", p.astype(q.dtype), v_BSKH.astype(q.dtype),
                     preferred_element_type=jnp.float32)
  else:
    extra_logits, extra_v = extra
    p, pe = masks.softmax(logits, extra_logits)
    out = (jnp.einsum("bkgts,bskh->btkgh", p.astype(q.dtype), v_BSKH.astype(q.dtype),
                      preferred_element_type=jnp.float32)
           + jnp.einsum("bkgtc,bckh->btkgh", pe.astype(q.dtype), extra_v.astype(q.dtype),
                        preferred_element_type=jnp.float32))
  return out.reshape(B, T, N, H).astype(q_BTNH.dtype)


def causal_token_rule(q_BTNH, qpos_BT, k_BSKH, kpos_BS, spec: AttentionSpec) -> jax.Array:
  """The block-sparse rule per query token, causally (module docstring): bool
  [B, K, T, S] over key slots (a full cache: slot = position)."""
  bs = spec.block_sparse
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  bk = bs.block_k
  if S % bk:
    raise ValueError(f"cache length {S} is not a multiple of block_k={bk}. Fix: round "
                     "the cache up to a multiple of model.sparse.block_k")
  C, G = S // bk, N // K
  scale = spec.scale if spec.scale is not None else H ** -0.5
  q = jax.lax.stop_gradient(q_BTNH).astype(jnp.float32).reshape(B, T, K, G, H)
  kb = jax.lax.stop_gradient(k_BSKH).astype(jnp.float32).reshape(B, C, bk, K, H)
  csum = jnp.cumsum(kb, axis=2)
  full = csum[:, :, -1] / bk  # [B, C, K, H]
  t = qpos_BT
  diag = t // bk  # [B, T]
  within = t % bk
  own = jnp.take_along_axis(csum.reshape(B, S, K, H), t[:, :, None, None], axis=1)
  own = own / (within + 1)[:, :, None, None].astype(jnp.float32)  # [B, T, K, H]
  scores = jnp.einsum("btkgh,bckh->bkgtc", q, full) * scale
  own_score = jnp.einsum("btkgh,btkh->bkgt", q, own) * scale
  j = jnp.arange(C)[None, None, :]
  is_diag = j == diag[:, :, None]  # [B, T, C]
  scores = jnp.where(is_diag[:, None, None], own_score[..., None], scores)
  valid = masks.block_has_allowed(t[:, :, None], j * bk, 1, bk, spec.causal, spec.sliding_window)
  forced = is_diag | (j < bs.sink_blocks) | ((j < diag[:, :, None])
                                              & (j >= diag[:, :, None] - bs.local_blocks))
  keep = sparse.select_blocks(scores, valid[:, None, None], forced[:, None, None],
                              top_k=bs.top_k, top_p=bs.top_p, max_blocks=bs.max_blocks)
  keep_BKTC = sparse.group_union(keep, forced[:, None], bs.max_blocks)
  block_of_slot = jnp.clip(kpos_BS, 0) // bk  # [B, S]
  keep_tok = jnp.take_along_axis(keep_BKTC, block_of_slot[:, None, None, :]
                                 .repeat(K, 1).repeat(T, 2), axis=3)
  return keep_tok


def attend_cached(q_BTNH, qpos_BT, k_BSKH, v_BSKH, kpos_BS, spec: AttentionSpec):
  """Queries at positions ``qpos_BT`` over key slots holding positions ``kpos_BS``
  (negative: empty) under ``spec`` (module docstring)."""
  H = q_BTNH.shape[-1]
  scale = spec.scale if spec.scale is not None else H ** -0.5
  qp, kp = qpos_BT[:, :, None], kpos_BS[:, None, :]
  ok_BTS = masks.allowed(qp, kp, spec.causal, spec.sliding_window) & (kp >= 0)
  if spec.hierarchical is not None:
    h = spec.hierarchical
    b, L = h.block, h.local_blocks
    S = k_BSKH.shape[1]
    if S % b:
      raise ValueError(f"cache length {S} is not a multiple of block={b}. Fix: round the "
                       "cache up to a multiple of model.hierarchical.block")
    C = S // b
    ok_BTS &= kp // b >= qp // b - L
    B, T, N, _ = q_BTNH.shape
    K = k_BSKH.shape[2]
    ksum = k_BSKH.astype(jnp.float32).reshape(B, C, b, K, H).mean(axis=2).astype(k_BSKH.dtype)
    vsum = v_BSKH.astype(jnp.float32).reshape(B, C, b, K, H).mean(axis=2).astype(v_BSKH.dtype)
    q = q_BTNH.reshape(B, T, K, N // K, H)
    summ = jnp.einsum("btkgh,bckh->bkgtc", q, ksum.astype(q.dtype),
                      preferred_element_type=jnp.float32)
    summ_ok = jnp.arange(C)[None, None, :] < qpos_BT[:, :, None] // b - L  # [B, T, C]
    summ = jnp.where(summ_ok[:, None, None], summ * scale + math.log(b), -jnp.inf)
    return _dense(q_BTNH, k_BSKH, v_BSKH, ok_BTS[:, None, None], scale, (summ, vsum))
  if spec.block_sparse is not None:
    keep_BKTS = causal_token_rule(q_BTNH, qpos_BT, k_BSKH, kpos_BS, spec)
    return _dense(q_BTNH, k_BSKH, v_BSKH, (ok_BTS[:, None] & keep_BKTS)[:, :, None], scale)
  return _dense(q_BTNH, k_BSKH, v_BSKH, ok_BTS[:, None, None], scale)

