"""The Deep-Thinking Ratio (lm/decode/dtr.py): the streamed JSD against its dense twin,
a hand-computed example, the properties of the JSD, the threshold and the mask."""
import fractions
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import ConfigError
from lm.decode import dtr

NEG = -1e4  # a logit whose probability underflows to exactly 0 in fp32
LOG2_3 = math.log2(3.0)


def _identity(x):
  return x


SCALE_D = 1.0 + 0.5 * np.random.default_rng(0).standard_normal(16).astype(np.float32)


def _rms_norm(x):
  """An RMSNorm with a non-trivial scale, as the model's final norm."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * SCALE_D


# Jitted once per (norm_fn, chunk, shapes): eager dispatch of the loops is slow on CPU.
_streamed = jax.jit(dtr.jsd_streamed, static_argnums=(1,), static_argnames=("chunk",))
_dense = jax.jit(dtr.jsd_dense, static_argnums=(1,))
_dtr = jax.jit(dtr.dtr, static_argnums=(1,), static_argnames=("chunk", "g", "rho"))


def _numpy_jsd_bits(p, q):
  """JSD(p, q) in bits with explicit sums, written independently of the module."""
  total = 0.0
  for pv, qv in zip(p, q):
    mv = 0.5 * (pv + qv)
    if pv > 0:
      total += 0.5 * pv * math.log2(pv / mv)
    if qv > 0:
      total += 0.5 * qv * math.log2(qv / mv)
  return total


def _lens(p_LNV, chunk=2):
  """jsd_streamed with norm = head = identity and hidden = log p (log 0 -> NEG)."""
  p_LNV = np.asarray(p_LNV, np.float64)
  hidden = np.where(p_LNV > 0, np.log(np.where(p_LNV > 0, p_LNV, 1.0)), NEG)
  V = p_LNV.shape[-1]
  return _streamed(jnp.asarray(hidden, jnp.float32), _identity,
                   jnp.eye(V, dtype=jnp.float32), chunk=chunk)


# -- 1. streamed == dense ------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 10, 64])
def test_streamed_matches_dense(seed, chunk):
  L, N, D, V = 5, 7, 16, 37  # 37 is no multiple of 10; 64 is over the vocabulary
  k1, k2 = jax.random.split(jax.random.key(seed))
  hidden_LND = 2.0 * jax.random.normal(k1, (L, N, D))
  head_DV = jax.random.normal(k2, (D, V))
  dense = _dense(hidden_LND, _rms_norm, head_DV)
  streamed = _streamed(hidden_LND, _rms_norm, head_DV, chunk=chunk)
  assert streamed.shape == (L, N) and streamed.dtype == jnp.float32
  np.testing.assert_allclose(streamed, dense, atol=1e-5)
  assert float(jnp.max(dense)) > 0.1  # the layers do disagree: the check is not vacuous
  np.testing.assert_allclose(streamed[-1], 0.0, atol=1e-6)


def test_streamed_jits_and_matches_numpy():
  L, N, D, V = 3, 4, 8, 11
  k1, k2 = jax.random.split(jax.random.key(7))
  hidden_LND = jax.random.normal(k1, (L, N, D))
  head_DV = 3.0 * jax.random.normal(k2, (D, V))
  fn = jax.jit(functools.partial(dtr.jsd_streamed, norm_fn=_identity, chunk=4))
  got = fn(hidden_LND, head_DV=head_DV)
  logits = np.asarray(hidden_LND, np.float64) @ np.asarray(head_DV, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = [[_numpy_jsd_bits(p[-1, n], p[l, n]) for n in range(N)] for l in range(L)]
  np.testing.assert_allclose(got, want, atol=1e-5)


# -- 2. a hand-computed example ------------------------------------------------------

# 4 layers, 5 tokens, V = 3; the last layer is each token's final distribution.
# threshold = ceil(0.85 * 4) = 4: deep means settling only at the last layer.
U = 1.0 / 3.0
HAND_LNV = np.array([
    # A        B                C              D                E
    [[.2, .3, .5], [1, 0, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]],     # layer 1
    [[.2, .3, .5], [.5, 0, .5], [0, 1, 0], [U, U, U], [0, 0, 1]],   # layer 2
    [[.2, .3, .5], [0, 0, 1], [U, U, U], [0, 0, 1], [.5, 0, .5]],   # layer 3
    [[.2, .3, .5], [0, 0, 1], [0, 0, 1], [.5, .5, 0], [0, 1, 0]],   # layer 4 (final)
])
# D by hand, from JSD = 1/2 KL(P||M) + 1/2 KL(Q||M) in bits:
# B, layer 2: P = (0,0,1), Q = (.5,0,.5), M = (.25,0,.75):
#   KL(P||M) = log2(4/3) = 2 - log2 3, KL(Q||M) = .5 + .5 log2(2/3) = 1 - .5 log2 3
#   -> 1.5 - 0.75 log2 3 = 0.3113 <= 0.5: B settles at layer 2.
# C, layer 3: P = (0,0,1), Q = uniform, M = (1/6,1/6,2/3):
#   KL(P||M) = log2(3/2), KL(Q||M) = 2/3 - 1/3 -> 0.5 log2 3 - 1/3 = 0.4591: layer 3.
# D, layer 2: P = (.5,.5,0), Q = uniform, M = (5/12,5/12,1/6):
#   KL(P||M) = log2(6/5), KL(Q||M) = 2/3 log2(4/5) + 1/3 -> 0.1909: settles at layer 2
#   although layer 3 is disjoint again (1 bit): the *first* layer within g counts.
# Disjoint supports give 1 bit; E is disjoint from its final until the end: deep.
JSD_B2 = 1.5 - 0.75 * LOG2_3
JSD_C3 = 0.5 * LOG2_3 - 1.0 / 3.0
JSD_D2 = 0.5 * (math.log2(6 / 5) + 2 / 3 * math.log2(4 / 5) + 1 / 3)
HAND_JSD_LN = np.array([
    [0, 1, 1, 1, 1],
    [0, JSD_B2, 1, JSD_D2, 1],
    [0, 0, JSD_C3, 1, 1],
    [0, 0, 0, 0, 0],
])


def test_hand_values_are_what_the_independent_formula_says():
  for l in range(4):
    for n in range(5):
      assert _numpy_jsd_bits(HAND_LNV[-1, n], HAND_LNV[l, n]) == pytest.approx(
          HAND_JSD_LN[l, n], abs=1e-12)
  assert JSD_B2 == pytest.approx(0.31128, abs=1e-5)
  assert JSD_C3 == pytest.approx(0.45915, abs=1e-5)
  assert JSD_D2 == pytest.approx(0.19087, abs=1e-5)


@pytest.mark.parametrize("chunk", [2, 1024])  # 2: the last chunk overlaps the first
def test_hand_example(chunk):
  jsd_LN = _lens(HAND_LNV, chunk=chunk)
  np.testing.assert_allclose(jsd_LN, HAND_JSD_LN, atol=1e-6)
  assert np.all(np.isfinite(jsd_LN))  # the zero probabilities (0 log 0) did not leak NaN
  out = dtr.deep_thinking_ratio(jsd_LN)
  assert out["threshold_layer"] == 4
  np.testing.assert_array_equal(out["settling_depth"], [1, 2, 3, 2, 4])
  np.testing.assert_array_equal(out["deep"], [False, False, False, False, True])
  assert float(out["ratio"]) == pytest.approx(0.2)
  assert out["settling_depth"].dtype == jnp.int32


def test_hand_example_dense_and_dtr():
  hidden = np.where(HAND_LNV > 0, np.log(np.where(HAND_LNV > 0, HAND_LNV, 1.0)), NEG)
  hidden = jnp.asarray(hidden, jnp.float32)
  eye = jnp.eye(3, dtype=jnp.float32)
  np.testing.assert_allclose(_dense(hidden, _identity, eye), HAND_JSD_LN, atol=1e-6)
  out = _dtr(hidden, _identity, eye, chunk=2)
  np.testing.assert_allclose(out["jsd"], HAND_JSD_LN, atol=1e-6)
  assert float(out["ratio"]) == pytest.approx(0.2)
  # g = 1 admits every layer (JSD <= 1 bit): every token settles at layer 1.
  assert float(_dtr(hidden, _identity, eye, chunk=2, g=1.0)["ratio"]) == 0.0
  # g near 0 admits only exact agreement: B settles at 3; C, D and E at 4.
  np.testing.assert_array_equal(dtr.settling_depth(out["jsd"], g=1e-6), [1, 3, 4, 4, 4])


# -- 3. properties of the JSD --------------------------------------------------------

def _random_dists(seed, n, v, sparse=0.3):
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(v, 0.5), size=n)
  p = np.where(rng.random((n, v)) < sparse, 0.0, p)
  p[:, 0] += 1e-3  # every row keeps some mass
  return p / p.sum(-1, keepdims=True)


def test_jsd_properties():
  P, Q = _random_dists(0, 64, 9), _random_dists(1, 64, 9)
  pq = _lens(np.stack([P, Q]), chunk=4)[0]  # JSD(Q, P)
  qp = _lens(np.stack([Q, P]), chunk=4)[0]  # JSD(P, Q)
  np.testing.assert_allclose(pq, qp, atol=1e-6)  # symmetric
  assert float(jnp.min(pq)) >= 0.0 and float(jnp.max(pq)) <= 1.0 + 1e-6
  want = [_numpy_jsd_bits(P[n], Q[n]) for n in range(64)]
  np.testing.assert_allclose(pq, want, atol=1e-5)
  np.testing.assert_allclose(_lens(np.stack([P, P]), chunk=4)[0], 0.0, atol=1e-6)


def test_jsd_is_one_bit_for_disjoint_supports():
  P, Q = _random_dists(2, 64, 9), _random_dists(3, 64, 9)
  P[:, 4:], Q[:, :4] = 0.0, 0.0  # P on the first 4 words, Q on the other 5
  Q[:, 4] += 1e-3
  P, Q = P / P.sum(-1, keepdims=True), Q / Q.sum(-1, keepdims=True)
  np.testing.assert_allclose(_lens(np.stack([P, Q]), chunk=4)[0], 1.0, atol=1e-6)


# -- 4. threshold and mask -----------------------------------------------------------

def test_threshold_layer():
  assert dtr.threshold_layer(12) == 11
  assert dtr.threshold_layer(20) == 17  # 0.85 * 20 = 17.000000000000004 in floats
  assert dtr.threshold_layer(4) == 4
  assert dtr.threshold_layer(1) == 1
  assert dtr.threshold_layer(10, 1.0) == 10
  for L in range(1, 200):
    assert dtr.threshold_layer(L) == math.ceil(fractions.Fraction(17, 20) * L)
    assert dtr.threshold_layer(L, 0.5) == math.ceil(L / 2)
  jsd_LN = jnp.zeros((20, 3))
  assert dtr.deep_thinking_ratio(jsd_LN)["threshold_layer"] == 17


def test_mask():
  jsd_LN = jnp.asarray(HAND_JSD_LN, jnp.float32)  # deep: only token E (the last)
  ratio = lambda m: float(dtr.deep_thinking_ratio(jsd_LN, mask_N=jnp.asarray(m))["ratio"])
  assert ratio([True] * 5) == pytest.approx(0.2)
  assert ratio([True, True, True, True, False]) == 0.0
  assert ratio([False, False, False, True, True]) == pytest.approx(0.5)
  assert ratio([False, False, False, False, True]) == 1.0
  assert ratio([False] * 5) == 0.0  # no token: 0, not NaN
  fn = jax.jit(lambda j, m: dtr.deep_thinking_ratio(j, mask_N=m)["ratio"])
  assert float(fn(jsd_LN, jnp.array([0, 1, 0, 0, 1], bool))) == pytest.approx(0.5)


def test_errors_say_how_to_fix():
  h, head = jnp.zeros((2, 3, 4)), jnp.zeros((4, 5))
  cases = [
      lambda: dtr.jsd_streamed(h[0], _identity, head),
      lambda: dtr.jsd_streamed(h, _identity, jnp.zeros((5, 4))),
      lambda: dtr.jsd_streamed(h, _identity, head, chunk=0),
      lambda: dtr.jsd_dense(h, _identity, jnp.zeros((3, 5))),
      lambda: dtr.threshold_layer(12, 0.0),
      lambda: dtr.threshold_layer(12, 1.5),
      lambda: dtr.settling_depth(jnp.zeros((2, 3)), g=-0.1),
      lambda: dtr.deep_thinking_ratio(jnp.zeros((2, 3)), mask_N=jnp.ones((4,), bool)),
  ]
  for case in cases:
    with pytest.raises(ConfigError, match="Fix:"):
      case()
