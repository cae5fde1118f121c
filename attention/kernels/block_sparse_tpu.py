"""Block-sparse flash attention as Pallas TPU (Mosaic) kernels, forward and backward.

What it computes: ``attention.sparse.block_sparse_reference`` — softmax attention
restricted to the kept (query block, key block) pairs of a block mask, intersected
with the token-level causal / sliding-window mask: query ``t`` attends key ``s`` iff
their block is kept, ``s <= t`` (causal) and ``t - s < window`` (window > 0). The
mask is SpargeAttention2-style (``attention.sparse.predict_block_mask``: one mask per
kv head, the union over its query heads); any bool mask works.

How: FlashAttention-2. The forward walks, for every (batch, query head, query
block), only the kept key blocks, with an online softmax (running max ``m``, sum
``l`` and output ``acc`` in fp32 VMEM scratch) and saves the log-sum-exp. The
backward recomputes the probabilities from that lse: one kernel accumulates dq
over the kept key blocks of each query block, another accumulates dk and dv over
the query blocks (of every query head in the kv head's group) that kept each key
block.

Design:

- Layout. The kernels run heads-major: q, o [B, N, T, H], k, v [B, K, S, H]; the
  public wrappers transpose from / to the model's [B, T, N, H] (one HBM pass each).
  Query head ``n`` reads kv head ``n // G`` (grouped-query attention, G = N / K).
- Block lists. ``attention.sparse.block_indices`` turns the mask into counts
  [B, K, Q] and ascending kept indices [B, K, Q, C] whose tail repeats the last kept
  index. Both are flattened to 1-D (SMEM pads multi-dimensional arrays) and passed
  by scalar prefetch; the key/value index_map reads the list, so the grid's last
  axis (C steps, the static upper bound) visits kept blocks first and then
  re-reads the last one — same block index, so no new DMA — while ``pl.when(j <
  count)`` skips the body. A row with no kept block re-reads block 0 and computes
  nothing. The backward's dk/dv kernel does the same with the transposed mask
  (``block_indices(swapaxes(mask))``) over the grid (B, K, C, G * Q).
- Token mask. Inside a visited block the causal / window mask comes from the block
  positions (iota); blocks wholly inside the allowed region skip it (a second,
  unmasked copy of the body chosen by a scalar test).
- Numerics. Logits, softmax statistics and all accumulators are fp32
  (``preferred_element_type=jnp.float32``); probabilities and dS are cast to the
  input dtype for the MXU (bf16 or fp32 inputs). The running max starts at -inf
  and a row whose max is still -inf uses 0 as its shift, so masked entries give
  exp(-inf) = 0 and never inf - inf.
- Empty rows. A query row with no allowed key (possible with a non-causal mask
  whose row is all False, or a user mask that misses the diagonal) outputs zeros
  and lse = **-inf** (log of an empty sum); its gradients are zero, and the
  backward replaces the -inf by 0 before recomputing (all its logits are masked).
- SMEM. The scalar-prefetched lists take 4 * B * K * Q * (C + 1) bytes of SMEM (1 MiB
  on v5e). When that exceeds ``SMEM_BUDGET_BYTES`` a call is split into chunks of
  batch elements (or of kv heads, when one batch element is already too big), each
  its own pallas_call on HBM slices; a single (batch, kv head) must fit (``_check_smem``
  raises otherwise: Q * C up to about 128K, i.e. T = S = 45K at block 128).
- lse and delta live in HBM as [B, N, T, 1] fp32 columns (the [bq, 1] block is
  legal for any bq that is a multiple of 8); ``return_lse`` reshapes to [B, N, T].
  The lse cotangent enters as ``delta - dlse`` (d logits = P * (dP - delta + dlse)).

Limits (it does not do): segment ids / packed sequences, a query offset (decode
with a KV cache), dropout, logit soft-capping, fp8. Head dims must be multiples of
64 up to 256; T and S must be whole numbers of blocks; blocks must be multiples of
8 (128 is the efficient choice: it fills the MXU and the lanes). Query heads of a
group re-read their kv blocks (no sharing across heads within one step). Cost
estimates passed to XLA are dense-equivalent upper bounds (the kept count is only
known at run time).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attention.kernels import common
from core.errors import Unsupported
from core.vma import out_struct

SUPPORTED_HEAD_DIMS = (64, 128, 192, 256)
DEFAULT_BLOCK = 128  # attend_pallas's block size for a static (causal / window) mask
# Scalar-prefetched block lists live in SMEM (1 MiB on v5e); each pallas_call keeps its
# lists under this budget by splitting the (batch, kv head) pairs into chunks.
SMEM_BUDGET_BYTES = 512 * 1024
_SUBLANES = 8


_div, _rem = common.div, common.rem


def _check_smem(q_BTNH, k_BSKH, block_q, block_k):
  """One (batch, kv head)'s scalar-prefetched block lists must fit the SMEM budget."""
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  Q, C = T // block_q, S // block_k
  need = max(_smem_bytes(Q, C), _smem_bytes(C, Q))
  if need > SMEM_BUDGET_BYTES:
    raise Unsupported(
        f"pallas block-sparse attention: {Q} x {C} blocks (T={T}, S={S}, block_q={block_q}, "
        f"block_k={block_k}): the block lists of one (batch, kv head) take {need} bytes of "
        f"SMEM, over the {SMEM_BUDGET_BYTES}-byte budget. Fix: use larger blocks, or "
        "implementation='xla'")


