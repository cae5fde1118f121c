"""Block-sparse flash attention as Pallas TPU (Mosaic) kernels, forward and backward.

What it computes: ``attention.sparse.block_sparse_reference`` — softmax attention
restricted to the kept (query block, key block) pairs of a block mask, intersected
with the token-level causal / sliding-window mask: query ``t`` attends key ``s`` iff
their block is kept, ``s <= t`` (causal) and ``t - s < window`` (window > 0). The
mask is SpargeAttention2-style (``attention.sparse.predict_block_mask``: one mask per
kv head, the union over its query heads); any bool mask works.

How: FlashAttention-2. The forward walks, for every (batch, query head), the kept
(query block, key block) pairs of its kv head's mask in row-major order, with an
online softmax per query block (running max ``m``, sum ``l`` and output ``acc`` in
fp32 VMEM scratch), and saves the log-sum-exp. The backward recomputes the
probabilities from that lse: one kernel accumulates dq over the same visits,
another accumulates dk and dv over the transposed visits (each key block's kept
query blocks, for every query head in the kv head's group).

Design:

- Layout. The kernels run heads-major: q, o [B, N, T, H], k, v [B, K, S, H]; the
  public wrappers transpose from / to the model's [B, T, N, H] (one HBM pass each).
  Query head ``n`` reads kv head ``n // G`` (grouped-query attention, G = N / K).
- A grid over the kept blocks only. The mask is traced (predicted from q and k
  under ``jit``), so no kept count is known when the kernel is built, and a grid
  step whose body is skipped still costs a pipeline step (its scalar work and
  DMA bookkeeping, without the matmuls). The choices:
  (a) a grid (B, N, Q, M) bounded by the most kept blocks of any row. M is static
  only if the config caps rows (``BlockSparse.max_blocks``; ``top_k`` is no cap,
  since ``top_p`` and the forced blocks add to it), and a causal mask's rows hold 1
  to Q valid blocks, so without a cap M = C and half the steps are skipped even at
  density 1.
  (b) a flattened *visit list* with one grid step per kept pair, as
  ``moe/kernels/gmm_pallas.py`` does, padded to a static length. Sound for any
  mask, but the static length must be the worst case (every valid block kept), so
  at density d a share 1 - d of the steps would still be skipped steps.
  (c) that list with a *dynamic* grid bound. Mosaic takes traced iteration bounds
  (a ``grid`` entry that is an int32 scalar reaches the kernel like a
  scalar-prefetch operand; the interpreters take it too), so the list keeps its
  static length in SMEM while the grid runs only as far as the longest list.
  This module does (c). ``visit_lists`` compacts the mask, intersected with the
  static causal / window block structure (which drops only blocks holding no
  allowed pair: exact), into one list per (batch, kv head) of packed positions
  ``row * (L + 1) + col`` in row-major order (L columns), with one no-op visit
  ``col = L`` for a row with no kept block (its output must still be written:
  zeros, lse -inf); the tail repeats the last visit (same block indices, so no
  new DMA) and ``pl.when(v < nvis)`` skips it. The grid is (B, N, max nvis) for
  the forward and dq, (B, K, G * max tnvis) for dk/dv over the transposed lists
  (query head innermost, so a key block's dk/dv stays resident over its run). A
  row's visits are consecutive, so its output block stays in VMEM and is written
  back when the row changes, as gmm does for its tiles. The grid steps are the
  kept pairs, plus one per empty row, plus the padding of shorter lists up to the
  longest (batch, kv head). The lists' static length V = sum over rows of
  max(valid blocks, 1) only sizes SMEM (for a causal mask about half of Q * C).
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
- SMEM. The scalar-prefetched lists take 4 * B * K * (V + 1) bytes of SMEM (1 MiB
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
estimates passed to XLA are upper bounds, every statically valid block visited:
the kept count is known only at run time, so XLA's cost analysis cannot see the
density (nor the grid, whose bound is dynamic).
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
  """One (batch, kv head)'s scalar-prefetched visit list must fit the SMEM budget (at
  its longest: every block kept, as with a non-causal dense mask)."""
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  Q, C = T // block_q, S // block_k
  need = _smem_bytes(Q * C)
  if need > SMEM_BUDGET_BYTES:
    raise Unsupported(
        f"pallas block-sparse attention: {Q} x {C} blocks (T={T}, S={S}, block_q={block_q}, "
        f"block_k={block_k}): the block lists of one (batch, kv head) take {need} bytes of "
        f"SMEM, over the {SMEM_BUDGET_BYTES}-byte budget. Fix: use larger blocks, or "
        "implementation='xla'")


# ----------------------------------------------------------------------------- visits


def visit_bound(valid_RL) -> int:
  """Static length of a visit list: each row's valid blocks, at least one per row."""
  return int(np.maximum(np.asarray(valid_RL).sum(-1), 1).sum())


