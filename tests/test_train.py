"""The loop (lm/loop.py) and the CLI: learning, exact resume, outputs, preemption, errors."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, records, tiny

from core.errors import ConfigError
from lm import experiment, flops, loop


def test_loss_decreases_and_outputs_written(tmp_path):
  """... and, in the same run, MFU against a given peak and a profile of steps 2-3 only
  (lm/flops.py's counts are tested in tests/test_flops.py)."""
  c = tiny(train__plot=True, train__tensorboard=True, train__peak_tflops=2.0,
           train__profile_steps=(2, 3))
  summary = loop.run(c, str(tmp_path))
  recs = records(tmp_path)
  losses = [r["loss"] for r in recs if "loss" in r]
  evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
  assert losses[0] > 5.5  # ~ln(384) at init
  assert np.mean(losses[-5:]) < losses[0] - 2.0
  assert evals[-1] < evals[0] - 0.5
  for r in recs:
    if "loss" in r:
      assert {"step", "loss", "learning_rate", "tokens_per_sec"} <= set(r)
  assert summary["step"] == c.train.steps
  assert json.load(open(tmp_path / "config.json"))["model"]["vocab_size"] == 384
  assert os.path.isdir(tmp_path / "checkpoints" / str(c.train.steps))
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
  assert (tmp_path / "loss_curve.png").stat().st_size > 1000
  # Throughput: model FLOPs of the step over each logged interval (one step each here).
  typed = experiment.build(c).config
  step_flops = flops.train_flops(typed.model, typed.data.batch_size, typed.data.seq_len)
  for r in (r for r in recs if "loss" in r):
    assert r["mfu"] == pytest.approx(r["model_tflops_per_sec"] / 2.0, rel=1e-3)
    seconds = typed.data.batch_size * typed.data.seq_len / r["tokens_per_sec"]
    assert r["model_tflops_per_sec"] == pytest.approx(
        step_flops / seconds / jax.device_count() / 1e12, rel=1e-3)
  traces = glob.glob(os.path.join(tmp_path, "tensorboard", "plugins", "profile", "*",
                                  "*.xplane.pb"))
  assert len(traces) == 1
  data = open(traces[0], "rb").read()
  assert [s for s in range(1, 6) if f"kestrel step {s}".encode() in data] == [2, 3]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bitwise_exact(tmp_path, optimizer):
  c = tiny(train__steps=12, train__log_every=1, train__eval_every=6, train__checkpoint_every=100,
           optimizer__name=optimizer)
  full = loop.run(c, str(tmp_path / "full"))
  half = loop.run(c, str(tmp_path / "split"), stop_at=5)
  assert half["step"] == 5
  resumed = loop.run(c, str(tmp_path / "split"))
  assert resumed["step"] == 12
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda rs: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rs]
  assert strip(records(tmp_path / "full")) == strip(records(tmp_path / "split"))


def test_incompatible_checkpoint_is_refused(tmp_path):
  loop.run(tiny(train__steps=2), str(tmp_path))
  # How the same state is computed may change on resume; its shapes may not.
  assert loop.run(tiny(train__steps=3, model__attention_impl="jax_nn", model__remat="full"),
                  str(tmp_path))["step"] == 3
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  config_json = (tmp_path / "config.json").read_text()
  with pytest.raises(ConfigError, match=r"--workdir=.*incompatible config: params/block_0/attn/"
                     r"k is float32\[64, 2, 16\] in the checkpoint, float32\[32, 2, 8\].*"
                     r"model.d_model 64 -> 32.*Fix: use a new --workdir"):
    loop.run(tiny(train__steps=4, model__d_model=32), str(tmp_path))
  with pytest.raises(ConfigError, match=r"incompatible config: opt_state/.* is in (the "
                     r"checkpoint|this config.s state) but not"):
    loop.run(tiny(train__steps=4, optimizer__name="muon"), str(tmp_path))
  # Refusing touches nothing: the checkpoints and config.json are as they were.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert (tmp_path / "config.json").read_text() == config_json


@pytest.mark.parametrize("field,value,match", [
    ("model__n_kv_heads", 3, "model.n_kv_heads=3"),
    ("model__d_model", 0, "model.d_model=0"),
    ("data__batch_size", -2, "data.batch_size=-2"),
    ("train__steps", 0, "train.steps=0"),
    ("optimizer__name", "sgd", "optimizer.name='sgd'"),
    ("model__vocab_size", 100, "model.vocab_size=100"),
    ("data__seq_len", 10_000_000, "data.seq_len"),
])
def test_config_errors_name_field_value_and_fix(tmp_path, field, value, match):
  with pytest.raises(ConfigError, match=match) as info:
    loop.run(tiny(**{field: value}), str(tmp_path))
  assert "Fix:" in str(info.value)


def _cli(*args, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_cli_overrides_and_unknown_key(tmp_path):
  p = _cli("--config=experiments/configs/base.py:tiny", f"--workdir={tmp_path}",
           "--config.train.steps=3", "--config.optimizer.name=muon", "--config.train.plot=False")
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out
  cfg = json.load(open(tmp_path / "config.json"))
  assert cfg["train"]["steps"] == 3 and cfg["optimizer"]["name"] == "muon"
  assert records(tmp_path)[-1]["step"] == 3
  # bad fields: one line each (as commands: tests/test_errors.py)
  from experiments.configs import from_argv
  from lm.config import resolve
  with pytest.raises(ConfigError, match="unknown config field 'n_hedas' under model.*n_heads"):
    from_argv(["--config=experiments/configs/base.py:tiny", "--config.model.n_hedas=4"])
  with pytest.raises(ConfigError, match=r"^model.n_kv_heads=3"):
    resolve(from_argv(["--config=experiments/configs/base.py:tiny",
                       "--config.model.n_kv_heads=3"])[0])


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  p = _cli("--config=experiments/configs/base.py:tiny", f"--workdir={tmp_path}",
           "--config.train.steps=100000", "--config.train.log_every=1",
           "--config.train.checkpoint_every=100000", "--config.train.progress=log")
  deadline = time.time() + 240
  while time.time() < deadline:
    if os.path.exists(tmp_path / "metrics.jsonl") and len(records(tmp_path)) >= 3:
      break
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out
  assert "SIGTERM: saved checkpoint" in out
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert saved and max(saved) >= 3
  # The saved state resumes: a short continuation starts from that step.
  c = tiny(train__steps=max(saved) + 2)
  assert loop.run(c, str(tmp_path))["step"] == max(saved) + 2


def test_interrupted_save_never_hides_the_last_good_checkpoint(tmp_path):
  c = tiny(train__steps=8, train__checkpoint_every=4)
  loop.run(c, str(tmp_path), stop_at=8)
  # A save killed midway leaves only orbax's temporary directory behind.
  partial = tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 100)
  c.train.steps = 10
  summary = loop.run(c, str(tmp_path))
  assert summary["step"] == 10
  recs = records(tmp_path)
  assert [r["step"] for r in recs if "loss" in r][-2:] == [9, 10]
