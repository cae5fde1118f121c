"""Tests for optim.chain and optim.schedules: routing, Muon vs optax, NAMO wiring,
schedules, errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from optax import contrib as optax_contrib

from experiments.configs import base
from optim import chain
from optim import namo
from optim import schedules

# A realistic model tree: logical axes and shapes (d=16, heads=4, kv=2, hd=4).
AXES = {
    "embed": ("vocab", "embed"),
    "head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "layer_0": {
        "attn": {
            "q": ("embed", "heads", "head_dim"),
            "k": ("embed", "kv_heads", "head_dim"),
            "v": ("embed", "kv_heads", "head_dim"),
            "o": ("heads", "head_dim", "embed"),
            "bias": ("bias",),
        },
        "mlp": {"gate": ("embed", "mlp"), "up": ("embed", "mlp"),
                "down": ("mlp", "embed")},
        "norm": ("norm",),
    },
    "moe": {"up": ("expert", "embed", "mlp"), "down": ("expert", "mlp", "embed")},
    "stacked": {"up": ("layers", "embed", "mlp"), "norm": ("layers", "norm")},
}
SHAPES = {
    "embed": (64, 16), "head": (16, 64), "final_norm": (16,),
    "layer_0": {
        "attn": {"q": (16, 4, 4), "k": (16, 2, 4), "v": (16, 2, 4),
                 "o": (4, 4, 16), "bias": (16,)},
        "mlp": {"gate": (16, 40), "up": (16, 40), "down": (40, 16)},
        "norm": (16,),
    },
    "moe": {"up": (3, 16, 24), "down": (3, 24, 16)},
    "stacked": {"up": (2, 16, 40), "norm": (2, 16)},
}
LABELS = {
    "embed": "adam", "head": "adam", "final_norm": "adam",
    "layer_0": {
        "attn": {"q": "muon", "k": "muon", "v": "muon", "o": "muon",
                 "bias": "adam"},
        "mlp": {"gate": "muon", "up": "muon", "down": "muon"},
        "norm": "adam",
    },
    "moe": {"up": "muon", "down": "muon"},
    "stacked": {"up": "muon", "norm": "adam"},
}


def _is_shape(x):
  return isinstance(x, tuple)


def _normal(seed, shape, scale=1.0):
  """Fresh float32 normals from NumPy (eager jax.random compiles per shape)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _random_tree(seed, shapes, scale=1.0):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  return jax.tree.unflatten(
      treedef, [_normal((*np.atleast_1d(seed), i), s, scale)
                for i, s in enumerate(leaves)])


def _opt_cfg(**overrides):
  cfg = base.get_config("tiny").optimizer
  for name, value in overrides.items():
    node = cfg
    *parents, leaf = name.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def _muon_cfg(**overrides):
  """Muon with a constant learning rate and no clipping, for optax comparisons."""
  defaults = dict(name="muon", schedule="constant", warmup_steps=0, clip_norm=0.0)
  defaults.update({"muon.learning_rate": 0.02, "muon.momentum": 0.9,
                   "muon.weight_decay": 0.1, "muon.ns_steps": 5,
                   "muon.nesterov": True, "muon.ns_dtype": "float32"})
  defaults.update(overrides)
  return _opt_cfg(**defaults)


# The ``optimizer.namo`` subtree (the paper's GPT-2 small values, NAMO's lr).
NAMO_FIELDS = dict(learning_rate=1.2e-2, b1=0.95, b2=0.99, eps=1e-8,
                   weight_decay=0.1, weight_decay_mode="adaptive",
                   nesterov=True, ns_steps=5, scale=0.2, clamp_c=0.5)


def _namo_cfg(name="namo", drop=(), **fields):
  """An optimizer config with an ``optimizer.namo`` subtree (constant lr, no
  clipping); ``fields`` override subtree values, ``drop`` removes fields."""
  cfg = _opt_cfg(name=name, schedule="constant", warmup_steps=0, clip_norm=0.0)
  sub = {k: v for k, v in {**NAMO_FIELDS, **fields}.items() if k not in drop}
  cfg.namo = ml_collections.ConfigDict(sub)
  return cfg