# ----------------------------------------------------------------------------- masks


def _visit(active, q_first, k_first, cfg, body):
  """Runs ``body(mask_or_None)`` for an active block, with the token mask only if needed."""
  if not (cfg.causal or cfg.window):
    pl.when(active)(lambda: body(None))
    return
  needs = common.needs_mask(q_first, k_first, cfg)

  @pl.when(active & needs)
  def _masked():
    body(common.token_mask(q_first, k_first, cfg.block_q, cfg.block_k, cfg))

  @pl.when(active & jnp.logical_not(needs))
  def _full():
    body(None)


def _logits(q, k, scale, mask):
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32) * scale
  return s if mask is None else jnp.where(mask, s, -jnp.inf)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(counts_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                *, G, K, Q, C, cfg):
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  b, n, i, j = (pl.program_id(a) for a in range(4))
  row = (b * K + _div(n, G)) * Q + i
  c = idx_ref[row * C + j]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  def body(mask):
    s = _logits(q_ref[...], k_ref[...], scale, mask)  # [bq, bk] fp32
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all-masked so far: no inf - inf
    alpha = jnp.exp(m_prev - shift)
    p = jnp.exp(s - shift)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
    v = v_ref[...]
    acc_sc[...] = alpha * acc_sc[...] + jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    m_sc[...] = m_new

  _visit(j < counts_ref[row], i * bq, c * bk, cfg, body)

  @pl.when(j == C - 1)
  def _finish():
    l = l_sc[...]
    seen = l > 0.0
    o_ref[...] = (acc_sc[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _cost(B, N, T, S, H, matmuls, *arrays):
  nbytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in arrays)
  return pl.CostEstimate(flops=2 * matmuls * B * N * T * S * H,
                         transcendentals=B * N * T * S, bytes_accessed=nbytes)


def _fwd_call(q_BNTH, k_BKSH, v_BKSH, counts_BKQ, idx_BKQC, cfg):
  bq, bk = cfg.block_q, cfg.block_k
  B, N, T, H = q_BNTH.shape
  K, S = k_BKSH.shape[1], k_BKSH.shape[2]
  G, Q, C = N // K, T // bq, S // bk

  def q_map(b, n, i, j, cnt, idx):
    return b, n, i, 0

  def kv_map(b, n, i, j, cnt, idx):
    return b, _div(n, G), idx[((b * K + _div(n, G)) * Q + i) * C + j], 0

  kernel = functools.partial(_fwd_kernel, G=G, K=K, Q=Q, C=C, cfg=cfg)
  o_shape = out_struct((B, N, T, H), q_BNTH.dtype, q_BNTH, k_BKSH, v_BKSH)
  lse_shape = out_struct((B, N, T, 1), jnp.float32, q_BNTH, k_BKSH, v_BKSH)
  return pl.pallas_call(
      kernel,
      out_shape=(o_shape, lse_shape),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, N, Q, C),
          in_specs=[pl.BlockSpec((None, None, bq, H), q_map),
                    pl.BlockSpec((None, None, bk, H), kv_map),
                    pl.BlockSpec((None, None, bk, H), kv_map)],
          out_specs=[pl.BlockSpec((None, None, bq, H), q_map),
                     pl.BlockSpec((None, None, bq, 1), q_map)],
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, H), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="kestrel_block_sparse_fwd",
      cost_estimate=_cost(B, N, T, S, H, 2, q_BNTH, k_BKSH, v_BKSH, o_shape),
  )(counts_BKQ.reshape(-1), idx_BKQC.reshape(-1), q_BNTH, k_BKSH, v_BKSH)


# ----------------------------------------------------------------------------- backward


def _probs(q, k, lse, scale, mask):
  """Recomputed probabilities [bq, bk] fp32 (lse is finite: empty rows carry 0)."""
  return jnp.exp(_logits(q, k, scale, mask) - lse)


