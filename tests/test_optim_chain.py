"""Tests for optim.chain, optim.muon and optim.schedules: routing by axis names, Muon
vs optax, NAMO wiring, schedules, config errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import contrib as optax_contrib

from core.errors import ConfigError
from optim import chain
from optim import muon
from optim import namo
from optim import schedules
from optim.chain import OptimizerConfig

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
  """An ``OptimizerConfig``; ``overrides`` name its fields, ``muon__x`` / ``namo__x`` the
  fields of its groups."""
  groups = {"muon": {}, "namo": {}}
  top = {}
  for name, value in overrides.items():
    group, _, field = name.partition("__")
    if field:
      groups[group][field] = value
    else:
      top[name] = value
  return OptimizerConfig(muon=muon.MuonConfig(**groups["muon"]),
                         namo=namo.NamoConfig(**groups["namo"]), **top)


def _muon_cfg(**overrides):
  """Muon with a constant learning rate and no clipping, for optax comparisons."""
  defaults = dict(name="muon", schedule="constant", warmup_steps=0, clip_norm=0.0,
                  muon__learning_rate=0.02, muon__momentum=0.9, muon__weight_decay=0.1,
                  muon__ns_steps=5, muon__nesterov=True, muon__ns_dtype="float32")
  defaults.update(overrides)
  return _opt_cfg(**defaults)


# The ``optimizer.namo`` group (the paper's GPT-2 small values, NAMO's lr).
NAMO_FIELDS = dict(learning_rate=1.2e-2, b1=0.95, b2=0.99, eps=1e-8,
                   weight_decay=0.1, weight_decay_mode="adaptive",
                   nesterov=True, ns_steps=5, scale=0.2, clamp_c=0.5)


def _namo_cfg(name="namo", **fields):
  """An optimizer config with a NAMO group (constant lr, no clipping); ``fields``
  override the group's values."""
  sub = {f"namo__{k}": v for k, v in {**NAMO_FIELDS, **fields}.items()}
  return _opt_cfg(name=name, schedule="constant", warmup_steps=0, clip_norm=0.0, **sub)


def _reference_muon(momentum=0.9, consistent_rms=None):
  return optax_contrib.muon(learning_rate=0.02, ns_steps=5, beta=momentum,
                            weight_decay=0.1, nesterov=True, consistent_rms=consistent_rms)


def _run(tx, params, grads_seq):
  """Applies ``tx`` to a sequence of gradients; returns the list of updates."""
  state, out, update = jax.jit(tx.init)(params), [], jax.jit(tx.update)
  for g in grads_seq:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out


# ----------------------------------------------------------------- routing


def test_param_labels_route_by_axis_names():
  assert chain.param_labels(AXES) == LABELS
  # A MoE router (its ``router`` axis) stays on AdamW, whatever its other axes.
  assert chain.param_labels({"r": ("embed", "router")}) == {"r": "adam"}
  assert chain.param_labels(AXES, group="namo")["layer_0"]["mlp"]["up"] == "namo"


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


# Every layout of a Muon leaf: name -> (logical axes, shape). Batch axes (stacked
# layers, experts) lead; see _matrices.
MUON_LEAVES = {
    "up": (("embed", "mlp"), (16, 40)),
    "experts": (("expert", "embed", "mlp"), (2, 16, 24)),
    "layers": (("layers", "mlp", "embed"), (2, 24, 16)),
    "layers_experts": (("layers", "expert", "embed", "mlp"), (2, 2, 16, 24)),
    "q": (("embed", "heads", "head_dim"), (16, 4, 8)),   # one (16, 32) matrix
    "o": (("heads", "head_dim", "embed"), (4, 8, 16)),   # one (32, 16) matrix
}


def _matrices(name, w):
  """The 2-D matrices Muon must see in leaf ``name``: {(name, index): matrix}. Stacked
  weights: one per slice of the batch axes; multi-axis q / o: reshaped to (in, out)."""
  shape = MUON_LEAVES[name][1]
  if name == "q":
    return {(name,): w.reshape(16, 32)}
  if name == "o":
    return {(name,): w.reshape(32, 16)}
  batch = shape[:len(shape) - 2]  # the leading axes here are stacked layers / experts
  return {(name, *i): w[i] for i in np.ndindex(*batch)}


