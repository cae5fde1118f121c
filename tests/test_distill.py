"""lm/distill.py and distillation runs of lm/train.py: the KL, the start from the
teacher, learning under a sparse mask, resume, errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import distill, train
from lm.errors import ConfigError
from test_train import records
from test_train import tiny as train_tiny

SPARSE = dict(model__sparse__enabled=True, model__sparse__block_q=16,
              model__sparse__block_k=16, model__sparse__top_k=0.0, model__sparse__top_p=0.0,
              model__sparse__sink_blocks=0)  # the diagonal blocks only: 8 of 36 kept


def tiny(**overrides):
  c = train_tiny(**overrides)
  if "data__seq_len" not in overrides:
    c.data.seq_len = 128  # 8 blocks of 16 per row
  return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A dense tiny model trained long enough for its attention to matter."""
  workdir = tmp_path_factory.mktemp("teacher")
  train.run(tiny(train__steps=120), str(workdir))
  return str(workdir)


def _numpy_kl(t, s, w, temperature):
  def log_softmax(x):
    x = x / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  lt, ls = log_softmax(t.astype(np.float64)), log_softmax(s.astype(np.float64))
  kl = (np.exp(lt) * (lt - ls)).sum(-1)
  return (kl * w).sum() / max(w.sum(), 1.0)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_numpy(temperature):
  rng = np.random.default_rng(0)
  t = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  s = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  w = (rng.random((2, 5)) > 0.3).astype(np.float32)
  got = distill.kl_divergence(jnp.asarray(t), jnp.asarray(s), jnp.asarray(w), temperature)
  np.testing.assert_allclose(float(got), _numpy_kl(t, s, w, temperature), rtol=1e-5)
  # bf16 logits are computed in fp32 all the same.
  t16 = jnp.asarray(t, jnp.bfloat16)
  np.testing.assert_allclose(
      float(distill.kl_divergence(t16, jnp.asarray(s), jnp.asarray(w), temperature)),
      _numpy_kl(np.asarray(t16.astype(jnp.float32)), s, w, temperature), rtol=1e-5)
  assert float(distill.kl_divergence(jnp.asarray(t), jnp.asarray(t), jnp.asarray(w))) == 0.0
  # The teacher side has no gradient; the student's is softmax(s/T) - softmax(t/T) over T.
  g = jax.grad(lambda x: distill.kl_divergence(jnp.asarray(t), x, jnp.ones((2, 5)),
                                               temperature))(jnp.asarray(s))
  soft = lambda x: np.exp(x / temperature) / np.exp(x / temperature).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(g), (soft(s) - soft(t)) / temperature / 10, atol=1e-6)
  cfg = tiny(distill__loss="kl+ce", distill__ce_weight=0.5,
             distill__temperature=temperature).distill
  assert float(distill.objective(jnp.float32(0.2), jnp.float32(3.0), cfg)) == pytest.approx(
      temperature ** 2 * 0.2 + 1.5)
  cfg.loss = "kl"
  assert float(distill.objective(jnp.float32(0.2), jnp.float32(3.0), cfg)) == pytest.approx(
      temperature ** 2 * 0.2)


def test_identical_student_starts_at_the_teacher(teacher, tmp_path):
  # sparse off: the student is the teacher's model; it starts from its weights.
  c = tiny(train__steps=2, train__log_every=1, distill__teacher=teacher)
  exp = train.build(c)
  params, step, directory = distill.restore_teacher(exp.config, exp.abstract_state["params"])
  assert step == 120 and directory == os.path.join(teacher, "checkpoints")
  state = exp.init_state(params)
  assert int(state["step"]) == 0
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"])
             if x.ndim > 0)  # fresh moments
  # The checkpoints/ folder is accepted as well as the workdir.
  c.distill.teacher = os.path.join(teacher, "checkpoints")
  summary = train.run(c, str(tmp_path))
  first = records(tmp_path)[0]
  assert first["step"] == 1 and first["distill/kl"] < 1e-6
  assert "attention/density" not in first
  assert summary["step"] == 2 and np.isfinite(summary["eval_loss"])


def test_sparse_student_learns_the_teacher(teacher, tmp_path):
  c = tiny(train__steps=30, train__log_every=5, train__eval_every=30, distill__teacher=teacher,
           optimizer__learning_rate=1e-3, **SPARSE)
  summary = train.run(c, str(tmp_path))
  recs = records(tmp_path)
  train_recs = [r for r in recs if "loss" in r]
  assert train_recs[0]["distill/kl"] > 1e-3  # the mask changes the teacher's predictions
  assert all(r["attention/density"] == pytest.approx(8 / 36) for r in train_recs)
  assert "eval_loss" in recs[-1]  # the cross-entropy, as in every run
  # On the fixed eval batches the student moves towards the teacher.
  exp = train.build(c)
  params, _, _ = distill.restore_teacher(exp.config, exp.abstract_state["params"])
  before = distill.evaluate_kl(exp, params, params)
  after = distill.evaluate_kl(exp, summary["state"]["params"], params)
  assert before > 1e-3 and after < 0.75 * before, (before, after)


def test_resume_is_exact_and_keeps_the_students_weights(teacher, tmp_path):
  c = tiny(train__steps=6, train__log_every=1, train__eval_every=3,
           train__checkpoint_every=100, distill__teacher=teacher, distill__loss="kl+ce",
           distill__ce_weight=0.3, **SPARSE)
  full = train.run(c, str(tmp_path / "full"))
  assert train.run(c, str(tmp_path / "split"), stop_at=3)["step"] == 3
  resumed = train.run(c, str(tmp_path / "split"))  # resumes its own step 3, not the teacher
  assert resumed["step"] == 6
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda rs: [(r["step"], r.get("loss"), r.get("distill/kl"), r.get("eval_loss"))
                      for r in rs]
  assert strip(records(tmp_path / "full")) == strip(records(tmp_path / "split"))


def test_errors(teacher, tmp_path):
  with pytest.raises(ConfigError, match=r"distill.teacher='.*nowhere': no such directory.*Fix:"):
    train.run(tiny(distill__teacher=str(tmp_path / "nowhere")), str(tmp_path / "a"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match=r"distill.teacher=.*no checkpoint in .*Fix: train"):
    train.run(tiny(distill__teacher=str(tmp_path / "empty")), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match=r"model.d_ff=96: the teacher .* has model.d_ff=192.*Fix:"):
    train.run(tiny(distill__teacher=teacher, model__d_ff=96), str(tmp_path / "c"))
  with pytest.raises(ConfigError, match=r"distill.loss='mse': unknown choice. Fix: use one of kl"):
    train.run(tiny(distill__teacher=teacher, distill__loss="mse"), str(tmp_path / "d"))
  with pytest.raises(ConfigError, match=r"distill.temperature=0.0: must be > 0"):
    train.run(tiny(distill__teacher=teacher, distill__temperature=0.0), str(tmp_path / "e"))
