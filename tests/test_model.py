"""lm/model.py: shapes, logical axes, and each layer against a hand-written reference."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from flax import nnx

from attention.layer import Attention
from attention.reference import attend_reference
from attention.spec import AttentionSpec
from core.errors import ConfigError
from lm import config as config_lib
from lm.model import RMSNorm, SwiGLU, apply, build_model

KNOWN_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}


def tiny_model_cfg(**overrides):
  """The tiny model's typed config with a 384-token vocabulary."""
  cfg = config_lib.resolve(tiny(**{f"model__{k}": v for k, v in overrides.items()})).model
  return dataclasses.replace(cfg, vocab_size=384)


def _logits(built, tokens):
  return apply(built.graphdef, built.params, built.state, tokens)[0]


def test_shapes_dtypes_and_logical_axes():
  cfg = tiny_model_cfg()
  built = build_model(cfg, seed=0)
  params, axes = built.params, built.axes["params"]
  assert built.state == {} and built.axes["state"] == {}
  tokens = jax.random.randint(jax.random.key(0), (3, 17), 0, 384)
  logits = _logits(built, tokens)
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
  assert "head" not in build_model(tiny_model_cfg(tie_embeddings=True), seed=0).params


def test_rmsnorm_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 8)).astype(np.float32)
  norm = RMSNorm(8, 1e-6)
  norm.scale[...] = jnp.asarray(rng.standard_normal(8).astype(np.float32))
  expected = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_swiglu_reference():
  mlp = SwiGLU(8, 12, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
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
  x = np.random.default_rng(2).standard_normal((2, T, D)).astype(np.float32)
  pos = np.broadcast_to(np.arange(T), (2, T)).astype(np.float32)
  q = _rope_np(np.einsum("btd,dnh->btnh", x, layer.q[...]), pos)
  k = _rope_np(np.einsum("btd,dkh->btkh", x, layer.k[...]), pos)
  v = np.einsum("btd,dkh->btkh", x, layer.v[...])
  out = attend_reference(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                         jnp.asarray(v), AttentionSpec(causal=True))
  expected = np.einsum("btnh,nhd->btd", out, layer.o[...])
  got = layer(jnp.asarray(x), jnp.asarray(pos, jnp.int32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _conv_np(u, w):
  """out[:, t] = sum_s w[s] u[:, t - W + 1 + s] (zeros before t = 0), by loops."""
  W, out = w.shape[0], np.zeros_like(u)
  for t in range(u.shape[1]):
    for s in range(W):
      if t - W + 1 + s >= 0:
        out[:, t] += w[s] * u[:, t - W + 1 + s]
  return out


def test_qkv_conv_layer_against_loops_forward_and_gradients():
  from attention.conv import causal_conv
  D, N, K, H, T, W = 32, 4, 2, 8, 11, 3
  layer = Attention(D, N, K, H, rngs=nnx.Rngs(1), qkv_conv=W)
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, T, D)).astype(np.float32)
  pos = np.broadcast_to(np.arange(T), (2, T)).astype(np.float32)
  proj = lambda w: np.einsum("btd,dnh->btnh", x, w[...])
  q = _rope_np(_conv_np(proj(layer.q), np.asarray(layer.conv_q[...])), pos)
  k = _rope_np(_conv_np(proj(layer.k), np.asarray(layer.conv_k[...])), pos)
  v = _conv_np(proj(layer.v), np.asarray(layer.conv_v[...]))
  out = attend_reference(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                         jnp.asarray(v), AttentionSpec(causal=True))
  expected = np.einsum("btnh,nhd->btd", out, layer.o[...])
  got = layer(jnp.asarray(x), jnp.asarray(pos, jnp.int32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # Gradients of the conv against a twin written with an explicit shift per tap.
  u = jnp.asarray(rng.standard_normal((2, T, K, H)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((W, K, H)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((2, T, K, H)), jnp.float32)
  def twin(u, w):
    shifted = [jnp.concatenate([jnp.zeros_like(u[:, :W - 1 - s]), u[:, :T - (W - 1 - s)]], 1)
               for s in range(W)]
    return jnp.sum(c * sum(w[s] * shifted[s] for s in range(W)))
  fast = jax.grad(lambda u, w: jnp.sum(c * causal_conv(u, w)[0]), (0, 1))(u, w)
  for a, b in zip(fast, jax.grad(twin, (0, 1))(u, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(fast[1]).sum()) > 0


def test_qkv_conv_model_is_causal():
  m = build_model(tiny_model_cfg(qkv_conv=2), seed=3)
  assert m.params["block_0"]["attn"]["conv_k"].shape == (2, 2, 16)
  tokens = np.array(jax.random.randint(jax.random.key(1), (2, 16), 0, 256))
  changed = tokens.copy()
  changed[:, 10:] = (changed[:, 10:] + 1) % 256
  a, b = _logits(m, tokens), _logits(m, changed)
  np.testing.assert_array_equal(a[:, :10], b[:, :10])
  assert not np.allclose(a[:, 10:], b[:, 10:])
  with pytest.raises(ConfigError, match=r"model\.qkv_conv=2: headwise"):
    tiny_model_cfg(qkv_conv=2, context_parallel="headwise")


def test_model_is_causal_and_bf16_close_to_fp32():
  cfg32 = tiny_model_cfg(dtype="float32")
  cfg16 = tiny_model_cfg(dtype="bfloat16")
  m32, m16 = build_model(cfg32, seed=3), build_model(cfg16, seed=3)
  tokens = np.array(jax.random.randint(jax.random.key(1), (2, 16), 0, 256))
  logits = _logits(m32, tokens)
  changed = tokens.copy()
  changed[:, 10:] = (changed[:, 10:] + 1) % 256
  logits2 = _logits(m32, changed)
  np.testing.assert_array_equal(logits[:, :10], logits2[:, :10])
  assert not np.allclose(logits[:, 10:], logits2[:, 10:])
  # bf16 compute, same fp32 parameters: close to the fp32 model, not equal.
  logits16 = _logits(m16, tokens)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits, atol=0.15)
  assert not np.array_equal(logits16, logits)


def test_config_rejects_unknown_dtype():
  with pytest.raises(ConfigError, match=r"model.dtype='float8': unknown choice.*Fix: use one of"):
    tiny_model_cfg(dtype="float8")


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "offload"])
def test_remat_gives_the_same_loss_and_gradients(remat):
  """Each policy (what a block saves; the rest is recomputed or, offload, moved to host
  memory and back) equals no remat."""
  import optax
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 256)
  def loss_and_grads(remat):
    built = build_model(tiny_model_cfg(dtype="float32", remat=remat), seed=4)
    params = built.params
    def loss(p):
      logits = apply(built.graphdef, p, built.state, tokens[:, :-1])[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return jax.jit(jax.value_and_grad(loss))(params)
  (l0, g0), (l1, g1) = loss_and_grads("none"), loss_and_grads(remat)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
