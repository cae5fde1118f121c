"""Flash attention in plain XLA: blockwise online softmax, O(T) memory, any platform.

The blockwise softmax of Milakov & Gimelshein 2018 as FlashAttention-2 (Dao 2023,
Alg. 1 and 2) runs it, with ``jax.lax.scan`` for the kernel's grid: the forward
scans query blocks and, inside, key blocks, folding each [bq, bk] block of fp32
scores into a running max, sum and output; it returns the output and the per-row
log-sum-exp (LSE). The backward (``custom_vjp``) scans key blocks and, inside, query
blocks: it recomputes each block's probabilities from the LSE, keeps dk, dv of the
key block in the carry and adds dq into an fp32 [T] buffer. Blocks with no allowed
(query, key) pair (``attention.masks``: in the causal future, out of the window) are
skipped with ``lax.cond``. Nothing of size T x S is ever live.

The saved output and LSE are named ``attention.spec.RESIDUALS`` (as splash and our
Pallas kernel name theirs), so a ``jax.checkpoint`` that saves that name keeps them and
recomputes only q, k, v (``attention.upipe``).

Shapes: B batch, T queries, S keys, N query heads, K kv heads (G = N / K), H head dim;
Q = T / bq query blocks, C = S / bk key blocks.
"""
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from attention import masks
from attention.spec import RESIDUALS, AttentionSpec
from core.errors import Unsupported
from core.vma import full_like_varying, grad_like

MAX_BLOCK = 512


