"""Expert parallelism: experts sharded over a mesh axis, tokens moved to them.

Device ``i`` of the expert axis (size ``n``) holds experts
``[i * E_local, (i + 1) * E_local)``; tokens are sharded over the batch across the
same axis (and possibly other data axes). Each device routes its own tokens,
sends every token-to-expert assignment to the device holding that expert, runs
its local experts with one grouped matmul per projection (``moe.gmm``) and sends
the results back, where they are combined with the router weights.

``expert_parallel_ffn`` is the per-device body (call it inside ``jax.shard_map``);
``routed_experts`` places it (and the other strategies) on the current mesh
through ``core.placement``: tokens over the ``batch`` and ``length`` axes,
experts over ``expert``. Two exchanges:

- ``ragged``: assignments sorted by expert; the per-destination row counts are
  swapped with an ``all_to_all``; the rows themselves move with
  ``jax.lax.ragged_all_to_all`` (exact sizes) into a receive buffer of static
  size: the worst case ``n * T_local * k`` rows (every device sends everything
  here: nothing is ever dropped), or ``ceil(capacity_factor * T_local * k)`` rows
  when ``capacity_factor`` is given (rows past the buffer are dropped: they are
  the tail of the buffer, which is filled in source-device order and, per
  source, in local-expert order). XLA:CPU has no ragged-all-to-all (``UNIMPLEMENTED:
  HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter``), so
  on CPU the default ``ragged_impl="emulated"`` does the same exchange with
  exactly the primitive's semantics from an ``all_to_all`` of slices padded to
  ``T_local * k`` rows and a scatter (for tests and CPU runs, not for speed).
- ``fixed``: one buffer of ``C = ceil(capacity_factor * T_local * k / n)`` rows per
  (source, destination) pair (``capacity_factor=None``: ``C = T_local * k``, the
  worst case, never drops), moved with a plain ``jax.lax.all_to_all``. Each
  destination's slots are filled in priority order: all first choices, then
  second choices, ..., token order within (GShard); the rest are dropped (their
  expert output is zero) and counted in ``DispatchStats.dropped``.

On the receiving device the rows are re-sorted by local expert (a stable sort
whose key puts empty buffer rows last), so the grouped matmul sees contiguous
groups and the padding lies past the sum of the group sizes (zeros out).

``DispatchStats.load_E`` is the global share of assignments per expert (before
any drop) and ``dropped`` the global share dropped: both are summed over the
expert axis and the other token axes (``stats_axes``).
"""
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from core import placement, platform
from core.vma import varying_like
from moe import dispatch, gmm
from moe.dispatch import DispatchStats, ExpertWeights, expert_ffn_grouped
from moe.router import Routing

EXCHANGES = ("ragged", "fixed")
RAGGED_IMPLS = ("native", "emulated")


def _excl_cumsum(x):
  return jnp.cumsum(x) - x


def _a2a(x, axis_name):
  """Row ``j`` of ``x`` goes to device ``j``; row ``s`` of the result came from ``s``."""
  return jax.lax.all_to_all(x, axis_name, 0, 0, tiled=True)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name, max_send_rows: int | None = None):
  """``jax.lax.ragged_all_to_all`` (one slice per device) from a padded ``all_to_all``
  and a scatter: same result, differentiable, runs where the primitive does not
  (XLA:CPU). Every slice is padded to ``max_send_rows`` (default: all of
  ``operand``; a smaller bound must hold for every send size), so it sends
  ``n * max_send_rows`` rows: for tests and CPU runs, not for speed."""
  M = output.shape[0]
  n = input_offsets.shape[0]
  N = operand.shape[0] if max_send_rows is None else min(max_send_rows, operand.shape[0])
  r = jnp.arange(N)
  src_nN = jnp.clip(input_offsets[:, None] + r[None, :], 0, operand.shape[0] - 1)
  send_valid = r[None, :] < send_sizes[:, None]
  mask = send_valid.reshape(send_valid.shape + (1,) * (operand.ndim - 1))
  send = jnp.where(mask, operand[src_nN], 0).astype(operand.dtype)
  recv = _a2a(send, axis_name)                                  # [n, N, ...]
  offsets = _a2a(output_offsets, axis_name)                     # where sources write here
  valid = r[None, :] < recv_sizes[:, None]
  unique_oob = M + jnp.arange(n * N).reshape(n, N)
  dst = jnp.where(valid, offsets[:, None] + r[None, :], unique_oob)
  return output.at[dst.reshape(-1)].set(recv.reshape((n * N,) + operand.shape[1:]),
                                        mode="drop", unique_indices=True)


