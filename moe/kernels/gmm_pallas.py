"""Grouped matmul as Pallas TPU (Mosaic) kernels, differentiable through ``custom_vjp``.

``gmm(lhs_MK, rhs_GKN, group_sizes_G)[m] = lhs_MK[m] @ rhs_GKN[group(m)]``: the
groups are contiguous row ranges of ``lhs`` in group order, rows past
``sum(group_sizes_G)`` give zeros, and groups may be empty. ``tgmm`` is the
weight gradient ``out_GKN[g] = x_MK[rows of g].T @ dout_MN[rows of g]``.

Design:

- Visits. Both kernels walk a grid of *visits*, ``(group, m-tile)`` pairs in
  row order, built by ``make_group_metadata`` in plain ``jnp`` and handed to the
  kernel as scalar-prefetch operands (SMEM). A tile that straddles a group
  boundary is visited once per group. The grid has the static upper bound
  ``num_m_tiles + G - 1`` visits; visits past the active count repeat the last
  active visit's (group, tile) so their blocks do not change (no DMA, no
  write-back of anything new) and the kernel skips them with ``pl.when``.
- gmm masking. For ``gmm`` empty groups are not visited, but m-tiles that no
  group touches (all rows past the last group) get one visit from a pseudo
  group ``G`` that computes nothing. On the last k step a visit writes the rows
  of its group (row iota vs ``group_offsets``); the first visit to a tile sets
  every other row to zero, later visits to the same tile (consecutive grid
  steps, so the output block stays in VMEM) keep what is there.
- tgmm. Every group, empty or not, gets at least one visit so that its output
  block ``out[g]`` is written (zeros for an empty group). An fp32 accumulator is
  zeroed on a group's first visit, fed ``x.T @ dout`` with ``dout`` rows outside
  the group masked to zero, and flushed to ``out[g]`` on the group's last visit.
- Padding and tiles. A dimension no larger than its tile is one full-dimension
  block (always legal on TPU, so small or odd shapes need no padding). A larger
  dimension is zero-padded to a multiple of its tile inside the wrapper and the
  result sliced back; such tiles must respect the TPU block rule: M tiles a
  multiple of the sublane count (8 for 32-bit, 16 for bf16, 32 for 8-bit), K and
  N tiles a multiple of 128 lanes (they are the lane dimension of some block).
- Accumulation is fp32 (``preferred_element_type=jnp.float32``); the output is
  ``preferred_element_type`` (default ``lhs.dtype``).
- Backward: ``d_lhs = gmm(dout, rhs[g].T)`` by the same kernel with
  ``transpose_rhs=True`` (an "NT" matmul of the ``[G, K, N]`` weights, no
  transpose in HBM), ``d_rhs = tgmm(lhs, dout)``; ``group_sizes`` gets none.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from core.vma import out_struct
from moe.kernels import common

DEFAULT_TILING = (128, 128, 128)  # (tm, tk, tn)
_LANES = 128


class GroupMetadata(NamedTuple):
  """Where each grid visit works (all int32).

  Attributes:
    group_offsets_G1: [G+1] first row of each group; the last entry is the row
      after the last group.
    group_ids_V: [V] the group of each visit (``G`` marks a pseudo-group visit to
      a tile with no group rows).
    m_tile_ids_V: [V] the m-tile of each visit.
    num_visits_1: [1] how many leading visits are active.
  """
  group_offsets_G1: jax.Array
  group_ids_V: jax.Array
  m_tile_ids_V: jax.Array
  num_visits_1: jax.Array


def make_group_metadata(group_sizes_G: jax.Array, m_padded: int, tm: int, *,
                        visit_empty_groups: bool = False,
                        cover_tail: bool = True) -> GroupMetadata:
  """Builds the visit schedule over (group, m-tile) pairs.

  Args:
    group_sizes_G: [G] int32 row counts (zeros allowed); offsets are clamped to
      ``m_padded``.
    m_padded: rows of the (padded) lhs, a multiple of ``tm``.
    tm: rows per m-tile.
    visit_empty_groups: give each empty group one visit (tgmm must zero its
      output block); gmm leaves them out.
    cover_tail: add pseudo-group ``G`` visits to the tiles that lie wholly past
      the last group, so that gmm writes their zeros.

  Returns:
    ``GroupMetadata`` with ``V = m_padded // tm + G - 1`` visit slots.
  """
  G = group_sizes_G.shape[0]
  num_tiles = m_padded // tm
  ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m_padded)
  offsets_G1 = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G]).astype(jnp.int32)
  starts_G = offsets_G1[:-1]
  first_tile_G = jnp.minimum(starts_G // tm, num_tiles - 1)
  last_tile_G = (ends_G - 1) // tm
  empty_count = 1 if visit_empty_groups else 0
  counts_G = jnp.where(ends_G > starts_G, last_tile_G - first_tile_G + 1, empty_count)
  if cover_tail:
    tail_first = (offsets_G1[G] + tm - 1) // tm
    first_tile_G = jnp.append(first_tile_G, tail_first)
    counts_G = jnp.append(counts_G, num_tiles - tail_first)
  visit_ends = jnp.cumsum(counts_G)
  num_active = visit_ends[-1]
  num_slots = num_tiles + G - 1
  # Inactive slots repeat the last active visit, so their blocks do not move.
  v_V = jnp.minimum(jnp.arange(num_slots, dtype=jnp.int32), jnp.maximum(num_active - 1, 0))
  gid_V = jnp.searchsorted(visit_ends, v_V, side="right").astype(jnp.int32)
  gid_V = jnp.minimum(gid_V, counts_G.shape[0] - 1)
  tile_V = first_tile_G[gid_V] + v_V - (visit_ends - counts_G)[gid_V]
  return GroupMetadata(offsets_G1, gid_V, tile_V.astype(jnp.int32),
                       num_active.reshape(1).astype(jnp.int32))


def _sublanes(*dtypes) -> int:
  return max(8 * 4 // jnp.dtype(d).itemsize for d in dtypes)


def _tile(dim: int, tile: int, align: int, what: str) -> tuple[int, int]:
  """(block size, padded dim): the full dim if it fits one tile, else ``tile``."""
  if dim <= tile:
    return dim, dim
  if tile % align:
    raise ValueError(f"gmm_pallas: tile {what}={tile} splits a dimension of {dim}, so it must be "
                     f"a multiple of {align} on TPU. Fix: use a tile that is a multiple of "
                     f"{align} or >= {dim}")
  return tile, pl.cdiv(dim, tile) * tile


def _pad_to(x, shape):
  if tuple(x.shape) == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _cost(M, K, N, *arrays_and_out):
  """Dense-equivalent cost (each row against one group), so XLA's cost analysis counts it."""
  nbytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in arrays_and_out)
  return pl.CostEstimate(flops=2 * M * K * N, transcendentals=0, bytes_accessed=nbytes)


