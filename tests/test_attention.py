"""attention/: the reference against a naive per-head loop, backends against the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import ops
from attention.reference import attend_reference
from attention.rope import apply_rope, rope_tables
from attention.spec import AttentionSpec


def naive_attention(q, k, v, causal, window, segment_ids=None):
  """Loop over batch and heads, repeat KV heads, softmax with jax.nn.softmax."""
  B, T, N, H = q.shape
  K = k.shape[2]
  out = []
  for b in range(B):
    heads = []
    for n in range(N):
      kv = n // (N // K)
      logits = q[b, :, n].astype(jnp.float32) @ k[b, :, kv].astype(jnp.float32).T / np.sqrt(H)
      i, j = np.arange(T)[:, None], np.arange(T)[None, :]
      allowed = np.ones((T, T), bool)
      if causal:
        allowed &= j <= i
      if window:
        allowed &= i - j < window
      if segment_ids is not None:
        allowed = allowed & (segment_ids[b][:, None] == segment_ids[b][None, :])
      logits = jnp.where(allowed, logits, -1e30)
      heads.append(jax.nn.softmax(logits, axis=-1) @ v[b, :, kv].astype(jnp.float32))
    out.append(jnp.stack(heads, axis=1))
  return jnp.stack(out)


def _qkv(seed, B=2, T=24, N=4, K=2, H=16, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H), dtype), jax.random.normal(kk, (B, T, K, H), dtype),
          jax.random.normal(kv, (B, T, K, H), dtype))


@pytest.mark.parametrize("causal,window,heads", [(True, 0, (4, 4)), (True, 0, (4, 2)),
                                                 (True, 5, (4, 1)), (False, 0, (6, 3)),
                                                 (False, 7, (4, 2))])
def test_reference_matches_naive_forward_and_grad(causal, window, heads):
  N, K = heads
  q, k, v = _qkv(np.random.randint(1 << 30), N=N, K=K)
  spec = AttentionSpec(causal=causal, sliding_window=window)
  np.testing.assert_allclose(attend_reference(q, k, v, spec), naive_attention(q, k, v, causal, window),
                             rtol=2e-5, atol=2e-5)
  w = jax.random.normal(jax.random.key(7), q.shape)
  g_ref = jax.grad(lambda *a: jnp.sum(attend_reference(*a, spec) * w), argnums=(0, 1, 2))(q, k, v)
  g_naive = jax.grad(lambda *a: jnp.sum(naive_attention(*a, causal, window) * w),
                     argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_ref, g_naive):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_reference_segment_ids():
  q, k, v = _qkv(3)
  seg = jnp.asarray(np.repeat([[0, 1, 2], [5, 5, 6]], 8, axis=1))
  out = attend_reference(q, k, v, AttentionSpec(causal=True), segment_ids_BT=seg)
  np.testing.assert_allclose(out, naive_attention(q, k, v, True, 0, np.asarray(seg)),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("window", [0, 6])
def test_jax_nn_backend_matches_reference(window):
  q, k, v = _qkv(np.random.randint(1 << 30), H=64)
  spec = AttentionSpec(causal=True, sliding_window=window)
  out = ops.attend(q, k, v, spec, implementation="jax_nn")
  np.testing.assert_allclose(out, attend_reference(q, k, v, spec), rtol=1e-5, atol=1e-5)
  f = lambda impl: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(ops.attend(q, k, v, spec, implementation=impl))),
                            argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(f("jax_nn"), f("xla")):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bf16_inputs_keep_dtype_and_stay_close():
  q, k, v = _qkv(5, H=64)
  spec = AttentionSpec()
  out = ops.attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), spec)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), attend_reference(q, k, v, spec), atol=5e-2)


def test_registry_fallback_and_errors():
  q, k, v = _qkv(1)
  seg = jnp.zeros(q.shape[:2], jnp.int32)
  # jax_nn does not take segment ids: the sequence falls back to xla.
  out = ops.attend(q, k, v, AttentionSpec(), segment_ids_BT=seg, implementation=["jax_nn", "xla"])
  np.testing.assert_allclose(out, attend_reference(q, k, v, AttentionSpec()), rtol=1e-6, atol=1e-6)
  with pytest.raises(ops.AttentionUnsupported, match="jax_nn: .*segment.*nope: not registered"):
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
  x = jax.random.normal(jax.random.key(0), (1, 1, 1, H))
  y = jax.random.normal(jax.random.key(1), (1, 1, 1, H))
  def rot(z, p):
    cos, sin = rope_tables(jnp.array([[p]]), H, 10_000.0)
    return apply_rope(z, cos, sin)
  np.testing.assert_allclose(jnp.linalg.norm(rot(x, 37)), jnp.linalg.norm(x), rtol=1e-5)
  d1 = jnp.sum(rot(x, 10) * rot(y, 3))
  d2 = jnp.sum(rot(x, 107) * rot(y, 100))
  np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-4)
  assert not np.allclose(jnp.sum(rot(x, 10) * rot(y, 3)), jnp.sum(rot(x, 10) * rot(y, 9)), atol=1e-3)
  np.testing.assert_allclose(rot(x, 0), x, rtol=1e-6)