def _reference_muon():
  return optax_contrib.muon(learning_rate=0.02, ns_steps=5, beta=0.9,
                            weight_decay=0.1, nesterov=True)


def _run(tx, params, grads_seq):
  """Applies ``tx`` to a sequence of gradients; returns the list of updates."""
  state, out, update = jax.jit(tx.init)(params), [], jax.jit(tx.update)
  for g in grads_seq:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out


def _grads(seed, shape, steps=3):
  return [_normal((seed, i), shape) for i in range(steps)]


# ----------------------------------------------------------------- routing


def test_param_labels_route_by_axis_names():
  assert chain.param_labels(AXES) == LABELS
  assert chain.BATCH_AXES == ("layers", "expert")


@pytest.mark.parametrize("axes, reduction, output, per_head", [
    (("embed", "mlp"), (0,), (1,), False),
    (("mlp", "embed"), (0,), (1,), False),
    (("embed", "heads", "head_dim"), (0,), (1, 2), False),
    (("embed", "kv_heads", "head_dim"), (0,), (1, 2), False),
    (("heads", "head_dim", "embed"), (0, 1), (2,), False),
    (("expert", "embed", "mlp"), (1,), (2,), False),
    (("expert", "mlp", "embed"), (1,), (2,), False),
    (("layers", "embed", "heads", "head_dim"), (1,), (2, 3), False),
    (("layers", "expert", "mlp", "embed"), (2,), (3,), False),
    # per_head: heads / kv_heads become batch axes (one matrix per head).
    (("embed", "heads", "head_dim"), (0,), (2,), True),
    (("embed", "kv_heads", "head_dim"), (0,), (2,), True),
    (("heads", "head_dim", "embed"), (1,), (2,), True),
    (("layers", "embed", "heads", "head_dim"), (1,), (3,), True),
    (("embed", "mlp"), (0,), (1,), True),
])
def test_muon_dimension_numbers(axes, reduction, output, per_head):
  dn = chain.muon_dimension_numbers(axes, per_head)
  assert isinstance(dn, optax_contrib.MuonDimensionNumbers)
  assert (tuple(dn.reduction_axis), tuple(dn.output_axis)) == (reduction, output)


def test_dimension_tree_masks_adam_leaves():
  tree = chain.muon_dimension_tree(AXES)
  assert isinstance(tree["embed"], optax.MaskedNode)
  assert isinstance(tree["layer_0"]["norm"], optax.MaskedNode)
  assert tree["moe"]["up"] == optax_contrib.MuonDimensionNumbers((1,), (2,))


# ------------------------------------------------------- muon vs optax muon


def test_muon_group_matches_optax_contrib_muon_on_matrices():
  axes = {"up": ("embed", "mlp"), "down": ("mlp", "embed")}
  params = {"up": _normal(0, (16, 40)),
            "down": _normal(1, (40, 16))}
  grads = [{"up": _normal((2, i), (16, 40)), "down": _normal((3, i), (40, 16))}
           for i in range(3)]
  ours = _run(chain.build_optimizer(_muon_cfg(), axes, 100).tx, params, grads)
  ref = _run(_reference_muon(), params, grads)
  for u, r in zip(ours, ref):
    for name in u:
      np.testing.assert_allclose(u[name], r[name], rtol=1e-4, atol=1e-6)
  # The comparison is not vacuous: an update is ~lr-sized and differs from SGD.
  assert 1e-3 < float(jnp.abs(ours[0]["up"]).max()) < 1.0
  other = _run(chain.build_optimizer(_muon_cfg(**{"muon.momentum": 0.5}), axes,
                                     100).tx, params, grads)
  assert not np.allclose(other[-1]["up"], ref[-1]["up"], rtol=1e-4, atol=1e-6)


