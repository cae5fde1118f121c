"""Dispatch strategies: how routed tokens reach their experts and come back.

One string picks the strategy (``moe_ffn(..., strategy=...)``):

- ``dropping`` (GShard, Lepikhin et al. 2020; Switch): each group of tokens gives
  every expert ``capacity = ceil(capacity_factor * S * k / E)`` slots, filled in
  priority order (all first choices before second choices, then token order).
  One-hot dispatch and combine tensors move tokens with einsums: dense, static
  shapes, the classic TPU path. Assignments past capacity are dropped: their
  expert output is zero and the token passes through the residual.
- ``dropless`` (MegaBlocks, Gale et al. 2022): sort the token-to-expert
  assignments by expert, one grouped matmul per projection over the contiguous
  groups (``moe.gmm``), unsort, combine with the router weights. Nothing dropped.
- ``reference``: the slow, obvious twin: every expert runs on every token and
  the router weights mask the results. Tests compare the others to it.

Experts are SwiGLU feed-forward networks with stacked weights
``gate_EDF``, ``up_EDF``, ``down_EFD``.
"""
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe import gmm as gmm_lib
from moe.router import Routing, expert_load

STRATEGIES = ("dropping", "dropless", "reference")


class ExpertWeights(NamedTuple):
  """Stacked SwiGLU expert weights."""
  gate_EDF: jax.Array
  up_EDF: jax.Array
  down_EFD: jax.Array


class DispatchStats(NamedTuple):
  """load_E: share of assignments routed to each expert (before any drop);
  dropped: share of assignments dropped for capacity (0 for dropless)."""
  load_E: jax.Array
  dropped: jax.Array


