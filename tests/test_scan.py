"""Scan over layers (``model.scan_layers``, lm.model): the scanned model is the unrolled
one with its blocks' weights stacked: same init, logits, gradients, sown statistics,
optimizer step; checkpoints convert between the layouts."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny
from core.errors import ConfigError
from lm import config as config_lib
from lm.model import apply, build_model, layer_period, scan_tree, unscan_tree

STACKS = {
    # name: (overrides, period)
    "dense": ({}, 1),
    "hybrid": ({"model__layer_pattern": "LS", "model__n_layers": 4,
                "model__linear__variant": "2mamba"}, 2),
    "moe_every_2": ({"model__moe__num_experts": 4, "model__moe__top_k": 2,
                     "model__moe__every": 2, "model__n_layers": 4}, 2),
}


def _cfg(scan: bool, **overrides):
  cfg = config_lib.resolve(tiny(model__dtype="float32", **overrides)).model
  return dataclasses.replace(cfg, vocab_size=384, scan_layers=scan)


def _close(a, b, rtol=1e-6, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_scanned_equals_unrolled(stack):
  """Init (the same random stream), logits, gradients, the statistics the layers sow
  (per block) and the new model state (MoE bias) of the scanned model equal the
  unrolled model's, with remat on; the conversion round-trips exactly."""
  overrides, period = STACKS[stack]
  un = build_model(_cfg(False, model__remat="dots", **overrides), seed=3)
  sc = build_model(_cfg(True, model__remat="dots", **overrides), seed=3)
  assert layer_period(_cfg(True, **overrides)) == period
  assert sorted(sc.params["blocks"]) == [f"block_{j}" for j in range(period)]
  assert all(a[0] == "layers" for a in jax.tree.leaves(
      sc.axes["params"]["blocks"], is_leaf=lambda x: isinstance(x, tuple)))
  _close(scan_tree(un.params, period), sc.params, 0, 0)
  _close(unscan_tree(sc.params), un.params, 0, 0)
  tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 384)

  def run(built):
    def loss(p):
      logits, stats, state = apply(built.graphdef, p, built.state, tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), (logits, stats, state)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(built.params)

  (l0, (logits0, stats0, state0)), g0 = run(un)
  (l1, (logits1, stats1, state1)), g1 = run(sc)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  _close(logits1, logits0)
  _close(g1, scan_tree(g0, period), rtol=1e-5, atol=1e-7)
  _close(stats1, stats0)
  _close(state1, scan_tree(state0, period))
  if stack == "moe_every_2":
    assert sorted(stats1["moe"]) == ["block_1", "block_3"]


def test_one_muon_step_equals_unrolled():
  """A whole train step (two MoE layers, Muon on the matrices: Newton-Schulz batched
  over the stacked layers and experts) from the same init equals the unrolled step:
  loss, gradient norm, and every parameter and optimizer moment after."""
  from lm import experiment as experiment_lib
  fields = dict(model__dtype="float32", model__n_layers=2,
                model__moe__num_experts=4, model__moe__top_k=2, model__moe__every=1,
                optimizer__name="muon", data__batch_size=4, data__seq_len=16)
  exps = [experiment_lib.build(tiny(model__scan_layers=s, **fields), devices=jax.devices()[:1])
          for s in (False, True)]
  states = [e.state.init() for e in exps]
  _close(scan_tree(states[0]["params"], 1), states[1]["params"], 0, 0)
  batch = next(iter(exps[0].data.train_iterator(0)))
  out = [e.train_step(s, e.put_batch(batch), e.abstract_aux() and {}) for e, s in
         zip(exps, states)]
  (s0, m0), (s1, m1) = out
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-5)
  _close(s1["params"], scan_tree(s0["params"], 1), rtol=1e-5, atol=1e-6)
  _close(s1["opt_state"], scan_tree(s0["opt_state"], 1), rtol=1e-5, atol=1e-6)