def visit_lists(block_mask_BKRL, valid_RL):
  """The flattened visit list of each (batch, kv head): what the kernels prefetch.

  Rows are query blocks and columns key blocks (forward, dq), or the transpose
  (dk/dv: ``common`` hands the transposed mask and validity).

  Args:
    block_mask_BKRL: bool [B, K, R, L], True = the block is kept.
    valid_RL: bool [R, L] numpy, blocks holding any allowed pair (static); kept
      blocks outside it are dropped (they hold no allowed pair).

  Returns:
    nvis_BK: int32 [B, K] active visits (at least R: one per row).
    visits_BKV: int32 [B, K, V], V = ``visit_bound(valid_RL)``: packed positions
      ``row * (L + 1) + col``, ascending (row-major); ``col == L`` is a no-op visit
      for a row with no kept block; the tail repeats the last active visit.
  """
  B, K, R, L = block_mask_BKRL.shape
  kept_BKRL = block_mask_BKRL & jnp.asarray(valid_RL)
  empty_BKR1 = jnp.logical_not(jnp.any(kept_BKRL, axis=-1, keepdims=True))
  # X = B * K lists of P = R * (L + 1) slots. Visit v is the slot where the running
  # count of visits first reaches v + 1: a binary search per visit (a sort of the
  # slots compiles for seconds on TPU).
  slots_XP = jnp.concatenate([kept_BKRL, empty_BKR1], axis=-1).reshape(B * K, R * (L + 1))
  ends_XP = jnp.cumsum(slots_XP.astype(jnp.int32), axis=-1)
  nvis_X = ends_XP[:, -1]
  v_XV = jnp.minimum(jnp.arange(visit_bound(valid_RL), dtype=jnp.int32), nvis_X[:, None] - 1)
  visits_XV = jax.vmap(functools.partial(jnp.searchsorted, side="left"))(ends_XP, v_XV + 1)
  return nvis_X.reshape(B, K), visits_XV.astype(jnp.int32).reshape(B, K, -1)


def _walk(nvis_ref, vis_ref, base, v, V: int, L: int):
  """Visit ``v`` of list ``base``: (row, col, live, first of its row, last of its row);
  ``first`` and ``last`` are False for the padding past the list's active visits."""
  nv = nvis_ref[base]
  at = lambda u: vis_ref[base * V + u]
  pos = at(v)
  row, col = _div(pos, L + 1), _rem(pos, L + 1)
  live = v < nv
  first = (v == 0) | (_div(at(jnp.maximum(v - 1, 0)), L + 1) != row)
  last = (v == nv - 1) | (_div(at(jnp.minimum(v + 1, V - 1)), L + 1) != row)
  return row, col, live, live & first, live & last


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


def _nbytes(*arrays) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in arrays)