def _ragged_a2a(impl, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                axis_name, max_send_rows):
  output = varying_like(output, operand)
  args = (operand, output, input_offsets.astype(jnp.int32), send_sizes.astype(jnp.int32),
          output_offsets.astype(jnp.int32), recv_sizes.astype(jnp.int32))
  if impl == "native":
    return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)
  return emulated_ragged_all_to_all(*args, axis_name=axis_name, max_send_rows=max_send_rows)


def _check_common(exchange, capacity_factor, ragged_impl):
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange={exchange!r}: unknown expert-parallel exchange. "
                     f"Fix: use one of {EXCHANGES}")
  if capacity_factor is not None and not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor}: must be > 0 or None. Fix: use None "
                     "(worst-case buffers, never drops) or a factor such as 1.25-2")
  if ragged_impl is not None and ragged_impl not in RAGGED_IMPLS:
    raise ValueError(f"ragged_impl={ragged_impl!r}: unknown ragged_all_to_all implementation. "
                     f"Fix: use None (platform default) or one of {RAGGED_IMPLS}")


def default_ragged_impl() -> str:
  """``native`` where XLA has ragged-all-to-all (GPU, TPU), ``emulated`` on CPU."""
  return "emulated" if platform.current() == "cpu" else "native"


def expert_parallel_ffn(x_TD: jax.Array, routing: Routing, w_local: ExpertWeights, *,
                        axis_name: str = "expert", num_experts: int, exchange: str = "ragged",
                        capacity_factor: float | None = None, dtype=None,
                        gmm_impl: None | str | Sequence[str] = None, tiling=None,
                        stats_axes: Sequence[str] = (), ragged_impl: str | None = None):
  """The routed experts' output for this device's tokens; call inside ``shard_map``.

  Args:
    x_TD: this device's tokens [T, D].
    routing: ``Routing`` for them; only ``weights_TK`` and ``experts_TK`` (global
      expert ids) are used (any leading shape with T elements).
    w_local: this device's experts, [E_local, ...] stacked SwiGLU weights; device
      ``i`` of ``axis_name`` holds experts ``[i * E_local, (i + 1) * E_local)``.
    axis_name: the mesh axis the experts are sharded over.
    num_experts: the global number of experts (``E_local * axis size``).
    exchange: ``ragged`` or ``fixed`` (see the module docstring).
    capacity_factor: None for worst-case buffers (never drops); else ``fixed``
      buffers hold ``ceil(cf * T * k / n)`` rows per destination and the ``ragged``
      receive buffer ``ceil(cf * T * k)`` rows.
    dtype: compute dtype (default x's).
    gmm_impl, tiling: passed to ``moe.gmm``.
    stats_axes: further mesh axes the tokens are sharded over (data axes); the
      statistics are summed over them and ``axis_name``.
    ragged_impl: ``native`` (``jax.lax.ragged_all_to_all``) or ``emulated``;
      None: ``default_ragged_impl()``.

  Returns:
    ([T, D] output in ``dtype``, ``DispatchStats`` with the global load [E] and
    dropped share).
  """
  _check_common(exchange, capacity_factor, ragged_impl)
  impl = ragged_impl or default_ragged_impl()
  n = jax.lax.axis_size(axis_name)
  L = w_local.gate_EDF.shape[0]
  if num_experts != n * L:
    raise ValueError(f"num_experts={num_experts}: the local experts ({L}) times the "
                     f"{axis_name!r} axis size ({n}) give {n * L}. Fix: pass the global expert "
                     f"count and shard the expert weights on dim 0 over {axis_name!r}")
  dt = dtype or x_TD.dtype
  T, D = x_TD.shape
  K = routing.experts_TK.shape[-1]
  experts_TK = routing.experts_TK.reshape(T, K).astype(jnp.int32)
  weights_TK = routing.weights_TK.reshape(T, K)
  A = T * K
  # Assignments in priority order: all first choices, then all second choices, ...
  e_A = experts_TK.T.reshape(-1)
  counts_E = jnp.zeros((num_experts,), jnp.int32).at[e_A].add(1)
  x_TD = x_TD.astype(dt)
  ffn = lambda rows, sizes: expert_ffn_grouped(rows, sizes, w_local, dtype=dt,
                                               gmm_impl=gmm_impl, tiling=tiling)

  if exchange == "ragged":
    order_A = jnp.argsort(e_A, stable=True)      # by expert, hence by destination
    c_nL = counts_E.reshape(n, L)                # rows I send to (device, local expert)
    in_off_n = _excl_cumsum(jnp.sum(c_nL, axis=1))
    recv_nL = _a2a(c_nL, axis_name)              # rows I get from (source, local expert)
    worst = n * A
    R = worst if capacity_factor is None else min(worst, math.ceil(capacity_factor * A))
    # The receive buffer holds the (source, local expert) segments back to back.
    seg_start = _excl_cumsum(recv_nL.reshape(-1))
    kept_nL = jnp.clip(R - seg_start, 0, recv_nL.reshape(-1)).reshape(n, L)
    recv_sizes_n = jnp.sum(kept_nL, axis=1)
    recv_off_n = jnp.minimum(seg_start.reshape(n, L)[:, 0], R)
    out_off_n = _a2a(recv_off_n, axis_name)      # where my slice lands on each receiver
    send_sizes_n = _a2a(recv_sizes_n, axis_name)  # what each receiver has room for
    # Every slice, either way, is at most one device's A assignments (max_send_rows).
    x_AD = jnp.take(x_TD, order_A % T, axis=0)
    x_RD = _ragged_a2a(impl, x_AD, jnp.zeros((R, D), dt), in_off_n, send_sizes_n, out_off_n,
                       recv_sizes_n, axis_name, A)
    # Re-sort by local expert; empty rows (key L) go past the sum of the group sizes.
    seg_R = jnp.searchsorted(jnp.cumsum(kept_nL.reshape(-1)), jnp.arange(R), side="right")
    key_R = jnp.where(seg_R < n * L, seg_R % L, L)
    perm_R = jnp.argsort(key_R, stable=True)
    y_grouped = ffn(jnp.take(x_RD, perm_R, axis=0), jnp.sum(kept_nL, axis=0))
    y_RD = jnp.zeros_like(y_grouped).at[perm_R].set(y_grouped, unique_indices=True)
    y_sorted = _ragged_a2a(impl, y_RD, jnp.zeros((A, D), dt), recv_off_n, recv_sizes_n,
                           _a2a(in_off_n, axis_name), send_sizes_n, axis_name, A)
    y_AD = jnp.zeros_like(y_sorted).at[order_A].set(y_sorted, unique_indices=True)
    kept = jnp.sum(send_sizes_n)
  else:
    C = A if capacity_factor is None else max(1, math.ceil(capacity_factor * A / n))
    d_A = e_A // L
    order_A = jnp.argsort(d_A, stable=True)      # by destination, priority order within
    count_n = jnp.zeros((n,), jnp.int32).at[d_A].add(1)
    start_n = _excl_cumsum(count_n)
    slot_C = jnp.arange(C)
    valid_nC = slot_C[None, :] < count_n[:, None]
    a_nC = order_A[jnp.clip(start_n[:, None] + slot_C[None, :], 0, A - 1)]
    x_send = jnp.where(valid_nC[..., None], jnp.take(x_TD, a_nC % T, axis=0), 0).astype(dt)
    id_send = jnp.where(valid_nC, e_A[a_nC] % L, L)
    x_recv = _a2a(x_send, axis_name).reshape(n * C, D)
    id_recv = _a2a(id_send, axis_name).reshape(n * C)
    perm = jnp.argsort(id_recv, stable=True)
    sizes_L = jnp.zeros((L + 1,), jnp.int32).at[id_recv].add(1)[:L]
    y_grouped = ffn(jnp.take(x_recv, perm, axis=0), sizes_L)
    y_recv = jnp.zeros_like(y_grouped).at[perm].set(y_grouped, unique_indices=True)
    y_back = _a2a(y_recv.reshape(n, C, D), axis_name)   # [destination, slot, D]
    rank_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
    pos_A = rank_A - start_n[d_A]
    keep_A = pos_A < C
    y_AD = jnp.where(keep_A[:, None], y_back[d_A, jnp.minimum(pos_A, C - 1)], 0).astype(dt)
    kept = jnp.sum(jnp.minimum(count_n, C))

  y_TD = jnp.einsum("ktd,tk->td", y_AD.reshape(K, T, D), weights_TK.astype(dt))
  axes = tuple(dict.fromkeys((axis_name, *stats_axes)))
  total = jax.lax.psum(jnp.float32(A), axes)
  load_E = jax.lax.psum(counts_E.astype(jnp.float32), axes) / total
  dropped = jax.lax.psum((A - kept).astype(jnp.float32), axes) / total
  return y_TD, DispatchStats(load_E, dropped)


