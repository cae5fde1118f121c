"""Grouped matrix multiplication: one op, several implementations, chosen by a string.

``gmm(lhs_MK, rhs_GKN, group_sizes_G)`` multiplies the rows of group ``g``
(rows ``offset_g .. offset_g + size_g - 1`` of ``lhs``, groups contiguous and in
order) by ``rhs[g]``. Rows past ``sum(group_sizes)`` give zeros. This is the
inner product of dropless MoE (MegaBlocks; Gale et al. 2022): tokens sorted by
expert, one matmul over contiguous groups, no capacity.

Implementations (entries of ``REGISTRY``, ``core.registry``; tokamax style:
``implementation=None | name | [names]``; when every candidate fails, one error
lists every reason; kernels run interpreted on CPU):

- ``xla``: the slow, obvious twin: every row times every group's matrix, masked.
  O(G M K N); the ground truth in tests.
- ``ragged_dot``: ``jax.lax.ragged_dot``.
- ``megablox``: JAX's Pallas TPU ``gmm``/``tgmm`` (needs M divisible by the tile).
- ``pallas``: our Pallas TPU (Mosaic) kernel, ``moe/kernels/gmm_pallas.py``,
  forward and both backward products under ``custom_vjp``.
- ``pallas_gpu``: our Pallas GPU (Triton) kernel, ``moe/kernels/gmm_gpu.py``.
  Tested interpreted and lowered to Triton IR here, never run on a GPU yet, so
  GPUs default to ``ragged_dot``.

All accumulate in float32; the output has ``preferred_element_type`` (default:
``lhs.dtype``).
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from core.errors import Unsupported
from core.registry import Registry

# implementation=None: the preference order per platform.
REGISTRY = Registry("grouped-matmul", default_order={
    "tpu": ("pallas", "megablox", "ragged_dot"), "gpu": ("ragged_dot",), "cpu": ("ragged_dot",)})


def available_implementations() -> tuple[str, ...]:
  return REGISTRY.names()


def group_ids(group_sizes_G: jax.Array, m: int) -> jax.Array:
  """The group of each of ``m`` rows; rows past the last group get ``G``."""
  ends_G = jnp.cumsum(group_sizes_G)
  return jnp.searchsorted(ends_G, jnp.arange(m), side="right").astype(jnp.int32)


def gmm_reference(lhs_MK, rhs_GKN, group_sizes_G, *, out_dtype, tiling=None):
  """Every row times every group's matrix, keeping the row's own group. Obvious, slow."""
  del tiling
  G = rhs_GKN.shape[0]
  onehot_MG = jax.nn.one_hot(group_ids(group_sizes_G, lhs_MK.shape[0]), G, dtype=jnp.float32)
  all_MGN = jnp.einsum("mk,gkn->mgn", lhs_MK, rhs_GKN, preferred_element_type=jnp.float32)
  return jnp.einsum("mgn,mg->mn", all_MGN, onehot_MG).astype(out_dtype)


def _ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, *, out_dtype, tiling=None):
  del tiling
  out = jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def _megablox(lhs_MK, rhs_GKN, group_sizes_G, *, out_dtype, tiling=None, interpret):
  from jax.experimental.pallas.ops.tpu.megablox import ops as mb
  tm, tk, tn = tiling or (128, 128, 128)
  M, K = lhs_MK.shape
  N = rhs_GKN.shape[2]
  tm, tk, tn = min(tm, M), min(tk, K), min(tn, N)
  if M % tm or K % tk or N % tn:
    raise Unsupported(f"shapes M={M}, K={K}, N={N} must be multiples of the tiles "
                      f"({tm}, {tk}, {tn})")
  try:
    out = mb.gmm(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32), jnp.float32,
                 (tm, tk, tn), None, None, False, interpret)
  except ValueError as e:
    if "manual_axis_type" not in str(e):
      raise
    raise Unsupported("cannot run inside shard_map's varying-axes check (its output "
                      "declares no manual axis types); use 'pallas'") from e
  # megablox leaves rows past the last group undefined; ours are zeros.
  valid_M = jnp.arange(M) < jnp.sum(group_sizes_G)
  return jnp.where(valid_M[:, None], out, 0).astype(out_dtype)


def _kernel(module: str):
  """A registry entry for one of our kernels; tiles the kernel cannot take are Unsupported."""
  def run(lhs_MK, rhs_GKN, group_sizes_G, *, out_dtype, tiling=None, interpret):
    import importlib
    kernel = importlib.import_module(f"moe.kernels.{module}")
    try:
      return kernel.gmm(lhs_MK, rhs_GKN, group_sizes_G, tiling=tiling, interpret=interpret,
                        preferred_element_type=out_dtype)
    except ValueError as e:  # e.g. tiles off the kernel's rule (lanes, powers of two)
      raise Unsupported(str(e)) from e
  return run


REGISTRY.register("xla", gmm_reference, doc="the reference")
REGISTRY.register("ragged_dot", _ragged_dot)
REGISTRY.register("megablox", _megablox, native=("tpu",), doc="'ragged_dot'")
REGISTRY.register("pallas", _kernel("gmm_pallas"), native=("tpu",),
                  doc="'pallas_gpu' or 'ragged_dot'")
REGISTRY.register("pallas_gpu", _kernel("gmm_gpu"), native=("gpu",),
                  doc="'pallas' or 'ragged_dot'")


def interpreted(implementation=None) -> bool:
  """Whether any candidate of ``implementation`` is a kernel interpreted on this platform
  (Pallas's interpreter trips shard_map's varying-axes check)."""
  from core import platform
  target = platform.current()
  return any(REGISTRY[n].interpret(target) for n in REGISTRY.candidates(implementation)
             if n in REGISTRY)


def gmm(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *,
        implementation: None | str | Sequence[str] = None, preferred_element_type=None,
        tiling: tuple[int, int, int] | None = None) -> jax.Array:
  """Grouped matmul ``out[m] = lhs[m] @ rhs[group(m)]``, differentiable in lhs and rhs.

  Args:
    lhs_MK: [M, K] rows sorted by group.
    rhs_GKN: [G, K, N] one matrix per group.
    group_sizes_G: [G] int32 row counts (zeros allowed); sum <= M.
    implementation: None (the best for the platform), a name, or names to try in order.
    preferred_element_type: output dtype (default lhs.dtype); accumulation is fp32.
    tiling: (tm, tk, tn) for the Pallas kernels.

  Returns:
    [M, N].
  """
  if lhs_MK.ndim != 2 or rhs_GKN.ndim != 3 or lhs_MK.shape[1] != rhs_GKN.shape[1]:
    raise ValueError(f"gmm: lhs {lhs_MK.shape} and rhs {rhs_GKN.shape} must be [M, K] and "
                     "[G, K, N]. Fix: flatten tokens to rows and stack expert weights")
  if group_sizes_G.shape != (rhs_GKN.shape[0],):
    raise ValueError(f"gmm: group_sizes {group_sizes_G.shape} must be [G={rhs_GKN.shape[0]}]. "
                     "Fix: one size per expert")
  return REGISTRY.call(implementation, lhs_MK, rhs_GKN, group_sizes_G,
                       out_dtype=preferred_element_type or lhs_MK.dtype, tiling=tiling)
