"""Block-sparse flash attention as Pallas GPU (Triton) kernels, forward and backward.

What it computes: exactly what ``attention/kernels/block_sparse_tpu.py`` computes
(``attention.sparse.block_sparse_reference``): softmax attention restricted to the
kept (query block, key block) pairs of a block mask [B, K, Q, C] (one mask per kv
head), intersected with the token-level causal / sliding-window mask. Same public
functions, signatures, ``return_lse`` and empty-row convention (zeros, lse = -inf).

How: FlashAttention-2 over the kept blocks only. The Triton lowering has no scalar
prefetch (block index maps cannot read data) and no scratch memory, so:

- Block lists. ``attention.sparse.block_indices`` gives counts [B, K, Q] and the
  ascending kept indices [B, K, Q, C]; both are flattened and passed as ordinary
  int32 inputs (whole arrays in global memory). A program reads its row's count
  and loops (``lax.fori_loop`` with that dynamic trip count) over the kept key
  blocks, loading each k / v tile at a dynamic offset (``pl.ds(c * block_k,
  block_k)``) from the (b, kv head) slab its BlockSpec selects.
- Forward: grid (Q, B * N) (query blocks on the launch grid's x axis, so that
  consecutive programs share a head's k / v in L2). The online-softmax state
  (running max, sum and fp32 output accumulator) is the loop carry; the program
  writes o and the fp32 log-sum-exp [B, N, T].
- Backward: delta = rowsum(dO * O) - dlse in plain JAX. A dq kernel (the forward's
  grid and loop) and a dk / dv kernel on grid (C, B * K) that loops, for each query
  head of the kv head's group, over the query blocks that kept its key block (the
  transposed lists, ``block_indices(swapaxes(mask))``), recomputing P from lse.
  Gradients flow through ``jax.custom_vjp``.
- Layout. The kernels read the model's [B, T, N, H] / [B, S, K, H] directly (rows
  of a tile are H contiguous elements, N * H apart): no transposes in HBM. Query
  head ``n`` reads kv head ``n // G`` (grouped-query attention, G = N / K).
- Token mask. Inside a kept block the causal / window mask comes from iota
  positions, applied only when the block straddles the mask's boundary (a
  ``lax.cond`` on the block's corners; interior blocks skip it).
- Numerics. Logits, softmax statistics and accumulators are fp32; P and dS are cast
  to the input dtype for the tensor cores (bf16), fp32 inputs multiply at
  ``HIGHEST`` precision (IEEE, not TF32). The running max starts at -inf and a row
  whose max is still -inf shifts by 0 (no inf - inf). A row with no allowed key
  outputs zeros and lse = -inf; its gradients are zero (the backward recomputes
  with lse replaced by 0: all its logits are masked).

Limits (it does not do): segment ids, a query offset (decode), dropout, soft-capping,
fp8 / fp16. Head dims 64 and 128. Blocks are powers of two >= 16 (Triton tensors
have power-of-two sizes and ``dot`` needs >= 16) dividing T and S; 64 is the
default (128 x 128 tiles at H = 128 in fp32 spill registers). The kv head's group
re-reads each k / v tile once per query head.

``interpret=True`` runs Pallas's generic interpreter (CPU tests).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from attention.kernels import common
from core.vma import out_struct

try:  # Triton compiler params (jax 0.11.2 and 0.12)
  from jax.experimental.pallas import triton as plgpu
  _CompilerParams = plgpu.CompilerParams
except (ImportError, AttributeError):  # pragma: no cover - older jax
  _CompilerParams = None

SUPPORTED_HEAD_DIMS = (64, 128)
DEFAULT_BLOCK = 64  # attend_pallas's block size for a static (causal / window) mask
_MIN_BLOCK = 16  # Triton's dot needs every block dimension >= 16


_div, _rem = common.div, common.rem


# ----------------------------------------------------------------------------- pieces


def _dot(a, b, contract):
  """fp32-accumulated ``dot_general`` of two tiles; fp32 x fp32 at full precision."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


_NT = ((1,), (1,))  # a @ b.T
_NN = ((1,), (0,))  # a @ b
_TN = ((0,), (0,))  # a.T @ b


def _mask_logits(s, q_first, k_first, cfg):
  """Logits [bq, bk] with the token mask applied (-inf), only if the block needs it."""
  if not (cfg.causal or cfg.window):
    return s
  masked = lambda s: jnp.where(
      common.token_mask(q_first, k_first, cfg.block_q, cfg.block_k, cfg), s, -jnp.inf)
  return jax.lax.cond(common.needs_mask(q_first, k_first, cfg), masked, lambda s: s, s)


