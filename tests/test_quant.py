"""Quantization (core/quant.py, lm/quant.py, experiments/quantize.py): qwix's numerics
against a hand-written quantizer, group-wise vs per-channel, PTQ error bounds on a
trained model, QAT gradients, MoE experts per expert, the stored checkpoint."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, tiny

from core import quant as cq
from core.errors import ConfigError
from experiments import evaluate, quantize
from lm import experiment, loop, quant, runs
from lm.model import apply, build_model
from lm.step import make_objective

QMAX = {"int8": 127, "int4": 7}


def hand_fake_quant(w: np.ndarray, qtype: str, axis: int, group: int = 0) -> np.ndarray:
  """The obvious twin: absmax over each group along ``axis``, scale = absmax / qmax,
  round half to even, clip, multiply back (in float32, one group at a time)."""
  w = np.moveaxis(np.asarray(w, np.float32), axis, -1)
  n = w.shape[-1]
  g = group or n
  out = np.empty_like(w)
  for start in range(0, n, g):
    part = w[..., start:start + g]
    scale = np.abs(part).max(axis=-1, keepdims=True) / np.float32(QMAX[qtype])
    scale = np.where(scale < np.sqrt(np.finfo(np.float32).tiny), np.float32(1), scale)
    out[..., start:start + g] = np.clip(np.round(part / scale), -QMAX[qtype],
                                        QMAX[qtype]) * scale
  return np.moveaxis(out, -1, axis)


def assert_quantized_like(got, w, qtype, axis, group=0):
  """``got`` is the hand quantizer's result (up to the scale's last bit)."""
  assert_close(got, hand_fake_quant(w, qtype, axis, group), 1e-6)


@pytest.mark.parametrize("qtype,group", [("int8", 0), ("int4", 0), ("int4", 16), ("int8", 32)])
def test_fake_quant_equals_hand_quantizer(qtype, group):
  w = np.asarray(jax.random.normal(jax.random.key(len(qtype) + group), (64, 24)), np.float32)
  got = cq.fake_quant(jnp.asarray(w), qtype, 0, group)
  assert_quantized_like(got, w, qtype, 0, group)
  assert len(np.unique(np.asarray(got)[:, 0])) <= 2 ** (8 if qtype == "int8" else 4) * 4
  # straight-through: the gradient of sum(fake_quant(w) * c) is c
  c = jax.random.normal(jax.random.key(1), w.shape)
  g = jax.grad(lambda x: jnp.sum(cq.fake_quant(x, qtype, 0, group) * c))(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


def test_act_int8_is_per_token():
  x = np.array(jax.random.normal(jax.random.key(3), (2, 5, 4, 8)), np.float32)
  x[0, 1] *= 100.0  # one token's scale must not leak into the others
  got = cq.act_int8(jnp.asarray(x), 2)
  assert_quantized_like(np.asarray(got).reshape(2, 5, 32), x.reshape(2, 5, 32), "int8", -1)


def test_group_wise_beats_per_channel_on_outlier_inputs():
  """Outliers on a few input features spoil one scale per output channel; groups of 32
  inputs confine them to their group."""
  w = np.array(jax.random.normal(jax.random.key(0), (256, 64)), np.float32)
  w[[5, 9, 20]] *= 40.0  # three outlier inputs, all in the first group of 32
  err = lambda g: float(np.linalg.norm(np.asarray(cq.fake_quant(jnp.asarray(w), "int4", 0, g))
                                       - w))
  assert err(32) < 0.5 * err(0)


def test_int4_packing_round_trips():
  v = np.random.default_rng(0).integers(-8, 8, size=(3, 7), dtype=np.int8)
  packed = quant.pack_int4(v)
  assert packed.dtype == np.uint8 and packed.shape == (3, 4)
  np.testing.assert_array_equal(quant.unpack_int4(packed, 7), v)


def test_matrices_by_role():
  c = tiny(model__layer_pattern="LS", model__n_layers=2, model__moe__num_experts=4,
           model__moe__num_shared=1)
  from lm.config import resolve
  built = build_model(resolve(c).model, 0, abstract=True)
  mats = quant.matrices(built.axes["params"])
  roles = {"/".join(p): m.role for p, m in mats.items()}
  assert roles["block_0/attn/w_A"] == "linear" and roles["block_0/attn/q"] == "linear"
  assert roles["block_1/attn/o"] == "attention"
  assert roles["block_0/mlp/gate"] == "experts" and roles["block_0/mlp/shared_up"] == "mlp"
  assert roles["head"] == "head"
  assert not any(k.endswith(("router", "embedding", "conv_q", "b_dt", "scale")) for k in roles)
  # A softmax layer with the linear layers' short conv (model.qkv_conv) stays attention.
  built = build_model(resolve(tiny(model__qkv_conv=2)).model, 0, abstract=True)
  roles = {"/".join(p): m.role for p, m in quant.matrices(built.axes["params"]).items()}
  assert roles["block_0/attn/q"] == roles["block_1/attn/o"] == "attention"
  assert not any(k.endswith("conv_q") for k in roles)
  o = mats[("block_1", "attn", "o")]
  assert o.contract == (0, 1) and o.batch == ()
  down = mats[("block_0", "mlp", "down")]
  assert down.contract == (1,) and down.batch == (0,)


def test_moe_experts_quantized_per_expert():
  """The stacked experts equal a loop over experts, each quantized on its own (groups
  along its input dimension)."""
  c = tiny(model__moe__num_experts=4, model__moe__top_k=2)
  from lm.config import resolve
  built = build_model(resolve(c).model, 0)
  cfg = quant.QuantConfig(weight="int4", group_size=16, targets=("experts",))
  got = quant.quantize_params(built.params, built.axes["params"], cfg)
  for name, axis in (("gate", 0), ("down", 0)):
    w = np.asarray(built.params["block_0"]["mlp"][name])
    for e in range(w.shape[0]):
      assert_quantized_like(got["block_0"]["mlp"][name][e], w[e], "int4", axis, 16)
  np.testing.assert_array_equal(got["block_0"]["attn"]["q"], built.params["block_0"]["attn"]["q"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny byte-level dense run of 30 steps (fp32 compute, so errors are quantization's)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.run(tiny(train__steps=30, train__eval_every=30, train__checkpoint_every=30,
                model__dtype="float32"), workdir)
  return workdir


def _logits(workdir, overrides=None):
  w = runs.load_weights(workdir, overrides)
  built = build_model(w.config.model, 0, abstract=True)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 48)), jnp.int32)
  return np.asarray(apply(built.graphdef, w.params, w.model_state, tokens)[0])


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Stated bounds on the relative L2 error of the logits of the trained tiny model (fp32
# compute), about twice the measured values (int8 per channel 0.005, w8a8 0.009, int4
# g32 0.089, fp8 0.027). Group-wise vs per channel is tested on outlier inputs above:
# on this model's near-Gaussian weights groups of 32 (two per 64 inputs) lower the
# weight error by a few percent only (measured with absmax / (qmax + 0.5) scales:
# 0.087 -> 0.084 relative), which the logits do not resolve.
BOUNDS = {"int8": 0.01, "w8a8": 0.02, "int4g32": 0.18, "fp8": 0.05}


def test_ptq_error_bounds(trained):
  ref = _logits(trained)
  int8 = _rel(_logits(trained, {"quant.weight": "int8"}), ref)
  w8a8 = _rel(_logits(trained, {"quant.weight": "int8", "quant.act": "int8"}), ref)
  int4 = _rel(_logits(trained, {"quant.weight": "int4", "quant.group_size": 32}), ref)
  fp8 = _rel(_logits(trained, {"quant.weight": "fp8"}), ref)
  print(f"relative logit error: int8 {int8:.4f}, w8a8 {w8a8:.4f}, int4 g32 {int4:.4f}, "
        f"fp8 {fp8:.4f}")
  assert 0 < int8 < BOUNDS["int8"]
  assert int8 < w8a8 < BOUNDS["w8a8"]
  assert int8 < int4 < BOUNDS["int4g32"]
  assert 0 < fp8 < BOUNDS["fp8"]


def test_stored_checkpoint_round_trips(trained, tmp_path):
  out = str(tmp_path / "q")
  r = quantize.quantize(trained, out, {"quant.weight": "int4", "quant.group_size": 32})
  assert r["bytes_after"] < r["bytes_unpacked"] < r["bytes_before"]
  with open(os.path.join(out, "quantized.json")) as f:
    manifest = json.load(f)
  assert manifest["weight"] == "int4" and "block_0/attn/q" in manifest["matrices"]
  with np.load(os.path.join(out, "quantized.npz")) as z:
    assert z["params/block_0/attn/q.q"].dtype == np.uint8  # two int4 values per byte
    assert z["params/block_0/attn/q.q"].size * 2 == 64 * 64
  np.testing.assert_array_equal(
      _logits(out), _logits(trained, {"quant.weight": "int4", "quant.group_size": 32}))
  a = evaluate.evaluate(out, eval_batches=1)
  b = evaluate.evaluate(trained, {"quant.weight": "int4", "quant.group_size": 32},
                        eval_batches=1)
  assert a["eval_loss"] == b["eval_loss"] and a["quant"]["stored"]
  assert a["weight_bytes"] == r["bytes_after"]
  with pytest.raises(ConfigError, match=r"--out=.*exists and is not an empty folder"):
    quantize.quantize(trained, out, {})


def test_qat_gradient_is_straight_through_at_the_quantized_weights():
  """One QAT objective's gradient equals the plain objective's gradient evaluated at the
  hand-quantized weights (straight-through), for every parameter."""
  c = tiny(quant__weight="int4", quant__group_size=16, quant__mode="qat",
           model__dtype="float32")
  exp = experiment.build(c)
  assert [h.name for h in exp.hooks] == ["quant"]
  built = build_model(exp.config.model, 0)
  batch = next(iter(exp.data.train_iterator(0)))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  qat = make_objective(built.graphdef, [], exp.hooks)
  plain = make_objective(built.graphdef, [])
  hand = dict(built.params)
  for path, m in quant.matrices(built.axes["params"]).items():
    w = np.asarray(quant.get_path(built.params, path))
    shape, ax = quant.merged_shape(w.shape, m)
    hand = quant.set_path(hand, path, jnp.asarray(
        hand_fake_quant(w.reshape(shape), "int4", ax, 16).reshape(w.shape), jnp.float32))
  g_qat = jax.jit(jax.grad(lambda p: qat(p, built.state, batch, {})[0]))(built.params)
  g_ref = jax.jit(jax.grad(lambda p: plain(p, built.state, batch, {})[0]))(hand)
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-4), g_qat, g_ref)
  assert float(jnp.abs(g_qat["block_0"]["attn"]["q"]).sum()) > 0


# QAT training and kill-and-resume: tests/test_prune.py (with pruning, one run).


def test_errors(trained):
  with pytest.raises(ConfigError, match=r"quant.weight='int3': unknown choice"):
    loop.run(tiny(quant__weight="int3"), "/nonexistent/never")
  with pytest.raises(ConfigError, match=r"quant.group_size=48: does not divide the input "
                     r"dimension 64 of block_0/attn/k.*Fix"):
    evaluate.evaluate(trained, {"quant.weight": "int4", "quant.group_size": 48})
  with pytest.raises(ConfigError, match=r"quant.targets=.*'attn' is not a role"):
    loop.run(tiny(quant__targets=("attn",)), "/nonexistent/never")
  with pytest.raises(ConfigError, match=r"quant.targets=\('linear',\): names no weight matrix"):
    evaluate.evaluate(trained, {"quant.weight": "int8", "quant.targets": ("linear",)})