def test_checkpoint_converts_between_layouts(tmp_path):
  """A model saved unrolled restores into a scanned model and back (``lm.checkpoint.
  restore_model`` converts, onto the target's shardings)."""
  from lm import checkpoint, sharding
  overrides, period = STACKS["hybrid"]
  mesh = sharding.make_mesh(config_lib.resolve(tiny(mesh__fsdp=2, mesh__data=-1)).mesh,
                            jax.devices()[:4])

  def abstract(built):
    specs = {"params": sharding.tree_specs(built.axes["params"], built.params, mesh),
             "model_state": sharding.tree_specs(built.axes["state"], built.state, mesh)}
    tree = {"params": built.params, "model_state": built.state}
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        tree, sharding.named(mesh, specs))

  for src, dst in ((False, True), (True, False)):
    saved = build_model(_cfg(src, **overrides), seed=7)
    target = build_model(_cfg(dst, **overrides), seed=1)  # other weights: must be replaced
    directory = os.path.join(tmp_path, f"from_{src}")
    ckpt = checkpoint.Checkpointer(directory)
    ckpt.save_model(4, {"params": saved.params, "model_state": saved.state}, {})
    ckpt.close()
    model, step = checkpoint.restore_model(directory, abstract(target))
    convert = (lambda t: scan_tree(t, period)) if dst else unscan_tree
    assert step == 4
    _close(model["params"], convert(saved.params), 0, 0)
    want = abstract(target)["params"]
    for got, a in zip(jax.tree.leaves(model["params"]), jax.tree.leaves(want)):
      assert got.sharding.is_equivalent_to(a.sharding, got.ndim)


def test_scanned_decoding_and_exits():
  """Decoding converts a scanned model's weights to the unrolled layout (same logits);
  lens exits at unit boundaries equal the unrolled model's, inside a unit they are a
  one-line config error."""
  from lm import decode
  overrides, period = STACKS["hybrid"]
  un = build_model(_cfg(False, **overrides), seed=2)
  sc = build_model(_cfg(True, **overrides), seed=2)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 384)
  *_, lens0 = apply(un.graphdef, un.params, un.state, tokens, exits=(2,))
  *_, lens1 = apply(sc.graphdef, sc.params, sc.state, tokens, exits=(2,))
  _close(lens1, lens0)
  with pytest.raises(ConfigError, match="scan_layers"):
    apply(sc.graphdef, sc.params, sc.state, tokens, exits=(1,))
  model = decode.Model.from_weights(_cfg(True, **overrides), sc.params, sc.state)
  cache = decode.init_cache(model, 2, 16, 0, jnp.float32)
  logits, _, _ = decode.extend(model, model.params, cache, tokens, jnp.array([8, 5]),
                               fresh=True)
  full = apply(un.graphdef, un.params, un.state, tokens)[0]
  np.testing.assert_allclose(logits[0], full[0], rtol=1e-4, atol=1e-4)


def test_compression_sees_one_matrix_per_layer():
  """Quantization groups and pruning ranks work per layer of a stacked weight (the
  ``layers`` axis is a batch axis of ``lm.quant.matrices``): the same as unrolled."""
  from lm import prune, quant
  overrides, period = STACKS["moe_every_2"]
  full = config_lib.resolve(tiny(model__dtype="float32", **overrides))
  un = build_model(_cfg(False, **overrides), seed=0)
  sc = build_model(_cfg(True, **overrides), seed=0)
  mats = quant.matrices(sc.axes["params"])
  assert mats[("blocks", "block_1", "mlp", "up")].batch == (0, 1)  # layers, experts
  q = dataclasses.replace(full.quant, weight="int4", group_size=32, mode="qat")
  fq = lambda b: jax.jit(lambda p: quant.quantize_params(p, b.axes["params"], q))(b.params)
  _close(fq(sc), scan_tree(fq(un), period), 0, 0)
  masks = lambda b: jax.jit(lambda params: {
      p: prune.magnitude_mask(quant.get_path(params, p), m, 0.5)
      for p, m in quant.matrices(b.axes["params"]).items()})(b.params)
  un_masks = masks(un)
  for path, mask in masks(sc).items():
    if path[0] != "blocks":
      continue
    for g in range(mask.shape[0]):
      want = un_masks[(f"block_{g * period + int(path[1][6:])}",) + path[2:]]
      np.testing.assert_array_equal(mask[g], want)
