"""SpargeAttention2's block-mask rule (attention/sparse.py) against a naive per-row
twin and hand-made score maps; the block-masked attention path of ``attend``."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import ops, sparse
from attention.reference import attend_reference
from attention.spec import AttentionSpec, BlockSparse
from core.errors import Unsupported

# Eager ops compile one by one; the checks below run as compiled programs instead, at
# XLA's cheapest setting (tiny programs: compile time is the cost).
fast_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                               "xla_llvm_disable_expensive_passes": True})
predict = fast_jit(sparse.predict_block_mask, static_argnums=2)
density = fast_jit(sparse.block_density, static_argnums=1)


def naive_rule(scores, valid, forced, top_k, top_p):
  """One row at a time, in numpy: softmax over valid blocks, sort, union."""
  out = np.zeros(scores.shape, bool)
  for idx in np.ndindex(scores.shape[:-1]):
    s, v, f = scores[idx], valid[idx[-1:]] if valid.ndim == 2 else valid[idx], forced[idx[-1:]] if forced.ndim == 2 else forced[idx]
    v = np.broadcast_to(v, s.shape)
    f = np.broadcast_to(f, s.shape)
    cols = np.flatnonzero(v)
    keep = set(np.flatnonzero(f & v))
    if len(cols):
      z = np.exp(s[cols] - s[cols].max())
      p = z / z.sum()
      order = cols[np.argsort(-p, kind="stable")]
      ps = np.sort(p)[::-1]
      n_k = 0 if top_k == 0 else max(1, int(np.ceil(top_k * len(cols))))
      keep |= set(order[:n_k])
      mass = 0.0
      for col, pc in zip(order, ps):
        if mass >= top_p:
          break
        keep.add(col)
        mass += pc
    out[idx][sorted(keep)] = True
  return out


@fast_jit
def _select(scores, valid, forced, top_k, top_p):  # top_k, top_p traced: one compile per shape
  return sparse.select_blocks(scores, valid, forced, top_k=top_k, top_p=top_p)


def _rule(scores, valid, forced, top_k, top_p):
  return np.asarray(_select(scores, valid, forced, np.float32(top_k), np.float32(top_p)))


def test_top_k_and_top_p_on_hand_made_rows():
  none = np.zeros((1, 8), bool)
  valid = np.ones((1, 8), bool)
  uniform = np.zeros((1, 8), np.float32)
  # Uniform row (each block 1/8): top-k 25% keeps 2; top-p 0.3 needs 3 blocks (0.375).
  assert _rule(uniform, valid, none, 0.25, 0.0).sum() == 2
  assert _rule(uniform, valid, none, 0.0, 0.3).sum() == 3
  # Skewed row: block 5 holds ~90% of the mass; top-p 0.5 keeps it alone, top-k keeps 2.
  skewed = np.zeros((1, 8), np.float32)
  skewed[0, 5], skewed[0, 2] = 5.0, 1.0
  assert np.flatnonzero(_rule(skewed, valid, none, 0.0, 0.5)[0]).tolist() == [5]
  assert np.flatnonzero(_rule(skewed, valid, none, 0.25, 0.0)[0]).tolist() == [2, 5]
  # The hybrid is the union; p = 1 keeps every valid block; k = p = 0 keeps the forced only.
  assert _rule(uniform, valid, none, 0.25, 0.3).sum() == 3
  assert _rule(skewed, valid, none, 0.0, 1.0).all()
  forced = np.zeros((1, 8), bool)
  forced[0, 7] = True
  assert np.flatnonzero(_rule(skewed, valid, forced, 0.0, 0.0)[0]).tolist() == [7]
  # Invalid (future) blocks are never kept, forced or not, and k counts valid blocks only.
  causal = np.arange(8)[None, :] <= 3
  got = _rule(skewed, causal, np.ones((1, 8), bool), 0.0, 0.0)
  assert np.flatnonzero(got[0]).tolist() == [0, 1, 2, 3]
  assert _rule(uniform, causal, none, 0.5, 0.0).sum() == 2  # 50% of 4 valid blocks


@pytest.mark.parametrize("top_k,top_p", [(0.1, 0.0), (0.0, 0.4), (0.2, 0.6), (0.05, 0.9)])
def test_rule_matches_naive_twin_on_random_maps(top_k, top_p):
  rng = np.random.default_rng(int(top_k * 100 + top_p * 10))
  Q = C = 12
  scores = rng.normal(size=(3, Q, C)).astype(np.float32) * rng.uniform(0.1, 4.0, size=(3, 1, 1))
  valid = np.tril(np.ones((Q, C), bool))
  forced = np.eye(Q, C, dtype=bool)
  np.testing.assert_array_equal(_rule(scores, valid, forced, top_k, top_p),
                                naive_rule(scores, valid, forced, top_k, top_p))


def _normal(seed, *shape):
  """Standard normal fp32 from ``np.random.default_rng(seed)`` (no per-shape compiles)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _qkv(B=2, T=128, N=4, K=2, H=32, seed=0):
  return (_normal(seed, B, T, N, H), _normal(seed + 1000, B, T, K, H),
          _normal(seed + 2000, B, T, K, H))


