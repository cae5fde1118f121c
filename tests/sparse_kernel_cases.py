"""Inputs, masks and reference statistics shared by the block-sparse kernel tests
(``test_sparse_kernel.py`` for TPU, ``test_sparse_kernel_gpu.py`` for GPU)."""
import jax
import jax.numpy as jnp
import numpy as np

from attention import sparse
from attention.reference import expand_block_mask, mask_TS
from attention.spec import AttentionSpec, BlockSparse


def qkv(seed, B, T, N, K, H, dtype=jnp.float32, S=None):
  S = S or T
  kq, kk, kv, ko = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
  do = jax.random.normal(ko, (B, T, N, H), jnp.float32).astype(dtype)
  return q, k, v, do


def spec_of(causal, window, bq, bk, **kw):
  return AttentionSpec(causal=causal, sliding_window=window,
                       block_sparse=BlockSparse(block_q=bq, block_k=bk, **kw))


def random_mask(seed, B, K, T, S, bq, bk, density=0.4):
  """Random blocks plus the diagonal ones (so that no causal row is empty)."""
  diag = sparse.forced_blocks(BlockSparse(block_q=bq, block_k=bk, sink_blocks=0), T, S)
  m = jax.random.bernoulli(jax.random.key(seed), density, (B, K, T // bq, S // bk))
  return m | jnp.asarray(diag)


def ref_lse(q_BTNH, k_BSKH, block_mask, spec):
  """log-sum-exp [B, N, T] of the allowed scaled logits (-inf for an empty row)."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1:3]
  bs = spec.block_sparse
  scale = spec.scale if spec.scale is not None else H ** -0.5
  logits = jnp.einsum("btkgh,bskh->bkgts", q_BTNH.reshape(B, T, K, N // K, H), k_BSKH,
                      preferred_element_type=jnp.float32) * scale
  allowed = mask_TS(spec, T, S) & expand_block_mask(block_mask, bs.block_q, bs.block_k)[:, :, None]
  return jax.nn.logsumexp(jnp.where(allowed, logits, -jnp.inf), axis=-1).reshape(B, N, T)


def close(got, want, dtype, what=""):
  tol = 1.5e-2 if dtype == jnp.bfloat16 else 2e-5
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.isfinite(got).all(), what
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()),
                             err_msg=what)
