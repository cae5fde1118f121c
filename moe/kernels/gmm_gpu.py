"""Grouped matmul as Pallas GPU (Triton) kernels, differentiable through ``custom_vjp``.

``gmm(lhs_MK, rhs_GKN, group_sizes_G)[m] = lhs_MK[m] @ rhs_GKN[group(m)]``: groups
are contiguous row ranges of ``lhs`` in group order, rows past
``sum(group_sizes_G)`` are zeros, groups may be empty. ``tgmm`` is the weight
gradient ``out_GKN[g] = x_MK[rows of g].T @ dout_MN[rows of g]``. The semantics
are those of ``moe/kernels/gmm_pallas.py`` (the TPU kernel); the design differs
because the Triton lowering has no scalar prefetch: block index maps cannot
read data, so the kernels take whole arrays and slice them with ``pl.ds``.

Design:

- Visits. ``make_visits`` (plain ``jnp``) lists ``(m-tile, group)`` pairs, one
  per m-tile a non-empty group touches (a tile straddling a boundary is visited
  once per group), plus visits of a *tail* pseudo-group ``G`` covering rows
  ``[sum(group_sizes), M_padded)``. Their count is at most ``num_m_tiles + G``,
  the static length of the grid's first axis; unused slots get group ``G + 1``
  and return at once.
- gmm. Program ``(visit, n-tile)`` loops over the K tiles (``fori_loop``, fp32
  accumulator) and stores only its group's rows (``store(..., mask=...)``).
  Different visits of one tile write disjoint rows, so programs never race and
  every row of the padded output is written exactly once; tail visits run no K
  step and write zeros.
- tgmm. Program ``(group, k-tile, n-tile)`` loops over the m-tiles its group
  touches (a dynamic trip count from the group offsets), loading ``x`` and
  ``dout`` with rows outside the group masked to zero; an empty group writes
  zeros.
- Padding and tiles. Tiles are powers of two >= 16 (Triton's ``dot``); a
  dimension smaller than its tile gets the smallest such tile that covers it.
  M, K, N are zero-padded to tile multiples inside the wrapper, then sliced.
- Precision. Accumulation is fp32. Two fp32 operands multiply at ``HIGHEST``
  precision (IEEE, not TF32); bf16 operands use the tensor cores.
- Backward: ``d_lhs = gmm(dout, rhs[g].T)`` by the same kernel with
  ``transpose_rhs=True`` (no transpose in HBM), ``d_rhs = tgmm(lhs, dout)``.

``interpret=True`` runs Pallas's generic interpreter (CPU tests); it fills
unwritten output with NaN, so a forgotten row shows up.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from core.vma import out_struct
from moe.kernels import common

try:  # masked load/store live in the Triton module (jax 0.11.2 and 0.12)
  from jax.experimental.pallas import triton as plgpu
  _load, _store = plgpu.load, plgpu.store
  _CompilerParams = plgpu.CompilerParams
except (ImportError, AttributeError):  # pragma: no cover - older jax
  plgpu = None
  _load, _store = pl.load, pl.store
  _CompilerParams = None

DEFAULT_TILING = (64, 64, 64)  # (tm, tk, tn)
_MIN_TILE = 16  # Triton's dot needs every block dimension >= 16.


def make_visits(group_sizes_G: jax.Array, m_padded: int, tm: int):
  """The ``(m-tile, group)`` visit schedule of ``gmm``.

  Args:
    group_sizes_G: [G] int32 row counts (zeros allowed); ends are clamped to ``m_padded``.
    m_padded: rows of the padded lhs, a multiple of ``tm``.
    tm: rows per m-tile.

  Returns:
    ``(offsets_G2, tiles_V, groups_V)``, all int32: ``offsets_G2`` [G+2] the first
    row of each group, then of the tail, then ``m_padded``; ``tiles_V`` and
    ``groups_V`` [V = m_padded // tm + G] the m-tile and group of each visit
    (``G``: the tail, ``G + 1``: an unused slot).
  """
  G = group_sizes_G.shape[0]
  num_tiles = m_padded // tm
  ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m_padded)
  ends_H = jnp.append(ends_G, m_padded).astype(jnp.int32)  # H = G + 1 groups with the tail
  offsets_G2 = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_H])
  starts_H = offsets_G2[:-1]
  first_H = starts_H // tm
  counts_H = jnp.where(ends_H > starts_H, (ends_H - 1) // tm - first_H + 1, 0)
  visit_ends_H = jnp.cumsum(counts_H)
  v_V = jnp.arange(num_tiles + G, dtype=jnp.int32)
  groups_V = jnp.searchsorted(visit_ends_H, v_V, side="right").astype(jnp.int32)
  h_V = jnp.minimum(groups_V, G)
  tiles_V = first_H[h_V] + v_V - (visit_ends_H - counts_H)[h_V]
  tiles_V = jnp.where(groups_V <= G, tiles_V, 0).astype(jnp.int32)
  return offsets_G2, tiles_V, groups_V


def _tile(dim: int, tile: int, what: str) -> tuple[int, int]:
  """(tile, padded dim): ``tile``, or the smallest power of two >= 16 covering a small dim."""
  if tile < _MIN_TILE or tile & (tile - 1):
    raise ValueError(f"gmm_gpu: tile {what}={tile} must be a power of two >= {_MIN_TILE} "
                     f"(Triton blocks). Fix: use e.g. {max(_MIN_TILE, pl.next_power_of_2(tile))}")
  tile = min(tile, max(_MIN_TILE, pl.next_power_of_2(dim)))
  return tile, pl.cdiv(dim, tile) * tile


def _pad_to(x, shape):
  if tuple(x.shape) == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _dot(a, b, contract):
  """fp32-accumulated ``dot_general`` of two blocks; fp32 x fp32 at full precision."""
  dt = jnp.promote_types(a.dtype, b.dtype)
  a, b = a.astype(dt), b.astype(dt)
  precision = jax.lax.Precision.HIGHEST if dt == jnp.float32 else None
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def _full_spec(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _params(num_warps, num_stages):
  return None if _CompilerParams is None else _CompilerParams(num_warps=num_warps,
                                                              num_stages=num_stages)


def _gmm_kernel(offs_ref, tiles_ref, groups_ref, lhs_ref, rhs_ref, out_ref, *, num_groups,
                tm, tc, to, c_tiles, transpose_rhs):
  v, n = pl.program_id(0), pl.program_id(1)
  g = groups_ref[v]

  @pl.when(g <= num_groups)  # G: the tail (zeros); G + 1: an unused slot
  def _visit():
    row0 = pl.multiple_of(tiles_ref[v] * tm, tm)
    col0 = pl.multiple_of(n * to, to)
    lo, hi = offs_ref[g], offs_ref[g + 1]
    g_rhs = jnp.minimum(g, num_groups - 1)

    def body(c, acc_MO):
      c0 = pl.multiple_of(c * tc, tc)
      a = lhs_ref[pl.ds(row0, tm), pl.ds(c0, tc)]
      if transpose_rhs:
        b = rhs_ref[g_rhs, pl.ds(col0, to), pl.ds(c0, tc)]
        return acc_MO + _dot(a, b, ((1,), (1,)))
      b = rhs_ref[g_rhs, pl.ds(c0, tc), pl.ds(col0, to)]
      return acc_MO + _dot(a, b, ((1,), (0,)))

    steps = c_tiles * (g < num_groups).astype(jnp.int32)  # tail: no K step, zeros
    acc_MO = jax.lax.fori_loop(0, steps, body, jnp.zeros((tm, to), jnp.float32))
    rows_MO = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, to), 0)
    mine_MO = (rows_MO >= lo) & (rows_MO < hi)
    _store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, to)], acc_MO.astype(out_ref.dtype),
           mask=mine_MO)


def _gmm(lhs_MC, rhs, group_sizes_G, tiling, interpret, out_dtype, transpose_rhs):
  """``lhs_MC @ rhs[g]`` per group; ``rhs`` is [G, C, O], or [G, O, C] if ``transpose_rhs``."""
  M, C = lhs_MC.shape
  G = rhs.shape[0]
  O = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  (tm, Mp), (tc, Cp), (to, Op) = (_tile(d, t, w) for d, t, w in
                                  zip((M, C, O), tiling, ("m", "k (contraction)", "n (output)")))
  lhs_MC = _pad_to(lhs_MC, (Mp, Cp))
  rhs = _pad_to(rhs, (G, Op, Cp) if transpose_rhs else (G, Cp, Op))
  offs_G2, tiles_V, groups_V = make_visits(group_sizes_G, Mp, tm)
  kernel = functools.partial(_gmm_kernel, num_groups=G, tm=tm, tc=tc, to=to, c_tiles=Cp // tc,
                             transpose_rhs=transpose_rhs)
  operands = (offs_G2, tiles_V, groups_V, lhs_MC, rhs)
  out_MO = pl.pallas_call(
      kernel,
      out_shape=out_struct((Mp, Op), out_dtype, lhs_MC, rhs, group_sizes_G),
      grid=(groups_V.shape[0], Op // to),
      in_specs=[_full_spec(x.shape) for x in operands],
      out_specs=_full_spec((Mp, Op)),
      compiler_params=_params(4, 3),
      interpret=interpret,
      name="kestrel_gmm_gpu_nt" if transpose_rhs else "kestrel_gmm_gpu",
  )(*operands)
  return out_MO[:M, :O]


def _tgmm_kernel(offs_ref, x_ref, dout_ref, out_ref, *, tm, tk, tn):
  g, k, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, hi = offs_ref[g], offs_ref[g + 1]
  # Scalar int arithmetic only (a jnp.where on literals mis-lowers to Triton).
  first = jax.lax.div(lo, tm)
  stop = first + (jax.lax.div(hi + tm - 1, tm) - first) * (hi > lo).astype(jnp.int32)
  k0, n0 = pl.multiple_of(k * tk, tk), pl.multiple_of(n * tn, tn)

  def body(t, acc_KN):
    row0 = pl.multiple_of(t * tm, tm)
    rows_M1 = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mine_M1 = (rows_M1 >= lo) & (rows_M1 < hi)
    x = _load(x_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
              mask=jnp.broadcast_to(mine_M1, (tm, tk)), other=0)
    dout = _load(dout_ref.at[pl.ds(row0, tm), pl.ds(n0, tn)],
                 mask=jnp.broadcast_to(mine_M1, (tm, tn)), other=0)
    return acc_KN + _dot(x, dout, ((0,), (0,)))

  acc_KN = jax.lax.fori_loop(first, stop, body, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc_KN.astype(out_ref.dtype)


def tgmm(x_MK: jax.Array, dout_MN: jax.Array, group_sizes_G: jax.Array, *,
         tiling: tuple[int, int, int] = DEFAULT_TILING, interpret=False,
         preferred_element_type=None) -> jax.Array:
  """Per-group ``x.T @ dout``: the weight gradient of ``gmm``.

  Args:
    x_MK: [M, K] rows sorted by group.
    dout_MN: [M, N] rows sorted the same way.
    group_sizes_G: [G] int32 row counts (zeros allowed); sum <= M.
    tiling: (tm, tk, tn), powers of two >= 16.
    interpret: False on GPU; True runs Pallas's interpreter (any backend).
    preferred_element_type: output dtype (default ``x_MK.dtype``); accumulation is fp32.

  Returns:
    [G, K, N]; an empty group gives zeros.
  """
  M, K = x_MK.shape
  N = dout_MN.shape[1]
  G = group_sizes_G.shape[0]
  out_dtype = jnp.dtype(preferred_element_type or x_MK.dtype)
  (tm, Mp), (tk, Kp), (tn, Np) = (_tile(d, t, w) for d, t, w in
                                  zip((M, K, N), tiling, ("m", "k", "n")))
  x_MK, dout_MN = _pad_to(x_MK, (Mp, Kp)), _pad_to(dout_MN, (Mp, Np))
  ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), Mp)
  offs_G1 = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G]).astype(jnp.int32)
  out_GKN = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
      out_shape=out_struct((G, Kp, Np), out_dtype, x_MK, dout_MN, group_sizes_G),
      grid=(G, Kp // tk, Np // tn),
      in_specs=[_full_spec(offs_G1.shape), _full_spec(x_MK.shape), _full_spec(dout_MN.shape)],
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, k, n: (g, k, n)),
      compiler_params=_params(4, 3),
      interpret=interpret,
      name="kestrel_tgmm_gpu",
  )(offs_G1, x_MK, dout_MN)
  return out_GKN[:, :K, :N]


KERNEL = common.GmmKernel(name="pallas_gpu grouped matmul", gmm_call=_gmm, tgmm=tgmm,
                          default_tiling=DEFAULT_TILING)
gmm = KERNEL.gmm  # the differentiable grouped matmul (``common.GmmKernel.gmm``)