def test_predicted_mask_is_causal_keeps_diagonal_sink_local_and_unions_gqa_heads():
  q, k, _ = _qkv(seed=1)
  bs = BlockSparse(block_q=16, block_k=16, top_k=0.1, top_p=0.2, sink_blocks=1, local_blocks=1)
  spec = AttentionSpec(block_sparse=bs)
  m = np.asarray(predict(q, k, spec))
  assert m.shape == (2, 2, 8, 8)
  Q = np.arange(8)
  assert not np.triu(m, 1).any()  # no future block
  assert m[..., Q, Q].all() and m[..., :, 0].all()  # diagonal and sink
  assert m[..., Q[1:], Q[1:] - 1].all()  # one local block before the diagonal
  # GQA: kv head 0's mask is the union of its query heads' masks (heads 0, 1).
  per_head = np.stack([
      np.asarray(predict(q[:, :, n:n + 1], k[:, :, n // 2:n // 2 + 1], spec))[:, 0]
      for n in range(4)], axis=1)
  np.testing.assert_array_equal(m[:, 0], per_head[:, 0] | per_head[:, 1])
  np.testing.assert_array_equal(m[:, 1], per_head[:, 2] | per_head[:, 3])
  # Unequal blocks: a 32-token query block overlaps two 16-token key blocks (both kept).
  spec2 = AttentionSpec(block_sparse=BlockSparse(block_q=32, block_k=16, top_k=0.0, top_p=0.0,
                                                 sink_blocks=0))
  m2 = np.asarray(predict(q, k, spec2))
  expected = np.zeros((4, 8), bool)
  for i in range(4):
    expected[i, 2 * i:2 * i + 2] = True
  np.testing.assert_array_equal(m2, np.broadcast_to(expected, m2.shape))


def test_density_sliding_window_and_indices():
  q, k, _ = _qkv(seed=2)
  full = AttentionSpec(block_sparse=BlockSparse(block_q=16, block_k=16, top_k=1.0, top_p=0.0))
  m = predict(q, k, full)
  assert float(density(m, full)) == 1.0
  np.testing.assert_array_equal(m[0, 0], np.tril(np.ones((8, 8), bool)))
  # A 32-token window touches the diagonal block and the two before it.
  win = AttentionSpec(sliding_window=32, block_sparse=BlockSparse(16, 16, top_k=1.0, top_p=0.0))
  mw = np.asarray(predict(q, k, win))[0, 0]
  np.testing.assert_array_equal(mw, np.tril(np.ones((8, 8), bool)) & np.triu(np.ones((8, 8), bool), -2))
  sparse_spec = AttentionSpec(block_sparse=BlockSparse(16, 16, top_k=0.0, top_p=0.0, sink_blocks=0))
  ms = predict(q, k, sparse_spec)
  np.testing.assert_allclose(float(density(ms, sparse_spec)), 8 / 36)
  counts, idx = fast_jit(sparse.block_indices)(m)
  mask = np.asarray(m)
  for b, h, i in np.ndindex(counts.shape):
    kept = np.flatnonzero(mask[b, h, i])
    assert counts[b, h, i] == len(kept)
    np.testing.assert_array_equal(idx[b, h, i, :len(kept)], kept)
    assert (idx[b, h, i, len(kept):] == kept[-1]).all()


def test_block_masked_attend_equals_reference_and_dense_at_density_one():
  q, k, v = _qkv(seed=3)
  spec = AttentionSpec(block_sparse=BlockSparse(16, 16, top_k=0.2, top_p=0.3))
  w = _normal(9, *q.shape)
  mask = predict(q, k, spec)

  @fast_jit
  def run(q, k, v, mask, w):
    out = ops.attend(q, k, v, spec, implementation="xla")  # predicts the mask itself
    ref = sparse.block_sparse_reference(q, k, v, mask, spec)
    dense = attend_reference(q, k, v, AttentionSpec())
    # Gradients flow through kept blocks only: they equal the masked reference's.
    g = jax.grad(lambda *a: jnp.sum(ops.attend(*a, spec, block_mask=mask, implementation="xla")
                                    * w), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(sparse.block_sparse_reference(*a, mask, spec) * w),
                     argnums=(0, 1, 2))(q, k, v)
    at_one = ops.attend(q, k, v, spec, block_mask=jnp.ones_like(mask), implementation="xla")
    return out, ref, dense, g, g_ref, at_one

  out, ref, dense, g, g_ref, at_one = run(q, k, v, mask, w)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  assert float(np.abs(out - dense).max()) > 1e-3
  # Explicit token mask twin: zero out masked logits by hand.
  tok = (np.repeat(np.repeat(np.asarray(mask), 16, 2), 16, 3)[:, :, None]
         & np.tril(np.ones((128, 128), bool)))
  qg = np.asarray(q).reshape(2, 128, 2, 2, 32)
  logits = np.einsum("btkgh,bskh->bkgts", qg, np.asarray(k)) / np.sqrt(32)
  logits = np.where(tok, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  twin = np.einsum("bkgts,bskh->btkgh", p, np.asarray(v)).reshape(q.shape)
  np.testing.assert_allclose(out, twin, rtol=1e-4, atol=1e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(at_one, dense, rtol=1e-6, atol=1e-6)


def test_clear_errors():
  q, k, v = _qkv(T=120)
  spec = AttentionSpec(block_sparse=BlockSparse(16, 16))
  with pytest.raises(ValueError, match=r"block_q=16: the query length 120 is not divisible.*Fix"):
    ops.attend(q, k, v, spec)
  with pytest.raises(ValueError, match=r"top_k=1.5: out of range.*Fix: choose top_k in \[0, 1\]"):
    BlockSparse(top_k=1.5)
  with pytest.raises(ValueError, match=r"top_p=-0.1: out of range"):
    BlockSparse(top_p=-0.1)
  with pytest.raises(ValueError, match="block_k=0"):
    BlockSparse(block_k=0)
  q, k, v = _qkv()
  with pytest.raises(Unsupported, match="jax_nn: no predicted block masks"):
    fast_jit(lambda q, k, v: ops.attend(q, k, v, spec, implementation="jax_nn"))(q, k, v)
  # A candidate list falls through to the reference.
  out, want = fast_jit(lambda q, k, v: (ops.attend(q, k, v, spec, implementation=("jax_nn", "xla")),
                                        ops.attend(q, k, v, spec, implementation="xla")))(q, k, v)
  np.testing.assert_allclose(out, want)


# Without a cap, gather also runs in test_attention_conformance.py.
@pytest.mark.parametrize("window,max_blocks", [(40, 0), (0, 3)])
def test_gather_path_equals_reference_forward_and_gradients(window, max_blocks):
  q, k, v = _qkv(seed=4 + max_blocks)
  spec = AttentionSpec(sliding_window=window, block_sparse=BlockSparse(
      16, 16, top_k=0.2, top_p=0.5, local_blocks=1, max_blocks=max_blocks))
  mask = predict(q, k, spec)
  if max_blocks:
    assert int(np.asarray(mask).sum(-1).max()) <= max_blocks
    assert np.asarray(mask)[..., np.arange(8), np.arange(8)].all()  # the diagonal survives the cap
  w = _normal(5, *q.shape)

  @fast_jit
  def run(q, k, v, mask, w):
    f = lambda impl: lambda *a: jnp.sum(ops.attend(*a, spec, block_mask=mask,
                                                   implementation=impl) * w)
    return (ops.attend(q, k, v, spec, block_mask=mask, implementation="gather"),
            sparse.block_sparse_reference(q, k, v, mask, spec),
            jax.grad(f("gather"), argnums=(0, 1, 2))(q, k, v),
            jax.grad(f("xla"), argnums=(0, 1, 2))(q, k, v))

  out, ref, g_gather, g_xla = run(q, k, v, mask, w)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(g_gather, g_xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
