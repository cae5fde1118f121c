"""Routed experts placed on 8 simulated CPU devices (moe/parallel.py, through
core.placement) against the single-device loop over experts (moe/dispatch.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from conftest import assert_close, placed
from core import platform
from moe import dispatch, parallel, router

D, F, K, B, S = 16, 24, 2, 8, 4


def _inputs(E, seed):
  """Tokens [B, S, D], expert weights and a router, from a literal seed."""
  rng = np.random.default_rng(seed)
  n = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
  x = n(B, S, D)
  w = dispatch.ExpertWeights(n(E, D, F, scale=D ** -0.5), n(E, D, F, scale=D ** -0.5),
                             n(E, F, D, scale=F ** -0.5))
  return x, w, n(D, E, scale=D ** -0.5)


def _mesh(kind):
  """Meshes named by Kestrel's mesh axes (lm.sharding: batch -> data x expert)."""
  if kind == "expert8":
    return jax.make_mesh((8,), ("expert",), axis_types=(AxisType.Auto,))
  t = AxisType.Explicit if kind == "data2_expert4_explicit" else AxisType.Auto
  return jax.make_mesh((2, 4), ("data", "expert"), axis_types=(t, t))


def _routed(mesh, exchange, **kw):
  """``routed_experts`` (dropless) jitted under ``placed(mesh)``."""
  def fn(x, r, w):
    with placed(mesh):
      return jax.jit(lambda x, r, w: parallel.routed_experts(
          x, r, w, strategy="dropless", expert_parallel=exchange, **kw))(x, r, w)
  return fn


def _per_assignment_outputs(x_TD, experts_TK, w):
  """Expert e_tk applied to token t, [T, K, D], the obvious way."""
  h = jax.nn.silu(jnp.einsum("td,edf->etf", x_TD, w.gate_EDF)) * jnp.einsum(
      "td,edf->etf", x_TD, w.up_EDF)
  y_ETD = jnp.einsum("etf,efd->etd", h, w.down_EFD)
  return np.asarray(y_ETD)[np.asarray(experts_TK), np.arange(x_TD.shape[0])[:, None]]


# ------------------------------------------------ per device == one device


@pytest.mark.parametrize("exchange,mesh_kind,E,seed", [
    ("none", "data2_expert4_auto", 8, 11),   # tokens per device, every expert everywhere
    ("ragged", "expert8", 16, 12),           # 2 local experts per device
    ("ragged", "data2_expert4_auto", 8, 14),
    ("fixed", "data2_expert4_explicit", 16, 15)])  # 4 local experts per device
def test_forward_and_grads_match_single_device(exchange, mesh_kind, E, seed):
  x, w, w_router = _inputs(E, seed)
  mesh = _mesh(mesh_kind)
  # A constant probe, not x: with Explicit axes, jax 0.12 fails to transpose an
  # elementwise op between a batch-sharded (y) and a replicated (x) operand
  # (AssertionError in add_jaxvals), routed_experts or not.
  probe = jnp.asarray(np.random.default_rng(5).standard_normal((B, S, D)), jnp.float32)
  # fixed: capacity_factor = n gives worst-case buffers (nothing dropped).
  kw = dict(capacity_factor=float(mesh.shape["expert"])) if exchange == "fixed" else {}

  def loss(fn, x, w, w_router):
    r = router.route(x, w_router, top_k=K)
    y, stats = fn(x, r, w)
    return jnp.sum(jnp.sin(y) * probe), (y, stats)

  placed_fn = lambda x, r, w: parallel.routed_experts(
      x, r, w, strategy="dropless", expert_parallel=exchange, **kw)
  ref = lambda x, r, w: dispatch.moe_ffn(x, r, w, strategy="reference")
  grad = lambda fn: jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True)
  with placed(mesh):
    (l, (y, stats)), g = jax.jit(grad(placed_fn))(x, w, w_router)
  (l_ref, (y_ref, stats_ref)), g_ref = grad(ref)(x, w, w_router)
  assert y.shape == (B, S, D) and stats.load_E.shape == (E,)
  assert_close(y, y_ref, 2e-5)
  assert_close(l, l_ref, 2e-5)
  assert_close(stats.load_E, stats_ref.load_E, 1e-6)
  assert float(stats.dropped) == 0.0
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert_close(a, b, 2e-5)


