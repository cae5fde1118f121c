"""Two local processes (loopback) with 2 CPU devices each train like one process with 4."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from conftest import ROOT, tiny

from lm import experiment, loop
from lm.checkpoint import Checkpointer

OVERRIDES = {"train.steps": 4, "train.log_every": 1, "train.eval_every": 4,
             "train.checkpoint_every": 4, "train.plot": False, "train.tensorboard": False,
             "model.dtype": "float32", "optimizer.eps": 1e-3, "mesh.data": 2, "mesh.fsdp": 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  workdir = tmp_path / "multi"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/base.py:tiny",
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "mesh data=2 x fsdp=2" in outs[0]

  c = tiny(**{k.replace(".", "__"): v for k, v in OVERRIDES.items()})
  single = loop.run(c, str(tmp_path / "single"), devices=jax.devices()[:4])
  with open(workdir / "metrics.jsonl") as f:
    multi = [json.loads(line) for line in f]
  with open(tmp_path / "single" / "metrics.jsonl") as f:
    ref = [json.loads(line) for line in f]
  np.testing.assert_allclose([r["loss"] for r in multi if "loss" in r],
                             [r["loss"] for r in ref if "loss" in r], rtol=1e-6)
  np.testing.assert_allclose([r["eval_loss"] for r in multi if "eval_loss" in r],
                             [r["eval_loss"] for r in ref if "eval_loss" in r], rtol=1e-6)
  # The two-process checkpoint holds the same parameters as the one-process run.
  exp = experiment.build(c, devices=jax.devices()[:4])
  restored = Checkpointer(str(workdir / "checkpoints")).restore(4, exp.state.abstract,
                                                               exp.data.train_iterator())
  for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(single["state"]["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