def _params(bq, bk, H):
  if _CompilerParams is None:
    return None
  return _CompilerParams(num_warps=8 if bq * max(bk, H) >= 128 * 128 else 4, num_stages=2)


def _full_spec(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(counts_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, N, G, K, Q, C,
                cfg):
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  i, bn = pl.program_id(0), pl.program_id(1)
  row = (_div(bn, N) * K + _div(_rem(bn, N), G)) * Q + i
  count = counts_ref[row]
  base = row * C
  q_first = i * bq
  q = q_ref[...]  # [bq, H]
  H = q.shape[-1]

  def body(j, carry):
    m, l, acc = carry
    k_first = pl.multiple_of(idx_ref[base + j] * bk, bk)
    k = k_ref[pl.ds(k_first, bk), :]
    v = v_ref[pl.ds(k_first, bk), :]
    s = _mask_logits(_dot(q, k, _NT) * scale, q_first, k_first, cfg)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all masked so far: no inf - inf
    alpha = jnp.exp(m - shift)
    p = jnp.exp(s - shift[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, _NN)
    return m_new, l, acc

  init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, H), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, count, body, init)
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _q_specs(N, G, bq, H, S):
  """BlockSpecs on grid (Q, B * N): a query tile, its kv head's whole k / v, an lse row."""
  q_spec = pl.BlockSpec((None, bq, None, H), lambda i, bn: (_div(bn, N), i, _rem(bn, N), 0))
  kv_spec = pl.BlockSpec((None, S, None, H),
                         lambda i, bn: (_div(bn, N), 0, _div(_rem(bn, N), G), 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bn: (_div(bn, N), _rem(bn, N), i))
  return q_spec, kv_spec, row_spec


def _fwd_call(q_BTNH, k_BSKH, v_BSKH, counts_BKQ, idx_BKQC, cfg):
  bq, bk = cfg.block_q, cfg.block_k
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G, Q, C = N // K, T // bq, S // bk
  counts, idx = counts_BKQ.reshape(-1), idx_BKQC.reshape(-1)
  q_spec, kv_spec, row_spec = _q_specs(N, G, bq, H, S)
  operands = (q_BTNH, k_BSKH, v_BSKH)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, N=N, G=G, K=K, Q=Q, C=C, cfg=cfg),
      out_shape=(out_struct((B, T, N, H), q_BTNH.dtype, *operands),
                 out_struct((B, N, T), jnp.float32, *operands)),
      grid=(Q, B * N),
      in_specs=[_full_spec(counts.shape), _full_spec(idx.shape), q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, row_spec],
      compiler_params=_params(bq, bk, H),
      interpret=cfg.interpret,
      name="kestrel_block_sparse_gpu_fwd",
  )(counts, idx, *operands)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(counts_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               N, G, K, Q, C, cfg):
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  i, bn = pl.program_id(0), pl.program_id(1)
  row = (_div(bn, N) * K + _div(_rem(bn, N), G)) * Q + i
  count = counts_ref[row]
  base = row * C
  q_first = i * bq
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, acc):
    k_first = pl.multiple_of(idx_ref[base + j] * bk, bk)
    k = k_ref[pl.ds(k_first, bk), :]
    v = v_ref[pl.ds(k_first, bk), :]
    s = _mask_logits(_dot(q, k, _NT) * scale, q_first, k_first, cfg)
    p = jnp.exp(s - lse[:, None])
    ds = p * (_dot(do, v, _NT) - delta[:, None])
    return acc + _dot(ds.astype(k.dtype), k, _NN)

  acc = jax.lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (acc * scale).astype(dq_ref.dtype)


