"""Our Pallas GPU (Triton) block-sparse attention (attention/kernels/block_sparse_gpu.py)
against ``attention.sparse.block_sparse_reference``.

Kernels run in Pallas's generic interpreter on the CPU (small shapes: interpretation
is slow; it fills unwritten output with NaN, so a forgotten tile fails). One test
lowers forward and backward to Triton IR for an abstract H100 without a GPU and
verifies the Triton modules; one compiles and runs them for real, only where the
default backend is a GPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import sparse
from attention.kernels import block_sparse_gpu as bsg
from attention.ops import AttentionUnsupported
from attention.reference import attend_reference
from attention.spec import AttentionSpec, BlockSparse
from sparse_kernel_cases import close as _close
from sparse_kernel_cases import qkv as _qkv
from sparse_kernel_cases import random_mask as _random_mask
from sparse_kernel_cases import ref_lse as _ref_lse
from sparse_kernel_cases import spec_of as _spec


def _kernel(mask, spec, interpret=True, return_lse=False):
  bs = spec.block_sparse
  return lambda q, k, v: bsg.block_sparse_attention(
      q, k, v, mask, block_q=bs.block_q, block_k=bs.block_k, causal=spec.causal,
      sliding_window=spec.sliding_window, scale=spec.scale, interpret=interpret,
      return_lse=return_lse)


# name: (B, T, N, K, H, block_q, block_k, causal, window, mask kind, dtype)
CASES = {
    "causal_gqa_random_mask_h64": (2, 128, 4, 2, 64, 32, 32, True, 0, "random", jnp.float32),
    "noncausal_mha_predicted_h128_rect_blocks": (1, 128, 2, 2, 128, 32, 64, False, 0,
                                                 "predicted", jnp.float32),
    "window_gqa_predicted": (1, 128, 4, 2, 64, 32, 32, True, 48, "predicted", jnp.float32),
    "bf16_causal_gqa_random_h128_block16": (1, 64, 4, 1, 128, 16, 16, True, 0, "random",
                                            jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_grads_match_reference(name):
  B, T, N, K, H, bq, bk, causal, window, kind, dtype = CASES[name]
  q, k, v, do = _qkv(len(name), B, T, N, K, H, dtype)
  spec = _spec(causal, window, bq, bk, top_k=0.2, top_p=0.3)
  if kind == "random":
    mask = _random_mask(len(name), B, K, T, T, bq, bk)
  else:
    mask = sparse.predict_block_mask(q, k, spec)
    assert 0 < float(sparse.block_density(mask, spec)) < 1, "want a genuinely sparse mask"
  out, vjp = jax.vjp(_kernel(mask, spec), q, k, v)
  ref, vjp_ref = jax.vjp(lambda a, b, c: sparse.block_sparse_reference(a, b, c, mask, spec),
                         q, k, v)
  assert out.shape == q.shape and out.dtype == dtype
  _close(out, ref, dtype, "out")
  for what, got, want in zip("qkv", vjp(do), vjp_ref(do)):
    assert got.shape == want.shape and got.dtype == want.dtype == dtype
    _close(got, want, dtype, f"d{what}")


def test_lse_and_its_gradient_under_jit_with_traced_mask():
  B, T, N, K, H, b = 1, 64, 4, 2, 64, 16
  q, k, v, do = _qkv(11, B, T, N, K, H)
  spec = _spec(True, 0, b, b)
  u = jax.random.normal(jax.random.key(12), (B, N, T))

  def loss(fn):
    def f(a, b_, c, m):
      out, lse = fn(m)(a, b_, c)
      return jnp.sum(out * do) + jnp.sum(lse * u)
    return f

  ref_fn = lambda m: lambda a, b_, c: (sparse.block_sparse_reference(a, b_, c, m, spec),
                                       _ref_lse(a, b_, m, spec))
  kernel_fn = lambda m: _kernel(m, spec, return_lse=True)
  grad = jax.jit(jax.grad(loss(kernel_fn), argnums=(0, 1, 2)))
  for seed in (11, 13):  # one compiled function, two masks
    mask = _random_mask(seed, B, K, T, T, b, b)
    out, lse = jax.jit(kernel_fn(mask))(q, k, v)
    assert lse.shape == (B, N, T) and lse.dtype == jnp.float32
    _close(lse, ref_fn(mask)(q, k, v)[1], jnp.float32, "lse")
    want = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v, mask)
    for what, g, w in zip("qkv", grad(q, k, v, mask), want):
      _close(g, w, jnp.float32, f"d{what} seed={seed}")


def test_density_one_is_dense_attention():
  B, T, N, K, H, b = 1, 64, 4, 2, 64, 32
  q, k, v, do = _qkv(3, B, T, N, K, H)
  mask = jnp.ones((B, K, T // b, T // b), bool)
  for causal in (True, False):
    spec = AttentionSpec(causal=causal, scale=0.1)
    kernel_spec = AttentionSpec(causal=causal, scale=0.1, block_sparse=BlockSparse(b, b))
    out, vjp = jax.vjp(_kernel(mask, kernel_spec), q, k, v)
    ref, vjp_ref = jax.vjp(lambda a, b_, c: attend_reference(a, b_, c, spec), q, k, v)
    _close(out, ref, jnp.float32, f"causal={causal}")
    for g, w in zip(vjp(do), vjp_ref(do)):
      _close(g, w, jnp.float32, f"grad causal={causal}")


def test_empty_query_rows_give_zeros_not_nan():
  B, T, N, K, H, b = 1, 64, 2, 1, 64, 16
  q, k, v, do = _qkv(4, B, T, N, K, H)
  spec = _spec(False, 0, b, b)
  mask = jnp.ones((B, K, T // b, T // b), bool).at[:, :, 1].set(False)  # query block 1: empty
  (out, lse), vjp = jax.vjp(_kernel(mask, spec, return_lse=True), q, k, v)
  assert not np.asarray(out[:, b:2 * b]).any()
  assert np.all(np.asarray(lse[:, :, b:2 * b]) == -np.inf)
  assert np.isfinite(np.asarray(lse[:, :, :b])).all()
  ref, vjp_ref = jax.vjp(lambda a, b_, c: sparse.block_sparse_reference(a, b_, c, mask, spec),
                         q, k, v)
  _close(out, ref, jnp.float32, "out")
  grads = vjp((do, jnp.zeros_like(lse)))
  assert not np.asarray(grads[0][:, b:2 * b]).any()
  for g, w in zip(grads, vjp_ref(do)):
    _close(g, w, jnp.float32, "grad")


def test_attend_pallas_static_and_predicted_masks():
  B, T, N, K, H = 1, 128, 2, 1, 64
  q, k, v, _ = _qkv(7, B, T, N, K, H)
  for spec in (AttentionSpec(causal=True, sliding_window=40), AttentionSpec(causal=False)):
    _close(bsg.attend_pallas(q, k, v, spec, interpret=True), attend_reference(q, k, v, spec),
           jnp.float32, str(spec))
  spec = _spec(True, 0, 32, 32, top_k=0.1, top_p=0.2)
  mask = sparse.predict_block_mask(q, k, spec)
  want = attend_reference(q, k, v, spec, block_mask=mask)
  _close(bsg.attend_pallas(q, k, v, spec, block_mask=mask, interpret=True), want, jnp.float32)
  _close(bsg.attend_pallas(q, k, v, spec, interpret=True), want, jnp.float32, "predicted here")
  with pytest.raises(AttentionUnsupported, match="segment ids"):
    bsg.attend_pallas(q, k, v, spec, segment_ids_BT=jnp.zeros((B, T), jnp.int32))


@pytest.mark.parametrize("T,H,bq,bk,dtype,match", [
    (100, 64, 32, 32, jnp.float32, "block_q=32 does not divide the query length T=100"),
    (128, 48, 32, 32, jnp.float32, r"head_dim=48 .*supported head dims are \(64, 128\)"),
    (128, 256, 32, 32, jnp.float32, "head_dim=256"),
    (128, 64, 32, 48, jnp.float32, "block_k=48 is not a power of two >= 16"),
    (128, 64, 8, 32, jnp.float32, "block_q=8 is not a power of two >= 16"),
    (128, 64, 32, 32, jnp.float16, "dtype float16 is not supported"),
])
def test_unsupported_inputs_say_why(T, H, bq, bk, dtype, match):
  q, k, v, _ = _qkv(8, 1, T, 2, 1, H, dtype, S=128)
  mask = jnp.ones((1, 1, max(T // bq, 1), 128 // bk), bool)
  with pytest.raises(AttentionUnsupported, match=match):
    bsg.block_sparse_attention(q, k, v, mask, block_q=bq, block_k=bk, interpret=True)


def test_malformed_shapes_raise_value_error():
  q, k, v, _ = _qkv(9, 1, 64, 3, 2, 64)
  with pytest.raises(ValueError, match="heads must be a multiple of kv_heads"):
    bsg.block_sparse_attention(q, k, v, jnp.ones((1, 2, 4, 4), bool), block_q=16, block_k=16)
  q, k, v, _ = _qkv(9, 1, 64, 2, 1, 64)
  with pytest.raises(ValueError, match=r"block_mask shape \(1, 1, 2, 4\): expected"):
    bsg.block_sparse_attention(q, k, v, jnp.ones((1, 1, 2, 4), bool), block_q=16, block_k=16)


def _loss(q, k, v, mask, block):
  out, lse = bsg.block_sparse_attention(q, k, v, mask, block_q=block, block_k=block,
                                        causal=True, sliding_window=100, return_lse=True)
  return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_triton_lowering_for_abstract_h100_without_gpu(monkeypatch):
  try:
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax.sharding import AbstractDevice, AbstractMesh
  except ImportError as e:
    pytest.skip(f"no Triton lowering / abstract devices in this jax: {e}")
  verified = []
  lower_module = triton_lowering.lower_jaxpr_to_triton_module

  def lower_and_verify(*args, **kwargs):  # the lowering itself does not verify the module
    result = lower_module(*args, **kwargs)
    verified.append(result.module.operation.verify())
    return result

  monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
  device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
  mesh = AbstractMesh((1,), ("d",), abstract_device=device)
  B, T, N, K, b = 2, 512, 8, 2, 64
  for H in bsg.SUPPORTED_HEAD_DIMS:
    for dtype in (jnp.bfloat16, jnp.float32):
      args = (jax.ShapeDtypeStruct((B, T, N, H), dtype),
              jax.ShapeDtypeStruct((B, T, K, H), dtype),
              jax.ShapeDtypeStruct((B, T, K, H), dtype),
              jax.ShapeDtypeStruct((B, K, T // b, T // b), jnp.bool_))
      step = jax.jit(jax.grad(functools.partial(_loss, block=b), argnums=(0, 1, 2)))
      with jax.sharding.use_abstract_mesh(mesh):
        text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
      assert text.count("__gpu$xla.gpu.triton") == 3, (H, dtype)  # fwd, dq, dkv
      for name in ("kestrel_block_sparse_gpu_fwd", "kestrel_block_sparse_gpu_dq",
                   "kestrel_block_sparse_gpu_dkv"):
        assert name in text, (name, H, dtype)
  assert verified == [True] * 12


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles Triton kernels: needs a GPU")
def test_compiled_on_gpu_matches_reference():
  B, T, N, K, b = 2, 1024, 8, 2, 64
  for H, dtype, tol, window in ((128, jnp.bfloat16, 2e-2, 0), (64, jnp.float32, 1e-4, 300)):
    q, k, v, do = _qkv(21, B, T, N, K, H, dtype)
    spec = _spec(True, window, b, b, top_k=0.1, top_p=0.3)
    mask = sparse.predict_block_mask(q, k, spec)
    mask = mask.at[0, 0, 3].set(False)  # an empty row: zeros, no NaN

    @jax.jit
    def f(a, b_, c, m, d):
      out, vjp = jax.vjp(_kernel(m, spec, interpret=False), a, b_, c)
      return out, vjp(d)

    out, grads = f(q, k, v, mask, do)
    with jax.default_matmul_precision("highest"):
      ref, vjp_ref = jax.vjp(
          lambda a, b_, c: sparse.block_sparse_reference(a, b_, c, mask, spec), q, k, v)
      want = vjp_ref(do)
    for what, got, exp in (("out", out, ref), *zip(("dq", "dk", "dv"), grads, want)):
      got, exp = np.asarray(got, np.float32), np.asarray(exp, np.float32)
      assert np.isfinite(got).all(), what
      np.testing.assert_allclose(got, exp, rtol=tol, atol=tol * max(1.0, np.abs(exp).max()),
                                 err_msg=f"{what} H={H} {dtype}")