def _dq_kernel(counts_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               acc_sc, *, G, K, Q, C, cfg):
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  b, n, i, j = (pl.program_id(a) for a in range(4))
  row = (b * K + _div(n, G)) * Q + i
  c = idx_ref[row * C + j]

  @pl.when(j == 0)
  def _init():
    acc_sc[...] = jnp.zeros_like(acc_sc)

  def body(mask):
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    p = _probs(q_ref[...], k, lse_ref[...], scale, mask)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    acc_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

  _visit(j < counts_ref[row], i * bq, c * bk, cfg, body)

  @pl.when(j == C - 1)
  def _finish():
    dq_ref[...] = (acc_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(counts_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, dk_sc, dv_sc, *, K, Q, C, R, cfg):
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  b, kh, c, r = (pl.program_id(a) for a in range(4))
  row = (b * K + kh) * C + c
  j = _rem(r, Q)
  i = idx_ref[row * Q + j]

  @pl.when(r == 0)
  def _init():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)

  def body(mask):
    q, do, v = q_ref[...], do_ref[...], v_ref[...]
    p = _probs(q, k_ref[...], lse_ref[...], scale, mask)  # [bq, bk]
    tn = (((0,), (0,)), ((), ()))  # contract the query rows: X^T @ Y
    dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, tn,
                                      preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, tn,
                                      preferred_element_type=jnp.float32)

  _visit(j < counts_ref[row], i * bq, c * bk, cfg, body)

  @pl.when(r == R - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _bwd_setup(q_BNTH, k_BKSH, cfg):
  B, N, T, H = q_BNTH.shape
  K, S = k_BKSH.shape[1], k_BKSH.shape[2]
  G, Q, C = N // K, T // cfg.block_q, S // cfg.block_k
  statics = dict(K=K, Q=Q, C=C, cfg=cfg)
  return B, N, T, H, K, S, G, Q, C, statics


def _dq_call(q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse_BNT1, delta_BNT1, counts_BKQ, idx_BKQC, cfg):
  """dq: the forward's grid, over the kept key blocks of each query block."""
  bq, bk = cfg.block_q, cfg.block_k
  B, N, T, H, K, S, G, Q, C, statics = _bwd_setup(q_BNTH, k_BKSH, cfg)
  operands = (q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse_BNT1, delta_BNT1)

  def q_map(b, n, i, j, cnt, idx):
    return b, n, i, 0

  def kv_map(b, n, i, j, cnt, idx):
    return b, _div(n, G), idx[((b * K + _div(n, G)) * Q + i) * C + j], 0

  q_spec = pl.BlockSpec((None, None, bq, H), q_map)
  kv_spec = pl.BlockSpec((None, None, bk, H), kv_map)
  col_spec = pl.BlockSpec((None, None, bq, 1), q_map)
  dq_shape = out_struct((B, N, T, H), q_BNTH.dtype, *operands)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, G=G, **statics),
      out_shape=dq_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, N, Q, C),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="kestrel_block_sparse_dq",
      cost_estimate=_cost(B, N, T, S, H, 3, *operands, dq_shape),
  )(counts_BKQ.reshape(-1), idx_BKQC.reshape(-1), *operands)
  return (dq,)


def _dkv_call(q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse_BNT1, delta_BNT1, tcounts_BKC, tidx_BKCQ,
              cfg):
  """dk, dv: for each key block, the query blocks that kept it, for each head of the group."""
  bq, bk = cfg.block_q, cfg.block_k
  B, N, T, H, K, S, G, Q, C, statics = _bwd_setup(q_BNTH, k_BKSH, cfg)
  operands = (q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse_BNT1, delta_BNT1)
  R = G * Q

  def qt_map(b, kh, c, r, cnt, idx):
    return b, kh * G + _div(r, Q), idx[((b * K + kh) * C + c) * Q + _rem(r, Q)], 0

  def k_map(b, kh, c, r, cnt, idx):
    return b, kh, c, 0

  qt_spec = pl.BlockSpec((None, None, bq, H), qt_map)
  colt_spec = pl.BlockSpec((None, None, bq, 1), qt_map)
  k_spec = pl.BlockSpec((None, None, bk, H), k_map)
  dk_shape = out_struct((B, K, S, H), k_BKSH.dtype, *operands)
  dv_shape = out_struct((B, K, S, H), v_BKSH.dtype, *operands)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, R=R, **statics),
      out_shape=(dk_shape, dv_shape),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, K, C, R),
          in_specs=[qt_spec, k_spec, k_spec, qt_spec, colt_spec, colt_spec],
          out_specs=[k_spec, k_spec],
          scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="kestrel_block_sparse_dkv",
      cost_estimate=_cost(B, N, T, S, H, 4, *operands, dk_shape, dv_shape),
  )(tcounts_BKC.reshape(-1), tidx_BKCQ.reshape(-1), *operands)
  return dk, dv


