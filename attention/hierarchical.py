"""Hierarchical attention: nearby tokens exactly, distant blocks as pooled summaries.

Query t (in block i = t // b) attends, in one softmax, to
- every key s <= t in blocks i - L .. i, token by token (L = ``local_blocks``), and
- one summary per older block j < i - L: the block's mean key and mean value, its
  logit raised by log(b) so a summary weighs like the b tokens it stands for
  (exact when the block's keys are equal; our choice, stated here).
Work is O(T (L + 1) b + T^2 / b) instead of O(T^2): the masked-out token blocks
are never computed (``blocked``); ``reference`` builds the full key set
[tokens; summaries] with a dense mask and is the slow twin.

Shapes: B batch, T tokens, N query heads, K kv heads (G = N / K), H head dim,
C = T / b blocks.
"""
import math

import jax
import jax.numpy as jnp

from attention import masks
from attention.spec import AttentionSpec


def _check(spec: AttentionSpec, T: int, S: int):
  h = spec.hierarchical
  if T != S:
    raise ValueError(f"hierarchical attention needs q_len == kv_len (got {T}, {S}). Fix: use "
                     "it for self-attention over one sequence")
  if T % h.block:
    raise ValueError(f"block={h.block}: the sequence length {T} is not divisible by it "
                     f"(config: model.hierarchical.block). Fix: choose a block dividing {T}")


def summaries(x_BSKH: jax.Array, block: int) -> jax.Array:
  """Mean over each block: [B, S, K, H] -> [B, S / block, K, H] (x's dtype)."""
  B, S, K, H = x_BSKH.shape
  pooled = jnp.mean(x_BSKH.astype(jnp.float32).reshape(B, S // block, block, K, H), axis=2)
  return pooled.astype(x_BSKH.dtype)


def hierarchical_reference(q_BTNH, k_BSKH, v_BSKH, spec: AttentionSpec) -> jax.Array:
  """Dense twin: attention over [tokens; block summaries] with a [T, S + C] mask."""
  h = spec.hierarchical
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  _check(spec, T, S)
  b, L, C, G = h.block, h.local_blocks, S // h.block, N // K
  scale = spec.scale if spec.scale is not None else H ** -0.5
  k_all = jnp.concatenate([k_BSKH, summaries(k_BSKH, b)], axis=1)
  v_all = jnp.concatenate([v_BSKH, summaries(v_BSKH, b)], axis=1)
  t = jnp.arange(T)[:, None]
  s = jnp.arange(S)[None, :]
  token_ok = masks.allowed(t, s, True, 0) & (s // b >= t // b - L)
  summary_ok = jnp.arange(C)[None, :] < t // b - L
  ok_TA = jnp.concatenate([token_ok, summary_ok], axis=1)
  bias_A = jnp.concatenate([jnp.zeros(S), jnp.full(C, math.log(b))])
  q = q_BTNH.reshape(B, T, K, G, H)
  logits = jnp.einsum("btkgh,bakh->bkgta", q, k_all, preferred_element_type=jnp.float32)
  logits = jnp.where(ok_TA, logits * scale + bias_A, -jnp.inf)
  (probs,) = masks.softmax(logits)
  out = jnp.einsum("bkgta,bakh->btkgh", probs.astype(v_all.dtype), v_all,
                   preferred_element_type=jnp.float32)
  return out.reshape(B, T, N, H).astype(q_BTNH.dtype)


def hierarchical_blocked(q_BTNH, k_BSKH, v_BSKH, spec: AttentionSpec) -> jax.Array:
  """The fast path: each query block meets its L + 1 local key blocks and C summaries."""
  h = spec.hierarchical
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  _check(spec, T, S)
  b, L, C, G = h.block, h.local_blocks, S // h.block, N // K
  W = min(L, C - 1) + 1  # local blocks per query block, own block included
  scale = spec.scale if spec.scale is not None else H ** -0.5
  kb = k_BSKH.reshape(B, C, b, K, H)
  vb = v_BSKH.reshape(B, C, b, K, H)
  pad = lambda x: jnp.pad(x, ((0, 0), (W - 1, 0), (0, 0), (0, 0), (0, 0)))
  # Window of query block i: key blocks i - W + 1 .. i (zero blocks before the start).
  kw = jnp.concatenate([pad(kb)[:, l:l + C] for l in range(W)], axis=2)  # [B, C, W*b, K, H]
  vw = jnp.concatenate([pad(vb)[:, l:l + C] for l in range(W)], axis=2)
  q = q_BTNH.reshape(B, C, b, K, G, H)
  local = jnp.einsum("bctkgh,bcskh->bkgcts", q, kw, preferred_element_type=jnp.float32) * scale
  t_in = jnp.arange(b)[:, None]
  s_win = jnp.arange(W * b)[None, :]  # position in the window; own block starts at (W-1)*b
  blk = jnp.arange(C)[:, None, None]
  local_ok = (s_win <= (W - 1) * b + t_in) & (blk - (W - 1) + s_win // b >= 0)  # [C, b, W*b]
  local = jnp.where(local_ok, local, -jnp.inf)
  ksum, vsum = summaries(k_BSKH, b), summaries(v_BSKH, b)
  summ = jnp.einsum("bctkgh,bjkh->bkgctj", q, ksum, preferred_element_type=jnp.float32)
  summ_ok = jnp.arange(C)[None, None, :] < jnp.arange(C)[:, None, None] - L  # [C, 1, C]
  summ = jnp.where(summ_ok, summ * scale + math.log(b), -jnp.inf)
  p_local, p_summ = masks.softmax(local, summ)
  out = (jnp.einsum("bkgcts,bcskh->bctkgh", p_local.astype(vw.dtype), vw,
                    preferred_element_type=jnp.float32)
         + jnp.einsum("bkgctj,bjkh->bctkgh", p_summ.astype(vsum.dtype), vsum,
                      preferred_element_type=jnp.float32))
  return out.reshape(B, T, N, H).astype(q_BTNH.dtype)
