"""DPO (lm/losses/dpo.py) and preference data (lm/data/preference.py): the loss against a
hand computation, log 2 and a zero margin at the reference, padding that cannot leak,
reward accuracy rising on the synthetic task, the rows' completion-only weights, clear
errors."""
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import records, tiny

from core.errors import ConfigError
from lm import experiment, loop, runs
from lm.config import resolve
from lm.data import make_data, preference
from lm.data.tokenizers import ByteTokenizer
from lm.losses import dpo


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("base"))
  loop.run(tiny(train__steps=2, train__eval_batches=1), workdir)
  return workdir


def _dpo(base, mode="dpo-full", **kw):
  fields = dict(train__steps=2, train__eval_every=2, train__eval_batches=1,
                data__batch_size=8, data__path="synthetic:upper", train__log_every=1)
  fields.update(kw)
  return tiny(f"experiments/configs/finetune.py:{base},{mode}", **fields)


def _hand(logits, targets, weights, beta, eps, kind):
  B, T, V = logits.shape
  seq = []
  for b in range(B):
    total = 0.0
    for t in range(T):
      row = logits[b, t].astype(np.float64)
      logz = math.log(sum(math.exp(v - row.max()) for v in row)) + row.max()
      if weights[b, t] > 0:
        total += weights[b, t] * (row[targets[b, t]] - logz)
    seq.append(total)
  return seq


def test_loss_equals_a_hand_computation():
  rng = np.random.default_rng(0)
  B, T, V = 4, 5, 7
  pol, ref = rng.normal(size=(B, T, V)), rng.normal(size=(B, T, V))
  targets = rng.integers(0, V, (B, T))
  weights = (rng.random((B, T)) > 0.3).astype(np.float32)
  p = _hand(pol, targets, weights, 0, 0, "")
  r = _hand(ref, targets, weights, 0, 0, "")
  for kind, beta, eps in (("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.1), ("ipo", 0.2, 0.0)):
    cfg = dpo.DpoConfig(loss=kind, beta=beta, label_smoothing=eps)
    losses, acc, margins = [], [], []
    for i in range(0, B, 2):
      h = (p[i] - r[i]) - (p[i + 1] - r[i + 1])
      sig = lambda z: 1 / (1 + math.exp(-z))
      if kind == "ipo":
        losses.append((h - 1 / (2 * beta)) ** 2)
      else:
        losses.append(-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)))
      acc.append(float(beta * (p[i] - r[i]) > beta * (p[i + 1] - r[i + 1])))
      margins.append(beta * h)
    pol_B = dpo.sequence_logps(jnp.asarray(pol, jnp.float32), jnp.asarray(targets),
                               jnp.asarray(weights))
    ref_B = dpo.sequence_logps(jnp.asarray(ref, jnp.float32), jnp.asarray(targets),
                               jnp.asarray(weights))
    loss, m = dpo.dpo_loss(pol_B, ref_B, cfg)
    np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(float(m["margin"]), np.mean(margins), rtol=1e-5, atol=1e-6)
    assert float(m["reward_accuracy"]) == np.mean(acc)


def test_padding_does_not_change_the_log_probs():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
  targets = rng.integers(0, 5, (2, 6))
  weights = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]], np.float32)
  short = dpo.sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  # pad positions: huge logits, other targets, weight 0
  big = np.concatenate([logits, 1e4 * rng.normal(size=(2, 3, 5)).astype(np.float32)], 1)
  tgt = np.concatenate([targets, rng.integers(0, 5, (2, 3))], 1)
  w = np.concatenate([weights, np.zeros((2, 3), np.float32)], 1)
  long = dpo.sequence_logps(jnp.asarray(big), jnp.asarray(tgt), jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(short), np.asarray(long))


def test_rows_weight_exactly_the_completion():
  tok = ByteTokenizer()
  inputs, targets, w = preference.encode(tok, "ab", "xyz", seq_len=10, bos=False)
  ids = list(b"ab") + list(b"xyz") + [tok.eos_id]
  assert list(inputs[:5]) == ids[:5] and list(targets[:5]) == ids[1:]
  np.testing.assert_array_equal(w, [0, 1, 1, 1, 1, 0, 0, 0, 0, 0])  # x y z eos
  assert np.all(inputs[6:] == tok.pad_id)
  # too long: prompt tokens go from the left, the completion stays whole
  inputs, targets, w = preference.encode(tok, "abcdefgh", "xyz", seq_len=6, bos=False)
  assert bytes(inputs[:3].tolist()) == b"fgh" and w.sum() == 4


def test_batches_interleave_pairs_from_jsonl_and_tasks(tmp_path):
  rows = [{"prompt": f"p{i}", "chosen": f" good{i}", "rejected": f" bad{i}"}
          for i in range(10)]
  path = tmp_path / "prefs.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  cfg = tiny(data__source="preference", data__path=str(path), data__batch_size=4,
             data__seq_len=16, data__val_fraction=0.2)
  data = make_data(resolve(cfg).data, seed=0)
  batch = next(data.train_iterator(0))
  tok = data.tokenizer
  text = lambda r: tok.decode([int(t) for t, w in zip(batch["targets"][r], batch["weights"][r])
                               if w > 0])
  for pair in range(2):
    good, bad = text(2 * pair), text(2 * pair + 1)
    assert good.startswith(" good") and bad.startswith(" bad") and good[5:] == bad[4:]
  held = data.eval_batches(1)[0]
  assert held["inputs"].shape == (4, 16)
  # the synthetic tasks: the same pair for the same (seed, stream, index), others differ
  words = preference.task_words()
  a = preference.synthetic_pair("synthetic:reverse", words, 0, 0, 3)
  assert a == preference.synthetic_pair("synthetic:reverse", words, 0, 0, 3)
  assert a != preference.synthetic_pair("synthetic:reverse", words, 0, 1, 3)
  assert a[1].split() == a[2].split()[::-1] and a[0].split()[1:-1] == a[2].split()
  u = preference.synthetic_pair("synthetic:upper", words, 0, 0, 3)
  assert u[1] == u[2].upper()