def _all_matrices(tree):
  return {k: v for name in tree for k, v in _matrices(name, tree[name]).items()}


def test_muon_group_equals_optax_muon_on_every_matrix():
  """Each matrix of each leaf (a plain matrix, each slice of a stacked ``layers`` /
  ``expert`` weight, a multi-axis projection as its (in, out) reshape) gets optax's
  Muon update for that matrix alone."""
  axes = {k: a for k, (a, _) in MUON_LEAVES.items()}
  shapes = {k: s for k, (_, s) in MUON_LEAVES.items()}
  params = _random_tree(0, shapes)
  grads = [_random_tree((1, i), shapes) for i in range(3)]
  ours = _run(chain.build_optimizer(_muon_cfg(), axes, 100).tx, params, grads)
  ref = _run(_reference_muon(), _all_matrices(params), [_all_matrices(g) for g in grads])
  for step, (u, r) in enumerate(zip(ours, ref)):
    for key, got in _all_matrices(u).items():
      np.testing.assert_allclose(got, r[key], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{key} step {step}")
  # Not vacuous: an update is ~lr-sized and differs from plain SGD's.
  assert 1e-3 < float(jnp.abs(ours[0]["up"]).max()) < 1.0
  sgd = -0.02 * grads[0]["layers"][0]
  assert not np.allclose(ours[0]["layers"][0], sgd, rtol=0.1, atol=1e-3)


def test_muon_group_reads_momentum_and_consistent_rms():
  """Non-default momentum and Moonlight's ``consistent_rms`` scale equal optax's."""
  names = ("layers", "experts")  # tall and wide: the two shape scales differ
  axes = {k: MUON_LEAVES[k][0] for k in names}
  shapes = {k: MUON_LEAVES[k][1] for k in names}
  params = _random_tree(2, shapes)
  grads = [_random_tree((3, i), shapes) for i in range(3)]
  cfg = _muon_cfg(muon__momentum=0.5, muon__consistent_rms=0.2)
  ours = _run(chain.build_optimizer(cfg, axes, 100).tx, params, grads)
  ref = _run(_reference_muon(momentum=0.5, consistent_rms=0.2), _all_matrices(params),
             [_all_matrices(g) for g in grads])
  for step, (u, r) in enumerate(zip(ours, ref)):
    for key, got in _all_matrices(u).items():
      np.testing.assert_allclose(got, r[key], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{key} step {step}")


def test_muon_per_head_orthogonalises_each_head():
  """per_head: q's (embed, head_dim) and o's (head_dim, embed) slice of each head is
  its own matrix."""
  axes = {"q": ("embed", "heads", "head_dim"), "o": ("heads", "head_dim", "embed")}
  shapes = {"q": (16, 4, 8), "o": (4, 8, 16)}
  head = {"q": lambda w, h: w[:, h, :], "o": lambda w, h: w[h]}
  params = _random_tree(11, shapes)
  grads = [_random_tree((12, i), shapes) for i in range(3)]
  ours = _run(chain.build_optimizer(_muon_cfg(muon__per_head=True), axes, 100).tx,
              params, grads)
  heads = lambda t: {(k, h): head[k](t[k], h) for k in axes for h in range(4)}
  ref = _run(_reference_muon(), heads(params), [heads(g) for g in grads])
  for u, r in zip(ours, ref):
    for key, got in heads(u).items():
      np.testing.assert_allclose(got, r[key], rtol=1e-4, atol=1e-6, err_msg=str(key))


# -------------------------------------------------------------------- namo


@pytest.mark.parametrize("name", ["namo", "namo_d"])
def test_namo_routing_and_learning_rates(name):
  built = chain.build_optimizer(_namo_cfg(name), AXES, 40)
  assert built.labels == jax.tree.map(lambda l: "namo" if l == "muon" else l, LABELS)
  assert float(built.learning_rates["namo"](5)) == pytest.approx(1.2e-2)
  assert float(built.learning_rates["adam"](5)) == pytest.approx(3e-3)


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


@pytest.mark.parametrize("fields, field", [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(scale=0.0), "scale"),
    (dict(ns_steps=0), "ns_steps"),
    (dict(clamp_c=0.0), "clamp_c"),
    (dict(clamp_c=1.5), "clamp_c"),
    (dict(weight_decay_mode="l2"), "weight_decay_mode"),
    (dict(nesterov=1), "nesterov"),
    (dict(ns_dtype="float16"), "ns_dtype"),
    (dict(per_head="yes"), "per_head"),
])
def test_bad_namo_config_raises_one_line_config_error(fields, field):
  with pytest.raises(ConfigError) as err:
    namo.NamoConfig(**fields)
  e, msg = err.value, str(err.value)
  assert e.field == field and msg.startswith(f"{field}={fields[field]!r}: ")
  assert ". Fix: " in msg and "\n" not in msg


def test_runtime_names_the_full_path_of_a_bad_group_field():
  """The experiment config prefixes the group's path (``optimizer.namo.b2``)."""
  from experiments.configs import group
  from lm.config import convert
  node = group(OptimizerConfig())
  node.namo.b2 = 1.0
  with pytest.raises(ConfigError, match=r"^optimizer\.namo\.b2=1\.0: .*Fix: "):
    convert(OptimizerConfig, node, "optimizer")
  node = group(OptimizerConfig())
  node.muon.momentum = 1.0
  with pytest.raises(ConfigError, match=r"^optimizer\.muon\.momentum=1\.0: .*Fix: "):
    convert(OptimizerConfig, node, "optimizer")
  assert convert(OptimizerConfig, group(OptimizerConfig()), "optimizer") == OptimizerConfig()


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


@pytest.mark.parametrize("decay_vocab", [True, False])
@pytest.mark.parametrize("name", ["adamw", "muon", "namo_d"])
def test_decay_vocab_false_spares_embedding_and_head(name, decay_vocab):
  """Zero gradients: the update is the weight decay alone. ``decay_vocab=False`` (the
  official NAMO code's AdamW group) leaves the embedding and head in place; every other
  matrix, the router on AdamW among them, still decays by its group's lr x decay."""
  axes = {"embed": ("vocab", "embed"), "head": ("embed", "vocab"), "norm": ("norm",),
          "w": ("embed", "mlp"), "router": ("embed", "router")}
  shapes = {"embed": (32, 8), "head": (8, 32), "norm": (8,), "w": (8, 12), "router": (8, 4)}
  cfg = _opt_cfg(name=name, schedule="constant", warmup_steps=0, clip_norm=0.0,
                 decay_vocab=decay_vocab, muon__weight_decay=0.1,
                 namo__weight_decay_mode="lr")  # adaptive decay is 0 at a zero gradient
  params = _random_tree(11, shapes)
  (u,) = _run(chain.build_optimizer(cfg, axes, 40).tx, params,
              [jax.tree.map(jnp.zeros_like, params)])
  adam = cfg.learning_rate * cfg.weight_decay
  matrix = {"adamw": adam, "muon": 0.02 * 0.1, "namo_d": cfg.namo.learning_rate * 0.1}[name]
  want = {"embed": adam if decay_vocab else 0.0, "head": adam if decay_vocab else 0.0,
          "norm": 0.0, "w": matrix, "router": adam}
  for leaf, rate in want.items():
    np.testing.assert_allclose(u[leaf], -rate * params[leaf], rtol=1e-5, atol=0,
                               err_msg=leaf)
  assert float(jnp.abs(u["w"]).max()) > 0 and float(jnp.abs(u["router"]).max()) > 0


# -------------------------------------------------- mixed tree, clipping


FROZEN_AXES = ("vocab", "kv_heads")


@pytest.mark.parametrize("name", ["adamw", "muon", "namo"])
def test_jitted_mixed_tree_clipping_and_frozen_axes(name):
  """The realistic tree, jitted: each leaf in its group (frozen ones: zero update, no
  state), the whole gradient clipped before the groups."""
  group = {"adamw": "adam", "muon": "muon"}.get(name, "namo")
  cfg = _namo_cfg(name) if group == "namo" else _opt_cfg(name=name, schedule="constant")
  # warmup 0: lr 0 at the first step would zero every update
  cfg = dataclasses.replace(cfg, clip_norm=1.0, warmup_steps=0, freeze_axes=FROZEN_AXES)
  params = _random_tree(9, SHAPES)
  grads = _random_tree(10, SHAPES, scale=1e6)
  built = chain.build_optimizer(cfg, AXES, 40)
  assert list(built.learning_rates) == ([] if group == "adam" else [group]) + ["adam"]
  frozen = jax.tree.map(lambda a: any(x in FROZEN_AXES for x in a), AXES, is_leaf=_is_shape)
  assert built.labels == jax.tree.map(
      lambda l, f: "frozen" if f else "adam" if l == "adam" else group, LABELS, frozen)
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
  assert len(moments) == (1 if group == "adam" else 2)  # One per group.
  norm = np.sqrt(sum(np.sum(np.square(m)) for m in jax.tree.leaves(moments)))
  assert 0.05 < norm <= 1.0 + 1e-5
  # Each leaf went to its own group and moved; the frozen ones did not.
  for (path, x), f in zip(jax.tree_util.tree_leaves_with_path(u), jax.tree.leaves(frozen)):
    assert bool(jnp.all(x == 0)) == f, jax.tree_util.keystr(path)
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
    ({"name": "sgd"}, "name"),
    ({"schedule": "step"}, "schedule"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 2.5}, "warmup_steps"),
    ({"decay_fraction": 0.0}, "decay_fraction"),
    ({"decay_fraction": 1.5}, "decay_fraction"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"b1": 2}, "b1"),
    ({"b2": 1.0}, "b2"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"clip_norm": -1.0}, "clip_norm"),
    ({"decay_vocab": "no"}, "decay_vocab"),
    ({"freeze_axes": ("vocab", 3)}, "freeze_axes"),
    ({"muon__learning_rate": -1.0}, "learning_rate"),
    ({"muon__momentum": 1.0}, "momentum"),
    ({"muon__ns_steps": 0}, "ns_steps"),
    ({"muon__consistent_rms": 0.0}, "consistent_rms"),
    ({"muon__nesterov": "yes"}, "nesterov"),
])
def test_bad_config_raises_one_line_config_error(overrides, field):
  """Each dataclass names its own field (the runtime adds ``optimizer.`` / ``optimizer.muon.``)."""
  with pytest.raises(ConfigError) as err:
    _opt_cfg(**overrides)
  (value,) = overrides.values()
  e, msg = err.value, str(err.value)
  assert e.field == field and msg.startswith(f"{field}={value!r}: ")
  assert ". Fix: " in msg and "\n" not in msg