def _swiglu(h_gate, h_up):
  return jax.nn.silu(h_gate) * h_up


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert per group: ``ceil(capacity_factor * group_size * k / E)``."""
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor}: must be > 0. Fix: use 1.0-1.25 "
                     "(Switch) or the dropless strategy")
  return max(1, math.ceil(capacity_factor * group_size * top_k / num_experts))


def reference(x_TD: jax.Array, routing: Routing, w: ExpertWeights, *, dtype=None):
  """Loop over experts: expert e runs on every token; its output is weighted by
  the router weight of e for that token (zero where e was not chosen)."""
  dt = dtype or x_TD.dtype
  E = w.gate_EDF.shape[0]
  x = x_TD.astype(dt)
  y = jnp.zeros(x_TD.shape, jnp.float32)
  for e in range(E):
    gate_T = jnp.sum(jnp.where(routing.experts_TK == e, routing.weights_TK, 0.0), axis=-1)
    h = _swiglu(x @ w.gate_EDF[e].astype(dt), x @ w.up_EDF[e].astype(dt))
    y = y + gate_T[..., None] * (h @ w.down_EFD[e].astype(dt)).astype(jnp.float32)
  return y.astype(dt), DispatchStats(expert_load(routing.experts_TK, E), jnp.zeros(()))


def dropping(x_GSD: jax.Array, routing: Routing, w: ExpertWeights, *,
             capacity_factor: float = 1.25, dtype=None):
  """Capacity-limited dispatch with one-hot einsums, per group of ``S`` tokens.

  Args:
    x_GSD: tokens in groups [G, S, D] (e.g. one group per sequence).
    routing: ``Routing`` with [G, S, K] weights and experts.
    w: stacked expert weights.
    capacity_factor: slots per expert = ceil(cf * S * k / E).
    dtype: compute dtype (default x's).

  Returns:
    ([G, S, D] output, ``DispatchStats``).
  """
  dt = dtype or x_GSD.dtype
  G, S, _ = x_GSD.shape
  E = w.gate_EDF.shape[0]
  K = routing.experts_TK.shape[-1]
  C = capacity(S, E, K, capacity_factor)
  # Priority: first choices of all tokens, then second choices, ... (GShard).
  onehot_GKSE = jax.nn.one_hot(jnp.swapaxes(routing.experts_TK, 1, 2), E, dtype=jnp.int32)
  flat = onehot_GKSE.reshape(G, K * S, E)
  position_GKSE = (jnp.cumsum(flat, axis=1) - 1).reshape(G, K, S, E) * onehot_GKSE
  keep_GKSE = onehot_GKSE * (position_GKSE < C)
  slot_GKSEC = jax.nn.one_hot(position_GKSE, C, dtype=dt) * keep_GKSE[..., None].astype(dt)
  dispatch_GSEC = jnp.sum(slot_GKSEC, axis=1)
  weights_GKS = jnp.swapaxes(routing.weights_TK, 1, 2).astype(dt)
  combine_GSEC = jnp.einsum("gksec,gks->gsec", slot_GKSEC, weights_GKS)
  x_GECD = jnp.einsum("gsec,gsd->gecd", dispatch_GSEC, x_GSD.astype(dt))
  h = _swiglu(jnp.einsum("gecd,edf->gecf", x_GECD, w.gate_EDF.astype(dt)),
              jnp.einsum("gecd,edf->gecf", x_GECD, w.up_EDF.astype(dt)))
  y_GECD = jnp.einsum("gecf,efd->gecd", h, w.down_EFD.astype(dt))
  y_GSD = jnp.einsum("gsec,gecd->gsd", combine_GSEC, y_GECD)
  dropped = 1.0 - jnp.sum(keep_GKSE) / (G * S * K)
  return y_GSD, DispatchStats(expert_load(routing.experts_TK, E), dropped.astype(jnp.float32))


def sort_by_expert(experts_TK: jax.Array, num_experts: int):
  """Assignments sorted by expert: (order_A, token_A, group_sizes_E), A = T*k.

  ``order_A`` is the stable argsort of the flattened assignments, ``token_A`` the
  token each sorted assignment came from.
  """
  K = experts_TK.shape[-1]
  flat_A = experts_TK.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True)
  group_sizes_E = jnp.zeros((num_experts,), jnp.int32).at[flat_A].add(1)
  return order_A, order_A // K, group_sizes_E


def expert_ffn_grouped(x_AD, group_sizes_E, w: ExpertWeights, *, dtype,
                       gmm_impl: None | str | Sequence[str] = None, tiling=None):
  """SwiGLU of rows sorted by expert, three grouped matmuls."""
  mm = lambda a, b: gmm_lib.gmm(a, b.astype(dtype), group_sizes_E, implementation=gmm_impl,
                                preferred_element_type=dtype, tiling=tiling)
  h_AF = _swiglu(mm(x_AD, w.gate_EDF), mm(x_AD, w.up_EDF))
  return mm(h_AF, w.down_EFD)


def dropless(x_TD: jax.Array, routing: Routing, w: ExpertWeights, *, dtype=None,
             gmm_impl: None | str | Sequence[str] = None, tiling=None):
  """Sort by expert, grouped matmuls, unsort, combine. No capacity, no drops.

  Args:
    x_TD: tokens [T, D].
    routing: ``Routing`` with [T, K] weights and experts.
    w: stacked expert weights.
    dtype: compute dtype (default x's).
    gmm_impl: ``moe.gmm`` implementation (None: the platform's best).
    tiling: tiles for the Pallas grouped matmuls.

  Returns:
    ([T, D] output, ``DispatchStats``).
  """
  dt = dtype or x_TD.dtype
  T, D = x_TD.shape
  E = w.gate_EDF.shape[0]
  K = routing.experts_TK.shape[-1]
  order_A, token_A, group_sizes_E = sort_by_expert(routing.experts_TK, E)
  x_AD = jnp.take(x_TD.astype(dt), token_A, axis=0)
  y_AD = expert_ffn_grouped(x_AD, group_sizes_E, w, dtype=dt, gmm_impl=gmm_impl, tiling=tiling)
  y_TKD = jnp.zeros_like(y_AD).at[order_A].set(y_AD, unique_indices=True).reshape(T, K, D)
  y_TD = jnp.einsum("tkd,tk->td", y_TKD, routing.weights_TK.astype(dt))
  return y_TD, DispatchStats(expert_load(routing.experts_TK, E), jnp.zeros((), jnp.float32))


def moe_ffn(x_BSD: jax.Array, routing: Routing, w: ExpertWeights, *, strategy: str,
            capacity_factor: float = 1.25, dtype=None,
            gmm_impl: None | str | Sequence[str] = None, tiling=None):
  """The routed experts' output for tokens [B, S, D] (the batch rows are the
  ``dropping`` groups), by ``strategy`` (one of ``STRATEGIES``), on whatever arrays
  it is given: the model places the strategies on a mesh with
  ``moe.parallel.routed_experts``."""
  B, S, D = x_BSD.shape
  if strategy == "dropping":
    return dropping(x_BSD, routing, w, capacity_factor=capacity_factor, dtype=dtype)
  flat = Routing(*(a.reshape(B * S, a.shape[-1]) for a in routing))
  if strategy == "dropless":
    y, stats = dropless(x_BSD.reshape(B * S, D), flat, w, dtype=dtype, gmm_impl=gmm_impl,
                        tiling=tiling)
  elif strategy == "reference":
    y, stats = reference(x_BSD.reshape(B * S, D), flat, w, dtype=dtype)
  else:
    raise ValueError(f"strategy={strategy!r}: unknown dispatch strategy. "
                     f"Fix: use one of {STRATEGIES}")
  return y.reshape(B, S, D), stats