def _mxu_operands(a, b):
  """Casts two blocks to one dtype for the MXU (no-op when they already match)."""
  if a.dtype == b.dtype:
    return a, b
  dt = jnp.promote_types(a.dtype, b.dtype)
  return a.astype(dt), b.astype(dt)


def _gmm_kernel(offsets_ref, gids_ref, tiles_ref, nvis_ref, lhs_ref, rhs_ref, out_ref, acc_ref,
                *, num_groups, k_tiles, transpose_rhs):
  v, k = pl.program_id(1), pl.program_id(2)
  g = gids_ref[v]
  active = v < nvis_ref[0]

  @pl.when(k == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active & (g < num_groups))
  def _accumulate():
    a, b = _mxu_operands(lhs_ref[...], rhs_ref[...])
    contract = (((1,), (1,)) if transpose_rhs else ((1,), (0,)), ((), ()))
    acc_ref[...] += jax.lax.dot_general(a, b, contract, preferred_element_type=jnp.float32)

  @pl.when(active & (k == k_tiles - 1))
  def _write():
    tm, tn = acc_ref.shape
    tile = tiles_ref[v]
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    lo = offsets_ref[jnp.minimum(g, num_groups)]
    hi = offsets_ref[jnp.minimum(g + 1, num_groups)]  # pseudo-group G: lo == hi, no rows
    mine = (rows >= lo) & (rows < hi)
    first_visit = (v == 0) | (tiles_ref[jnp.maximum(v - 1, 0)] != tile)
    kept = jnp.where(first_visit, 0.0, out_ref[...].astype(jnp.float32))
    out_ref[...] = jnp.where(mine, acc_ref[...], kept).astype(out_ref.dtype)