def _cost(visits: int, matmuls: int, bq: int, bk: int, H: int, nbytes: int):
  """Upper bound for ``visits`` block visits (all statically valid blocks kept)."""
  return pl.CostEstimate(flops=2 * matmuls * visits * bq * bk * H,
                         transcendentals=visits * bq * bk, bytes_accessed=nbytes)


def _rows_specs(B, N, K, G, C, V, bq, bk, H):
  """BlockSpecs of the forward / dq grid (B, N, visits): q-shaped, kv-shaped, lse-shaped."""

  def pos(b, n, v, vis):
    return vis[(b * K + _div(n, G)) * V + v]

  def q_map(b, n, v, nvis, vis):
    return b, n, _div(pos(b, n, v, vis), C + 1), 0

  def kv_map(b, n, v, nvis, vis):  # a no-op visit (col C) reads the last block
    return b, _div(n, G), jnp.minimum(_rem(pos(b, n, v, vis), C + 1), C - 1), 0

  return (pl.BlockSpec((None, None, bq, H), q_map), pl.BlockSpec((None, None, bk, H), kv_map),
          pl.BlockSpec((None, None, bq, 1), q_map))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(nvis_ref, vis_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                *, G, K, C, V, cfg):
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  b, n, step = (pl.program_id(a) for a in range(3))
  i, c, live, first, last = _walk(nvis_ref, vis_ref, b * K + _div(n, G), step, V, C)

  @pl.when(first)
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

  _visit(live & (c < C), i * bq, c * bk, cfg, body)

  @pl.when(last)
  def _finish():
    l = l_sc[...]
    seen = l > 0.0
    o_ref[...] = (acc_sc[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _fwd_call(q_BNTH, k_BKSH, v_BKSH, nvis_BK, visits_BKV, cfg):
  bq, bk = cfg.block_q, cfg.block_k
  B, N, T, H = q_BNTH.shape
  K, S = k_BKSH.shape[1], k_BKSH.shape[2]
  G, C, V = N // K, S // bk, visits_BKV.shape[-1]
  q_spec, kv_spec, col_spec = _rows_specs(B, N, K, G, C, V, bq, bk, H)
  kernel = functools.partial(_fwd_kernel, G=G, K=K, C=C, V=V, cfg=cfg)
  o_shape = out_struct((B, N, T, H), q_BNTH.dtype, q_BNTH, k_BKSH, v_BKSH)
  lse_shape = out_struct((B, N, T, 1), jnp.float32, q_BNTH, k_BKSH, v_BKSH)
  kv_bytes = B * N * V * 2 * bk * H * k_BKSH.dtype.itemsize  # k and v blocks, per visit
  return pl.pallas_call(
      kernel,
      out_shape=(o_shape, lse_shape),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, N, jnp.max(nvis_BK)),  # dynamic: the longest list's active visits
          in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=[q_spec, col_spec],
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, H), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="kestrel_block_sparse_fwd",
      cost_estimate=_cost(B * N * V, 2, bq, bk, H,
                          _nbytes(q_BNTH, o_shape, lse_shape) + kv_bytes),
  )(nvis_BK.reshape(-1), visits_BKV.reshape(-1), q_BNTH, k_BKSH, v_BKSH)


# ----------------------------------------------------------------------------- backward


def _probs(q, k, lse, scale, mask):
  """Recomputed probabilities [bq, bk] fp32 (lse is finite: empty rows carry 0)."""
  return jnp.exp(_logits(q, k, scale, mask) - lse)