@pytest.mark.parametrize("overrides, field", [
    ({"warmup_steps": 40}, "warmup_steps"),  # no step left after the warmup
    ({"schedule": "wsd", "warmup_steps": 30, "decay_fraction": 0.5}, "decay_fraction"),
])
def test_schedule_that_does_not_fit_the_run_raises_config_error(overrides, field):
  cfg = _opt_cfg(**overrides)  # valid on its own: the run length decides
  with pytest.raises(ConfigError) as err:
    chain.build_optimizer(cfg, AXES, 40)
  msg = str(err.value)
  assert err.value.field == field and msg.startswith(f"{field}=") and "Fix: " in msg
  assert "\n" not in msg
  chain.build_optimizer(cfg, AXES, 80)  # a longer run fits


def test_bad_logical_axes_leaf_raises():
  with pytest.raises(ValueError, match=r"logical_axes\['w'\]"):
    chain.param_labels({"w": "embed"})
  with pytest.raises(ValueError, match="logical_axes"):
    chain.muon_dimension_numbers(("layers", "norm"))


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
  bf16 = _run(chain.build_optimizer(_muon_cfg(muon__ns_dtype="bfloat16"), axes, 100).tx,
              params, grads)
  for a, b in zip(bf16, ref):
    for k in a:
      rel = float(jnp.linalg.norm(a[k] - b[k]) / jnp.linalg.norm(b[k]))
      # bf16 iterations: a few percent (measured 2-6%), never exact; a wrong
      # layout or a missing orthogonalisation is off by O(1).
      assert 0 < rel < 0.1, (k, rel)
  with pytest.raises(ConfigError, match=r"^ns_dtype='int8': unknown choice\. Fix: "):
    muon.MuonConfig(ns_dtype="int8")