def _gmm(lhs_MC, rhs, group_sizes_G, tiling, interpret, out_dtype, transpose_rhs):
  """``lhs_MC @ rhs[g]`` per group; ``rhs`` is [G, C, O], or [G, O, C] if ``transpose_rhs``."""
  M, C = lhs_MC.shape
  G = rhs.shape[0]
  O = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tc, to = tiling
  sub = _sublanes(lhs_MC.dtype, rhs.dtype, out_dtype)
  tm, Mp = _tile(M, tm, sub, "m")
  tc, Cp = _tile(C, tc, _LANES, "k (contraction)")
  to, Op = _tile(O, to, _LANES, "n (output)")
  lhs_MC = _pad_to(lhs_MC, (Mp, Cp))
  rhs = _pad_to(rhs, (G, Op, Cp) if transpose_rhs else (G, Cp, Op))
  meta = make_group_metadata(group_sizes_G, Mp, tm)
  num_visits = meta.group_ids_V.shape[0]
  k_tiles = Cp // tc

  def k_of(v, k, gids, nvis):  # visits that compute nothing hold one block: no new DMA
    return jnp.where((v < nvis[0]) & (gids[v] < G), k, k_tiles - 1)

  def lhs_map(n, v, k, offs, gids, tiles, nvis):
    return tiles[v], k_of(v, k, gids, nvis)

  def rhs_map(n, v, k, offs, gids, tiles, nvis):
    g, kk = jnp.minimum(gids[v], G - 1), k_of(v, k, gids, nvis)
    return (g, n, kk) if transpose_rhs else (g, kk, n)

  def out_map(n, v, k, offs, gids, tiles, nvis):
    return tiles[v], n

  rhs_block = (None, to, tc) if transpose_rhs else (None, tc, to)
  out_shape = out_struct((Mp, Op), out_dtype, lhs_MC, rhs, group_sizes_G)
  kernel = functools.partial(_gmm_kernel, num_groups=G, k_tiles=k_tiles,
                             transpose_rhs=transpose_rhs)
  out_MO = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(Op // to, num_visits, k_tiles),
          in_specs=[pl.BlockSpec((tm, tc), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, to), out_map),
          scratch_shapes=[pltpu.VMEM((tm, to), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="kestrel_gmm_nt" if transpose_rhs else "kestrel_gmm",
      cost_estimate=_cost(M, C, O, lhs_MC, rhs, out_shape),
  )(*meta, lhs_MC, rhs)
  return out_MO[:M, :O]


def _tgmm_kernel(offsets_ref, gids_ref, tiles_ref, nvis_ref, x_ref, dout_ref, out_ref, acc_ref,
                 *, num_visits):
  v = pl.program_id(2)
  g = gids_ref[v]
  active = v < nvis_ref[0]
  first = (v == 0) | (gids_ref[jnp.maximum(v - 1, 0)] != g)
  last = (v == nvis_ref[0] - 1) | (gids_ref[jnp.minimum(v + 1, num_visits - 1)] != g)
  lo, hi = offsets_ref[g], offsets_ref[g + 1]

  @pl.when(active & first)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active & (hi > lo))
  def _accumulate():
    dout = dout_ref[...]
    tm, tn = dout.shape
    rows = tiles_ref[v] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    mine = (rows >= lo) & (rows < hi)
    dout = jnp.where(mine, dout.astype(jnp.float32), 0.0).astype(dout.dtype)
    x, dout = _mxu_operands(x_ref[...], dout)
    acc_ref[...] += jax.lax.dot_general(x, dout, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

  @pl.when(active & last)
  def _flush():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(x_MK: jax.Array, dout_MN: jax.Array, group_sizes_G: jax.Array, *,
         tiling: tuple[int, int, int] = DEFAULT_TILING, interpret=False,
         preferred_element_type=None) -> jax.Array:
  """Per-group ``x.T @ dout``: the weight gradient of ``gmm``.

  Args:
    x_MK: [M, K] rows sorted by group.
    dout_MN: [M, N] rows sorted the same way.
    group_sizes_G: [G] int32 row counts (zeros allowed); sum <= M.
    tiling: (tm, tk, tn).
    interpret: False on TPU; True (or ``pltpu.InterpretParams()``) elsewhere.
    preferred_element_type: output dtype (default ``x_MK.dtype``); accumulation is fp32.

  Returns:
    [G, K, N]; an empty group gives zeros.
  """
  M, K = x_MK.shape
  N = dout_MN.shape[1]
  G = group_sizes_G.shape[0]
  out_dtype = jnp.dtype(preferred_element_type or x_MK.dtype)
  tm, tk, tn = tiling
  tm, Mp = _tile(M, tm, _sublanes(x_MK.dtype, dout_MN.dtype), "m")
  tk, Kp = _tile(K, tk, _LANES, "k")
  tn, Np = _tile(N, tn, _LANES, "n")
  x_MK, dout_MN = _pad_to(x_MK, (Mp, Kp)), _pad_to(dout_MN, (Mp, Np))
  meta = make_group_metadata(group_sizes_G.astype(jnp.int32), Mp, tm, visit_empty_groups=True,
                             cover_tail=False)
  num_visits = meta.group_ids_V.shape[0]
  out_shape = out_struct((G, Kp, Np), out_dtype, x_MK, dout_MN, group_sizes_G)
  out_GKN = pl.pallas_call(
      functools.partial(_tgmm_kernel, num_visits=num_visits),
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(Kp // tk, Np // tn, num_visits),
          in_specs=[pl.BlockSpec((tm, tk), lambda k, n, v, o, g, t, a: (t[v], k)),
                    pl.BlockSpec((tm, tn), lambda k, n, v, o, g, t, a: (t[v], n))],
          out_specs=pl.BlockSpec((None, tk, tn), lambda k, n, v, o, g, t, a: (g[v], k, n)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="kestrel_tgmm",
      cost_estimate=_cost(M, K, N, x_MK, dout_MN, out_shape),
  )(*meta, x_MK, dout_MN)
  return out_GKN[:, :K, :N]


KERNEL = common.GmmKernel(name="pallas grouped matmul", gmm_call=_gmm, tgmm=tgmm,
                          default_tiling=DEFAULT_TILING)
gmm = KERNEL.gmm  # the differentiable grouped matmul (``common.GmmKernel.gmm``)