def test_at_the_reference_the_loss_is_log_2_and_the_margin_zero(base):
  """A frozen copy as the reference (full DPO) here; the LoRA base with adapters off in
  ``test_reward_accuracy_rises_on_the_synthetic_task`` (its first step)."""
  exp = experiment.build(_dpo(base, "dpo-full"))
  loaded, _ = runs.load_aux(exp)
  aux = {n: loaded[n] for n in exp.abstract_aux()}
  start, _ = runs.latest_model(base, {"params": exp.state.abstract["params"],
                                      "model_state": exp.state.abstract["model_state"]})
  state = exp.state.init(start)
  with jax.set_mesh(exp.mesh):
    batch = exp.put_batch(next(exp.data.train_iterator(0)))
    _, metrics = exp.train_step(state, batch, aux)
  m = jax.device_get(metrics["dpo"])
  assert abs(float(m["loss"]) - math.log(2)) < 1e-6, m
  # two programs (policy with gradients, reference without) round differently: ~1e-7
  assert abs(float(m["margin"])) < 1e-5 and abs(float(m["chosen_reward"])) < 1e-5, m
  assert abs(float(m["kl"])) < 1e-6
  # with LoRA the reference is the base itself: one copy of the weights, no second load
  exp = experiment.build(_dpo(base, "dpo"))
  loaded, notes = runs.load_aux(exp)
  aux = {n: loaded[n] for n in exp.abstract_aux()}
  assert aux["dpo"] is aux["lora"] and any("adapters off" in n for n in notes)


def test_padding_in_the_batch_does_not_leak(base):
  exp = experiment.build(_dpo(base))
  loaded, _ = runs.load_aux(exp)
  aux = {n: loaded[n] for n in exp.abstract_aux()}

  start, _ = runs.latest_model(base, {"params": exp.state.abstract["params"],
                                      "model_state": exp.state.abstract["model_state"]})
  batch = next(exp.data.train_iterator(0))
  noisy = dict(batch)
  pad = batch["weights"] == 0
  late = np.cumsum(batch["weights"], axis=1) == batch["weights"].sum(1, keepdims=True)
  fill = np.random.default_rng(0).integers(0, 256, batch["inputs"].shape).astype(np.int32)
  noisy["inputs"] = np.where(pad & late, fill, batch["inputs"])  # after the completion
  noisy["targets"] = np.where(pad, fill, batch["targets"])
  out = []
  for b in (batch, noisy):
    state = exp.state.init(start)
    with jax.set_mesh(exp.mesh):
      _, metrics = exp.train_step(state, exp.put_batch(b), aux)
    out.append(jax.device_get(metrics["dpo"]))
  for k in ("loss", "chosen_reward", "rejected_reward"):
    np.testing.assert_allclose(out[0][k], out[1][k], rtol=1e-6, atol=1e-7)


def test_reward_accuracy_rises_on_the_synthetic_task(base, tmp_path):
  work = str(tmp_path / "dpo")
  loop.run(_dpo(base, "dpo", train__steps=8, train__eval_every=8, train__eval_batches=2,
                optimizer__learning_rate=1e-2), work)
  recs = records(work)
  first = recs[0]  # step 1's metrics: before any update, the policy is the reference
  assert abs(first["dpo/loss"] - math.log(2)) < 1e-6 and abs(first["dpo/margin"]) < 1e-5
  final = [r for r in recs if "eval_dpo/reward_accuracy" in r][-1]
  assert final["eval_dpo/reward_accuracy"] >= 0.9, final
  assert final["eval_dpo/margin"] > 0 and final["eval_dpo/kl"] > 0


def test_clear_errors(base, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "chosen": "b"}\n')
  with pytest.raises(ConfigError, match=r"^data.path=.*bad.jsonl:1': the row has no "
                     r"'rejected' field"):
    experiment.build(_dpo(base, data__path=str(bad)))
  with pytest.raises(ConfigError, match=r"^data.batch_size=7: must be even"):
    resolve(_dpo(base, data__batch_size=7))
  with pytest.raises(ConfigError, match=r"^dpo.loss='sigmoid': needs preference pairs"):
    experiment.build(_dpo(base, data__source="embedded", data__path=""))
  other = tmp_path / "other"
  other.mkdir()
  with open(os.path.join(base, "config.json")) as f:
    saved = json.load(f)
  saved["data"]["tokenizer"] = "bpe"
  (other / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match=r"^dpo.reference=.*another tokenizer"):
    experiment.build(_dpo(base, dpo__reference=str(other)))
  shutil.rmtree(other)