def _smem_bytes(rows: int, length: int) -> int:
  """SMEM taken by one (batch, kv head)'s scalar-prefetched counts [rows] and lists
  [rows, length] (int32)."""
  return 4 * rows * (length + 1)


def _chunked(call, q_args, kv_args, list_args, cfg, unit_bytes):
  """Runs ``call(*q_args, *kv_args, *list_args, cfg)`` over (batch, kv head) chunks whose
  scalar-prefetched block lists fit ``SMEM_BUDGET_BYTES``; one call when they all fit.

  q_args are [B, N, ...], kv_args [B, K, ...], list_args [B, K, ...]; every output is
  [B, N or K, ...]. Chunks slice and concatenate in HBM: one extra pass over the
  operands, small next to the attention itself at the lengths that need it.
  """
  B, K = list_args[0].shape[:2]
  G = q_args[0].shape[1] // K
  budget = SMEM_BUDGET_BYTES
  if B * K * unit_bytes <= budget:
    return call(*q_args, *kv_args, *list_args, cfg)
  if K * unit_bytes <= budget:
    bc, kc = budget // (K * unit_bytes), K
  else:
    bc, kc = 1, max(1, budget // unit_bytes)
  rows = []
  for b0 in range(0, B, bc):
    b1 = min(B, b0 + bc)
    cols = []
    for k0 in range(0, K, kc):
      k1 = min(K, k0 + kc)
      cols.append(call(*(x[b0:b1, k0 * G:k1 * G] for x in q_args),
                       *(x[b0:b1, k0:k1] for x in kv_args + list_args), cfg))
    rows.append([jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
                 for outs in zip(*cols)])
  return tuple(jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0] for outs in zip(*rows))


def _forward(q_BNTH, k_BKSH, v_BKSH, counts_BKQ, idx_BKQC, cfg):
  Q, C = idx_BKQC.shape[2:]
  return _chunked(_fwd_call, [q_BNTH], [k_BKSH, v_BKSH], [counts_BKQ, idx_BKQC], cfg,
                  _smem_bytes(Q, C))


def _backward(q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse_BNT1, delta_BNT1, counts_BKQ, idx_BKQC,
              tcounts_BKC, tidx_BKCQ, cfg):
  Q, C = idx_BKQC.shape[2:]
  q_rows = [q_BNTH, do_BNTH, lse_BNT1, delta_BNT1]
  (dq,) = _chunked(_dq_chunk, q_rows, [k_BKSH, v_BKSH], [counts_BKQ, idx_BKQC], cfg,
                   _smem_bytes(Q, C))
  dk, dv = _chunked(_dkv_chunk, q_rows, [k_BKSH, v_BKSH], [tcounts_BKC, tidx_BKCQ], cfg,
                    _smem_bytes(C, Q))
  return dq, dk, dv


def _dq_chunk(q, do, lse, delta, k, v, counts, idx, cfg):
  return _dq_call(q, k, v, do, lse, delta, counts, idx, cfg)


def _dkv_chunk(q, do, lse, delta, k, v, tcounts, tidx, cfg):
  return _dkv_call(q, k, v, do, lse, delta, tcounts, tidx, cfg)


# ----------------------------------------------------------------------------- the kernel


def _forward_bnth(q_BNTH, k_BKSH, v_BKSH, counts_BKQ, idx_BKQC, cfg):
  o, lse_BNT1 = _forward(q_BNTH, k_BKSH, v_BKSH, counts_BKQ, idx_BKQC, cfg)
  return o, lse_BNT1[..., 0]


def _backward_bnth(q, k, v, do, lse_BNT, delta_BNT, counts, idx, tcounts, tidx, cfg):
  return _backward(q, k, v, do, lse_BNT[..., None], delta_BNT[..., None], counts, idx, tcounts,
                   tidx, cfg)


KERNEL = common.BlockSparseKernel(
    name="pallas block-sparse attention", heads_major=True, default_block=DEFAULT_BLOCK,
    head_dim_ok=lambda h: h % 64 == 0 and 0 < h <= 256,
    head_dims=f"{SUPPORTED_HEAD_DIMS} (multiples of 64 up to 256)",
    block_ok=lambda b: b > 0 and b % _SUBLANES == 0,
    block_rule=(f"a multiple of {_SUBLANES} (TPU sublanes). Fix: use a multiple of "
                f"{_SUBLANES}; 128 is preferred (it fills the MXU and the lanes)"),
    forward=_forward_bnth, backward=_backward_bnth, extra_check=_check_smem)

# The public API (``common.BlockSparseKernel.attention`` / ``.attend``).
block_sparse_attention = KERNEL.attention
attend_pallas = KERNEL.attend
