"""optim.namo against a slow NumPy twin that follows the NAMO / NAMO-D equations.

The twin (``_reference``) works in the paper's PyTorch layout (W is m x n with
n = input features, so it receives our ``(R, O)`` matrices transposed), loops
over columns for NAMO-D, keeps everything in float64 except Newton-Schulz,
which runs in float32 (or in emulated bf16: every op's result rounded to bf16,
what XLA does on the CPU) with the same op order as ``namo.newton_schulz``.

Tolerances (absolute, relative to the largest entry of the reference update):
with an fp32 Newton-Schulz on both sides the updates agree to ~3e-6 (matmul
summation order), checked at 1e-4. With bf16 on both sides (the jitted CPU
path), summation order flips single entries by ~1 bf16 ulp; measured ~3e-3,
checked at 1e-2 (an fp32 Newton-Schulz in place of bf16 fails it). Each of
these mutations of ``optim/namo.py`` fails the suite (checked by hand): mu1 in
place of mu2 in eq. 2, no NAMO-D clamp, ``lr`` decay without lr, no Nesterov,
no mu2 bias correction, s from min(m, n), the schedule read at t instead of
t - 1, no min(alpha, 1) in the decay, NAMO-D's v per matrix, 4 NS steps.
"""

import ml_dtypes
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from optim import chain
from optim import namo

B1, B2, EPS, LAM, SCALE = 0.95, 0.99, 1e-8, 0.1, 0.2
STEPS = 4
# name: (logical axes, shape, per_head). Matrix slices: see _matrices.
LEAVES = {
    "wide": (("embed", "mlp"), (12, 40), False),
    "tall": (("mlp", "embed"), (40, 12), False),
    "experts": (("expert", "embed", "mlp"), (3, 12, 20), False),
    "q": (("embed", "heads", "head_dim"), (12, 4, 6), False),
    "o_per_head": (("heads", "head_dim", "embed"), (4, 6, 12), True),
}
DIMS = {k: chain.muon_dimension_numbers(a, ph) for k, (a, _, ph) in LEAVES.items()}
STACKED = ("experts", "o_per_head")  # Leading axis = one matrix per slice.


def _matrices(name, x):
  """The (R, O) matrices (inputs x outputs) a leaf holds, in state order.

  Also splits a ``nu`` leaf into its per-matrix parts.
  """
  x = np.asarray(x, np.float64)
  if name in STACKED:
    return list(x)
  return [x.reshape(12, 24)] if name == "q" and x.ndim == 3 else [x]


def _lr(count):
  """A growing schedule: early steps unclamped, later ones hit min(., 1)."""
  return 0.02 * 5.0 ** count


# ------------------------------------------------------------- the twin


def _bf16(x):
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _ns_reference(x, ns_dtype):
  """Eq. 3: Frobenius-normalised quintic Newton-Schulz, 5 steps."""
  rnd = _bf16 if ns_dtype == "bfloat16" else (lambda a: np.float32(a))
  x = np.asarray(x, np.float32)
  x = x / (np.linalg.norm(x) + np.float32(1e-7))
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  x = rnd(x)
  a, b, c = (rnd(np.float32(k)) for k in namo.NS_COEFFS)
  for _ in range(5):
    gram = rnd(x @ x.T)
    poly = rnd(rnd(b * gram) + rnd(c * rnd(gram @ gram)))
    x = rnd(rnd(a * x) + rnd(poly @ x))
  return np.asarray(x.T if tall else x, np.float64)


def _reference(w_RO, grads_RO, *, per_column, c, nesterov, mode,
               ns_dtype="float32"):
  """NAMO / NAMO-D on one matrix, literally; returns (updates, v, alphas)."""
  w = np.asarray(w_RO, np.float64).T  # Paper layout: (m outputs, n inputs).
  m_mat = np.zeros_like(w)
  n_in = w.shape[1]
  v = np.zeros(n_in) if per_column else 0.0
  s = SCALE * np.sqrt(max(w.shape))
  updates, alphas = [], []
  for t, g in enumerate(grads_RO, start=1):
    g = np.asarray(g, np.float64).T
    lr = _lr(t - 1)
    m_mat = B1 * m_mat + (1 - B1) * g  # Eq. 1.
    n_mat = B1 * m_mat + (1 - B1) * g if nesterov else m_mat
    o = _ns_reference(n_mat, ns_dtype)  # Eq. 3.
    b = lr * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
    new = w.copy()
    if not per_column:
      v = B2 * v + (1 - B2) * np.sum(g ** 2)  # Eq. 2.
      alpha = b * np.linalg.norm(n_mat) / (np.sqrt(v) + EPS)  # Eq. 4.
      decay = LAM * min(alpha, 1.0) if mode == "adaptive" else lr * LAM
      new = new * (1 - decay)  # Eq. 5.
      new = new - min(alpha * s, 1.0) * o
      alphas.append(alpha)
    else:
      d = np.zeros(n_in)
      for j in range(n_in):
        v[j] = B2 * v[j] + (1 - B2) * np.sum(g[:, j] ** 2)
        d[j] = np.linalg.norm(n_mat[:, j]) / (np.sqrt(v[j]) + EPS)
      mean = d.mean()
      for j in range(n_in):
        dj = min(max(d[j], c * mean), mean / c)
        alpha = b * dj
        decay = LAM * min(alpha, 1.0) if mode == "adaptive" else lr * LAM
        new[:, j] = w[:, j] * (1 - decay)
        new[:, j] = new[:, j] - min(alpha * s, 1.0) * o[:, j]
        alphas.append(alpha)
    updates.append((new - w).T)
    w = new
  return updates, v, np.array(alphas)