def test_indivisible_shapes_fall_back_to_fewer_devices():
  """6 experts on expert=4, or a batch of 4 on data x expert = 8: the mesh axis that does
  not divide is left out of the call (core.placement.per_device); same result."""
  mesh = _mesh("data2_expert4_auto")
  x, w, w_router = _inputs(6, 16)
  r = router.route(x, w_router, top_k=K)
  y, stats = _routed(mesh, "ragged")(x, r, w)
  y_ref, stats_ref = dispatch.moe_ffn(x, r, w, strategy="reference")
  assert_close(y, y_ref, 2e-5)
  assert_close(stats.load_E, stats_ref.load_E, 1e-6)
  x, w, w_router = _inputs(8, 17)
  x4 = x[:4]
  r4 = router.route(x4, w_router, top_k=K)
  y, _ = _routed(mesh, "ragged")(x4, r4, w)
  assert_close(y, dispatch.moe_ffn(x4, r4, w, strategy="reference")[0], 2e-5)


def test_dropless_runs_per_device_dropping_is_left_to_xla():
  """Sorting tokens by expert must not cross devices: dropless is a per-device body
  (shard_map) even without expert parallelism; the einsum strategies are not."""
  mesh = _mesh("data2_expert4_auto")
  x, w, w_router = _inputs(8, 18)
  r = router.route(x, w_router, top_k=K)

  def program(strategy):
    call = lambda x, r, w: parallel.routed_experts(x, r, w, strategy=strategy)
    with placed(mesh):
      return str(jax.make_jaxpr(call)(x, r, w))
  assert "shard_map" in program("dropless")
  assert "shard_map" not in program("dropping")


# ------------------------------------------------------ capacity and drops


def _expected_fixed_keep(experts_TK, n, L, C):
  """GShard priority per (source device, destination device): first choices, then
  second choices, token order within; the first C of each destination are kept."""
  e = np.asarray(experts_TK).reshape(n, -1, K)  # [source, T_local, K]
  keep = np.zeros(e.shape, bool)
  for s in range(n):
    used = np.zeros(n, int)
    for k in range(K):
      for t in range(e.shape[1]):
        d = e[s, t, k] // L
        keep[s, t, k] = used[d] < C
        used[d] += 1
  return keep.reshape(-1, K)


def _expected_ragged_keep(experts_TK, n, L, R):
  """Receive buffer of R rows filled by source device, then local expert, then the
  sender's priority order (first choices, then second, token order)."""
  e = np.asarray(experts_TK).reshape(n, -1, K)
  keep = np.zeros(e.shape, bool)
  for d in range(n):
    filled = 0
    for s in range(n):
      for l in range(L):
        for k in range(K):
          for t in range(e.shape[1]):
            if e[s, t, k] == d * L + l:
              keep[s, t, k] = filled < R
              filled += 1
  return keep.reshape(-1, K)


def _ep_body(mesh, exchange, E, cf):
  """``expert_parallel_ffn`` under shard_map (routed_experts never caps ``ragged``)."""
  def body(x, weights, experts, w_loc):
    Bl = x.shape[0]
    r = router.Routing(weights.reshape(Bl * S, K), experts.reshape(Bl * S, K), None, None)
    y, stats = parallel.expert_parallel_ffn(x.reshape(Bl * S, D), r, w_loc, num_experts=E,
                                            exchange=exchange, capacity_factor=cf)
    return y.reshape(Bl, S, D), stats
  tok = P("expert")
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, P("expert")),
                               out_specs=(tok, P())))