def _dq_kernel(nvis_ref, vis_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               acc_sc, *, G, K, C, V, cfg):
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  b, n, step = (pl.program_id(a) for a in range(3))
  i, c, live, first, last = _walk(nvis_ref, vis_ref, b * K + _div(n, G), step, V, C)

  @pl.when(first)
  def _init():
    acc_sc[...] = jnp.zeros_like(acc_sc)

  def body(mask):
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    p = _probs(q_ref[...], k, lse_ref[...], scale, mask)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    acc_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

  _visit(live & (c < C), i * bq, c * bk, cfg, body)

  @pl.when(last)
  def _finish():
    dq_ref[...] = (acc_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(nvis_ref, vis_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, dk_sc, dv_sc, *, G, K, Q, V, cfg):
  bq, bk, scale = cfg.block_q, cfg.block_k, cfg.scale
  b, kh, r = (pl.program_id(a) for a in range(3))
  g = _rem(r, G)  # the query head within the group: innermost
  c, i, live, first, last = _walk(nvis_ref, vis_ref, b * K + kh, _div(r, G), V, Q)

  @pl.when(first & (g == 0))
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

  _visit(live & (i < Q), i * bq, c * bk, cfg, body)

  @pl.when(last & (g == G - 1))
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _bwd_setup(q_BNTH, k_BKSH, cfg):
  B, N, T, H = q_BNTH.shape
  K, S = k_BKSH.shape[1], k_BKSH.shape[2]
  G, Q, C = N // K, T // cfg.block_q, S // cfg.block_k
  return B, N, T, H, K, S, G, Q, C


def _dq_call(q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse_BNT1, delta_BNT1, nvis_BK, visits_BKV, cfg):
  """dq: the forward's visits, the kept key blocks of each query block in turn."""
  bq, bk = cfg.block_q, cfg.block_k
  B, N, T, H, K, S, G, Q, C = _bwd_setup(q_BNTH, k_BKSH, cfg)
  V = visits_BKV.shape[-1]
  operands = (q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse_BNT1, delta_BNT1)
  q_spec, kv_spec, col_spec = _rows_specs(B, N, K, G, C, V, bq, bk, H)
  dq_shape = out_struct((B, N, T, H), q_BNTH.dtype, *operands)
  kv_bytes = B * N * V * 2 * bk * H * k_BKSH.dtype.itemsize
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, G=G, K=K, C=C, V=V, cfg=cfg),
      out_shape=dq_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, N, jnp.max(nvis_BK)),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="kestrel_block_sparse_dq",
      cost_estimate=_cost(B * N * V, 3, bq, bk, H,
                          _nbytes(q_BNTH, do_BNTH, lse_BNT1, delta_BNT1, dq_shape) + kv_bytes),
  )(nvis_BK.reshape(-1), visits_BKV.reshape(-1), *operands)
  return (dq,)


def _dkv_call(q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse_BNT1, delta_BNT1, tnvis_BK, tvisits_BKV,
              cfg):
  """dk, dv: each key block's kept query blocks in turn, every head of the group at each."""
  bq, bk = cfg.block_q, cfg.block_k
  B, N, T, H, K, S, G, Q, C = _bwd_setup(q_BNTH, k_BKSH, cfg)
  V = tvisits_BKV.shape[-1]
  operands = (q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse_BNT1, delta_BNT1)

  def pos(b, kh, r, vis):
    return vis[(b * K + kh) * V + _div(r, G)]

  def qt_map(b, kh, r, nvis, vis):  # past the active visits: stay on the last head's block
    g = jnp.where(_div(r, G) < nvis[b * K + kh], _rem(r, G), G - 1)
    return b, kh * G + g, jnp.minimum(_rem(pos(b, kh, r, vis), Q + 1), Q - 1), 0

  def k_map(b, kh, r, nvis, vis):
    return b, kh, _div(pos(b, kh, r, vis), Q + 1), 0

  qt_spec = pl.BlockSpec((None, None, bq, H), qt_map)
  colt_spec = pl.BlockSpec((None, None, bq, 1), qt_map)
  k_spec = pl.BlockSpec((None, None, bk, H), k_map)
  dk_shape = out_struct((B, K, S, H), k_BKSH.dtype, *operands)
  dv_shape = out_struct((B, K, S, H), v_BKSH.dtype, *operands)
  q_bytes = B * N * V * bq * (2 * H * q_BNTH.dtype.itemsize + 2 * 4)  # q, do, lse, delta
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, G=G, K=K, Q=Q, V=V, cfg=cfg),
      out_shape=(dk_shape, dv_shape),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, K, jnp.max(tnvis_BK) * G),
          in_specs=[qt_spec, k_spec, k_spec, qt_spec, colt_spec, colt_spec],
          out_specs=[k_spec, k_spec],
          scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="kestrel_block_sparse_dkv",
      cost_estimate=_cost(B * N * V, 4, bq, bk, H,
                          _nbytes(k_BKSH, v_BKSH, dk_shape, dv_shape) + q_bytes),
  )(tnvis_BK.reshape(-1), tvisits_BKV.reshape(-1), *operands)
  return dk, dv