def block_size(n: int) -> int:
  """The largest power of two <= min(512, n / 4) dividing n (several blocks even for
  short sequences); ``Unsupported`` when below 8."""
  b = MAX_BLOCK
  while b >= 8 and (n % b or b > n // 4):
    b //= 2
  if b < 8:
    raise Unsupported(f"flash: length {n} has no block of 8 or more tokens dividing it into "
                      ">= 4 blocks. Fix: use a multiple of 32 tokens, or implementation='xla'")
  return b


def _scores(q_BtKGH, k_BsKH, spec, scale, q_first, k_first):
  bq, bk = q_BtKGH.shape[1], k_BsKH.shape[1]
  s_BKGts = jnp.einsum("btkgh,bskh->bkgts", q_BtKGH, k_BsKH,
                       preferred_element_type=jnp.float32) * scale
  ok_ts = masks.allowed(q_first + jnp.arange(bq)[:, None], k_first + jnp.arange(bk)[None, :],
                        spec.causal, spec.sliding_window)
  return jnp.where(ok_ts, s_BKGts, -jnp.inf)


def _live(spec, q_first, k_first, bq, bk):
  return masks.block_has_allowed(q_first, k_first, bq, bk, spec.causal, spec.sliding_window)


def _blocks(x, b):
  """[B, T, ...] -> [T/b, B, b, ...] (the scanned axis first)."""
  return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // b, b, *x.shape[2:]), 1, 0)


def _unblocks(x):
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _forward(q_BTNH, k_BSKH, v_BSKH, spec, bq, bk):
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  scale = spec.scale if spec.scale is not None else H ** -0.5
  q_QBtKGH = _blocks(q_BTNH.reshape(B, T, K, G, H), bq)
  k_CBsKH, v_CBsKH = _blocks(k_BSKH, bk), _blocks(v_BSKH, bk)
  n_k = k_CBsKH.shape[0]

  def query_block(_, xs):
    i, q_BtKGH = xs

    def key_block(carry, ys):
      j, k_BsKH, v_BsKH = ys

      def fold(carry):
        m_BKGt, l_BKGt, acc_BtKGH = carry
        s_BKGts = _scores(q_BtKGH, k_BsKH, spec, scale, i * bq, j * bk)
        return masks.online_fold(m_BKGt, l_BKGt, acc_BtKGH, s_BKGts, v_BsKH)

      live = _live(spec, i * bq, j * bk, bq, bk)
      return jax.lax.cond(live, fold, lambda c: c, carry), None

    m0 = full_like_varying((B, K, G, bq), jnp.float32, q_BtKGH, -jnp.inf)
    l0 = full_like_varying((B, K, G, bq), jnp.float32, q_BtKGH)
    acc0 = full_like_varying((B, bq, K, G, H), jnp.float32, q_BtKGH)
    (m, l, acc), _ = jax.lax.scan(key_block, (m0, l0, acc0),
                                  (jnp.arange(n_k), k_CBsKH, v_CBsKH))
    ok = l > 0   # rows with no allowed key: output 0, lse -inf
    out_BtKGH = acc / jnp.moveaxis(jnp.where(ok, l, 1.0), 3, 1)[..., None]
    lse_BKGt = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)
    return None, (out_BtKGH.astype(q_BTNH.dtype), lse_BKGt)

  _, (out_QBtKGH, lse_QBKGt) = jax.lax.scan(query_block, None,
                                            (jnp.arange(T // bq), q_QBtKGH))
  return _unblocks(out_QBtKGH).reshape(B, T, N, H), lse_QBKGt


def _backward(spec, bq, bk, res, dout_BTNH):
  q_BTNH, k_BSKH, v_BSKH, out_BTNH, lse_QBKGt = res
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  scale = spec.scale if spec.scale is not None else H ** -0.5
  # D = rowsum(dO * O): the softmax-Jacobian term (FlashAttention-2, Alg. 2).
  d_BTKG = jnp.einsum("btkgh,btkgh->btkg", dout_BTNH.reshape(B, T, K, G, H).astype(jnp.float32),
                      out_BTNH.reshape(B, T, K, G, H).astype(jnp.float32))
  d_QBKGt = jnp.moveaxis(_blocks(d_BTKG, bq), 2, 4)
  lse_QBKGt = jnp.where(jnp.isfinite(lse_QBKGt), lse_QBKGt, 0.0)   # empty rows: p = 0
  q_QBtKGH = _blocks(q_BTNH.reshape(B, T, K, G, H), bq)
  do_QBtKGH = _blocks(dout_BTNH.reshape(B, T, K, G, H), bq)
  n_q = T // bq

  def key_block(dq_QBtKGH, xs):
    j, k_BsKH, v_BsKH = xs

    def query_block(carry, ys):
      i, q_BtKGH, do_BtKGH, lse_BKGt, d_BKGt = ys

      def grads(carry):
        dk_BsKH, dv_BsKH, dq_QBtKGH = carry
        s_BKGts = _scores(q_BtKGH, k_BsKH, spec, scale, i * bq, j * bk)
        p_BKGts = jnp.exp(s_BKGts - lse_BKGt[..., None])
        dv_BsKH = dv_BsKH + jnp.einsum("bkgts,btkgh->bskh", p_BKGts,
                                       do_BtKGH.astype(jnp.float32))
        dp_BKGts = jnp.einsum("btkgh,bskh->bkgts", do_BtKGH, v_BsKH,
                              preferred_element_type=jnp.float32)
        ds_BKGts = p_BKGts * (dp_BKGts - d_BKGt[..., None]) * scale
        dq_BtKGH = jnp.einsum("bkgts,bskh->btkgh", ds_BKGts, k_BsKH.astype(jnp.float32))
        dk_BsKH = dk_BsKH + jnp.einsum("bkgts,btkgh->bskh", ds_BKGts,
                                       q_BtKGH.astype(jnp.float32))
        dq_QBtKGH = dq_QBtKGH.at[i].add(dq_BtKGH)
        return dk_BsKH, dv_BsKH, dq_QBtKGH

      live = _live(spec, i * bq, j * bk, bq, bk)
      return jax.lax.cond(live, grads, lambda c: c, carry), None

    dkv0 = full_like_varying(k_BsKH.shape, jnp.float32, q_BTNH)
    (dk, dv, dq_QBtKGH), _ = jax.lax.scan(
        query_block, (dkv0, dkv0, dq_QBtKGH),
        (jnp.arange(n_q), q_QBtKGH, do_QBtKGH, lse_QBKGt, d_QBKGt))
    return dq_QBtKGH, (dk, dv)

  dq0 = full_like_varying(q_QBtKGH.shape, jnp.float32, q_BTNH)
  dq_QBtKGH, (dk_CBsKH, dv_CBsKH) = jax.lax.scan(
      key_block, dq0, (jnp.arange(k_BSKH.shape[1] // bk), _blocks(k_BSKH, bk),
                       _blocks(v_BSKH, bk)))
  dq = _unblocks(dq_QBtKGH).reshape(B, T, N, H)
  return (grad_like(dq, q_BTNH), grad_like(_unblocks(dk_CBsKH), k_BSKH),
          grad_like(_unblocks(dv_CBsKH), v_BSKH))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q_BTNH, k_BSKH, v_BSKH, spec, bq, bk):
  return _forward(q_BTNH, k_BSKH, v_BSKH, spec, bq, bk)[0]


def _flash_fwd(q_BTNH, k_BSKH, v_BSKH, spec, bq, bk):
  out_BTNH, lse_QBKGt = _forward(q_BTNH, k_BSKH, v_BSKH, spec, bq, bk)
  out_BTNH, lse_QBKGt = checkpoint_name(out_BTNH, RESIDUALS), checkpoint_name(lse_QBKGt,
                                                                              RESIDUALS)
  return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, out_BTNH, lse_QBKGt)


_flash.defvjp(_flash_fwd, _backward)


def flash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                    spec: AttentionSpec = AttentionSpec()) -> jax.Array:
  """softmax(q k^T * scale + mask) v, blockwise (see the module docstring).

  Args:
    q_BTNH: queries [B, T, N, H]; k_BSKH, v_BSKH: keys, values [B, S, K, H], N % K == 0.
    spec: causal / sliding window / scale (no block-sparse or hierarchical spec).

  Returns:
    [B, T, N, H] in q's dtype; a row with no allowed key is 0.

  Raises:
    core.errors.Unsupported: T or S without a block size (``block_size``).
  """
  return _flash(q_BTNH, k_BSKH, v_BSKH, spec, block_size(q_BTNH.shape[1]),
                block_size(k_BSKH.shape[1]))
