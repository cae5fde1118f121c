"""moe/: routers, balancing losses, dispatch strategies against the loop-over-experts
reference (forward and gradients), the MoE layer (its config, shared experts and the
auxiliary-loss-free balancing bias)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close
from core.errors import ConfigError
from moe import dispatch, gmm, router
from moe.config import MoEConfig
from moe.dispatch import ExpertWeights
from moe.layer import BalanceBias, MoEFeedForward


def _inputs(seed, B=2, S=8, D=16, F=24, E=4):
  """Tokens, router and expert weights from a literal seed (NumPy: no per-shape
  compiles of jax.random)."""
  rng = np.random.default_rng(seed)
  n = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
  x = n(B, S, D)
  w_r = n(D, E, scale=D ** -0.5)
  w = ExpertWeights(n(E, D, F, scale=D ** -0.5), n(E, D, F, scale=D ** -0.5),
                    n(E, F, D, scale=F ** -0.5))
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
  x, w_r, _ = _inputs(1)
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
  # Hugging Face's Mixtral convention (f per choice [k, E], summed over the k choices,
  # times E) is k times ours for top-k: their coefficient c is our k * c.
  k, E = 3, 8
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(3), (64, E)))
  experts = jax.lax.top_k(probs + jax.random.uniform(jax.random.key(4), (64, E)), k)[1]
  hf = E * np.sum(np.mean(np.eye(E)[np.asarray(experts)], axis=0) * np.mean(probs, 0)[None])
  np.testing.assert_allclose(k * router.load_balancing_loss(probs, experts), hf, rtol=1e-5)
  logits = jnp.array([[1.0, 2.0], [0.0, -3.0]])
  z = np.log(np.exp([1.0, 2.0]).sum()) ** 2 / 2 + np.log(np.exp([0.0, -3.0]).sum()) ** 2 / 2
  np.testing.assert_allclose(router.router_z_loss(logits), z, rtol=1e-6)
  load = router.expert_load(jnp.array([[0, 1], [0, 2], [0, 1]]), 4)
  np.testing.assert_allclose(load, [3 / 6, 2 / 6, 1 / 6, 0])
  np.testing.assert_allclose(router.load_cv(load), np.std(load) / np.mean(load), rtol=1e-6)
  bias = router.update_balance_bias(jnp.zeros(4), load, 0.01)
  np.testing.assert_allclose(bias, [-0.01, -0.01, 0.01, 0.01])


# ---------------------------------------------------------------- dispatch


def _route(x, w_r, rcfg):
  rcfg = dict(rcfg)
  bias = jnp.linspace(-0.3, 0.3, w_r.shape[1]) if rcfg.pop("bias", False) else None
  return router.route(x, w_r, bias_E=bias, **rcfg)


def _moe(strategy, x, w_r, w, rcfg, **kw):
  return dispatch.moe_ffn(x, _route(x, w_r, rcfg), w, strategy=strategy, **kw)


ROUTERS = {"top1": dict(top_k=1), "top2": dict(top_k=2),
           "top2-sigmoid": dict(top_k=2, score="sigmoid"), "top3-bias": dict(top_k=3, bias=True)}
STRATEGIES = {
    "dropping": ("dropping", dict(capacity_factor=8.0)),  # capacity >= all tokens: no drops
    "dropless-ragged_dot": ("dropless", dict(gmm_impl="ragged_dot")),
    "dropless-xla": ("dropless", dict(gmm_impl="xla")),
    "dropless-pallas": ("dropless", dict(gmm_impl="pallas", tiling=(16, 128, 128))),  # interpreted
}
# Every router for the two dispatch algorithms; the other grouped matmuls (tested with
# gradients on their own in test_gmm.py) once each, for the wiring; the interpreted
# Pallas kernel forward only (its backward kernels cost ~20 s to interpret here).
# (strategy, router, seed)
DISPATCH_CASES = [
    ("dropping", "top1", 101), ("dropping", "top2", 102), ("dropping", "top2-sigmoid", 103),
    ("dropping", "top3-bias", 104), ("dropless-ragged_dot", "top1", 105),
    ("dropless-ragged_dot", "top2", 106), ("dropless-ragged_dot", "top2-sigmoid", 107),
    ("dropless-ragged_dot", "top3-bias", 108), ("dropless-xla", "top3-bias", 109),
    ("dropless-pallas", "top2", 110)]


@pytest.mark.parametrize("name,router_name,seed", DISPATCH_CASES,
                         ids=[f"{s}-{r}" for s, r, _ in DISPATCH_CASES])
def test_strategies_equal_loop_over_experts(name, router_name, seed):
  strategy, kw = STRATEGIES[name]
  rcfg = ROUTERS[router_name]
  x, w_r, w = _inputs(seed)
  y, stats = _moe(strategy, x, w_r, w, rcfg, **kw)
  y_ref, stats_ref = _moe("reference", x, w_r, w, rcfg)
  assert_close(y, y_ref)
  np.testing.assert_allclose(stats.load_E, stats_ref.load_E)
  assert float(stats.dropped) == 0.0
  if name == "dropless-pallas":
    return
  loss = lambda s, **k: lambda x, w_r, w: jnp.sum(jnp.sin(_moe(s, x, w_r, w, rcfg, **k)[0]))
  g = jax.grad(loss(strategy, **kw), argnums=(0, 1, 2))(x, w_r, w)
  g_ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(x, w_r, w)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert_close(a, b, 1e-4)


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
  x, w_r, w = _inputs(2)
  with pytest.raises(ValueError, match="strategy='scatter'.*Fix: use one of"):
    _moe("scatter", x, w_r, w, dict(top_k=2))


def test_bf16_dropless_close_to_fp32_reference():
  x, w_r, w = _inputs(3)
  y, _ = _moe("dropless", x, w_r, w, dict(top_k=2), dtype=jnp.bfloat16, gmm_impl="ragged_dot")
  y_ref, _ = _moe("reference", x, w_r, w, dict(top_k=2))
  assert y.dtype == jnp.bfloat16
  err = float(jnp.linalg.norm(y.astype(jnp.float32) - y_ref) / jnp.linalg.norm(y_ref))
  assert err < 2e-2, err


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("fields,field", [
    (dict(num_experts=-1), "num_experts"),
    (dict(num_experts=4, every=0), "every"),
    (dict(num_experts=4, top_k=0), "top_k"),
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(num_experts=4, d_ff=-8), "d_ff"),
    (dict(num_experts=4, num_shared=-1), "num_shared"),
    (dict(num_experts=4, score="relu"), "score"),
    (dict(num_experts=4, dispatch="scatter"), "dispatch"),
    (dict(num_experts=4, gmm_impl="cublas"), "gmm_impl"),
    (dict(num_experts=4, expert_parallel="all_gather"), "expert_parallel"),
    (dict(num_experts=4, dispatch="dropping", expert_parallel="ragged"), "expert_parallel"),
    (dict(num_experts=4, capacity_factor=0.0), "capacity_factor"),
    (dict(num_experts=4, capacity_factor=-1.0), "capacity_factor"),
    (dict(num_experts=4, load_balance_coef=-0.01), "load_balance_coef"),
    (dict(num_experts=4, z_loss_coef=-1e-3), "z_loss_coef"),
    (dict(num_experts=4, bias_update_rate=-1e-3), "bias_update_rate"),
])
def test_moe_config_refuses_bad_values_naming_the_field(fields, field):
  with pytest.raises(ConfigError) as err:
    MoEConfig(**fields)
  e, msg = err.value, str(err.value)
  assert e.field == field and e.value == fields[field], (e.field, e.value)
  assert msg.startswith(f"{field}={fields[field]!r}: ") and ". Fix: " in msg
  assert "\n" not in msg
  assert str(e.within("model.moe")).startswith(f"model.moe.{field}=")


def test_moe_config_accepts_every_choice_and_places_layers():
  for name in gmm.REGISTRY.names() + ("auto",):
    cfg = MoEConfig(num_experts=4, gmm_impl=name)
    assert cfg.gmm_implementation == (None if name == "auto" else name)
  for exchange in ("none", "ragged", "fixed"):
    MoEConfig(num_experts=4, expert_parallel=exchange)
  dense = MoEConfig()
  assert not dense.enabled and not dense.is_moe_layer(0)
  every2 = MoEConfig(num_experts=4, every=2)
  assert [every2.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
  with pytest.raises(ValueError, match=r"num_experts=0: a dense layer.*Fix: "):
    MoEFeedForward(16, 8, dense, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- layer


def _functional(layer):
  """The layer as pure functions of pure dicts (params, the rest of its state)."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def apply(params, rest, x):
    m = nnx.merge(graphdef, params, rest)
    y = m(x)
    sown = nnx.to_pure_dict(nnx.pop(m, nnx.Intermediate))
    _, _, new_rest = nnx.split(m, nnx.Param, ...)
    return y, sown["moe_stats"][0], nnx.to_pure_dict(new_rest)

  return apply, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def test_layer_with_shared_experts_matches_hand_composition():
  D, F = 16, 12
  layer = MoEFeedForward(D, F, MoEConfig(num_experts=4, top_k=2, num_shared=2),
                         rngs=nnx.Rngs(0))
  x, _, _ = _inputs(5, D=D)
  apply, params, rest = _functional(layer)
  y, stats, _ = apply(params, rest, x)
  routing = router.route(x, params["router"], top_k=2)
  w = ExpertWeights(params["gate"], params["up"], params["down"])
  y_routed, _ = dispatch.moe_ffn(x, routing, w, strategy="reference")
  sg, su, sd = params["shared_gate"], params["shared_up"], params["shared_down"]
  assert sg.shape == (D, 2 * F) and sd.shape == (2 * F, D)
  y_shared = (jax.nn.silu(x @ sg) * (x @ su)) @ sd
  assert_close(y, y_routed + y_shared)
  np.testing.assert_allclose(stats["load"], router.expert_load(routing.experts_TK, 4))
  np.testing.assert_allclose(stats["dropped"], 0.0)
  np.testing.assert_allclose(stats["lb_loss"],
                             router.load_balancing_loss(routing.probs_TE, routing.experts_TK), rtol=1e-6)
  np.testing.assert_allclose(stats["z_loss"], router.router_z_loss(routing.logits_TE), rtol=1e-6)