def _dkv_kernel(tcounts_ref, tidx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, G, K, Q, C, cfg):
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  c, bkh = pl.program_id(0), pl.program_id(1)
  row = bkh * C + c  # bkh = b * K + kv head
  count = tcounts_ref[row]
  base = row * Q
  k_first = c * bk
  k, v = k_ref[...], v_ref[...]  # [bk, H]

  def head(g, carry):
    def body(j, carry):
      dk, dv = carry
      q_first = pl.multiple_of(tidx_ref[base + j] * bq, bq)
      q = q_ref[pl.ds(q_first, bq), g, :]
      do = do_ref[pl.ds(q_first, bq), g, :]
      lse = lse_ref[g, pl.ds(q_first, bq)]
      delta = delta_ref[g, pl.ds(q_first, bq)]
      s = _mask_logits(_dot(q, k, _NT) * scale, q_first, k_first, cfg)
      p = jnp.exp(s - lse[:, None])  # [bq, bk]
      dv = dv + _dot(p.astype(do.dtype), do, _TN)
      ds = p * (_dot(do, v, _NT) - delta[:, None])
      dk = dk + _dot(ds.astype(q.dtype), q, _TN)
      return dk, dv

    return jax.lax.fori_loop(0, count, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, G, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_call(q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT, counts_BKQ, idx_BKQC, cfg):
  """dq: the forward's grid, over the kept key blocks of each query block."""
  bq, bk = cfg.block_q, cfg.block_k
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G, Q, C = N // K, T // bq, S // bk
  counts, idx = counts_BKQ.reshape(-1), idx_BKQC.reshape(-1)
  q_spec, kv_spec, row_spec = _q_specs(N, G, bq, H, S)
  operands = (q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT)
  return pl.pallas_call(
      functools.partial(_dq_kernel, N=N, G=G, K=K, Q=Q, C=C, cfg=cfg),
      out_shape=out_struct((B, T, N, H), q_BTNH.dtype, *operands),
      grid=(Q, B * N),
      in_specs=[_full_spec(counts.shape), _full_spec(idx.shape), q_spec, kv_spec, kv_spec,
                q_spec, row_spec, row_spec],
      out_specs=q_spec,
      compiler_params=_params(bq, bk, H),
      interpret=cfg.interpret,
      name="kestrel_block_sparse_gpu_dq",
  )(counts, idx, *operands)


def _dkv_call(q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT, tcounts_BKC, tidx_BKCQ,
              cfg):
  """dk, dv: for each key block, the query blocks that kept it, for each head of the group."""
  bq, bk = cfg.block_q, cfg.block_k
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G, Q, C = N // K, T // bq, S // bk
  tcounts, tidx = tcounts_BKC.reshape(-1), tidx_BKCQ.reshape(-1)
  # Grid (C, B * K): the group's G query heads, whole sequence; one k / v tile.
  qg_spec = pl.BlockSpec((None, T, G, H), lambda c, bkh: (_div(bkh, K), 0, _rem(bkh, K), 0))
  rowg_spec = pl.BlockSpec((None, G, T), lambda c, bkh: (_div(bkh, K), _rem(bkh, K), 0))
  k_spec = pl.BlockSpec((None, bk, None, H), lambda c, bkh: (_div(bkh, K), c, _rem(bkh, K), 0))
  operands = (q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, G=G, K=K, Q=Q, C=C, cfg=cfg),
      out_shape=(out_struct((B, S, K, H), k_BSKH.dtype, *operands),
                 out_struct((B, S, K, H), v_BSKH.dtype, *operands)),
      grid=(C, B * K),
      in_specs=[_full_spec(tcounts.shape), _full_spec(tidx.shape), qg_spec, k_spec, k_spec,
                qg_spec, rowg_spec, rowg_spec],
      out_specs=[k_spec, k_spec],
      compiler_params=_params(bq, bk, H),
      interpret=cfg.interpret,
      name="kestrel_block_sparse_gpu_dkv",
  )(tcounts, tidx, *operands)


# ----------------------------------------------------------------------------- the kernel


def _backward(q, k, v, do, lse_BNT, delta_BNT, counts, idx, tcounts, tidx, cfg):
  dq = _dq_call(q, k, v, do, lse_BNT, delta_BNT, counts, idx, cfg)
  dk, dv = _dkv_call(q, k, v, do, lse_BNT, delta_BNT, tcounts, tidx, cfg)
  return dq, dk, dv


KERNEL = common.BlockSparseKernel(
    name="pallas GPU block-sparse attention", heads_major=False, default_block=DEFAULT_BLOCK,
    head_dim_ok=lambda h: h in SUPPORTED_HEAD_DIMS, head_dims=str(SUPPORTED_HEAD_DIMS),
    block_ok=lambda b: b >= _MIN_BLOCK and not b & (b - 1),
    block_rule=(f"a power of two >= {_MIN_BLOCK} (Triton tiles have power-of-two sizes "
                f"and its dot needs >= {_MIN_BLOCK}). Fix: use 16, 32, 64 or 128; 64 is "
                "preferred"),
    forward=_fwd_call, backward=_backward)

# The public API (``common.BlockSparseKernel.attention`` / ``.attend``).
block_sparse_attention = KERNEL.attention
attend_pallas = KERNEL.attend
