"""attention/: the reference against a naive per-head loop; the registry's fallback and
errors; RoPE. (Every backend against the reference: test_attention_conformance.py.)"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import ops
from attention.reference import attend_reference
from attention.rope import apply_rope, rope_tables
from attention.spec import AttentionSpec
from core.errors import Unsupported

# Eager ops compile one by one; these checks are one compiled program each instead,
# at XLA's cheapest setting (tiny programs: compile time is the cost).
fast_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                               "xla_llvm_disable_expensive_passes": True})


def naive_attention(q, k, v, causal, window, segment_ids=None):
  """One head at a time (vmapped over batch and heads), kv heads repeated, the mask
  built from its definition, softmax with jax.nn.softmax."""
  B, T, N, H = q.shape
  k, v = (jnp.repeat(x, N // k.shape[2], axis=2) for x in (k, v))  # query head n -> n // G
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  allowed = np.ones((T, T), bool)
  if causal:
    allowed &= j <= i
  if window:
    allowed &= i - j < window
  seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)

  def head(q_TH, k_TH, v_TH, seg_T):
    logits = q_TH.astype(jnp.float32) @ k_TH.astype(jnp.float32).T / np.sqrt(H)
    ok = allowed & (seg_T[:, None] == seg_T[None, :])
    logits = jnp.where(ok, logits, -1e30)
    return jax.nn.softmax(logits, axis=-1) @ v_TH.astype(jnp.float32)

  per_head = jax.vmap(head, in_axes=(1, 1, 1, None), out_axes=1)  # over heads
  return jax.vmap(per_head)(q, k, v, seg)  # over the batch


def _normal(seed, *shape):
  """Standard normal fp32 from ``np.random.default_rng(seed)`` (no per-shape compiles)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _qkv(seed, B=2, T=24, N=4, K=2, H=16):
  return (_normal(seed, B, T, N, H), _normal(seed + 1000, B, T, K, H),
          _normal(seed + 2000, B, T, K, H))


@pytest.mark.parametrize("seed,causal,window,heads", [(10, True, 0, (4, 4)), (11, True, 0, (4, 2)),
                                                      (12, True, 5, (4, 1)), (13, False, 0, (6, 3)),
                                                      (14, False, 7, (4, 2))])
def test_reference_matches_naive_forward_and_grad(seed, causal, window, heads):
  N, K = heads
  q, k, v = _qkv(seed, N=N, K=K)
  spec = AttentionSpec(causal=causal, sliding_window=window)
  w = _normal(7, *q.shape)

  @fast_jit
  def both(q, k, v, w):
    ref = lambda *a: attend_reference(*a, spec)
    naive = lambda *a: naive_attention(*a, causal, window)
    grads = [jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
             for f in (ref, naive)]
    return ref(q, k, v), naive(q, k, v), *grads

  out, out_naive, g_ref, g_naive = both(q, k, v, w)
  np.testing.assert_allclose(out, out_naive, rtol=2e-5, atol=2e-5)
  for a, b in zip(g_ref, g_naive):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_reference_segment_ids():
  q, k, v = _qkv(3)
  seg = jnp.asarray(np.repeat([[0, 1, 2], [5, 5, 6]], 8, axis=1))
  out = fast_jit(lambda *a: attend_reference(*a, AttentionSpec(causal=True), segment_ids_BT=seg))(
      q, k, v)
  naive = fast_jit(lambda *a: naive_attention(*a, True, 0, np.asarray(seg)))(q, k, v)
  np.testing.assert_allclose(out, naive,
                             rtol=2e-5, atol=2e-5)


def test_bf16_inputs_keep_dtype_and_stay_close():
  q, k, v = _qkv(5, H=64)
  spec = AttentionSpec()
  bf16 = lambda x: x.astype(jnp.bfloat16)
  out, ref = fast_jit(lambda q, k, v: (ops.attend(bf16(q), bf16(k), bf16(v), spec),
                                       attend_reference(q, k, v, spec)))(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


def test_registry_fallback_and_errors():
  q, k, v = _qkv(1)
  seg = jnp.zeros(q.shape[:2], jnp.int32)
  # jax_nn does not take segment ids: the sequence falls back to xla.
  out = ops.attend(q, k, v, AttentionSpec(), segment_ids_BT=seg, implementation=["jax_nn", "xla"])
  np.testing.assert_allclose(out, attend_reference(q, k, v, AttentionSpec()), rtol=1e-6, atol=1e-6)
  with pytest.raises(Unsupported, match="jax_nn: .*segment.*nope: not registered"):
    ops.attend(q, k, v, AttentionSpec(), segment_ids_BT=seg, implementation=["jax_nn", "nope"])
  with pytest.raises(ValueError, match="kv_heads"):
    ops.attend(q[:, :, :3], k, v, AttentionSpec())
  with pytest.raises(ValueError, match="implementation"):
    ops.attend(q, k, v, AttentionSpec(), implementation=[])
  with pytest.raises(ValueError, match="sliding_window"):
    AttentionSpec(sliding_window=-1)
  assert {"xla", "jax_nn"} <= set(ops.available_implementations())
  assert ops.attend(q, k, v).shape == q.shape  # implementation=None picks one


def test_rope_is_a_relative_rotation():
  H = 32
  rng = np.random.default_rng(0)
  x, y = (rng.standard_normal((1, 1, 1, H), np.float32) for _ in range(2))

  @fast_jit
  def _rot(z, p):
    cos, sin = rope_tables(p.reshape(1, 1), H, 10_000.0)
    return apply_rope(z, cos, sin)
  rot = lambda z, p: np.asarray(_rot(z, jnp.int32(p)), np.float64)
  np.testing.assert_allclose(np.linalg.norm(rot(x, 37)), np.linalg.norm(x), rtol=1e-5)
  d1 = np.sum(rot(x, 10) * rot(y, 3))
  d2 = np.sum(rot(x, 107) * rot(y, 100))
  np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-4)
  assert not np.allclose(np.sum(rot(x, 10) * rot(y, 3)), np.sum(rot(x, 10) * rot(y, 9)), atol=1e-3)
  np.testing.assert_allclose(rot(x, 0), x, rtol=1e-6)