# ------------------------------------------------------------ the fast path


def _inputs(seed):
  """Params and STEPS gradients whose input features have varying scales."""
  rng = np.random.default_rng(seed)
  params, grads = {}, [{} for _ in range(STEPS)]
  for name, (axes, shape, _) in LEAVES.items():
    params[name] = rng.standard_normal(shape).astype(np.float32)
    red = DIMS[name].reduction_axis
    for g in grads:
      col = np.exp(rng.standard_normal([shape[i] if i in red else 1
                                        for i in range(len(shape))]))
      g[name] = (col * rng.standard_normal(shape)).astype(np.float32)
  return params, grads


def _tx(per_column, c=0.5, **kw):
  kw = dict(b1=B1, b2=B2, eps=EPS, weight_decay=LAM, scale=SCALE,
            weight_dimension_numbers=DIMS, **kw)
  if per_column:
    return namo.namo_d(_lr, clamp_c=c, **kw)
  return namo.namo(_lr, **kw)


def _run(tx, params, grads, jit=False):
  """Applies ``tx`` over ``grads``; eager by default (op compilations are
  cached across tests, a jit of the whole update costs ~1.5 s each)."""
  state, out = tx.init(params), []
  update = jax.jit(tx.update) if jit else tx.update
  params = jax.tree.map(jnp.asarray, params)
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out, state


def _check(ours, state, params, grads, tol, **ref_kw):
  """Compares every matrix of every leaf with the twin; returns all alphas.

  ``tol``: allowed error relative to the largest entry of the reference.
  """
  alphas = []
  for name in LEAVES:
    w_slices = _matrices(name, params[name])
    g_slices = [_matrices(name, g[name]) for g in grads]
    u_slices = [_matrices(name, u[name]) for u in ours]
    nu_slices = _matrices(name, state.nu[name])
    for i, w in enumerate(w_slices):
      ref_u, ref_v, a = _reference(w, [g[i] for g in g_slices], **ref_kw)
      alphas.append(a)
      for step, (u, r) in enumerate(zip(u_slices, ref_u)):
        np.testing.assert_allclose(
            u[i], r, rtol=0, atol=tol * np.abs(r).max(),
            err_msg=f"{name}[{i}] step {step + 1}")
      np.testing.assert_allclose(nu_slices[i], ref_v, rtol=1e-5)
  return np.concatenate(alphas)


@pytest.mark.parametrize("per_column, c, nesterov, mode, seed", [
    (False, 1.0, True, "adaptive", 101), (False, 1.0, True, "lr", 102),
    (False, 1.0, False, "adaptive", 103), (False, 1.0, False, "lr", 104),
    (True, 1.0, True, "adaptive", 105), (True, 1.0, True, "lr", 106),
    (True, 1.0, False, "adaptive", 107), (True, 1.0, False, "lr", 108),
    (True, 0.5, True, "adaptive", 109), (True, 0.5, True, "lr", 110),
    (True, 0.5, False, "adaptive", 111), (True, 0.5, False, "lr", 112),
])
def test_matches_reference(per_column, c, nesterov, mode, seed):
  params, grads = _inputs(seed)
  tx = _tx(per_column, c, nesterov=nesterov, weight_decay_mode=mode,
           ns_dtype=jnp.float32)
  ours, state = _run(tx, params, grads)
  alphas = _check(ours, state, params, grads, 1e-4, per_column=per_column,
                  c=c, nesterov=nesterov, mode=mode)
  # Both sides of min(alpha s, 1) and of min(alpha, 1) were exercised.
  s_min, s_max = SCALE * np.sqrt(12), SCALE * np.sqrt(40)
  assert (alphas * s_min < 1).any() and (alphas * s_max > 1).any()
  assert (alphas < 1).any() and (alphas > 1).any()


def test_jitted_bf16_newton_schulz_matches_reference():
  """The production path: jitted, bf16 Newton-Schulz (default ``ns_dtype``)."""
  params, grads = _inputs(7)
  ours, state = _run(_tx(True), params, grads, jit=True)
  _check(ours, state, params, grads, 1e-2, per_column=True, c=0.5,
         nesterov=True, mode="adaptive", ns_dtype="bfloat16")


