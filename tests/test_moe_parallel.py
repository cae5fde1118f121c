"""Expert parallelism (moe/parallel.py) on 8 simulated CPU devices, against the
single-device dispatch (moe/dispatch.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from moe import dispatch, parallel, router

D, F, K, B, S = 32, 48, 2, 8, 8


def _weights(E, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (B, S, D), jnp.float32)
  w = dispatch.ExpertWeights(jax.random.normal(ks[1], (E, D, F)) / math.sqrt(D),
                             jax.random.normal(ks[2], (E, D, F)) / math.sqrt(D),
                             jax.random.normal(ks[3], (E, F, D)) / math.sqrt(F))
  w_router = jax.random.normal(ks[4], (D, E)) / math.sqrt(D)
  return x, w, w_router


def _mesh(kind):
  if kind == "expert8":
    return jax.make_mesh((8,), ("expert",), axis_types=(AxisType.Auto,)), ("expert",)
  t = AxisType.Explicit if kind == "data2_expert4_explicit" else AxisType.Auto
  return jax.make_mesh((2, 4), ("data", "expert"), axis_types=(t, t)), ("data", "expert")


def _close(a, b, tol=2e-5):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def _per_assignment_outputs(x_TD, experts_TK, w):
  """Expert e_tk applied to token t, [T, K, D], the obvious way."""
  h = jax.nn.silu(jnp.einsum("td,edf->etf", x_TD, w.gate_EDF)) * jnp.einsum(
      "td,edf->etf", x_TD, w.up_EDF)
  y_ETD = jnp.einsum("etf,efd->etd", h, w.down_EFD)
  return np.asarray(y_ETD)[np.asarray(experts_TK), np.arange(x_TD.shape[0])[:, None]]


@pytest.mark.parametrize("exchange", ["ragged", "fixed"])
def test_forward_matches_single_device(exchange):
  E = 16
  x, w, w_router = _weights(E)
  mesh, batch_axes = _mesh("expert8")
  r = router.route(x, w_router, top_k=K)
  f = jax.jit(lambda x, r, w: parallel.ep_moe_ffn(x, r, w, mesh=mesh, batch_axes=batch_axes,
                                                  exchange=exchange))
  y, stats = f(x, r, w)
  y_ref, stats_ref = dispatch.moe_ffn(x, r, w, strategy="reference")
  y_dl, _ = dispatch.moe_ffn(x, r, w, strategy="dropless")
  assert y.shape == (B, S, D) and stats.load_E.shape == (E,)
  _close(y, y_ref)
  _close(y, y_dl)
  _close(stats.load_E, stats_ref.load_E, 1e-6)
  assert float(stats.dropped) == 0.0


@pytest.mark.parametrize("exchange,mesh_kind", [
    ("ragged", "expert8"), ("fixed", "expert8"),
    ("ragged", "data2_expert4_auto"), ("fixed", "data2_expert4_explicit")])
def test_grads_match_single_device(exchange, mesh_kind):
  E = 8
  x, w, w_router = _weights(E, seed=1)
  mesh, batch_axes = _mesh(mesh_kind)
  # A constant probe, not x: with Explicit axes, jax 0.12 fails to transpose an
  # elementwise op between a batch-sharded (y) and a replicated (x) operand
  # (AssertionError in add_jaxvals), ep_moe_ffn or not.
  probe = jax.random.normal(jax.random.key(5), (B, S, D))

  def loss(fn, x, w, w_router):
    r = router.route(x, w_router, top_k=K)
    y, stats = fn(x, r, w)
    return jnp.sum(jnp.sin(y) * probe), (y, stats)

  ep = lambda x, r, w: parallel.ep_moe_ffn(x, r, w, batch_axes=batch_axes, exchange=exchange)
  ref = lambda x, r, w: dispatch.moe_ffn(x, r, w, strategy="reference")
  grad = lambda fn: jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True)
  with jax.set_mesh(mesh):  # mesh=None: ep_moe_ffn takes the context mesh under jit
    (l, (y, stats)), g = jax.jit(grad(ep))(x, w, w_router)
  (l_ref, (y_ref, stats_ref)), g_ref = grad(ref)(x, w, w_router)
  _close(y, y_ref)
  _close(l, l_ref)
  _close(stats.load_E, stats_ref.load_E, 1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    _close(a, b)


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


@pytest.mark.parametrize("exchange", ["fixed", "ragged"])
def test_small_capacity_drops_exactly_the_expected_rows(exchange):
  E, cf = 8, 1.0
  x, w, w_router = _weights(E, seed=2)
  mesh, batch_axes = _mesh("expert8")
  r = router.route(x, w_router, top_k=K)
  y, stats = jax.jit(lambda x, r, w: parallel.ep_moe_ffn(
      x, r, w, mesh=mesh, exchange=exchange, capacity_factor=cf))(x, r, w)
  n, L, A_local = 8, E // 8, (B // 8) * S * K
  experts = r.experts_TK.reshape(-1, K)
  if exchange == "fixed":
    keep = _expected_fixed_keep(experts, n, L, math.ceil(cf * A_local / n))
  else:
    keep = _expected_ragged_keep(experts, n, L, math.ceil(cf * A_local))
  assert 0 < (~keep).sum() < keep.size
  y_TKD = _per_assignment_outputs(x.reshape(-1, D), experts, w)
  want = np.einsum("tkd,tk->td", y_TKD, np.asarray(r.weights_TK).reshape(-1, K) * keep)
  _close(y.reshape(-1, D), want)
  np.testing.assert_allclose(float(stats.dropped), (~keep).mean(), rtol=1e-6)
  _, stats_ref = dispatch.moe_ffn(x, r, w, strategy="reference")
  _close(stats.load_E, stats_ref.load_E, 1e-6)  # load counts before any drop


@pytest.mark.parametrize("exchange", ["ragged", "fixed"])
def test_skewed_router_one_device_receives_everything(exchange):
  E = 16  # device 0 holds experts 0 and 1: every assignment goes there
  x, w, _ = _weights(E, seed=3)
  mesh, _ = _mesh("expert8")
  gates = jax.nn.softmax(jax.random.normal(jax.random.key(4), (B, S, K)), axis=-1)
  experts = jnp.broadcast_to(jnp.array([1, 0], jnp.int32), (B, S, K))
  unused = jnp.zeros((B, S, E))
  r = router.Routing(gates, experts, unused, unused)
  y, stats = jax.jit(lambda x, r, w: parallel.ep_moe_ffn(x, r, w, mesh=mesh,
                                                          exchange=exchange))(x, r, w)
  y_ref, _ = dispatch.moe_ffn(x, r, w, strategy="reference")
  _close(y, y_ref)
  np.testing.assert_allclose(stats.load_E, np.eye(E)[:2].sum(0) / 2)
  assert float(stats.dropped) == 0.0


def test_emulated_ragged_all_to_all_matches_the_documented_example():
  # The example of jax.lax.ragged_all_to_all's docstring, on an axis of size 2.
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",), axis_types=(AxisType.Auto,))
  args = [np.array(a) for a in ([[1, 2, 2], [3, 4, 0]], [[0] * 4] * 2, [[0, 1], [0, 1]],
                                [[1, 2], [1, 1]], [[0, 0], [1, 2]], [[1, 1], [2, 1]])]
  f = jax.shard_map(lambda *a: parallel.emulated_ragged_all_to_all(
      *(v[0] for v in a), axis_name="x")[None], mesh=mesh, in_specs=P("x"), out_specs=P("x"))
  np.testing.assert_array_equal(jax.jit(f)(*args), [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_native_ragged_all_to_all_runs_or_fails_as_known():
  """XLA:CPU (jax 0.12) has no ragged-all-to-all; elsewhere native must match."""
  E = 8
  x, w, w_router = _weights(E)
  mesh, _ = _mesh("expert8")
  r = router.route(x, w_router, top_k=K)
  f = jax.jit(lambda x, r, w: parallel.ep_moe_ffn(x, r, w, mesh=mesh, ragged_impl="native"))
  try:
    y, _ = f(x, r, w)
  except Exception as e:  # noqa: BLE001
    assert jax.default_backend() == "cpu", e
    assert "ragged-all-to-all` is not supported by XLA:CPU" in str(e)
    return
  _close(y, dispatch.moe_ffn(x, r, w, strategy="reference")[0])


def test_clear_errors():
  mesh, batch_axes = _mesh("data2_expert4_auto")
  x, w, w_router = _weights(8)
  r = router.route(x, w_router, top_k=K)
  call = lambda x, r, w, **kw: parallel.ep_moe_ffn(x, r, w, mesh=mesh, batch_axes=batch_axes,
                                                   **kw)
  w6 = jax.tree.map(lambda a: a[:6], w)
  with pytest.raises(ValueError, match=r"^moe\.num_experts=6: not divisible by mesh\.expert=4"
                                       r".*Fix: "):
    call(x, r, w6)
  with pytest.raises(ValueError, match=r"^batch_size=6: not divisible by mesh\.data=2 x "
                                       r"mesh\.expert=4=8.*Fix: "):
    call(x[:6], jax.tree.map(lambda a: a[:6], r), w)
  with pytest.raises(ValueError, match=r"^exchange='bogus': unknown .*Fix: "):
    call(x, r, w, exchange="bogus")
  with pytest.raises(ValueError, match=r"^capacity_factor=0: must be > 0.*Fix: "):
    call(x, r, w, exchange="fixed", capacity_factor=0)
  with pytest.raises(ValueError, match=r"^batch_axes=\('data',\): must include "
                                       r"expert_axis='expert'.*Fix: "):
    parallel.ep_moe_ffn(x, r, w, mesh=mesh, batch_axes=("data",))
  with pytest.raises(ValueError, match=r"^mesh=None: no mesh.*Fix: "):
    parallel.ep_moe_ffn(x, r, w)
  # The per-device body checks the global expert count against its shard.
  body = jax.shard_map(
      lambda x, e, g, w: parallel.expert_parallel_ffn(
          x[0], router.Routing(g[0], e[0], None, None), w, num_experts=16)[0][None],
      mesh=_mesh("expert8")[0], in_specs=P("expert"), out_specs=P("expert"))
  with pytest.raises(ValueError, match=r"^num_experts=16: the local experts \(1\) times the "
                                       r"'expert' axis size \(8\) give 8.*Fix: "):
    jax.jit(body)(x, r.experts_TK, r.weights_TK, w)
