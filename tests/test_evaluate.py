"""experiments.evaluate: a trained run's held-out metrics, as the run logged them, under
config overrides; accuracy on synthetic tasks; the CLI's JSON and one-line errors."""
import json
import math
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, records, tiny

from core.errors import ConfigError
from experiments import evaluate
from lm import loop

STEPS = 30


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """A tiny byte-level run of 30 steps, evaluated (and checkpointed) at its last step."""
  workdir = str(tmp_path_factory.mktemp("text_run"))
  loop.run(tiny(train__steps=STEPS, train__eval_every=STEPS, train__checkpoint_every=STEPS),
           workdir)
  return workdir


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
  """A tiny run of the synthetic MQAR task, 4 steps."""
  workdir = str(tmp_path_factory.mktemp("synthetic_run"))
  loop.run(tiny(data__source="synthetic", data__synthetic__task="mqar", data__seq_len=40,
                train__steps=4, train__eval_every=4, train__eval_batches=2), workdir)
  return workdir


def _edited_copy(workdir, target, edit) -> str:
  """A copy of ``workdir`` (config.json, checkpoints/) with ``edit(config dict)`` applied."""
  shutil.copytree(workdir, target)
  path = os.path.join(target, "config.json")
  with open(path) as f:
    config = json.load(f)
  edit(config)
  with open(path, "w") as f:
    json.dump(config, f)
  return str(target)


def test_loss_is_the_runs_own_eval_at_the_same_step(text_run):
  logged = [r for r in records(text_run) if "eval_loss" in r][-1]
  result = evaluate.evaluate(text_run)
  assert result["step"] == logged["step"] == STEPS
  assert result["eval_batches"] == 4  # the run's train.eval_batches, as the loop used
  np.testing.assert_allclose(result["eval_loss"], logged["eval_loss"], rtol=1e-6)
  np.testing.assert_allclose(result["eval_bpb"], logged["eval_bpb"], rtol=1e-6)
  assert result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-12)
  assert "exact_match" not in result  # text: no accuracy
  text = evaluate.report(result)
  assert f"step {STEPS}" in text and f"eval_loss       {result['eval_loss']:.4f}" in text
  fewer = evaluate.evaluate(text_run, eval_batches=1)
  assert fewer["eval_batches"] == 1 and fewer["eval_loss"] != result["eval_loss"]


def test_same_weights_under_other_attention(text_run):
  xla = evaluate.evaluate(text_run)["eval_loss"]
  jax_nn = evaluate.evaluate(text_run, {"model.attention_impl": "jax_nn"})["eval_loss"]
  assert jax_nn == pytest.approx(xla, abs=1e-4)
  # Hierarchical attention: the block-skipping path and its dense twin agree.
  hier = {"model.hierarchical.block": "16"}
  dense_twin = evaluate.evaluate(text_run, hier)["eval_loss"]
  blocked = evaluate.evaluate(text_run, {**hier, "model.attention_impl": "blocked"})["eval_loss"]
  assert blocked == pytest.approx(dense_twin, abs=1e-4)
  sparse = evaluate.evaluate(text_run, {"model.sparse.enabled": "True",
                                        "model.sparse.block_q": "16",
                                        "model.sparse.block_k": "16"})
  assert 0.0 < sparse["eval_attention/density"] < 1.0
  assert math.isfinite(sparse["eval_loss"]) and sparse["eval_loss"] != xla


def test_a_distillation_run_is_evaluated_without_its_teacher(text_run, tmp_path):
  def student(config):
    config["distill"].update(teacher="/no/such/teacher", loss="kl")
  distilled = _edited_copy(text_run, tmp_path / "student", student)
  assert evaluate.evaluate(distilled)["eval_loss"] == evaluate.evaluate(text_run)["eval_loss"]


def test_a_mixture_reports_every_source(text_run, tmp_path):
  def mixture(config):
    config["data"].update(source="mixture", mixture={
        "docs": {"source": "embedded", "path": "python_docs", "weight": 1.0},
        "code": {"source": "embedded", "path": "python_code", "weight": 1.0}})
  result = evaluate.evaluate(_edited_copy(text_run, tmp_path / "mix", mixture), eval_batches=1)
  per_source = [result[f"eval_loss/{name}"] for name in ("docs", "code")]
  assert min(per_source) <= result["eval_loss"] <= max(per_source)
  assert all(result[f"eval_bpb/{name}"] > 0 for name in ("docs", "code"))
  assert "  docs: eval_loss" in evaluate.report(result)


def test_synthetic_task_reports_accuracy(synthetic_run):
  logged = [r for r in records(synthetic_run) if "eval_loss" in r][-1]
  result = evaluate.evaluate(synthetic_run)
  np.testing.assert_allclose(result["eval_loss"], logged["eval_loss"], rtol=1e-6)
  assert result["eval_bpb"] is None  # no text, no bytes
  assert 0.0 <= result["exact_match"] <= 1.0 and 0.0 <= result["eval_accuracy"] <= 1.0
  assert result["exact_match"] <= result["eval_accuracy"]  # an exact row has every token right
  assert result["examples"] == 2 * 8  # eval_batches x batch_size: every row has answers
  assert "exact_match" in evaluate.report(result)


