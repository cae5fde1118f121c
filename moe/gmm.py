"""Grouped matrix multiplication: one op, several implementations, chosen by a string.

``gmm(lhs_MK, rhs_GKN, group_sizes_G)`` multiplies the rows of group ``g``
(rows ``offset_g .. offset_g + size_g - 1`` of ``lhs``, groups contiguous and in
order) by ``rhs[g]``. Rows past ``sum(group_sizes)`` give zeros. This is the
inner product of dropless MoE (MegaBlocks; Gale et al. 2022): tokens sorted by
expert, one matmul over contiguous groups, no capacity.

Implementations (tokamax style: ``implementation=None | name | [names]``; when
every candidate fails, one error lists every reason):

- ``xla``: the slow, obvious twin: every row times every group's matrix, masked.
  O(G M K N); the ground truth in tests.
- ``ragged_dot``: ``jax.lax.ragged_dot``.
- ``megablox``: JAX's Pallas TPU ``gmm``/``tgmm`` (needs M divisible by the tile;
  runs interpreted off TPU).
- ``pallas``: our Pallas TPU (Mosaic) kernel, ``moe/kernels/gmm_pallas.py``,
  forward and both backward products under ``custom_vjp``; interpreted off TPU.
- ``pallas_gpu``: our Pallas GPU (Triton) kernel, ``moe/kernels/gmm_gpu.py``;
  interpreted off GPU. Tested interpreted and lowered to Triton IR here, never run
  on a GPU yet, so GPUs default to ``ragged_dot``.

All accumulate in float32; the output has ``preferred_element_type`` (default:
``lhs.dtype``).
"""
import contextlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

GmmFn = Callable[..., jax.Array]

_REGISTRY: dict[str, GmmFn] = {}
# implementation=None: the preference order per platform.
_DEFAULT_ORDER = {"tpu": ("pallas", "megablox", "ragged_dot"), "gpu": ("ragged_dot",),
                  "cpu": ("ragged_dot",)}


_PLATFORMS: list[str] = []


@contextlib.contextmanager
def target_platform(name: str):
  """Within this context, pick implementations (and interpret mode) for ``name``
  (``tpu``, ``gpu``, ``cpu``) instead of the default backend's: a CPU host that
  compiles ahead of time for a TPU topology traces TPU programs."""
  _PLATFORMS.append(name)
  try:
    yield
  finally:
    _PLATFORMS.pop()


def current_platform() -> str:
  """The platform programs are traced for: ``target_platform``'s, else the default backend."""
  return _PLATFORMS[-1] if _PLATFORMS else jax.default_backend()


class GmmUnsupported(ValueError):
  """An implementation cannot handle these inputs (shape, dtype, platform)."""


def register(name: str, fn: GmmFn) -> None:
  """Registers ``fn(lhs, rhs, group_sizes, *, out_dtype, tiling, interpret)``."""
  _REGISTRY[name] = fn


def available_implementations() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def group_ids(group_sizes_G: jax.Array, m: int) -> jax.Array:
  """The group of each of ``m`` rows; rows past the last group get ``G``."""
  ends_G = jnp.cumsum(group_sizes_G)
  return jnp.searchsorted(ends_G, jnp.arange(m), side="right").astype(jnp.int32)


def gmm_reference(lhs_MK, rhs_GKN, group_sizes_G, *, out_dtype, tiling=None, interpret=None):
  """Every row times every group's matrix, keeping the row's own group. Obvious, slow."""
  del tiling, interpret
  G = rhs_GKN.shape[0]
  onehot_MG = jax.nn.one_hot(group_ids(group_sizes_G, lhs_MK.shape[0]), G, dtype=jnp.float32)
  all_MGN = jnp.einsum("mk,gkn->mgn", lhs_MK, rhs_GKN, preferred_element_type=jnp.float32)
  return jnp.einsum("mgn,mg->mn", all_MGN, onehot_MG).astype(out_dtype)


def _ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, *, out_dtype, tiling=None, interpret=None):
  del tiling, interpret
  out = jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def _interpret(interpret):
  return current_platform() != "tpu" if interpret is None else interpret


