"""experiments.sparse_hybrid's measurements: per-row errors and entropies against a
numpy twin, the entropy split, the bisection and the q/k/v capture."""
import dataclasses

import jax
import numpy as np
from conftest import tiny

from attention import sparse
from experiments import sparse_hybrid as sh
from lm import config as config_lib
from lm.model import apply, build_model


def _numpy_rows(q, k, v, mask, b):
  """The twin: loops over rows; dense and block-masked causal softmax attention."""
  B, T, N, H = q.shape
  G = N // k.shape[2]
  Q = T // b
  ent, err, ref = (np.zeros((B, N, Q)) for _ in range(3))
  for bi in range(B):
    for n in range(N):
      logits = q[bi, :, n] @ k[bi, :, n // G].T / np.sqrt(H)
      causal = np.tril(np.ones((T, T), bool))
      kept = np.kron(mask[bi, n // G], np.ones((b, b))).astype(bool) & causal
      outs = []
      for allowed in (causal, kept):
        p = np.exp(np.where(allowed, logits, -np.inf) - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        outs.append((p @ v[bi, :, n // G], p))
      (dense, p), (masked, _) = outs
      for i in range(Q):
        rows = slice(i * b, (i + 1) * b)
        mass = p[rows].reshape(b, Q, b).sum(-1).mean(0)[:i + 1]
        ent[bi, n, i] = (-(mass * np.log(mass)).sum() / np.log(i + 1)) if i else np.nan
        err[bi, n, i] = np.abs(masked[rows] - dense[rows]).sum()
        ref[bi, n, i] = np.abs(dense[rows]).sum()
  return ent, err, ref


def test_row_stats_match_a_numpy_twin():
  B, T, N, K, H, b = 2, 32, 4, 2, 8, 8
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (B, T, N, H)) * 2
  k = jax.random.normal(ks[1], (B, T, K, H))
  v = jax.random.normal(ks[2], (B, T, K, H))
  spec = sh.block_spec(sh.sparse_fields("top_p", 0.5), block=b)
  mask = sparse.predict_block_mask(q, k, spec)
  ent, err, ref, n_valid = sh.row_stats(q, k, v, {"m": (mask, spec)})
  want = _numpy_rows(*(np.asarray(x, np.float64) for x in (q, k, v, mask)), b)
  np.testing.assert_allclose(ent, want[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(err["m"], want[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ref, want[2], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(n_valid, [1, 2, 3, 4])
  assert float(np.asarray(err["m"]).sum()) > 0  # the mask drops something


def test_rel_l1_by_entropy_splits_at_the_threshold():
  entropy = np.array([[[np.nan, 0.2, 0.9, 0.5]]])
  err = np.array([[[5.0, 1.0, 2.0, 3.0]]])
  ref = np.array([[[1.0, 10.0, 10.0, 20.0]]])
  n_valid = np.array([1, 16, 20, 30])  # the first row is left out (MIN_VALID = 16)
  got = sh.rel_l1_by_entropy(entropy, err, ref, n_valid, threshold=0.5)
  assert got == {"all": 6 / 40, "uniform": 5 / 30, "skewed": 1 / 10}


def test_bisect_finds_the_closest_step_and_refuses_out_of_reach():
  step = lambda x: np.floor(x * 10) / 10  # 0, 0.1, ..., 1
  x, f = sh.bisect(step, 0.32)
  assert f == 0.3 and 0.3 <= x < 0.4
  assert sh.bisect(step, 1.5) is None


def test_calibrate_meets_the_target_with_the_models_rule():
  B, T, N, K, H = 1, 256, 2, 1, 8
  ks = jax.random.split(jax.random.key(1), 2)
  qkv = [(jax.random.normal(ks[0], (B, T, N, H)) * 3, jax.random.normal(ks[1], (B, T, K, H)),
          None)]
  for rule in sh.RULES:
    c = sh.calibrate(qkv, rule, 0.3)
    assert abs(c["density"] - 0.3) < 0.02, (rule, c)
    assert c["density"] == sh.density(qkv, sh.block_spec(c["fields"]))
  assert sh.calibrate(qkv, "top_p", 0.01) is None  # below the diagonal's share


def test_qkv_capture_hands_out_each_layers_q_k_v():
  c = config_lib.resolve(tiny())
  built = build_model(dataclasses.replace(c.model, vocab_size=384), seed=0)
  tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 256)
  plain, stats, _ = apply(built.graphdef, built.params, built.state, tokens)
  assert "qkv" not in stats
  logits, stats, _ = apply(*sh.with_qkv_capture(built.graphdef, built.params, built.state),
                           tokens)
  np.testing.assert_array_equal(logits, plain)
  m = c.model
  assert sorted(stats["qkv"]) == [f"block_{i}" for i in range(m.n_layers)]
  q = stats["qkv"]["block_0"]["q"]
  assert q.shape == (2, 64, m.n_heads, m.d_model // m.n_heads)
  assert stats["qkv"]["block_0"]["k"].shape == (2, 64, m.n_kv_heads, m.d_model // m.n_heads)


def test_long_configs_have_128_key_blocks_and_the_records_masks():
  from experiments.configs import sparse_attention as sa
  teacher, student = (config_lib.resolve(sa.get_config(a)) for a in ("teacher_long",
                                                                       "ablation_long"))
  assert teacher.model.sparse is None and teacher.data.seq_len == 2048
  bs = student.model.sparse
  assert student.data.seq_len // bs.block_k == 128
  assert (bs.top_k, bs.top_p, bs.sink_blocks) == (0.03, sa.HYBRID["union"]["top_p"], 0)