# ----------------------------------------------------------------- batched and distributed


def _mesh8():
  """Kestrel's mesh axes, data 2 x fsdp 4, and the split ``lm.sharding`` makes of it."""
  from jax.sharding import AxisType
  from lm import sharding
  shape = tuple({"data": 2, "fsdp": 4}.get(a, 1) for a in sharding.MESH_AXES)
  mesh = jax.make_mesh(shape, sharding.MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))
  spread = sharding.optimizer_spread(mesh)
  assert spread.size == 8
  return mesh, spread


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.1)])  # bf16: 2-6 %
def test_newton_schulz_many_equals_per_matrix(dtype, tol):
  """Stacks of mixed shapes (a tall one joins the wide ones of its transposed shape) iterate
  together, plain and split over 8 devices; each matrix equals ``newton_schulz`` alone."""
  shapes = [(6, 16, 40), (5, 40, 16), (1, 24, 24), (3, 8, 12)]
  stacks = [_normal((40, i), s) for i, s in enumerate(shapes)]
  _, spread = _mesh8()
  for sp in (None, spread):
    got = jax.jit(lambda xs, sp=sp: namo.newton_schulz_many(xs, 5, dtype, sp))(stacks)
    for x, y in zip(stacks, got):
      assert y.shape == x.shape and y.dtype == jnp.float32
      ref = jax.jit(jax.vmap(lambda m: namo.newton_schulz(m, 5, dtype=dtype)))(x)
      err = jnp.abs(y - ref).max(axis=(1, 2)) / jnp.abs(ref).max(axis=(1, 2))
      assert float(err.max()) < tol, (x.shape, sp is not None, err)