def _numpy_sums(logits, targets, weights) -> dict:
  exact = examples = 0
  for row_logits, row_targets, row_weights in zip(logits, targets, weights):
    supervised = [t for t in range(len(row_targets)) if row_weights[t] > 0]
    hits = [int(np.argmax(row_logits[t]) == row_targets[t]) for t in supervised]
    if supervised:
      examples += 1
      exact += all(hits)
  return {"exact": exact, "examples": examples}


def test_answer_sums_by_hand_and_against_numpy():
  # 3 rows x 4 positions, vocab 3; predictions are the one-hot positions.
  predicted = np.array([[0, 1, 2, 0], [1, 1, 1, 1], [2, 2, 0, 0]])
  logits = np.eye(3, dtype=np.float32)[predicted]
  targets = np.array([[0, 1, 0, 2], [1, 2, 1, 1], [0, 0, 0, 0]])
  weights = np.array([[1, 1, 0, 0],    # both answers right (wrong ones unsupervised): exact
                      [0, 1, 1, 0],    # one of two answers wrong: not exact
                      [0, 0, 0, 0]],   # no answer (padding row): not an example
                     np.float32)
  sums = {k: int(v) for k, v in evaluate.answer_sums(jnp.asarray(logits), jnp.asarray(targets),
                                                      jnp.asarray(weights)).items()}
  assert sums == {"exact": 1, "examples": 2}
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 6, 3)).astype(np.float32)
  targets = rng.integers(0, 3, size=(16, 6))
  weights = (rng.random((16, 6)) < 0.3).astype(np.float32)
  sums = evaluate.answer_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  assert {k: int(v) for k, v in sums.items()} == _numpy_sums(logits, targets, weights)


def test_bad_workdirs_and_overrides_are_config_errors(text_run, tmp_path):
  with pytest.raises(ConfigError, match=r"^--workdir='/no/run': no such directory\. Fix: "):
    evaluate.evaluate("/no/run")
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(os.path.join(text_run, "config.json"), untrained)
  with pytest.raises(ConfigError, match=r"has no checkpoints/ folder .*Fix: train it first"):
    evaluate.evaluate(str(untrained))
  with pytest.raises(ConfigError, match=r"its checkpoint \(step 30\) does not fit the config: "
                     r"params/block_0/attn/k is float32\[64, 2, 16\] in the checkpoint"):
    evaluate.evaluate(text_run, {"model.d_model": "32"})
  with pytest.raises(ConfigError, match=r"^--config.model.n_hedas='4': unknown config field"):
    evaluate.evaluate(text_run, {"model.n_hedas": "4"})
  with pytest.raises(ConfigError, match=r"^model.attention_impl='blocked': no attention "
                     r"implementation could run: blocked: hierarchical specs only"):
    evaluate.evaluate(text_run, {"model.attention_impl": "blocked"})
  with pytest.raises(ConfigError, match=r"^--eval_batches=0: must be >= 1"):
    evaluate.evaluate(text_run, eval_batches=0)


def _cli(*args) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "-m", "experiments.evaluate", *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_json_and_one_line_errors(text_run, tmp_path):
  ok = _cli(f"--workdir={text_run}", "--json", "--config.model.attention_impl=jax_nn")
  bad = _cli(f"--workdir={tmp_path / 'nothing'}", "--config.model.attention_impl=jax_nn")
  out, err = ok.communicate(timeout=300)
  assert ok.returncode == 0, err
  result = json.loads(out)  # stdout is the one object, nothing else
  expected = evaluate.evaluate(text_run, {"model.attention_impl": "jax_nn"})
  assert set(result) == set(expected) >= {"workdir", "step", "eval_loss", "perplexity",
                                          "eval_bpb"}
  assert result["step"] == STEPS
  np.testing.assert_allclose(result["eval_loss"], expected["eval_loss"], rtol=1e-6)
  out, err = bad.communicate(timeout=300)
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert bad.returncode == 2 and "Traceback" not in out + err, err
  assert len(errors) == 1 and "no such directory. Fix: pass the workdir" in errors[0], err


def test_eval_accuracy_is_the_weighted_top1_share():
  from lm.losses.cross_entropy import accuracy
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 7, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (3, 7))
  targets[0, :4] = logits[0, :4].argmax(-1)  # some hits for sure
  weights = (rng.random((3, 7)) < 0.6).astype(np.float32)
  weights[0, :4] = 1.0
  hits = [(logits[b, t].argmax() == targets[b, t]) for b in range(3) for t in range(7)
          if weights[b, t]]
  got = accuracy(jnp.asarray(logits), {"targets": jnp.asarray(targets),
                                       "weights": jnp.asarray(weights)})
  np.testing.assert_allclose(float(got), sum(hits) / len(hits), rtol=1e-6)
