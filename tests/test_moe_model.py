"""MoE in the LM: config, optimizer routing, training, balancing, sharding, errors."""
import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import topology_or_skip
from conftest import tiny as base_tiny

from core.errors import ConfigError
from lm import config as config_lib
from lm import experiment, loop, sharding
from lm.model import build_model
from optim.chain import OptimizerConfig, build_optimizer, muon_dimension_tree, param_labels


def tiny(**moe):
  """The MoE tiny config with ``model.moe`` overrides."""
  return base_tiny("experiments/configs/moe.py:tiny",
                   **{f"model__moe__{k}": v for k, v in moe.items()})


def model_cfg(c):
  return dataclasses.replace(config_lib.resolve(c).model, vocab_size=384)


def test_every_nth_layer_and_expert_shapes():
  c = tiny(every=2, num_shared=1, d_ff=32)
  c.model.n_layers = 4
  c = model_cfg(c)
  assert [c.moe.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
  built = build_model(c, seed=0)
  params, axes = built.params, built.axes["params"]
  assert "router" not in params["block_0"]["mlp"]
  mlp = params["block_1"]["mlp"]
  E, D = c.moe.num_experts, c.d_model
  assert mlp["gate"].shape == (E, D, 32) and mlp["down"].shape == (E, 32, D)
  assert mlp["shared_gate"].shape == (D, 32) and mlp["router"].shape == (D, E)
  assert axes["block_1"]["mlp"]["gate"] == ("expert", "embed", "mlp")


def test_optimizer_routes_experts_per_matrix_router_to_adam_bias_is_state():
  built = build_model(model_cfg(tiny()), seed=0, abstract=True)
  axes = built.axes["params"]
  labels = param_labels(axes)["block_0"]["mlp"]
  assert labels == {"gate": "muon", "up": "muon", "down": "muon", "router": "adam"}
  dims = muon_dimension_tree(axes)["block_0"]["mlp"]
  # The expert axis (0) is a batch axis: each expert's [D, F] / [F, D] is its own matrix.
  assert (dims["gate"].reduction_axis, dims["gate"].output_axis) == ((1,), (2,))
  assert (dims["down"].reduction_axis, dims["down"].output_axis) == ((1,), (2,))
  # The balancing bias is model state, not a parameter: the optimizer never sees it.
  assert built.state["block_0"]["mlp"]["router_bias"].shape == (4,)
  assert built.axes["state"]["block_0"]["mlp"]["router_bias"] == ("router_bias",)
  opt = build_optimizer(OptimizerConfig(name="muon"), axes, 10)
  assert "router_bias" not in opt.labels["block_0"]["mlp"]


def _train_steps(config, n, devices=None):
  exp = experiment.build(config, devices=devices)
  it = exp.data.train_iterator()
  state = exp.state.init()
  out = []
  for _ in range(n):
    state, metrics = exp.train_step(state, exp.put_batch(next(it)), {})
    out.append(jax.device_get(metrics))
  return exp, state, out


def test_aux_losses_enter_the_objective_and_bias_moves_by_sign_of_load():
  c = tiny(bias_update_rate=0.01, load_balance_coef=0.01, z_loss_coef=1e-3)
  _, state, metrics = _train_steps(c, 3)
  m = metrics[-1]
  lb = sum(s["lb_loss"] for s in m["moe"].values())
  z = sum(s["z_loss"] for s in m["moe"].values())
  np.testing.assert_allclose(m["loss_total"], m["loss"] + 0.01 * lb + 1e-3 * z, rtol=1e-5)
  # Each step moves every bias entry by exactly +-rate (zero-error experts aside):
  # it is not a parameter, so only the sign rule (in the layer) moves it.
  bias = np.asarray(state["model_state"]["block_0"]["mlp"]["router_bias"])
  loads = [mm["moe"]["block_0"]["load"] for mm in metrics]
  expected = sum(-0.01 * np.sign(l - l.mean()) for l in loads)
  np.testing.assert_allclose(bias, expected, atol=1e-6)
  # Without the rate, the bias stays zero although weight decay and Adam run.
  _, state0, _ = _train_steps(tiny(bias_update_rate=0.0), 2)
  np.testing.assert_array_equal(state0["model_state"]["block_0"]["mlp"]["router_bias"], 0.0)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_balancing_evens_out_a_skewed_router(score):
  """Tokens with a shared component and a router that favours expert 0: the
  auxiliary-loss-free update alone (no gradient) brings the load toward uniform."""
  from moe import router
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (512, 16)).at[:, 0].add(1.0)
  w = (jax.random.normal(k2, (16, 8)) * 0.3).at[0, 0].set(3.0)
  bias = jnp.zeros(8)
  cvs = []
  step = jax.jit(lambda bias: router.expert_load(
      router.route(x, w, top_k=2, score=score, bias_E=bias).experts_TK, 8))
  for _ in range(200):
    load = step(bias)
    cvs.append(float(router.load_cv(load)))
    bias = router.update_balance_bias(bias, load, 0.005)
  assert cvs[0] > 0.7 and np.mean(cvs[-20:]) < 0.3 * cvs[0], cvs[::10]


