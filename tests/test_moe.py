"""moe/: routers, balancing losses, dispatch strategies against the loop-over-experts
reference (forward and gradients), the MoE layer, and MoE models in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import dispatch, router
from moe.dispatch import ExpertWeights
from moe.layer import MoEFeedForward


def _inputs(seed, B=2, S=16, D=32, F=48, E=8):
  k = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(k[0], (B, S, D), jnp.float32)
  w_r = jax.random.normal(k[1], (D, E), jnp.float32) / np.sqrt(D)
  w = ExpertWeights(jax.random.normal(k[2], (E, D, F)) / np.sqrt(D),
                    jax.random.normal(k[3], (E, D, F)) / np.sqrt(D),
                    jax.random.normal(k[4], (E, F, D)) / np.sqrt(F))
  return x, w_r, w


# ---------------------------------------------------------------- routers


def test_softmax_top_k_and_normalisation():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.5, 2.5]])
  w_DE = jnp.eye(4)
  probs = jax.nn.softmax(logits, -1)
  r1 = router.route(logits, w_DE, top_k=1)  # Switch: the raw probability
  np.testing.assert_array_equal(r1.experts_TK[:, 0], [0, 1])
  np.testing.assert_allclose(r1.weights_TK[:, 0], probs[jnp.arange(2), jnp.array([0, 1])], rtol=1e-6)
  r2 = router.route(logits, w_DE, top_k=2)  # Mixtral: renormalised over the two
  np.testing.assert_array_equal(r2.experts_TK, [[0, 1], [1, 3]])
  p = np.asarray(probs)
  np.testing.assert_allclose(r2.weights_TK[0], p[0, [0, 1]] / p[0, [0, 1]].sum(), rtol=1e-6)
  np.testing.assert_allclose(r2.probs_TE, probs, rtol=1e-6)


def test_sigmoid_router_and_bias_changes_selection_not_weights():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  s = jax.nn.sigmoid(logits)[0]
  r = router.route(logits, jnp.eye(4), top_k=2, score="sigmoid")
  np.testing.assert_array_equal(r.experts_TK, [[0, 1]])
  np.testing.assert_allclose(r.weights_TK[0], s[:2] / s[:2].sum(), rtol=1e-6)
  np.testing.assert_allclose(r.probs_TE[0], s / s.sum(), rtol=1e-6)
  bias = jnp.array([0.0, -1.0, 0.0, 1.0])  # pushes expert 3 in, expert 1 out
  rb = router.route(logits, jnp.eye(4), top_k=2, score="sigmoid", bias_E=bias)
  np.testing.assert_array_equal(rb.experts_TK, [[3, 0]])
  np.testing.assert_allclose(rb.weights_TK[0], s[jnp.array([3, 0])] / (s[3] + s[0]), rtol=1e-6)
  # The bias gets no gradient: it only selects.
  g = jax.grad(lambda b: jnp.sum(router.route(logits, jnp.eye(4), top_k=2, score="sigmoid",
                                              bias_E=b).weights_TK * jnp.array([1.0, 2.0])))(bias)
  np.testing.assert_array_equal(g, 0.0)


def test_jitter_perturbs_the_input_only_with_an_rng():
  x, w_r, _ = _inputs(0)
  a = router.route(x, w_r, top_k=2)
  b = router.route(x, w_r, top_k=2, jitter=0.1, rng=jax.random.key(1))
  assert not np.allclose(a.logits_TE, b.logits_TE)
  with pytest.raises(ValueError, match="jitter>0 needs an rng"):
    router.route(x, w_r, top_k=2, jitter=0.1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=5), r"top_k=5: must be in \[1, num_experts=4\]"),
    (dict(top_k=0), r"top_k=0"),
    (dict(top_k=1, score="relu"), r"score='relu': unknown router score"),
])
def test_router_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    router.route(jnp.ones((3, 4)), jnp.ones((4, 4)), **kwargs)


def test_balancing_losses_by_hand():
  # 4 tokens, 2 experts, top-1. Token choices: 0, 0, 0, 1 -> f = (3/4, 1/4).
  probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
  experts = jnp.array([[0], [0], [0], [1]])
  P = probs.mean(0)  # (0.65, 0.35)
  expected = 2 * (0.75 * P[0] + 0.25 * P[1])
  np.testing.assert_allclose(router.load_balancing_loss(probs, experts), expected, rtol=1e-6)
  # Uniform router and uniform load give exactly 1.
  np.testing.assert_allclose(router.load_balancing_loss(jnp.full((4, 2), 0.5),
                                                        jnp.array([[0], [1], [0], [1]])), 1.0)
  logits = jnp.array([[1.0, 2.0], [0.0, -3.0]])
  z = np.log(np.exp([1.0, 2.0]).sum()) ** 2 / 2 + np.log(np.exp([0.0, -3.0]).sum()) ** 2 / 2
  np.testing.assert_allclose(router.router_z_loss(logits), z, rtol=1e-6)
  load = router.expert_load(jnp.array([[0, 1], [0, 2], [0, 1]]), 4)
  np.testing.assert_allclose(load, [3 / 6, 2 / 6, 1 / 6, 0])
  np.testing.assert_allclose(router.load_cv(load), np.std(load) / np.mean(load), rtol=1e-6)
  bias = router.update_balance_bias(jnp.zeros(4), load, 0.01)
  np.testing.assert_allclose(bias, [-0.01, -0.01, 0.01, 0.01])


# ---------------------------------------------------------------- dispatch


ROUTERS = [dict(top_k=1), dict(top_k=2), dict(top_k=2, score="sigmoid"), dict(top_k=3, bias=True)]


def _route(x, w_r, rcfg):
  rcfg = dict(rcfg)
  bias = jnp.linspace(-0.3, 0.3, w_r.shape[1]) if rcfg.pop("bias", False) else None
  return router.route(x, w_r, bias_E=bias, **rcfg)


def _moe(strategy, x, w_r, w, rcfg, **kw):
  return dispatch.moe_ffn(x, _route(x, w_r, rcfg), w, strategy=strategy, **kw)


@pytest.mark.parametrize("rcfg", ROUTERS, ids=lambda r: "-".join(f"{k}{v}" for k, v in r.items()))
@pytest.mark.parametrize("strategy,kw", [
    ("dropping", dict(capacity_factor=8.0)),  # capacity >= all tokens: nothing dropped
    ("dropless", dict(gmm_impl="ragged_dot")),
    ("dropless", dict(gmm_impl="xla")),
    ("dropless", dict(gmm_impl="pallas", tiling=(16, 128, 128))),  # ours, interpreted
], ids=["dropping", "dropless-ragged_dot", "dropless-xla", "dropless-pallas"])
def test_strategies_equal_loop_over_experts(strategy, kw, rcfg):
  x, w_r, w = _inputs(seed=hash((strategy, str(kw), str(rcfg))) % 1000)
  y, stats = _moe(strategy, x, w_r, w, rcfg, **kw)
  y_ref, stats_ref = _moe("reference", x, w_r, w, rcfg)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.load_E, stats_ref.load_E)
  assert float(stats.dropped) == 0.0
  loss = lambda s, **k: lambda x, w_r, w: jnp.sum(jnp.sin(_moe(s, x, w_r, w, rcfg, **k)[0]))
  g = jax.grad(loss(strategy, **kw), argnums=(0, 1, 2))(x, w_r, w)
  g_ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(x, w_r, w)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dropping_respects_capacity_and_priority():
  # One group of 4 tokens, 2 experts, top-2, capacity_factor 0.5 -> 2 slots each.
  E, D = 2, 3
  experts = jnp.array([[[0, 1], [0, 1], [1, 0], [0, 1]]])
  weights = jnp.full((1, 4, 2), 0.5)
  routing = router.Routing(weights, experts, jnp.full((1, 4, E), 0.5), jnp.zeros((1, 4, E)))
  eye = jnp.broadcast_to(jnp.eye(D), (E, D, D))
  w = ExpertWeights(eye * 10.0, eye, eye)  # f(x) = silu(10x) * x: positive for x > 0
  x = jnp.ones((1, 4, D))
  y, stats = dispatch.dropping(x, routing, w, capacity_factor=0.5)
  assert dispatch.capacity(4, E, 2, 0.5) == 2
  # First choices go first: expert 0 takes tokens 0, 1 (token 3's first choice
  # overflows), expert 1 takes token 2; then second choices: expert 1 takes token 0
  # only. Kept: t0 both, t1 one, t2 one, t3 none -> 4 of 8 dropped.
  fx = float(jax.nn.silu(10.0) * 1.0)
  np.testing.assert_allclose(y[0, :, 0], [fx, 0.5 * fx, 0.5 * fx, 0.0], rtol=1e-5)
  np.testing.assert_allclose(stats.dropped, 0.5)
  with pytest.raises(ValueError, match=r"capacity_factor=0.0: must be > 0"):
    dispatch.dropping(x, routing, w, capacity_factor=0.0)


def test_unknown_strategy_is_refused():
  x, w_r, w = _inputs(0)
  with pytest.raises(ValueError, match="strategy='scatter'.*Fix: use one of"):
    _moe("scatter", x, w_r, w, dict(top_k=2))


def test_bf16_dropless_close_to_fp32_reference():
  x, w_r, w = _inputs(3)
  y, _ = _moe("dropless", x, w_r, w, dict(top_k=2), dtype=jnp.bfloat16, gmm_impl="ragged_dot")
  y_ref, _ = _moe("reference", x, w_r, w, dict(top_k=2))
  assert y.dtype == jnp.bfloat16
  err = float(jnp.linalg.norm(y.astype(jnp.float32) - y_ref) / jnp.linalg.norm(y_ref))
  assert err < 2e-2, err


# ---------------------------------------------------------------- layer


def test_layer_with_shared_experts_matches_hand_composition():
  layer = MoEFeedForward(32, num_experts=4, top_k=2, d_ff=24, num_shared=2, rngs=nnx.Rngs(0))
  x, _, _ = _inputs(5, D=32)
  y, sown = nnx.capture(layer, nnx.Intermediate)(x)
  routing = router.route(x, layer.router[...], top_k=2)
  w = ExpertWeights(layer.gate[...], layer.up[...], layer.down[...])
  y_routed, _ = dispatch.reference(x.reshape(-1, 32), jax.tree.map(lambda a: a.reshape(-1, a.shape[-1]), routing), w)
  sg, su, sd = layer.shared_gate[...], layer.shared_up[...], layer.shared_down[...]
  assert sg.shape == (32, 48)
  y_shared = (jax.nn.silu(x @ sg) * (x @ su)) @ sd
  np.testing.assert_allclose(y, y_routed.reshape(x.shape) + y_shared, rtol=1e-5, atol=1e-5)
  stats = nnx.to_pure_dict(sown)["moe_stats"][0]
  np.testing.assert_allclose(stats["load"], router.expert_load(routing.experts_TK, 4))
  np.testing.assert_allclose(stats["lb_loss"],
                             router.load_balancing_loss(routing.probs_TE, routing.experts_TK), rtol=1e-6)
  np.testing.assert_allclose(stats["z_loss"], router.router_z_loss(routing.logits_TE), rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=9), r"top_k=9: must be in \[1, num_experts=8\]"),
    (dict(strategy="dropping", capacity_factor=-1.0), r"capacity_factor=-1.0: must be > 0"),
    (dict(strategy="dropping", expert_parallel="ragged"), r"expert_parallel='ragged' with strategy='dropping'"),
])
def test_layer_errors(kwargs, match):
  args = dict(num_experts=8, top_k=2, d_ff=8, rngs=nnx.Rngs(0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    MoEFeedForward(16, **args)
