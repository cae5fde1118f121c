"""The attention registry's other backends: splash (interpreted), hierarchical
attention (blocked vs its dense twin and a per-query loop), platform choice, and a
TPU AOT compile of a block-sparse model's train step with our kernel."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import hierarchical, ops
from attention.reference import attend_reference
from attention.spec import AttentionSpec, Hierarchical


def _qkv(B=1, T=256, N=4, K=2, H=64, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, T, K, H)),
          jax.random.normal(kv, (B, T, K, H)))


def _grads(f, q, k, v, w):
  return jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("spec", [AttentionSpec(), AttentionSpec(sliding_window=100),
                                  AttentionSpec(causal=False)], ids=["causal", "window", "full"])
def test_splash_interpreted_equals_reference(spec):
  q, k, v = _qkv(seed=1)
  w = jax.random.normal(jax.random.key(2), q.shape)
  out = ops.attend(q, k, v, spec, implementation="splash")
  np.testing.assert_allclose(out, attend_reference(q, k, v, spec), rtol=1e-5, atol=1e-5)
  if spec == AttentionSpec():
    for a, b in zip(_grads(lambda *x: ops.attend(*x, spec, implementation="splash"), q, k, v, w),
                    _grads(lambda *x: attend_reference(*x, spec), q, k, v, w)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_splash_segment_ids_and_refusals():
  q, k, v = _qkv(B=2, seed=3)
  seg = jnp.concatenate([jnp.zeros((2, 100), jnp.int32), jnp.ones((2, 156), jnp.int32)], axis=1)
  np.testing.assert_allclose(
      ops.attend(q, k, v, AttentionSpec(), segment_ids_BT=seg, implementation="splash"),
      attend_reference(q, k, v, AttentionSpec(), segment_ids_BT=seg), rtol=1e-5, atol=1e-5)
  q2, k2, v2 = _qkv(T=200)
  with pytest.raises(ops.AttentionUnsupported, match="splash: sequence lengths must be multiples of 128"):
    ops.attend(q2, k2, v2, AttentionSpec(), implementation="splash")
  # Every reason is raised together when all candidates fail.
  with pytest.raises(ops.AttentionUnsupported, match="splash: .*; nope: not registered"):
    ops.attend(q2, k2, v2, AttentionSpec(), implementation=["splash", "nope"])


def test_platform_context_picks_the_default_order():
  assert ops._candidates(None) == ("xla",)
  with ops.target_platform("tpu"):
    assert ops._candidates(None) == ("splash", "pallas", "xla")
  with ops.target_platform("gpu"):
    assert ops._candidates(None)[0] == "jax_nn"
    q, k, v = _qkv()
    with pytest.raises(ops.AttentionUnsupported, match="on GPU use 'pallas_gpu'"):
      ops.attend(q, k, v, AttentionSpec(), implementation="pallas")


def _loop_hierarchical(q, k, v, block, L):
  """Per query, in numpy: softmax over allowed tokens and older block summaries."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  G = N // k.shape[2]
  out = np.zeros_like(q)
  for b_, t, n in np.ndindex(B, T, N):
    kh, vh = k[b_, :, n // G], v[b_, :, n // G]
    i = t // block
    keys, vals, bias = [], [], []
    for s in range(max(0, (i - L) * block), t + 1):
      keys.append(kh[s]), vals.append(vh[s]), bias.append(0.0)
    for j in range(max(i - L, 0)):
      keys.append(kh[j * block:(j + 1) * block].mean(0))
      vals.append(vh[j * block:(j + 1) * block].mean(0))
      bias.append(math.log(block))
    logits = np.array(keys) @ q[b_, t, n] / math.sqrt(H) + np.array(bias)
    p = np.exp(logits - logits.max())
    out[b_, t, n] = (p / p.sum()) @ np.array(vals)
  return out


@pytest.mark.parametrize("L", [0, 1, 3])
def test_hierarchical_blocked_equals_dense_twin_and_loop(L):
  q, k, v = _qkv(B=2, T=64, H=8, seed=4 + L)
  spec = AttentionSpec(hierarchical=Hierarchical(block=8, local_blocks=L))
  w = jax.random.normal(jax.random.key(7), q.shape)
  fast = ops.attend(q, k, v, spec)
  np.testing.assert_allclose(fast, hierarchical.hierarchical_reference(q, k, v, spec),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fast, _loop_hierarchical(q, k, v, 8, L), rtol=1e-4, atol=1e-5)
  for a, b in zip(_grads(lambda *x: ops.attend(*x, spec, implementation="blocked"), q, k, v, w),
                  _grads(lambda *x: ops.attend(*x, spec, implementation="xla"), q, k, v, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_hierarchical_with_every_block_local_is_causal_attention_and_errors():
  q, k, v = _qkv(T=64, H=8)
  spec = AttentionSpec(hierarchical=Hierarchical(block=16, local_blocks=4))
  np.testing.assert_allclose(ops.attend(q, k, v, spec), attend_reference(q, k, v, AttentionSpec()),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="block=24: the sequence length 64 is not divisible"):
    ops.attend(q, k, v, AttentionSpec(hierarchical=Hierarchical(block=24)))
  with pytest.raises(ValueError, match="excludes block_sparse and sliding_window"):
    AttentionSpec(sliding_window=8, hierarchical=Hierarchical(block=16))
  with pytest.raises(ops.AttentionUnsupported, match="splash: no hierarchical attention"):
    ops.attend(q, k, v, spec, implementation="splash")


def test_sparse_model_train_step_compiles_for_tpu_with_our_kernel():
  from jax.experimental import topologies
  try:
    topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                 chip_config_name="default", num_slices=1)
  except Exception as e:  # noqa: BLE001 - no libtpu here
    pytest.skip(f"no TPU topology (libtpu missing?): {e}")
  from experiments.configs import base
  from lm import aot
  c = base.get_config("tiny")
  c.model.d_model, c.model.n_heads, c.model.n_kv_heads = 256, 4, 2  # head dim 64
  c.data.seq_len, c.data.batch_size = 512, 4
  c.model.attention_impl = "pallas"
  c.model.sparse.enabled = True
  c.model.sparse.block_q = c.model.sparse.block_k = 128
  c.mesh.data = 4
  r = aot.compile_train_step(c, "v5e:2x2")
  assert r.fits and r.devices == 4


def test_attention_layer_runs_our_kernel_per_device_under_a_mesh():
  from flax import nnx
  from jax.sharding import Mesh
  from attention.layer import Attention
  from attention.spec import BlockSparse
  spec = AttentionSpec(block_sparse=BlockSparse(16, 16, top_k=0.2, top_p=0.3))
  x = jax.random.normal(jax.random.key(0), (4, 64, 32))
  pos = jnp.broadcast_to(jnp.arange(64), (4, 64))
  outs = {}
  for impl in ("xla", "pallas"):
    layer = Attention(32, 4, 2, 64, rngs=nnx.Rngs(params=0), implementation=impl, spec=spec,
                      batch_axes=("data",))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    with jax.set_mesh(mesh):
      outs[impl] = nnx.jit(lambda m, x, p: m(x, p))(layer, x, pos)
  np.testing.assert_allclose(outs["pallas"], outs["xla"], rtol=1e-4, atol=1e-5)


def test_distilling_sparse_train_step_compiles_for_tpu():
  from experiments.configs import sparse_attention
  from lm import aot
  try:
    aot.topology_devices("v5e:2x2")
  except Exception as e:  # noqa: BLE001 - no libtpu here
    pytest.skip(f"no TPU topology (libtpu missing?): {e}")
  c = sparse_attention.get_config("ablation")
  c.mesh.data = 4
  c.model.n_layers = 1
  r = aot.compile_train_step(c, "v5e:2x2")  # the teacher's folder is only read by train.run
  assert r.fits and r.devices == 4
