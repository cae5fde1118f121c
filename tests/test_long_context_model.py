"""Linear-attention and hybrid stacks and context parallelism in the LM: config,
optimizer routing, training, sharded == single device, errors."""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny

from core.errors import ConfigError
from lm import config as config_lib
from lm import experiment, sharding
from lm.model import build_model
from optim.chain import param_labels


def _steps(config, n, devices=None):
  exp = experiment.build(config, devices=devices)
  it = exp.data.train_iterator()
  state = exp.state.init()
  losses = []
  for _ in range(n):
    state, m = exp.train_step(state, exp.put_batch(next(it)), {})
    losses.append(float(m["loss"]))
  return exp, state, losses


def test_layer_pattern_is_cycled_and_linear_params_route_by_axes():
  c = config_lib.resolve(tiny("experiments/configs/ssd.py:tiny,LLS", model__n_layers=4)).model
  assert [c.mixer(i) for i in range(4)] == ["L", "L", "S", "L"]
  built = build_model(dataclasses.replace(c, vocab_size=384), seed=0, abstract=True)
  params, axes = built.params, built.axes["params"]
  assert "conv_q" in params["block_0"]["attn"] and "conv_q" not in params["block_2"]["attn"]
  labels = param_labels(axes)["block_0"]["attn"]
  # Projections to and from the residual stream are matrices (Muon); conv kernels,
  # per-head biases, norm scales and decay vectors are not.
  assert labels["q"] == labels["o"] == labels["w_dt"] == "muon"
  assert labels["conv_q"] == labels["conv_q_bias"] == labels["norm_scale"] == "adam"
  assert labels["A_log"] == labels["b_dt"] == "adam"


@pytest.mark.parametrize("variant,pattern", [("ssd", "L"), ("mamba2s", "L"), ("2mamba", "L"),
                                             ("2mamba", "LS")])
def test_linear_and_hybrid_stacks_learn(variant, pattern):
  c = tiny(f"experiments/configs/ssd.py:tiny,{pattern}", model__linear__variant=variant)
  _, _, losses = _steps(c, 12)
  assert np.mean(losses[-3:]) < losses[0] - 1.5, losses


def _cp_config(strategy="none", **mesh):
  c = tiny("experiments/configs/long_context.py:tiny")
  c.model.context_parallel = strategy
  c.model.dtype = "float32"
  c.data.seq_len = 512
  c.data.batch_size = 2
  c.optimizer.eps = 1e-3  # see tests/test_sharding.py: keeps Adam's update Lipschitz in g
  c.optimizer.warmup_steps = 0
  for k in sharding.MESH_AXES:
    c.mesh[k] = mesh.get(k, 1)
  return c


@functools.cache
def _single_device_cp():
  """(state, losses) of two steps of ``_cp_config()`` on one device (host arrays)."""
  _, state, losses = _steps(_cp_config(), 2, jax.devices()[:1])
  return jax.device_get(state), losses


@pytest.mark.parametrize("strategy,mesh", [
    ("ulysses", {"sequence": 8}), ("headwise", {"sequence": 4, "data": 2}),
    ("ring", {"sequence": 8}), ("zigzag", {"sequence": 4, "data": 2})])
def test_context_parallel_training_equals_single_device(strategy, mesh):
  ref_state, ref = _single_device_cp()
  exp, state, losses = _steps(_cp_config(strategy, **mesh), 2)
  np.testing.assert_allclose(losses, ref, rtol=2e-6)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  batch = exp.put_batch(next(exp.data.train_iterator()))
  program = exp.train_step.lower(state, batch, {}).as_text()
  collective = "collective_permute" if strategy in ("ring", "zigzag") else "all_to_all"
  assert collective in program


@pytest.mark.parametrize("field,value,mesh,match", [
    ("model.layer_pattern", "SX", {}, r"model.layer_pattern='SX': must be a non-empty string of S and L"),
    ("model.context_parallel", "ulysses", {"sequence": 8, "n_heads": 4},
     r"model.n_heads=4: not divisible by mesh.sequence=8"),
    ("model.context_parallel", "ring", {"sequence": 8, "seq_len": 500},
     r"data.seq_len=500: not divisible by mesh.sequence=8"),
    ("model.context_parallel", "zigzag", {"sequence": 8, "seq_len": 504},
     r"data.seq_len=504: not divisible by 2 x mesh.sequence=8"),
    ("model.context_parallel", "blockwise", {}, r"model.context_parallel='blockwise': unknown choice"),
    ("model.context_parallel", "headwise", {"sequence": 4, "heads_per_stage": 3},
     r"model.heads_per_stage=3: mesh.sequence=4 x heads_per_stage must divide n_heads=8"),
])
def test_config_errors(field, value, mesh, match):
  c = _cp_config()
  c.mesh.sequence = mesh.get("sequence", 1)
  c.mesh.data = 8 // c.mesh.sequence
  if "n_heads" in mesh:
    c.model.n_heads = c.model.n_kv_heads = mesh["n_heads"]
  if "heads_per_stage" in mesh:
    c.model.heads_per_stage = mesh["heads_per_stage"]
  if "seq_len" in mesh:
    c.data.seq_len = mesh["seq_len"]
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=match) as info:
    config_lib.resolve(c)
  assert "Fix:" in str(info.value)


def test_cli_trains_a_hybrid(tmp_path):
  """The flags reach the model: the checkpoint holds a 2Mamba layer (conv kernels, a
  token-dependent decay, no dt) followed by a softmax layer, and the loss falls."""
  import orbax.checkpoint as ocp
  from conftest import records
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "experiments.train",
                      "--config=experiments/configs/ssd.py:tiny,LS", f"--workdir={tmp_path}",
                      "--config.train.steps=3", "--config.train.log_every=1",
                      "--config.train.plot=False", "--config.train.tensorboard=False",
                      "--config.model.linear.variant=2mamba"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout + p.stderr
  cfg = json.load(open(tmp_path / "config.json"))
  assert cfg["model"]["layer_pattern"] == "LS" and cfg["model"]["linear"]["variant"] == "2mamba"
  saved = ocp.StandardCheckpointer().metadata(str(tmp_path / "checkpoints" / "3" / "state"))
  params = getattr(saved, "item_metadata", saved)
  params = getattr(params, "tree", params)["params"]
  linear, softmax = params["block_0"]["attn"], params["block_1"]["attn"]
  assert {"conv_q", "w_A", "b_A"} <= set(linear) and not {"w_dt", "A_log"} & set(linear)
  assert set(softmax) == {"q", "k", "v", "o"}
  losses = [r["loss"] for r in records(tmp_path) if "loss" in r]
  assert losses[-1] < losses[0]
