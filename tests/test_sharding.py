"""lm/sharding.py: the rules table, mesh errors, and sharded == single-device training."""
import functools

import jax
import numpy as np
import pytest
from conftest import tiny
from jax.sharding import PartitionSpec as P

from core.errors import ConfigError
from lm import config as config_lib
from lm import experiment, sharding
from lm.checkpoint import Checkpointer

SIZES = {"dcn": 1, "data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}


def test_rules_first_match_and_no_axis_bound_twice():
  spec = lambda axes, shape, sizes=SIZES: sharding.logical_to_spec(axes, shape, sizes)
  assert spec(("embed", "mlp"), (64, 128)) == P("fsdp", "tensor")
  assert spec(("mlp", "embed"), (128, 64)) == P("tensor", "fsdp")
  assert spec(("vocab", "embed"), (384, 64)) == P("tensor", "fsdp")
  assert spec(("embed", "heads", "head_dim"), (64, 4, 16)) == P("fsdp", "tensor")
  assert spec(("norm",), (64,)) == P()
  # The batch takes data and fsdp, so the residual stream's embed stays whole.
  assert spec(("batch", "length", "embed"), (8, 16, 64)) == P(("data", "fsdp"))
  # Size-1 mesh axes drop out: the same names on one device are replicated.
  ones = dict.fromkeys(SIZES, 1)
  assert spec(("embed", "mlp"), (64, 128), ones) == P()
  # A later rule for the same name is a fallback when the first's axis is taken.
  rules = (("a", "tensor"), ("b", "tensor"), ("b", "fsdp"))
  assert sharding.logical_to_spec(("a", "b"), (4, 4), SIZES, rules=rules) == P("tensor", "fsdp")


def test_rule_errors_name_the_fields():
  with pytest.raises(ConfigError, match=r"mesh.tensor=4.*does not divide model.n_kv_heads=2"):
    sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), dict(SIZES, tensor=4))
  with pytest.raises(ConfigError, match="'fancy'.*has no rule"):
    sharding.logical_to_spec(("fancy",), (4,), SIZES)


def test_mesh_errors():
  mesh_cfg = lambda **axes: config_lib.resolve(tiny(**{f"mesh__{a}": v for a, v in axes.items()})).mesh
  with pytest.raises(ConfigError, match=r"mesh='data=3 x tensor=2'.*6 devices but 8 are present"):
    sharding.make_mesh(mesh_cfg(data=3, tensor=2))
  with pytest.raises(ConfigError, match="only one axis may be -1"):
    sharding.make_mesh(mesh_cfg(data=-1, fsdp=-1))
  with pytest.raises(ConfigError, match=r"mesh.data=-1.*do(es)? not divide the 8 devices"):
    sharding.make_mesh(mesh_cfg(data=-1, fsdp=3))
  mesh = sharding.make_mesh(mesh_cfg(data=-1, tensor=2))
  assert dict(mesh.shape)["data"] == 4 and dict(mesh.shape)["tensor"] == 2


def _config(optimizer="adamw", **mesh):
  c = tiny(model__d_model=64, model__n_heads=8, model__n_kv_heads=8, model__dtype="float32",
           optimizer__name=optimizer)
  c.optimizer.warmup_steps = 0
  # Adam's first steps are ~lr * sign(g) when eps << |g|: a gradient entry near
  # zero would turn float32 reduction-order noise into an O(lr) difference. A
  # larger eps keeps the update Lipschitz in g, so tolerances can stay tight.
  c.optimizer.eps = 1e-3
  # bf16 Newton-Schulz would turn reduction-order noise into ~1e-5 differences.
  c.optimizer.namo.ns_dtype = c.optimizer.muon.ns_dtype = "float32"
  c.data.batch_size = 8
  for k in sharding.MESH_AXES:
    c.mesh[k] = mesh.get(k, 1)
  return c


def _steps(config, n, devices):
  exp = experiment.build(config, devices=devices)
  it = exp.data.train_iterator()
  state = exp.state.init()
  losses = []
  for _ in range(n):
    state, metrics = exp.train_step(state, exp.put_batch(next(it)), {})
    losses.append(float(metrics["loss"]))
  return exp, state, losses


@functools.cache
def _single_device(optimizer):
  """(state, losses) of two steps on one device (host arrays): the reference of every mesh."""
  _, state, losses = _steps(_config(optimizer), 2, jax.devices()[:1])
  return jax.device_get(state), losses


def _assert_close(a_tree, b_tree, rtol, atol):
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("optimizer,mesh", [
    ("adamw", {"data": 8}), ("adamw", {"fsdp": 8}), ("adamw", {"tensor": 8}),
    ("adamw", {"data": 2, "fsdp": 2, "tensor": 2}), ("muon", {"fsdp": 4, "tensor": 2}),
    ("namo_d", {"fsdp": 4, "tensor": 2}),
])
def test_sharded_step_equals_single_device(optimizer, mesh):
  ref_state, ref_losses = _single_device(optimizer)
  exp, state, losses = _steps(_config(optimizer, **mesh), 2, None)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
  _assert_close(state["params"], ref_state["params"], rtol=1e-5, atol=1e-6)
  _assert_close(state["opt_state"], ref_state["opt_state"], rtol=1e-4, atol=1e-7)
  # The parameter and its optimizer state are really split across devices.
  gate = state["params"]["block_0"]["mlp"]["gate"]
  expected = sharding.logical_to_spec(("embed", "mlp"), gate.shape, dict(exp.mesh.shape))
  assert gate.sharding.spec == expected
  n_shards = len({s.index for s in gate.addressable_shards})
  assert n_shards == mesh.get("fsdp", 1) * mesh.get("tensor", 1)
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.shape == gate.shape]
  assert moments and all(m.sharding.spec == expected for m in moments)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  # Save after 3 steps on 8 devices (fsdp x tensor), restore on 4 (data x tensor).
  exp_a, state_a, _ = _steps(_config(fsdp=4, tensor=2), 0, None)
  it_a = exp_a.data.train_iterator()
  for _ in range(3):
    state_a, _ = exp_a.train_step(state_a, exp_a.put_batch(next(it_a)), {})
  ckpt = Checkpointer(str(tmp_path), keep=1)
  ckpt.save(3, state_a, it_a, {"test": True})
  saved = jax.device_get(state_a)
  next_a = next(it_a)

  exp_b = experiment.build(_config(data=2, tensor=2), devices=jax.devices()[4:])
  it_b = exp_b.data.train_iterator()
  state_b = ckpt.restore(3, exp_b.state.abstract, it_b)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert state_b["params"]["embedding"].sharding.mesh.devices.size == 4
  for k, v in next(it_b).items():
    np.testing.assert_array_equal(v, next_a[k])
