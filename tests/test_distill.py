"""The distillation loss term (lm/losses/distill.py) and distillation runs: the KL, the
start from the teacher, learning under a sparse mask, cross-entropy fine-tuning,
resume, errors."""
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import records
from conftest import tiny as train_tiny

from core.errors import ConfigError
from lm import experiment, loop, losses
from lm.losses import distill

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
  loop.run(tiny(train__steps=120), str(workdir))
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



@pytest.mark.parametrize("loss,ce_weight", [("kl", 0.0), ("kl+ce", 0.5), ("ce", 1.0)])
def test_objective_weights(loss, ce_weight):
  """The objective is ce_weight * CE + T^2 KL (no KL for ``ce``), through the step's objective."""
  from lm.step import make_objective
  exp = experiment.build(tiny(distill__teacher="unused", distill__loss=loss,
                              distill__ce_weight=0.5, distill__temperature=2.0))
  (term,) = exp.terms
  assert term.ce_weight == ce_weight and losses.ce_weight(exp.terms) == ce_weight
  model = exp.state.init()
  teacher = {"params": jax.tree.map(lambda x: x * 0.5, model["params"]),
             "model_state": model["model_state"]}
  batch = exp.put_batch(next(exp.data.train_iterator()))
  aux = {"distill": teacher} if term.uses_teacher else {}
  with jax.set_mesh(exp.mesh):
    total, (out, _, metrics) = jax.jit(make_objective(exp.model.graphdef, exp.terms))(
        model["params"], model["model_state"], batch, aux)
  kl = float(metrics["distill"]["kl"]) if term.uses_teacher else 0.0
  assert (kl > 0) == term.uses_teacher
  assert float(total) == pytest.approx(ce_weight * float(out.ce) + 4.0 * kl, rel=1e-6)


def test_identical_student_starts_at_the_teacher(teacher, tmp_path):
  # sparse off: the student is the teacher's model; it starts from its weights.
  c = tiny(train__steps=2, train__log_every=1, distill__teacher=teacher)
  exp = experiment.build(c)
  abstract = {k: exp.state.abstract[k] for k in ("params", "model_state")}
  model, step, directory = distill.restore_teacher(teacher, abstract)
  assert step == 120 and directory == os.path.join(teacher, "checkpoints")
  state = exp.state.init(model)
  assert int(state["step"]) == 0
  for a, b in zip(jax.tree.leaves(model["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"])
             if x.ndim > 0)  # fresh moments
  # The checkpoints/ folder is accepted as well as the workdir.
  c.distill.teacher = os.path.join(teacher, "checkpoints")
  summary = loop.run(c, str(tmp_path))
  first = records(tmp_path)[0]
  assert first["step"] == 1 and first["distill/kl"] < 1e-6
  assert "attention/density" not in first
  assert summary["step"] == 2 and np.isfinite(summary["eval_loss"])


def test_sparse_student_learns_the_teacher(teacher, tmp_path):
  c = tiny(train__steps=30, train__log_every=5, train__eval_every=30, distill__teacher=teacher,
           optimizer__learning_rate=1e-3, **SPARSE)
  summary = loop.run(c, str(tmp_path))
  recs = records(tmp_path)
  train_recs = [r for r in recs if "loss" in r]
  assert train_recs[0]["distill/kl"] > 1e-3  # the mask changes the teacher's predictions
  assert all(r["attention/density"] == pytest.approx(8 / 36) for r in train_recs)
  assert "eval_loss" in recs[-1]  # the cross-entropy, as in every run
  # On the fixed eval batches the student moves towards the teacher.
  exp = experiment.build(c)
  abstract = {k: exp.state.abstract[k] for k in ("params", "model_state")}
  teacher_model, _, _ = distill.restore_teacher(teacher, abstract)
  kl = lambda m: loop.evaluate(exp, m["params"], m["model_state"],
                               aux={"distill": teacher_model})["eval_distill/kl"]
  before, after = kl(teacher_model), kl(summary["state"])
  assert before > 1e-3 and after < 0.75 * before, (before, after)
  assert recs[-1]["eval_distill/kl"] == pytest.approx(after, rel=1e-5)


