"""TPU AOT compiles of the real train step from this CPU host (jax[tpu]'s compiler)."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from core.errors import ConfigError
from experiments.configs import base, pod
from lm import aot


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_tiny_compiles_for_two_generations(topology):
  c = base.get_config("tiny")
  c.mesh.data, c.mesh.fsdp = 2, -1
  r = aot.compile_train_step(c, topology)
  assert r.fits and r.devices == 4 and r.mesh["fsdp"] == 2
  assert 0 < r.param_bytes < r.argument_bytes
  assert 0 <= r.opt_bytes - 2 * r.param_bytes < 64  # AdamW: mu and nu like the params, + counts
  assert 0.8 < r.compiler_flops / r.model_flops < 1.5


@pytest.mark.parametrize("name,topology", [("1b-v5p64", "v5p:4x4x2")])
def test_pod_config_compiles_on_its_mesh(name, topology):
  c = pod.get_config(name)
  # The full 20-layer model at batch 256 x 2048 compiles too (~1.5 min; the table in
  # benchmarks/results/compile_memory.md); one layer at one sequence of 512 per device
  # keeps the suite fast.
  c.model.n_layers, c.data.batch_size, c.data.seq_len = 1, 32, 512
  r = aot.compile_train_step(c, topology)
  assert r.devices == 32 and r.mesh["fsdp"] == 16 and r.mesh["data"] == 2
  assert r.fits, aot.format_report(r)
  # FSDP: each device holds ~1/16 of the parameters.
  full = r.params * 4
  assert full / 16 <= r.param_bytes < full / 16 * 1.2
  assert 0.9 < r.compiler_flops / r.model_flops < 1.2


def test_too_large_says_it_does_not_fit():
  p = subprocess.run(
      [sys.executable, "-m", "experiments.compile", "--config=experiments/configs/pod.py:1b-v5p64",
       "--topology=v5e:2x2", "--config.model.n_layers=2", "--config.mesh.data=2"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1"), capture_output=True, text=True,
      timeout=600)
  assert p.returncode == 1, p.stdout + p.stderr[-2000:]
  assert "error: does not fit: v5e:2x2" in p.stderr and "HBM" in p.stderr and "Fix:" in p.stderr


def test_bad_topology_and_mesh_errors():
  with pytest.raises(ConfigError, match="--topology='v9z:2x2'"):
    aot.parse_topology("v9z:2x2")
  c = base.get_config("tiny")
  c.mesh.data, c.mesh.tensor = 2, 4  # 8 devices asked, v5e:2x2 has 4
  with pytest.raises(ConfigError, match="4 are present"):
    aot.compile_train_step(c, "v5e:2x2")


def test_remat_trades_memory_for_flops():
  # Scanned layers (the pod layout; one body to compile): at this size the activations
  # saved for the backward dominate the step's memory (remat keeps ~0.2 of it).
  c = base.get_config("tiny")
  c.data.batch_size, c.data.seq_len = 16, 512
  c.model.n_layers, c.model.d_model, c.model.d_ff = 4, 128, 384
  c.model.scan_layers = True
  c.mesh.data = 4
  plain = aot.compile_train_step(c, "v5e:2x2")
  c.model.remat = "full"
  remat = aot.compile_train_step(c, "v5e:2x2")
  assert remat.temp_bytes < 0.7 * plain.temp_bytes, (remat.temp_bytes, plain.temp_bytes)
  assert 1.1 < remat.compiler_flops / plain.compiler_flops < 1.45  # ~one more forward


def test_compression_step_compiles_for_tpu():
  """QAT (int4 g32 weights, int8 activations) with 2:4 pruning masks in the state: the
  TPU compiler takes the step."""
  c = base.get_config("tiny")
  c.mesh.data, c.mesh.fsdp = 2, -1
  c.quant.weight, c.quant.group_size, c.quant.act, c.quant.mode = "int4", 32, "int8", "qat"
  c.prune.method = "nm"
  r = aot.compile_train_step(c, "v5e:2x2")
  assert r.fits and r.argument_bytes > r.param_bytes + r.opt_bytes


def test_qlora_dpo_step_compiles_for_tpu(tmp_path):
  """QLoRA (nf4 base codes and scales in the step's inputs, adapters trained) with DPO
  against the base with the adapters off: the TPU compiler takes the step, and the
  trained state (adapters, their AdamW moments) is a small part of its inputs."""
  c = base.get_config("tiny")
  c.mesh.data, c.mesh.fsdp = 2, -1
  c.lora.init_from, c.lora.base_quant, c.lora.base_group_size = str(tmp_path), "nf4", 32
  c.data.source, c.data.path, c.dpo.loss = "preference", "synthetic:upper", "sigmoid"
  r = aot.compile_train_step(c, "v5e:2x2")
  assert r.fits and 3 * r.param_bytes < r.argument_bytes - r.opt_bytes, aot.format_report(r)