@pytest.mark.parametrize("exchange,seed", [("fixed", 21), ("ragged", 22)])
def test_small_capacity_drops_exactly_the_expected_rows(exchange, seed):
  E, cf, n = 8, 1.0, 8
  x, w, w_router = _inputs(E, seed)
  mesh = _mesh("expert8")
  r = router.route(x, w_router, top_k=K)
  if exchange == "fixed":  # through the placed entry point
    y, stats = _routed(mesh, "fixed", capacity_factor=cf)(x, r, w)
  else:
    y, stats = _ep_body(mesh, "ragged", E, cf)(x, r.weights_TK, r.experts_TK, w)
  L, A_local = E // n, (B // n) * S * K
  experts = r.experts_TK.reshape(-1, K)
  if exchange == "fixed":
    keep = _expected_fixed_keep(experts, n, L, math.ceil(cf * A_local / n))
  else:
    keep = _expected_ragged_keep(experts, n, L, math.ceil(cf * A_local))
  assert 0 < (~keep).sum() < keep.size
  y_TKD = _per_assignment_outputs(x.reshape(-1, D), experts, w)
  want = np.einsum("tkd,tk->td", y_TKD, np.asarray(r.weights_TK).reshape(-1, K) * keep)
  assert_close(y.reshape(-1, D), want, 2e-5)
  np.testing.assert_allclose(float(stats.dropped), (~keep).mean(), rtol=1e-6)
  _, stats_ref = dispatch.moe_ffn(x, r, w, strategy="reference")
  assert_close(stats.load_E, stats_ref.load_E, 1e-6)  # load counts before any drop


@pytest.mark.parametrize("exchange", ["ragged", "fixed"])
def test_skewed_router_one_device_receives_everything(exchange):
  E = 16  # device 0 holds experts 0 and 1: every assignment goes there
  x, w, _ = _inputs(E, 31)
  mesh = _mesh("expert8")
  gates = jax.nn.softmax(jnp.asarray(np.random.default_rng(32).standard_normal((B, S, K)),
                                     jnp.float32), axis=-1)
  experts = jnp.broadcast_to(jnp.array([1, 0], jnp.int32), (B, S, K))
  unused = jnp.zeros((B, S, E))
  r = router.Routing(gates, experts, unused, unused)
  kw = dict(capacity_factor=8.0) if exchange == "fixed" else {}  # worst case: no drops
  y, stats = _routed(mesh, exchange, **kw)(x, r, w)
  y_ref, _ = dispatch.moe_ffn(x, r, w, strategy="reference")
  assert_close(y, y_ref, 2e-5)
  np.testing.assert_allclose(stats.load_E, np.eye(E)[:2].sum(0) / 2)
  assert float(stats.dropped) == 0.0


# ------------------------------------------------------- ragged_all_to_all


def _numpy_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                             recv_sizes):
  """jax.lax.ragged_all_to_all's documented semantics, per device ``i`` of ``n``: device i
  sends ``operand[i][input_offsets[i][j]:][:send_sizes[i][j]]`` to device j, which writes it
  at ``output_offsets[i][j]`` of its own output (offsets in the receiver's buffer);
  ``recv_sizes[j][i] == send_sizes[i][j]``; the rest of the output is left as given."""
  out = np.array(output)
  n = len(operand)
  for i in range(n):
    for j in range(n):
      size = send_sizes[i][j]
      assert recv_sizes[j][i] == size
      src = operand[i][input_offsets[i][j]:input_offsets[i][j] + size]
      out[j][output_offsets[i][j]:output_offsets[i][j] + size] = src
  return out


def _emulated(n, **kw):
  mesh = Mesh(np.array(jax.devices()[:n]), ("x",), axis_types=(AxisType.Auto,))
  return jax.jit(jax.shard_map(lambda *a: parallel.emulated_ragged_all_to_all(
      *(v[0] for v in a), axis_name="x", **kw)[None], mesh=mesh, in_specs=P("x"),
      out_specs=P("x")))


def test_emulated_ragged_all_to_all_matches_the_documented_example():
  # The example of jax.lax.ragged_all_to_all's docstring, on an axis of size 2.
  args = [np.array(a) for a in ([[1, 2, 2], [3, 4, 0]], [[0] * 4] * 2, [[0, 1], [0, 1]],
                                [[1, 2], [1, 1]], [[0, 0], [1, 2]], [[1, 1], [2, 1]])]
  want = [[1, 3, 0, 0], [2, 2, 4, 0]]
  np.testing.assert_array_equal(_numpy_ragged_all_to_all(*args), want)
  np.testing.assert_array_equal(_emulated(2)(*args), want)


