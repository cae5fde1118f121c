"""What the TPU and GPU grouped-matmul kernels share: the named config, the input
checks and the ``custom_vjp`` (d_lhs by the same kernel with the weights read
transposed, d_rhs by the kernel's ``tgmm``).

A backend (``gmm_pallas.KERNEL``, ``gmm_gpu.KERNEL``) supplies

- ``gmm_call(lhs_MC, rhs, group_sizes_G, tiling, interpret, out_dtype, transpose_rhs)``:
  ``out[m] = lhs[m] @ rhs[group(m)]`` (``rhs[group(m)].T`` with ``transpose_rhs``),
  rows past ``sum(group_sizes)`` zero;
- ``tgmm(x_MK, dout_MN, group_sizes_G, *, tiling, interpret, preferred_element_type)``:
  ``out[g] = x[rows of g].T @ dout[rows of g]``, zeros for an empty group.
"""
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from core.vma import grad_like


@dataclasses.dataclass(frozen=True)
class GmmConfig:
  """The static settings of one grouped-matmul call."""
  tiling: tuple[int, int, int]
  interpret: Any
  out_dtype: Any


@dataclasses.dataclass(frozen=True, eq=False)
class GmmKernel:
  """One grouped-matmul backend (see the module docstring)."""
  name: str
  gmm_call: Callable
  tgmm: Callable
  default_tiling: tuple[int, int, int]

  def gmm(self, lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *,
          tiling: tuple[int, int, int] | None = None, interpret=False,
          preferred_element_type=None) -> jax.Array:
    """Grouped matmul ``out[m] = lhs_MK[m] @ rhs_GKN[group(m)]``, differentiable in lhs and rhs.

    Args:
      lhs_MK: [M, K] rows sorted by group (any M; padded to the tile inside).
      rhs_GKN: [G, K, N] one matrix per group.
      group_sizes_G: [G] int32 row counts (zeros allowed); sum <= M. No gradient.
      tiling: (tm, tk, tn); default the backend's.
      interpret: False on the backend's platform; True elsewhere (tests).
      preferred_element_type: output dtype (default ``lhs_MK.dtype``); accumulation is fp32.

    Returns:
      [M, N]; rows past ``sum(group_sizes_G)`` are zeros.
    """
    if lhs_MK.ndim != 2 or rhs_GKN.ndim != 3 or lhs_MK.shape[1] != rhs_GKN.shape[1]:
      raise ValueError(f"{self.name}: lhs {lhs_MK.shape} and rhs {rhs_GKN.shape} must be "
                       "[M, K] and [G, K, N]. Fix: flatten tokens to rows and stack expert "
                       "weights")
    if group_sizes_G.shape != (rhs_GKN.shape[0],):
      raise ValueError(f"{self.name}: group_sizes {group_sizes_G.shape} must be "
                       f"[G={rhs_GKN.shape[0]}]. Fix: one size per expert")
    cfg = GmmConfig(tuple(tiling or self.default_tiling), interpret,
                    jnp.dtype(preferred_element_type or lhs_MK.dtype))
    return _gmm(self, lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32), cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _gmm(kernel: GmmKernel, lhs_MK, rhs_GKN, group_sizes_G, cfg: GmmConfig):
  return kernel.gmm_call(lhs_MK, rhs_GKN, group_sizes_G, cfg.tiling, cfg.interpret,
                         cfg.out_dtype, False)


def _gmm_fwd(kernel, lhs_MK, rhs_GKN, group_sizes_G, cfg):
  return _gmm(kernel, lhs_MK, rhs_GKN, group_sizes_G, cfg), (lhs_MK, rhs_GKN, group_sizes_G)


def _gmm_bwd(kernel, cfg, res, dout_MN):
  lhs_MK, rhs_GKN, group_sizes_G = res
  tm, tk, tn = cfg.tiling
  # d_lhs: contraction over N (tile tn), output columns K (tile tk).
  dlhs_MK = kernel.gmm_call(dout_MN, rhs_GKN, group_sizes_G, (tm, tn, tk), cfg.interpret,
                            jnp.float32, True)
  drhs_GKN = kernel.tgmm(lhs_MK, dout_MN, group_sizes_G, tiling=cfg.tiling,
                         interpret=cfg.interpret, preferred_element_type=jnp.float32)
  return grad_like(dlhs_MK, lhs_MK), grad_like(drhs_GKN, rhs_GKN), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