def test_spread_splits_the_work_over_the_devices():
  """XLA's per-device FLOPs of the iterations: split over 8 devices, each device does an
  eighth of the matrices (20 of one shape padded to 24: 3 each), where without the split
  propagation leaves at least a quarter on every device."""
  stacks = [_normal((41, i), s) for i, s in enumerate([(16, 64, 128), (4, 128, 64)])]
  mesh, spread = _mesh8()
  placed = [jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(None, "fsdp", None)))
            for x in stacks]
  one = 5 * (2 * 2 * 64 * 64 * 128 + 2 * 64 ** 3)  # five quintic steps on one 64 x 128
  flops = {}
  for name, sp in (("plain", None), ("spread", spread)):
    f = jax.jit(lambda xs, sp=sp: namo.newton_schulz_many(xs, 5, jnp.float32, sp))
    flops[name] = f.lower(placed).compile().cost_analysis()["flops"]
  assert flops["plain"] >= 20 * one / 4
  assert 3 * one <= flops["spread"] < 3.3 * one


def test_distributed_update_equals_per_matrix_on_8_devices():
  """The whole Muon group, jitted on 8 devices with FSDP-sharded parameters: split
  orthogonalisation equals the unsplit one and optax's Muon matrix by matrix (NAMO-D's
  split path: tests/test_sharding.py, 8 devices against one)."""
  axes = {k: a for k, (a, _) in MUON_LEAVES.items()}
  shapes = {k: s for k, (_, s) in MUON_LEAVES.items()}
  params = _random_tree(42, shapes)
  grads = [_random_tree((43, i), shapes) for i in range(2)]
  mesh, spread = _mesh8()
  put = lambda t: jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.P(*([None] * (x.ndim - 1)), "fsdp"))), t)
  cfg = _muon_cfg()
  runs = {}
  for split in (False, True):
    built = chain.build_optimizer(cfg, axes, 100, spread=spread if split else None)
    runs[split] = _run(built.tx, put(params), [put(g) for g in grads])
  for a, b in zip(runs[True], runs[False]):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  ref = _run(_reference_muon(), _all_matrices(params), [_all_matrices(g) for g in grads])
  for step, (u, r) in enumerate(zip(runs[True], ref)):
    for key, got in _all_matrices(u).items():
      np.testing.assert_allclose(got, r[key], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{key} step {step}")