@pytest.mark.parametrize("dispatch", ["dropping", "dropless"])
def test_moe_trains_and_logs_expert_load(tmp_path, dispatch):
  from lm import loop
  c = tiny(dispatch=dispatch)
  c.train.steps = 30
  summary = loop.run(c, str(tmp_path))
  recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in recs if "loss" in r]
  assert np.mean(losses[-5:]) < losses[0] - 1.5
  last = [r for r in recs if "loss" in r][-1]
  for i in range(c.model.n_layers):
    load = last[f"moe/block_{i}/load"]
    assert len(load) == c.model.moe.num_experts and abs(sum(load) - 1) < 1e-3
    assert f"moe/block_{i}/load_cv" in last and f"moe/block_{i}/dropped" in last
  if dispatch == "dropless":
    assert last["moe/dropped"] == 0
  else:  # capacity 1.25: some overflow is normal, most assignments fit
    assert 0 <= last["moe/dropped"] < 0.5
  assert summary["eval_loss"] < 4.0


def test_dropping_with_ample_capacity_equals_dropless_model():
  a = tiny(dispatch="dropping", capacity_factor=float(tiny().model.moe.num_experts))
  b = tiny(dispatch="dropless")
  for c in (a, b):
    c.model.dtype = "float32"
  _, _, ma = _train_steps(a, 2)
  _, _, mb = _train_steps(b, 2)
  np.testing.assert_allclose([m["loss"] for m in ma], [m["loss"] for m in mb], rtol=1e-5)
  assert all(float(m["moe"]["block_0"]["dropped"]) == 0 for m in ma)


def _sharded_config(expert_parallel="none", **mesh):
  c = tiny(num_experts=8, expert_parallel=expert_parallel)
  c.model.dtype = "float32"
  c.optimizer.eps = 1e-3  # see tests/test_sharding.py: keeps Adam's update Lipschitz in g
  c.optimizer.warmup_steps = 0
  c.data.batch_size = 8
  for k in sharding.MESH_AXES:
    c.mesh[k] = mesh.get(k, 1)
  return c


@functools.cache
def _single_device_moe():
  """(state, metrics) of two steps of ``_sharded_config()`` on one device (host arrays)."""
  _, state, out = _train_steps(_sharded_config(), 2, jax.devices()[:1])
  return jax.device_get(state), out


@pytest.mark.parametrize("exchange,mesh,gmm_impl", [
    ("none", {"expert": 8}, "auto"), ("none", {"data": 2, "expert": 4}, "auto"),
    ("ragged", {"expert": 8}, "auto"), ("fixed", {"data": 2, "expert": 4}, "auto"),
    ("ragged", {"data": 2, "expert": 4}, "pallas")])  # our kernel, interpreted, per device
def test_expert_sharded_model_equals_single_device(exchange, mesh, gmm_impl):
  """XLA-partitioned experts (none) and explicit expert parallelism (ragged/fixed
  all-to-all in shard_map) give the single-device losses and parameters."""
  ref_state, ref = _single_device_moe()
  config = _sharded_config(exchange, **mesh)
  config.model.moe.capacity_factor = 8.0  # fixed buffers: room for every assignment
  config.model.moe.gmm_impl = gmm_impl
  exp, state, out = _train_steps(config, 2)
  assert all(float(m["moe"]["block_0"]["dropped"]) == 0 for m in out)
  np.testing.assert_allclose([m["loss"] for m in out], [m["loss"] for m in ref], rtol=2e-6)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # Explicit expert parallelism really exchanges tokens with all-to-alls.
  batch = exp.put_batch(next(exp.data.train_iterator()))
  program = exp.train_step.lower(state, batch, {}).as_text()
  assert ("all_to_all" in program) == (exchange != "none")
  gate = state["params"]["block_0"]["mlp"]["gate"]
  assert gate.sharding.spec[0] == "expert"
  assert len({s.index for s in gate.addressable_shards}) == mesh["expert"]


@pytest.mark.parametrize("field,value,match", [
    ("top_k", 5, r"model.moe.top_k=5: exceeds num_experts=4"),
    ("capacity_factor", 0.0, r"model.moe.capacity_factor=0.0: must be a number > 0"),
    ("dispatch", "scatter", r"model.moe.dispatch='scatter': unknown choice"),
    ("every", 0, r"model.moe.every=0: must be an integer >= 1"),
])
def test_config_errors(tmp_path, field, value, match):
  with pytest.raises(ConfigError, match=match) as info:
    config_lib.resolve(tiny(**{field: value}))
  assert "Fix:" in str(info.value)


def test_experts_not_divisible_by_expert_axis():
  c = tiny(num_experts=6)
  c.mesh.data, c.mesh.expert = 2, 4
  with pytest.raises(ConfigError, match=r"model.moe.num_experts=6: not divisible by mesh.expert=4"):
    config_lib.resolve(c)