def _megablox(lhs_MK, rhs_GKN, group_sizes_G, *, out_dtype, tiling=None, interpret=None):
  from jax.experimental.pallas.ops.tpu.megablox import ops as mb
  tm, tk, tn = tiling or (128, 128, 128)
  M, K = lhs_MK.shape
  N = rhs_GKN.shape[2]
  tm, tk, tn = min(tm, M), min(tk, K), min(tn, N)
  if M % tm or K % tk or N % tn:
    raise GmmUnsupported(f"megablox: shapes M={M}, K={K}, N={N} must be multiples of the "
                         f"tiles ({tm}, {tk}, {tn})")
  try:
    out = mb.gmm(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32), jnp.float32,
                 (tm, tk, tn), None, None, False, _interpret(interpret))
  except ValueError as e:
    if "manual_axis_type" not in str(e):
      raise
    raise GmmUnsupported("megablox: cannot run inside shard_map's varying-axes check (its "
                         "output declares no manual axis types); use 'pallas'") from e
  # megablox leaves rows past the last group undefined; ours are zeros.
  valid_M = jnp.arange(M) < jnp.sum(group_sizes_G)
  return jnp.where(valid_M[:, None], out, 0).astype(out_dtype)


def _pallas(lhs_MK, rhs_GKN, group_sizes_G, *, out_dtype, tiling=None, interpret=None):
  from moe.kernels import gmm_pallas
  return gmm_pallas.gmm(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32),
                        tiling=tiling or gmm_pallas.DEFAULT_TILING,
                        interpret=_interpret(interpret)).astype(out_dtype)


def _pallas_gpu(lhs_MK, rhs_GKN, group_sizes_G, *, out_dtype, tiling=None, interpret=None):
  from moe.kernels import gmm_gpu
  try:
    return gmm_gpu.gmm(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32),
                       tiling=tiling or gmm_gpu.DEFAULT_TILING,
                       interpret=(current_platform() != "gpu") if interpret is None else interpret,
                       preferred_element_type=out_dtype)
  except ValueError as e:  # tiles that are not powers of two >= 16
    raise GmmUnsupported(f"pallas_gpu: {e}") from e


register("xla", gmm_reference)
register("ragged_dot", _ragged_dot)
register("megablox", _megablox)
register("pallas", _pallas)
register("pallas_gpu", _pallas_gpu)


def _candidates(implementation) -> tuple[str, ...]:
  if implementation is None:
    return _DEFAULT_ORDER.get(current_platform(), ("ragged_dot",))
  if isinstance(implementation, str):
    return (implementation,)
  if isinstance(implementation, Sequence) and implementation:
    return tuple(implementation)
  raise ValueError(f"implementation={implementation!r}: expected None, a name or a non-empty "
                   f"sequence of names. Fix: use one of {available_implementations()}")


def gmm(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *,
        implementation: None | str | Sequence[str] = None, preferred_element_type=None,
        tiling: tuple[int, int, int] | None = None, interpret: bool | None = None) -> jax.Array:
  """Grouped matmul ``out[m] = lhs[m] @ rhs[group(m)]``, differentiable in lhs and rhs.

  Args:
    lhs_MK: [M, K] rows sorted by group.
    rhs_GKN: [G, K, N] one matrix per group.
    group_sizes_G: [G] int32 row counts (zeros allowed); sum <= M.
    implementation: None (the best for the platform), a name, or names to try in order.
    preferred_element_type: output dtype (default lhs.dtype); accumulation is fp32.
    tiling: (tm, tk, tn) for the Pallas kernels.
    interpret: run Pallas kernels interpreted (default: off TPU).

  Returns:
    [M, N].
  """
  if lhs_MK.ndim != 2 or rhs_GKN.ndim != 3 or lhs_MK.shape[1] != rhs_GKN.shape[1]:
    raise ValueError(f"gmm: lhs {lhs_MK.shape} and rhs {rhs_GKN.shape} must be [M, K] and "
                     "[G, K, N]. Fix: flatten tokens to rows and stack expert weights")
  if group_sizes_G.shape != (rhs_GKN.shape[0],):
    raise ValueError(f"gmm: group_sizes {group_sizes_G.shape} must be [G={rhs_GKN.shape[0]}]. "
                     "Fix: one size per expert")
  out_dtype = preferred_element_type or lhs_MK.dtype
  errors = []
  for name in _candidates(implementation):
    fn = _REGISTRY.get(name)
    if fn is None:
      errors.append(f"{name}: not registered (have {available_implementations()})")
      continue
    try:
      return fn(lhs_MK, rhs_GKN, group_sizes_G, out_dtype=out_dtype, tiling=tiling,
                interpret=interpret)
    except (GmmUnsupported, NotImplementedError) as e:
      errors.append(f"{name}: {e}")
  raise GmmUnsupported("no grouped-matmul implementation could run: " + "; ".join(errors))