@pytest.mark.parametrize("max_send_rows", [None, 5])
def test_emulated_ragged_all_to_all_equals_the_numpy_model(max_send_rows):
  """4 devices, ragged sizes (zeros included), rows with a trailing feature axis, output
  slices packed in source order with gaps; the untouched rows keep the output's values."""
  n, N, M = 4, 14, 16
  rng = np.random.default_rng(41)
  send = rng.integers(0, 3, (n, n))
  send[0, 2] = 5  # the largest slice: max_send_rows=5 still bounds every send size
  send[1] = 0     # a device that sends nothing
  in_off = np.zeros((n, n), np.int64)
  for i in range(n):  # slices in destination order with a gap of 0-1 rows between them
    in_off[i] = np.cumsum(np.r_[0, send[i, :-1] + rng.integers(0, 2, n - 1)])
  assert (in_off[:, -1] + send[:, -1] <= N).all()
  out_off = np.zeros((n, n), np.int64)   # receiver j packs sources 0..n-1, gap of 1 row
  for j in range(n):
    out_off[:, j] = np.cumsum(np.r_[1, send[:-1, j] + 1])
  assert (out_off[-1] + send[-1] <= M).all()
  recv = send.T.copy()
  operand = rng.standard_normal((n, N, 3)).astype(np.float32)
  output = np.full((n, M, 3), -7.0, np.float32)
  args = (operand, output, in_off.astype(np.int32), send.astype(np.int32),
          out_off.astype(np.int32), recv.astype(np.int32))
  want = _numpy_ragged_all_to_all(*args)
  np.testing.assert_array_equal(_emulated(n, max_send_rows=max_send_rows)(*args), want)


def test_native_ragged_all_to_all_is_chosen_where_it_exists():
  """XLA:CPU has no ragged-all-to-all: the emulation there, the primitive on GPU/TPU."""
  assert parallel.default_ragged_impl() == "emulated"  # this host: CPU
  for name, want in [("tpu", "native"), ("gpu", "native"), ("cpu", "emulated")]:
    with platform.target(name):
      assert parallel.default_ragged_impl() == want
  E = 8
  x, w, w_router = _inputs(E, 51)
  r = router.route(x, w_router, top_k=K)
  mesh = _mesh("expert8")

  def primitives(name):
    """Traced (not compiled) for ``name``, inside ``placed`` (which targets the mesh's
    cpu); a fresh function each time: jax's trace cache does not see the target."""
    call = lambda x, r, w: parallel.routed_experts(
        x, r, w, strategy="dropless", expert_parallel="ragged", gmm_impl="ragged_dot")
    with placed(mesh), platform.target(name):
      return str(jax.make_jaxpr(call)(x, r, w))
  assert "ragged_all_to_all" in primitives("tpu")
  assert "ragged_all_to_all" not in primitives("cpu")


# ------------------------------------------------------------------- errors


def test_clear_errors():
  mesh = _mesh("data2_expert4_auto")
  x, w, w_router = _inputs(8, 61)
  r = router.route(x, w_router, top_k=K)
  call = lambda **kw: _routed(mesh, kw.pop("expert_parallel", "ragged"), **kw)(x, r, w)
  with pytest.raises(ValueError, match=r"^exchange='bogus': unknown .*Fix: "):
    call(expert_parallel="bogus")
  with pytest.raises(ValueError, match=r"^capacity_factor=0: must be > 0.*Fix: "):
    call(expert_parallel="fixed", capacity_factor=0)
  with pytest.raises(ValueError, match=r"^ragged_impl='bogus': unknown .*Fix: "):
    call(ragged_impl="bogus")
  with pytest.raises(ValueError, match=r"^expert_parallel='ragged' with strategy='dropping'"
                                       r".*Fix: "):
    with placed(mesh):
      parallel.routed_experts(x, r, w, strategy="dropping", expert_parallel="ragged")
  # The per-device body checks the global expert count against its shard.
  body = jax.shard_map(
      lambda x, e, g, w: parallel.expert_parallel_ffn(
          x[0], router.Routing(g[0], e[0], None, None), w, num_experts=16)[0][None],
      mesh=_mesh("expert8"), in_specs=P("expert"), out_specs=P("expert"))
  with pytest.raises(ValueError, match=r"^num_experts=16: the local experts \(1\) times the "
                                       r"'expert' axis size \(8\) give 8.*Fix: "):
    jax.jit(body)(x, r.experts_TK, r.weights_TK, w)