def test_cli_picks_the_dispatch_strategy(tmp_path):
  """The flag reaches the layer: a tight capacity drops assignments with ``dropping`` and
  never with ``dropless`` (same config otherwise)."""
  from experiments.configs import from_argv
  dropped = {}
  for d in ("dropping", "dropless"):  # the command's own parsing, then its loop
    config, _, _ = from_argv(["--config=experiments/configs/moe.py:tiny",
                              "--config.train.steps=2", "--config.train.log_every=1",
                              "--config.train.plot=False", "--config.train.tensorboard=False",
                              "--config.train.eval_batches=1",
                              "--config.model.moe.capacity_factor=0.25",
                              f"--config.model.moe.dispatch={d}"])
    loop.run(config, str(tmp_path / d))
    assert json.load(open(tmp_path / d / "config.json"))["model"]["moe"]["dispatch"] == d
    last = [json.loads(l) for l in open(tmp_path / d / "metrics.jsonl") if '"loss"' in l][-1]
    dropped[d] = last["moe/dropped"]
  assert dropped["dropless"] == 0 and dropped["dropping"] > 0.5, dropped


@pytest.mark.parametrize("dispatch,exchange,gmm_impl,mesh", [
    ("dropless", "ragged", "auto", {"expert": 4}),  # TPU default: our Pallas kernel
    ("dropless", "fixed", "auto", {"data": 2, "expert": 2}),
    ("dropping", "none", "auto", {"data": 2, "expert": 2}),
])
def test_moe_train_step_compiles_for_tpu(dispatch, exchange, gmm_impl, mesh):
  """The real MoE train step, with the TPU compiler for a v5e topology, from this host."""
  from lm import aot
  c = tiny(dispatch=dispatch, expert_parallel=exchange, gmm_impl=gmm_impl, num_experts=8)
  c.data.batch_size, c.data.seq_len = 8, 256  # 512 tokens per device: full 128-row tiles
  for k, v in mesh.items():
    c.mesh[k] = v
  c.mesh.data = mesh.get("data", 1)
  _, lowered = aot.lower_train_step(c, topology_or_skip("v5e:2x2"))
  text = lowered.as_text()
  compiled = lowered.compile()
  assert compiled.memory_analysis().temp_size_in_bytes > 0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] > 0
  if gmm_impl == "auto":
    assert ("kestrel_gmm" in text) == (dispatch == "dropless")  # ours is TPU's default
  if exchange == "ragged":
    assert "ragged_all_to_all" in text  # the native collective, not the CPU emulation


def test_active_parameters_count_top_k_experts_only():
  from lm.model import active_param_count, count_params
  for top_k in (1, 2):
    c = model_cfg(tiny(num_experts=8, top_k=top_k))
    dense = model_cfg(tiny(num_experts=0))
    params = build_model(c, seed=0, abstract=True).params
    dense_params = build_model(dense, seed=0, abstract=True).params
    router = c.n_layers * c.d_model * 8  # the balancing bias is state, not a parameter
    # top-k experts of the dense width: k x the dense FFN, plus the router.
    extra_ffn = (top_k - 1) * c.n_layers * 3 * c.d_model * c.d_ff
    assert active_param_count(c, params) == count_params(dense_params) + extra_ffn + router
    assert count_params(params) > active_param_count(c, params)


def _all_gathers(hlo: str) -> list[tuple[int, ...]]:
  """Output shapes of the optimized program's all-gathers, one per collective (the TPU
  compiler splits one all-gather into async pieces that share its channel id)."""
  by_channel = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%[\w.-]+ = \(?[a-z0-9]+\[([\d,]*)\]\S* all-gather(?:-start)?\("
                 r".*channel_id=(\d+)", line)
    if m:
      by_channel[m.group(2)] = tuple(int(d) for d in m.group(1).split(",") if d)
  return list(by_channel.values())


def test_default_moe_step_keeps_tokens_local_and_gathers_each_expert_weight_once():
  """TPU's default MoE path (dropless, expert_parallel=none, our Pallas gmm) with the
  experts sharded over fsdp and expert. It runs per device: before, the step did not
  compile ("Mosaic kernels cannot be automatically partitioned"), and with ragged_dot
  XLA gathered every device's tokens (the whole batch) and sorted them globally. Now
  each expert weight is gathered once per step (as FSDP gathers any layer) and no
  token activation is gathered."""
  from lm import aot
  c = tiny(num_experts=8)
  c.data.batch_size, c.data.seq_len = 8, 256
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 2, 2
  exp, lowered = aot.lower_train_step(c, topology_or_skip("v5e:2x2"))
  gathers = _all_gathers(lowered.compile().as_text())
  m = exp.config.model
  E, D, F, L = m.moe.num_experts, m.d_model, m.d_ff, m.n_layers
  experts = [g for g in gathers if len(g) == 3 and np.prod(g) == E * D * F]
  assert len(experts) == 3 * L, gathers  # gate, up, down of each MoE layer, once
  tokens = c.data.batch_size * c.data.seq_len
  assert not [g for g in gathers if tokens in g or tokens * m.moe.top_k in g], gathers