def test_stacked_expert_weight_is_orthogonalised_per_expert():
  axes = {"w": ("expert", "embed", "mlp")}
  params = {"w": _normal(3, (3, 16, 24))}
  grads = [{"w": g} for g in _grads(4, (3, 16, 24))]
  ours = _run(chain.build_optimizer(_muon_cfg(), axes, 100).tx, params, grads)
  for e in range(3):
    ref = _run(_reference_muon(), {"w": params["w"][e]},
               [{"w": g["w"][e]} for g in grads])
    for u, r in zip(ours, ref):
      np.testing.assert_allclose(u["w"][e], r["w"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("axes, shape, matrix", [
    (("embed", "heads", "head_dim"), (16, 4, 8), (16, 32)),
    (("heads", "head_dim", "embed"), (4, 8, 16), (32, 16)),
])
def test_multi_axis_weight_is_treated_as_reshaped_matrix(axes, shape, matrix):
  params = {"w": _normal(5, shape)}
  grads = [{"w": g} for g in _grads(6, shape)]
  ours = _run(chain.build_optimizer(_muon_cfg(), {"w": axes}, 100).tx,
              params, grads)
  ref = _run(_reference_muon(), {"w": params["w"].reshape(matrix)},
             [{"w": g["w"].reshape(matrix)} for g in grads])
  for u, r in zip(ours, ref):
    np.testing.assert_allclose(u["w"].reshape(matrix), r["w"], rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("axes, shape, head_slice", [
    (("embed", "heads", "head_dim"), (16, 4, 8), lambda w, h: w[:, h, :]),
    (("heads", "head_dim", "embed"), (4, 8, 16), lambda w, h: w[h]),
])
def test_muon_per_head_orthogonalises_each_head(axes, shape, head_slice):
  params = {"w": _normal(11, shape)}
  grads = [{"w": g} for g in _grads(12, shape)]
  cfg = _muon_cfg(**{"muon.per_head": True})
  ours = _run(chain.build_optimizer(cfg, {"w": axes}, 100).tx, params, grads)
  heads = lambda w: {h: head_slice(w, h) for h in range(4)}  # 4 2-D leaves.
  ref = _run(_reference_muon(), heads(params["w"]),
             [heads(g["w"]) for g in grads])
  for u, r in zip(ours, ref):
    for h in range(4):
      np.testing.assert_allclose(head_slice(u["w"], h), r[h], rtol=1e-4,
                                 atol=1e-6)


# -------------------------------------------------------------------- namo


@pytest.mark.parametrize("name", ["namo", "namo_d"])
def test_namo_routing_and_learning_rates(name):
  """Labels: see test_jitted_mixed_tree_and_clipping."""
  built = chain.build_optimizer(_namo_cfg(name), AXES, 40)
  assert float(built.learning_rates["namo"](5)) == pytest.approx(1.2e-2)
  assert float(built.learning_rates["adam"](5)) == pytest.approx(3e-3)
  chain.build_optimizer(_namo_cfg(drop=("clamp_c",)), AXES, 40)  # namo only.


@pytest.mark.parametrize("name", ["namo", "namo_d"])
def test_namo_group_reads_every_field(name):
  """Non-default values for every field; the group equals a direct call."""
  fields = dict(b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05,
                weight_decay_mode="lr", nesterov=False, ns_steps=4, scale=0.3)
  if name == "namo_d":
    fields["clamp_c"] = 0.7
  axes = {"up": ("embed", "mlp"), "o": ("heads", "head_dim", "embed")}
  shapes = {"up": (16, 40), "o": (4, 4, 16)}
  params = _random_tree(13, shapes)
  grads = [_random_tree((14, i), shapes) for i in range(3)]
  cfg = _namo_cfg(name, learning_rate=0.05, ns_dtype="float32", **fields)
  ours = _run(chain.build_optimizer(cfg, axes, 100).tx, params, grads)
  ref_tx = getattr(namo, name)(
      0.05, ns_dtype=jnp.float32, **fields,
      weight_dimension_numbers=chain.muon_dimension_tree(axes))
  for u, r in zip(ours, _run(ref_tx, params, grads)):
    for k in u:
      np.testing.assert_allclose(u[k], r[k], rtol=1e-6, atol=1e-8)
  assert 1e-3 < float(jnp.abs(ours[0]["up"]).max()) < 1.0


def _no_namo_subtree():
  cfg = _opt_cfg(name="namo")
  if "namo" in cfg:  # Whatever base.py holds, test the missing subtree.
    del cfg["namo"]
  return cfg


@pytest.mark.parametrize("cfg, field", [
    (_no_namo_subtree, "learning_rate"),
    (lambda: _namo_cfg(drop=("b2",)), "b2"),
    (lambda: _namo_cfg(drop=("scale",)), "scale"),
    (lambda: _namo_cfg("namo_d", drop=("clamp_c",)), "clamp_c"),
    (lambda: _namo_cfg("namo_d", clamp_c=0.0), "clamp_c"),
    (lambda: _namo_cfg(weight_decay_mode="l2"), "weight_decay_mode"),
    (lambda: _namo_cfg(nesterov=1), "nesterov"),
    (lambda: _namo_cfg(ns_dtype="float16"), "ns_dtype"),
    (lambda: _namo_cfg(per_head="yes"), "per_head"),
])
def test_bad_namo_config_raises_one_line_value_error(cfg, field):
  with pytest.raises(ValueError) as err:
    chain.build_optimizer(cfg(), AXES, 40)
  msg = str(err.value)
  assert msg.startswith(f"optimizer.namo.{field}=") and "Fix:" in msg
  assert "\n" not in msg


# ------------------------------------------------------------------- adamw


def test_adamw_path_equals_optax_chain():
  cfg = _opt_cfg(name="adamw", clip_norm=1.0)
  axes = {"embed": ("vocab", "embed"), "norm": ("norm",),
          "w": ("embed", "mlp"), "stacked_norm": ("layers", "norm")}
  shapes = {"embed": (32, 8), "norm": (8,), "w": (8, 12), "stacked_norm": (2, 8)}
  params = _random_tree(7, shapes)
  grads = [_random_tree((8, i), shapes) for i in range(3)]
  built = chain.build_optimizer(cfg, axes, 40)
  assert set(built.learning_rates) == {"adam"}
  sched = schedules.make_schedule(cfg.learning_rate, cfg, 40)
  mask = {"embed": True, "norm": False, "w": True, "stacked_norm": False}
  ref_tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=mask))
  for u, r in zip(_run(built.tx, params, grads), _run(ref_tx, params, grads)):
    for name in u:
      np.testing.assert_allclose(u[name], r[name], rtol=1e-6, atol=0)


# -------------------------------------------------- mixed tree, clipping


@pytest.mark.parametrize("name", ["muon", "namo", "namo_d"])
def test_jitted_mixed_tree_and_clipping(name):
  group = "muon" if name == "muon" else "namo"
  cfg = (_namo_cfg(name) if group == "namo" else
         _opt_cfg(name="muon", schedule="constant", warmup_steps=0))
  cfg.clip_norm = 1.0
  params = _random_tree(9, SHAPES)
  grads = _random_tree(10, SHAPES, scale=1e6)
  built = chain.build_optimizer(cfg, AXES, 40)
  assert list(built.learning_rates) == [group, "adam"]
  assert built.labels == jax.tree.map(
      lambda l: group if l == "muon" else l, LABELS)
  state = built.tx.init(params)
  update = jax.jit(built.tx.update)
  u, state = update(grads, state, params)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  for leaf_u, leaf_p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
    assert leaf_u.shape == leaf_p.shape
    assert bool(jnp.all(jnp.isfinite(leaf_u)))
  u, state = update(grads, state, params)  # Second step, through the momentum.
  assert 1e-4 < max(float(jnp.abs(x).max()) for x in jax.tree.leaves(u)) < 1.0
  # Clipping happened: every first moment (Adam's and Muon's / NAMO's M) holds
  # a momentum-weighted sum of gradients whose global norm is <= clip_norm.
  moments = [m for _, m in optax.tree.get_all_with_path(state, "mu")]
  assert len(moments) == 2  # One per group.
  norm = np.sqrt(sum(np.sum(np.square(m)) for m in jax.tree.leaves(moments)))
  assert 0.05 < norm <= 1.0 + 1e-5
  # Each leaf went to its own group and moved.
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(u))
  if group == "namo":  # v: per matrix (NAMO) / per input feature (NAMO-D).
    is_namo = lambda x: isinstance(x, namo.NamoState)
    (ns,) = [x for x in jax.tree.leaves(state, is_leaf=is_namo) if is_namo(x)]
    assert ns.nu["moe"]["up"].shape == ((3,) if name == "namo" else (3, 16))