def test_balance_bias_is_state_updated_by_the_call_without_gradient():
  D, F, E, rate = 16, 12, 4, 0.01
  layer = MoEFeedForward(D, F, MoEConfig(num_experts=E, top_k=2, bias_update_rate=rate),
                         rngs=nnx.Rngs(1))
  # State, not a parameter: no optimizer ever sees it.
  assert isinstance(layer.router_bias, BalanceBias)
  assert not isinstance(layer.router_bias, nnx.Param)
  assert "router_bias" not in nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  apply, params, rest = _functional(layer)
  assert set(rest) == {"router_bias"} and "router_bias" not in params
  np.testing.assert_array_equal(rest["router_bias"], np.zeros(E))
  # A start that changes the selection, so the call must route with it.
  rest = {"router_bias": jnp.array([0.3, -0.2, 0.1, -0.4], jnp.float32)}
  x, _, _ = _inputs(6, D=D)

  def loss(params, rest, x):
    y, stats, new_rest = apply(params, rest, x)
    return jnp.sum(jnp.sin(y)), (y, stats, new_rest)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  bias = rest["router_bias"]
  for _ in range(2):  # the second call routes with the first call's update
    (_, (y, stats, new_rest)), (g_params, g_rest) = step(params, rest, x)
    routing = router.route(x, params["router"], top_k=2, bias_E=bias)
    assert not np.array_equal(routing.experts_TK,
                              router.route(x, params["router"], top_k=2).experts_TK)
    load = router.expert_load(routing.experts_TK, E)
    np.testing.assert_allclose(stats["load"], load)
    w = ExpertWeights(params["gate"], params["up"], params["down"])
    assert_close(y, dispatch.moe_ffn(x, routing, w, strategy="reference")[0])
    # moe.router.update_balance_bias, by hand: b -= rate * sign(load - mean(load))
    load = np.asarray(load)
    want = np.asarray(bias) - rate * np.sign(load - load.mean())
    np.testing.assert_allclose(new_rest["router_bias"], want, rtol=0, atol=1e-7)
    assert not np.allclose(want, bias)
    np.testing.assert_array_equal(g_rest["router_bias"], 0.0)  # no gradient
    assert float(jnp.abs(g_params["router"]).max()) > 0       # the router learns
    rest, bias = new_rest, jnp.asarray(want, jnp.float32)
  # Without a rate the call leaves it alone.
  layer0 = MoEFeedForward(D, F, MoEConfig(num_experts=E, top_k=2), rngs=nnx.Rngs(1))
  apply0, params0, rest0 = _functional(layer0)
  _, _, after = apply0(params0, rest, x)
  np.testing.assert_array_equal(after["router_bias"], rest["router_bias"])