def test_state_v_is_fp32_per_matrix_or_per_input_feature():
  params, _ = _inputs(0)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  want = {  # NAMO: batch axes only; NAMO-D: batch then reduction axes.
      False: {"wide": (), "tall": (), "experts": (3,), "q": (),
              "o_per_head": (4,)},
      True: {"wide": (12,), "tall": (40,), "experts": (3, 12), "q": (12,),
             "o_per_head": (4, 6)},
  }
  for per_column, shapes in want.items():
    state = _tx(per_column).init(params)
    assert isinstance(state, namo.NamoState)
    assert {k: v.shape for k, v in state.nu.items()} == shapes
    assert all(v.dtype == jnp.float32 for v in state.nu.values())
    assert all(m.dtype == jnp.bfloat16 for m in state.mu.values())


def test_namo_d_with_c1_is_one_step_size_per_matrix():
  """c = 1: each d_j is clamped to mean(d), so the step is a scalar times O.

  Without decay, NAMO and NAMO-D share M, N and O, so NAMO-D(c=1)'s update is
  NAMO's times one factor per matrix: mean_j(d_j) / (||N|| / sqrt(v)), which is
  not 1 (a mean of ratios, not a ratio of norms). With c < 1 the factor varies
  across input features.
  """
  params, grads = _inputs(3)

  def run(per_column, c=1.0):
    kw = dict(weight_decay=0.0, ns_dtype=jnp.float32,
              weight_dimension_numbers=DIMS)
    tx = (namo.namo_d(0.01, clamp_c=c, **kw) if per_column
          else namo.namo(0.01, **kw))
    return _run(tx, params, grads)[0]

  base, uniform, clamped = run(False, 1.0), run(True, 1.0), run(True, 0.5)
  for step in range(1, STEPS):
    ratio = np.asarray(uniform[step]["wide"]) / np.asarray(base[step]["wide"])
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-4)
    assert abs(ratio.mean() - 1) > 1e-3
    per_row = (np.asarray(clamped[step]["wide"])
               / np.asarray(base[step]["wide"])).mean(axis=1)
    assert per_row.std() / per_row.mean() > 1e-2


# ------------------------------------------------------------------- errors


def test_update_without_params_raises():
  tx = namo.namo(0.01)
  params = {"w": jnp.ones((4, 6))}
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize("build, match", [
    (lambda: namo.namo(0.01, weight_decay_mode="l2"), "weight_decay_mode"),
    (lambda: namo.namo_d(0.01, clamp_c=0.0), "clamp_c"),
    (lambda: namo.namo_d(0.01, clamp_c=1.5), "clamp_c"),
    (lambda: namo.namo(0.01, b2=1.0), "b2"),
])
def test_bad_arguments_raise(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_dimension_tree_must_match_params():
  tx = namo.namo(0.01, weight_dimension_numbers={"a": DIMS["wide"]})
  with pytest.raises(ValueError, match="shaped like the params"):
    tx.init({"a": jnp.ones((4, 6)), "b": jnp.ones((4, 6))})


@pytest.mark.parametrize("shape, seed", [((64, 128), 21), ((128, 48), 22)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_newton_schulz_is_near_orthogonal(shape, seed, dtype):
  """Jordan's quintic does not converge to exactly 1: singular values land in ~[0.68, 1.13]."""
  x = np.random.default_rng(seed).standard_normal(shape)
  s = np.linalg.svd(np.asarray(namo.newton_schulz(jnp.asarray(x, jnp.float32), 5, namo.NS_COEFFS,
                                                  dtype), np.float32), compute_uv=False)
  assert 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())
  # Fewer steps leave the smallest directions far from 1: the check can fail.
  s1 = np.linalg.svd(np.asarray(namo.newton_schulz(jnp.asarray(x, jnp.float32), 1, namo.NS_COEFFS,
                                                   jnp.float32)), compute_uv=False)
  assert s1.min() < 0.6


def test_newton_schulz_on_ill_conditioned_matrix():
  """Condition number 100: every direction reaches the band; at 1e3 the tail lags (5 steps)."""
  rng = np.random.default_rng(9)
  u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
  v, _ = np.linalg.qr(rng.standard_normal((128, 64)))
  for cond, share in ((1e2, 1.0), (1e3, 0.75)):
    x = (u * np.logspace(0, -np.log10(cond), 64)) @ v.T
    s = np.linalg.svd(np.asarray(namo.newton_schulz(jnp.asarray(x, jnp.float32)), np.float32),
                      compute_uv=False)
    assert s.max() < 1.25 and np.mean((s > 0.6) & (s < 1.25)) >= share, (cond, s.min())