def _smem_bytes(visits: int) -> int:
  """SMEM taken by one (batch, kv head)'s scalar-prefetched visit list and its count
  (int32)."""
  return 4 * (visits + 1)


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


def _forward(q_BNTH, k_BKSH, v_BKSH, nvis_BK, visits_BKV, cfg):
  return _chunked(_fwd_call, [q_BNTH], [k_BKSH, v_BKSH], [nvis_BK, visits_BKV], cfg,
                  _smem_bytes(visits_BKV.shape[-1]))


def _backward(q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse_BNT1, delta_BNT1, nvis_BK, visits_BKV,
              tnvis_BK, tvisits_BKV, cfg):
  q_rows = [q_BNTH, do_BNTH, lse_BNT1, delta_BNT1]
  (dq,) = _chunked(_dq_chunk, q_rows, [k_BKSH, v_BKSH], [nvis_BK, visits_BKV], cfg,
                   _smem_bytes(visits_BKV.shape[-1]))
  dk, dv = _chunked(_dkv_chunk, q_rows, [k_BKSH, v_BKSH], [tnvis_BK, tvisits_BKV], cfg,
                    _smem_bytes(tvisits_BKV.shape[-1]))
  return dq, dk, dv


def _dq_chunk(q, do, lse, delta, k, v, nvis, visits, cfg):
  return _dq_call(q, k, v, do, lse, delta, nvis, visits, cfg)


def _dkv_chunk(q, do, lse, delta, k, v, tnvis, tvisits, cfg):
  return _dkv_call(q, k, v, do, lse, delta, tnvis, tvisits, cfg)


# ----------------------------------------------------------------------------- the kernel


def _forward_bnth(q_BNTH, k_BKSH, v_BKSH, nvis_BK, visits_BKV, cfg):
  o, lse_BNT1 = _forward(q_BNTH, k_BKSH, v_BKSH, nvis_BK, visits_BKV, cfg)
  return o, lse_BNT1[..., 0]


def _backward_bnth(q, k, v, do, lse_BNT, delta_BNT, nvis, visits, tnvis, tvisits, cfg):
  return _backward(q, k, v, do, lse_BNT[..., None], delta_BNT[..., None], nvis, visits, tnvis,
                   tvisits, cfg)


KERNEL = common.BlockSparseKernel(
    name="pallas block-sparse attention", heads_major=True, default_block=DEFAULT_BLOCK,
    head_dim_ok=lambda h: h % 64 == 0 and 0 < h <= 256,
    head_dims=f"{SUPPORTED_HEAD_DIMS} (multiples of 64 up to 256)",
    block_ok=lambda b: b > 0 and b % _SUBLANES == 0,
    block_rule=(f"a multiple of {_SUBLANES} (TPU sublanes). Fix: use a multiple of "
                f"{_SUBLANES}; 128 is preferred (it fills the MXU and the lanes)"),
    forward=_forward_bnth, backward=_backward_bnth, extra_check=_check_smem,
    schedule=visit_lists)

# The public API (``common.BlockSparseKernel.attention`` / ``.attend``).
block_sparse_attention = KERNEL.attention
attend_pallas = KERNEL.attend