def test_cross_entropy_fine_tuning_starts_at_the_teacher_without_its_forward(teacher, tmp_path):
  """``distill.loss=ce``: the sparse-attention ablation's control. The student starts from
  the teacher's weights and trains on its own cross-entropy; the step gets no teacher."""
  c = tiny(train__steps=3, train__log_every=1, distill__teacher=teacher, distill__loss="ce",
           **SPARSE)
  exp = experiment.build(c)
  assert exp.abstract_aux() == {}
  loop.run(c, str(tmp_path))
  recs = [r for r in records(tmp_path) if "loss" in r]
  assert all("distill/kl" not in r for r in recs)
  teacher_recs = {r["step"]: r for r in records(teacher) if "eval_loss" in r}
  # The first step's loss is the teacher's weights' loss on a training batch: far below
  # a fresh model's ~ln(384).
  assert recs[0]["loss"] < teacher_recs[120]["eval_loss"] + 0.5 < 5.0


def test_resume_is_exact_and_keeps_the_students_weights(teacher, tmp_path):
  c = tiny(train__steps=6, train__log_every=1, train__eval_every=3,
           train__checkpoint_every=100, distill__teacher=teacher, distill__loss="kl+ce",
           distill__ce_weight=0.3, **SPARSE)
  full = loop.run(c, str(tmp_path / "full"))
  assert loop.run(c, str(tmp_path / "split"), stop_at=3)["step"] == 3
  resumed = loop.run(c, str(tmp_path / "split"))  # resumes its own step 3, not the teacher
  assert resumed["step"] == 6
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda rs: [(r["step"], r.get("loss"), r.get("distill/kl"), r.get("eval_loss"))
                      for r in rs]
  assert strip(records(tmp_path / "full")) == strip(records(tmp_path / "split"))


def test_a_teacher_of_another_architecture(teacher, tmp_path):
  """An MoE linear/softmax hybrid learns from the dense softmax teacher (the run's own
  config.json gives its model); it starts fresh (the shapes differ). A smaller dense
  student of another width: colab/compress.ipynb."""
  students = {"hybrid_moe": dict(model__layer_pattern="LS", model__moe__num_experts=4,
                                 model__moe__top_k=2, model__moe__d_ff=48)}
  for name, kw in students.items():
    c = tiny(train__steps=6, train__log_every=1, train__eval_every=6, distill__teacher=teacher,
             optimizer__learning_rate=3e-3, **kw)
    exp = experiment.build(c)
    assert not exp.terms[0].same_shapes
    loop.run(c, str(tmp_path / name))
    recs = [r for r in records(tmp_path / name) if "loss" in r]
    assert recs[0]["loss"] > 5.0  # fresh, not the teacher's weights
    assert recs[-1]["distill/kl"] < 0.8 * recs[0]["distill/kl"], name


def test_ce_from_a_teacher_of_another_shape_is_plain_training(teacher, tmp_path):
  kw = dict(train__steps=2, train__log_every=1, train__eval_every=2, model__d_ff=96)
  loop.run(tiny(distill__teacher=teacher, distill__loss="ce", **kw), str(tmp_path / "ce"))
  loop.run(tiny(**kw), str(tmp_path / "plain"))
  drop = lambda rs: [{k: v for k, v in r.items() if "elapsed" not in k and "per_sec" not in k
                      and k != "loss_total"} for r in rs]  # loss_total: the term is on
  assert drop(records(tmp_path / "ce")) == drop(records(tmp_path / "plain"))


def test_errors(teacher, tmp_path):
  with pytest.raises(ConfigError, match=r"distill.teacher='.*nowhere': no such directory.*Fix:"):
    loop.run(tiny(distill__teacher=str(tmp_path / "nowhere")), str(tmp_path / "a"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match=r"distill.teacher=.*no checkpoint in .*Fix: train"):
    loop.run(tiny(distill__teacher=str(tmp_path / "empty")), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match=r"distill.teacher=.*the teacher's vocabulary is 384 "
                     r"tokens, the student's 512.*Fix:"):
    loop.run(tiny(distill__teacher=teacher, model__vocab_size=512), str(tmp_path / "c"))
  other = tmp_path / "bpe_teacher"
  other.mkdir()
  saved = json.loads((Path(teacher) / "config.json").read_text())
  saved["data"]["tokenizer"] = "bpe"
  (other / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match=r"distill.teacher=.*another tokenizer \('bpe', the "
                     r"student's 'byte'\).*Fix:"):
    loop.run(tiny(distill__teacher=str(other)), str(tmp_path / "c"))
  with pytest.raises(ConfigError, match=r"distill.loss='mse': unknown choice. Fix: use one of kl"):
    loop.run(tiny(distill__teacher=teacher, distill__loss="mse"), str(tmp_path / "d"))
  with pytest.raises(ConfigError, match=r"distill.temperature=0.0: must be a number > 0"):
    loop.run(tiny(distill__teacher=teacher, distill__temperature=0.0), str(tmp_path / "e"))
  assert not any((tmp_path / d).exists() for d in "abcde")