def routed_experts(x_BSD: jax.Array, routing: Routing, w: ExpertWeights, *, strategy: str,
                   capacity_factor: float = 1.25, dtype=None, expert_parallel: str = "none",
                   gmm_impl: None | str | Sequence[str] = None, tiling=None,
                   ragged_impl: str | None = None):
  """The routed experts' output for tokens [B, S, D], placed on the current mesh.

  ``dropping`` and ``reference`` are einsums XLA partitions itself
  (``moe.dispatch``). ``dropless`` sorts tokens by expert, which must not happen
  across devices: it runs per device (``core.placement.per_device``) on the
  device's tokens (``batch`` and ``length`` shards):

  - ``expert_parallel="none"``: with every expert's weights (gathered over the mesh
    axes that shard them, as FSDP gathers any layer's weights);
  - ``ragged`` / ``fixed``: with the device's experts (``expert`` shards), tokens
    exchanged over the ``expert`` axis (``expert_parallel_ffn``); when the
    placement does not shard ``expert``, as ``none``.

  Returns ([B, S, D] output, ``DispatchStats`` with the global load and dropped share).
  """
  if strategy != "dropless":
    if expert_parallel != "none":
      raise ValueError(f"expert_parallel={expert_parallel!r} with strategy={strategy!r}: "
                       "expert parallelism exchanges sorted tokens. Fix: use "
                       "strategy='dropless' (or expert_parallel='none')")
    return dispatch.moe_ffn(x_BSD, routing, w, strategy=strategy,
                            capacity_factor=capacity_factor, dtype=dtype)
  if expert_parallel != "none":
    _check_common(expert_parallel, capacity_factor, ragged_impl)
  B, S, D = x_BSD.shape
  E, K = w.gate_EDF.shape[0], routing.experts_TK.shape[-1]
  cf = capacity_factor if expert_parallel == "fixed" else None

  def body(x, weights, experts, w_loc):
    Bl, Sl = x.shape[:2]
    r = Routing(weights.reshape(Bl * Sl, K), experts.reshape(Bl * Sl, K), None, None)
    tokens = placement.bound("batch") + placement.bound("length")
    ep = placement.bound("expert") if expert_parallel != "none" else ()
    if ep:
      y, stats = expert_parallel_ffn(
          x.reshape(Bl * Sl, D), r, w_loc, axis_name=ep[0], num_experts=E,
          exchange=expert_parallel, capacity_factor=cf, dtype=dtype, gmm_impl=gmm_impl,
          tiling=tiling, stats_axes=tokens, ragged_impl=ragged_impl)
    else:
      y, stats = dispatch.dropless(x.reshape(Bl * Sl, D), r, w_loc, dtype=dtype,
                                   gmm_impl=gmm_impl, tiling=tiling)
      if tokens:  # every device holds as many tokens: the global share is the mean
        stats = DispatchStats(jax.lax.pmean(stats.load_E, tokens),
                              jax.lax.pmean(stats.dropped, tokens))
    return y.reshape(Bl, Sl, D), stats

  tok = ("batch", "length", None)
  experts_axes = ("expert", None, None) if expert_parallel != "none" else None
  w_axes = ExpertWeights(experts_axes, experts_axes, experts_axes)
  return placement.per_device(
      body, (x_BSD, routing.weights_TK, routing.experts_TK, w), (tok, tok, tok, w_axes),
      (tok, DispatchStats((None,), ())),
      # Interpreted Pallas kernels trip shard_map's varying-axes check; unchecked,
      # shard_map's transpose sums the replicated weights' gradients itself.
      check_vma=not gmm.interpreted(gmm_impl))
