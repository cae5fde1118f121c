"""lm/model.py: shapes, logical axes, and each layer against a hand-written reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.layer import Attention
from attention.reference import attend_reference
from attention.spec import AttentionSpec
from experiments.configs.base import get_config
from lm.model import RMSNorm, SwiGLU, Transformer
from lm.model import build_model

KNOWN_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}


def tiny_model_cfg(**overrides):
  cfg = get_config("tiny").model
  cfg.update(overrides)
  return cfg


def test_shapes_dtypes_and_logical_axes():
  cfg = tiny_model_cfg()
  graphdef, params, axes = build_model(cfg, 384, seed=0)
  tokens = jax.random.randint(jax.random.key(0), (3, 17), 0, 384)
  logits = nnx.merge(graphdef, params)(tokens)
  assert logits.shape == (3, 17, 384) and logits.dtype == jnp.float32
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  assert len(flat_p) == len(flat_a)
  for (path, p), a in zip(flat_p, flat_a):
    assert p.dtype == jnp.float32, path
    assert len(a) == p.ndim and set(a) <= KNOWN_AXES, (path, a)
  D, F, V, L = cfg.d_model, cfg.d_ff, 384, cfg.n_layers
  H = D // cfg.n_heads
  per_layer = D * H * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * D * F + 2 * D
  expected = 2 * V * D + L * per_layer + D
  assert sum(p.size for _, p in flat_p) == expected


def test_tied_embeddings_have_no_head():
  _, params, _ = build_model(tiny_model_cfg(tie_embeddings=True), 384, seed=0)
  assert "head" not in params


def test_rmsnorm_reference():
  x = np.random.randn(2, 5, 8).astype(np.float32)
  norm = RMSNorm(8, 1e-6)
  norm.scale[...] = jnp.asarray(np.random.randn(8).astype(np.float32))
  expected = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_swiglu_reference():
  mlp = SwiGLU(8, 12, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  x = np.random.randn(2, 3, 8).astype(np.float32)
  g, u, d = (np.asarray(w[...]) for w in (mlp.gate, mlp.up, mlp.down))
  a = x @ g
  expected = (a / (1 + np.exp(-a)) * (x @ u)) @ d
  np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)


def _rope_np(x, pos, theta=10_000.0):
  H = x.shape[-1]
  freq = theta ** (-np.arange(0, H, 2) / H)
  ang = pos[:, :, None, None] * freq
  x1, x2 = x[..., : H // 2], x[..., H // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (4, 1)])
def test_attention_layer_reference(n_heads, n_kv):
  D, H, T = 32, 8, 11
  layer = Attention(D, n_heads, n_kv, H, rngs=nnx.Rngs(1))
  x = np.random.randn(2, T, D).astype(np.float32)
  pos = np.broadcast_to(np.arange(T), (2, T)).astype(np.float32)
  q = _rope_np(np.einsum("btd,dnh->btnh", x, layer.q[...]), pos)
  k = _rope_np(np.einsum("btd,dkh->btkh", x, layer.k[...]), pos)
  v = np.einsum("btd,dkh->btkh", x, layer.v[...])
  out = attend_reference(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                         jnp.asarray(v), AttentionSpec(causal=True))
  expected = np.einsum("btnh,nhd->btd", out, layer.o[...])
  got = layer(jnp.asarray(x), jnp.asarray(pos, jnp.int32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_model_is_causal_and_bf16_close_to_fp32():
  cfg32 = tiny_model_cfg(dtype="float32")
  cfg16 = tiny_model_cfg(dtype="bfloat16")
  g32, params, _ = build_model(cfg32, 384, seed=3)
  g16, params16, _ = build_model(cfg16, 384, seed=3)
  tokens = np.array(jax.random.randint(jax.random.key(1), (2, 16), 0, 256))
  logits = nnx.merge(g32, params)(tokens)
  changed = tokens.copy()
  changed[:, 10:] = (changed[:, 10:] + 1) % 256
  logits2 = nnx.merge(g32, params)(changed)
  np.testing.assert_array_equal(logits[:, :10], logits2[:, :10])
  assert not np.allclose(logits[:, 10:], logits2[:, 10:])
  # bf16 compute, same fp32 parameters: close to the fp32 model, not equal.
  logits16 = nnx.merge(g16, params16)(tokens)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits, atol=0.15)
  assert not np.array_equal(logits16, logits)


def test_transformer_rejects_unknown_dtype():
  from lm.errors import ConfigError
  with pytest.raises(ConfigError, match="model.dtype"):
    Transformer(tiny_model_cfg(dtype="float8"), 384, rngs=nnx.Rngs(0))


def test_remat_gives_the_same_loss_and_gradients():
  import optax
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 256)
  def loss_and_grads(remat):
    graphdef, params, _ = build_model(tiny_model_cfg(dtype="float32", remat=remat), 384, seed=4)
    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return jax.jit(jax.value_and_grad(loss))(params)
  (l0, g0), (l1, g1) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