# --------------------------------------------------------------- schedules


def test_cosine_schedule_values():
  cfg = _opt_cfg(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
  s = schedules.make_schedule(2.0, cfg, 100)
  for step, want in [(0, 0.0), (5, 1.0), (10, 2.0), (55, 1.1), (100, 0.2)]:
    np.testing.assert_allclose(float(s(step)), want, rtol=1e-4, atol=1e-6)


def test_wsd_schedule_values():
  cfg = _opt_cfg(schedule="wsd", warmup_steps=10, decay_fraction=0.2,
                 min_lr_ratio=0.1)
  s = schedules.make_schedule(1.0, cfg, 100)
  for step, want in [(0, 0.0), (5, 0.5), (10, 1.0), (50, 1.0), (80, 1.0),
                     (90, 0.55), (100, 0.1), (120, 0.1)]:
    np.testing.assert_allclose(float(s(step)), want, rtol=1e-4, atol=1e-6)


def test_constant_schedule_and_zero_warmup():
  s = schedules.make_schedule(
      1.0, _opt_cfg(schedule="constant", warmup_steps=4), 100)
  for step, want in [(0, 0.0), (2, 0.5), (4, 1.0), (99, 1.0)]:
    np.testing.assert_allclose(float(s(step)), want, rtol=1e-6)
  for name in ("constant", "cosine", "wsd"):
    s = schedules.make_schedule(3.0, _opt_cfg(schedule=name, warmup_steps=0), 100)
    np.testing.assert_allclose(float(s(0)), 3.0, rtol=1e-6)


def test_learning_rates_dict_per_group():
  built = chain.build_optimizer(_opt_cfg(name="muon", schedule="constant",
                                         warmup_steps=1), AXES, 40)
  assert float(built.learning_rates["muon"](5)) == pytest.approx(0.02)
  assert float(built.learning_rates["adam"](5)) == pytest.approx(3e-3)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("overrides, field", [
    ({"name": "sgd"}, "optimizer.name"),
    ({"schedule": "step"}, "optimizer.schedule"),
    ({"warmup_steps": 40}, "optimizer.warmup_steps"),
    ({"warmup_steps": -1}, "optimizer.warmup_steps"),
    ({"schedule": "wsd", "decay_fraction": 0.0}, "optimizer.decay_fraction"),
    ({"schedule": "wsd", "decay_fraction": 1.5}, "optimizer.decay_fraction"),
    ({"schedule": "wsd", "warmup_steps": 30, "decay_fraction": 0.5},
     "optimizer.decay_fraction"),
    ({"min_lr_ratio": 1.5}, "optimizer.min_lr_ratio"),
    ({"learning_rate": 0.0}, "optimizer.learning_rate"),
    ({"name": "muon", "muon.learning_rate": -1.0}, "optimizer.muon.learning_rate"),
    ({"name": "muon", "muon.momentum": 1.0}, "optimizer.muon.momentum"),
    ({"name": "muon", "muon.ns_steps": 0}, "optimizer.muon.ns_steps"),
    ({"b2": 1.0}, "optimizer.b2"),
    ({"clip_norm": -1.0}, "optimizer.clip_norm"),
])
def test_bad_config_raises_one_line_value_error(overrides, field):
  with pytest.raises(ValueError) as err:
    chain.build_optimizer(_opt_cfg(**overrides), AXES, 40)
  msg = str(err.value)
  assert field in msg and "Fix:" in msg and "\n" not in msg


def test_bad_logical_axes_leaf_raises():
  with pytest.raises(ValueError, match=r"logical_axes\['w'\]"):
    chain.param_labels({"w": "embed"})
  with pytest.raises(ValueError, match="logical_axes"):
    chain.muon_dimension_numbers(("layers", "norm"))


@pytest.mark.parametrize("name", ["adamw", "muon", "namo"])
def test_freeze_axes_labels_and_zero_updates(name):
  from experiments.configs.base import get_config
  from lm.model import build_model
  c = get_config("tiny")
  c.optimizer.name = name
  c.optimizer.freeze_axes = ("vocab", "kv_heads")
  c.optimizer.warmup_steps = 0  # lr 0 at the first step would zero every update
  _, params, axes = build_model(c.model, 384, 0)
  built = chain.build_optimizer(c.optimizer, axes, 10)
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  flat_labels = jax.tree.leaves(built.labels)
  for a, l in zip(flat_axes, flat_labels):
    assert (l == "frozen") == any(x in ("vocab", "kv_heads") for x in a), (a, l)
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  updates, _ = built.tx.update(grads, built.tx.init(params), params)
  for a, u in zip(flat_axes, jax.tree.leaves(updates)):
    frozen = any(x in ("vocab", "kv_heads") for x in a)
    assert bool(jnp.all(u == 0)) == frozen, a


def test_muon_bf16_newton_schulz_path():
  """ns_dtype=bfloat16: optax's momentum + our Newton-Schulz in bf16. In fp32 our
  orthogonaliser reproduces optax's; in bf16 it stays within bf16 error of it."""
  axes = {"up": ("embed", "mlp"), "moe": ("expert", "mlp", "embed")}
  params = {"up": _normal(0, (16, 40)), "moe": _normal(1, (3, 24, 16))}
  grads = [{"up": _normal((2, i), (16, 40)), "moe": _normal((3, i), (3, 24, 16))}
           for i in range(3)]
  ref = _run(chain.build_optimizer(_muon_cfg(), axes, 100).tx, params, grads)
  dims = chain.muon_dimension_tree(axes)
  composed = optax.chain(optax_contrib.scale_by_muon(ns_steps=0, beta=0.9, weight_dimension_numbers=dims),
                         namo.orthogonalize(5, jnp.float32, dims))
  plain = optax_contrib.scale_by_muon(ns_steps=5, beta=0.9, weight_dimension_numbers=dims)
  for a, b in zip(_run(composed, params, grads), _run(plain, params, grads)):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)
  bf16 = _run(chain.build_optimizer(_muon_cfg(**{"muon.ns_dtype": "bfloat16"}), axes, 100).tx,
              params, grads)
  for a, b in zip(bf16, ref):
    for k in a:
      rel = float(jnp.linalg.norm(a[k] - b[k]) / jnp.linalg.norm(b[k]))
      # bf16 iterations: a few percent (measured 2-6%), never exact; a wrong
      # layout or a missing orthogonalisation is off by O(1).
      assert 0 < rel < 0.1, (k, rel)
  with pytest.raises(ValueError, match="optimizer.muon.ns_dtype='int8'"):
    chain.build_optimizer(_muon_cfg(**{"muon.ns_dtype": "int8"}), axes, 100)
