"""Our Pallas block-sparse attention (attention/kernels/block_sparse_tpu.py) against
``attention.sparse.block_sparse_reference``.

Kernels run interpreted on the CPU (small shapes: interpretation is slow); one test
compiles forward and backward with the real TPU compiler (needs libtpu, skipped
without it).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from attention import sparse
from attention.kernels import block_sparse_tpu as bst
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
  return lambda q, k, v: bst.block_sparse_attention(
      q, k, v, mask, block_q=bs.block_q, block_k=bs.block_k, causal=spec.causal,
      sliding_window=spec.sliding_window, scale=spec.scale, interpret=interpret,
      return_lse=return_lse)


# name: (B, T, N, K, H, block_q, block_k, causal, window, mask kind, dtype)
CASES = {
    "causal_gqa_random_mask_h64": (2, 128, 4, 2, 64, 32, 32, True, 0, "random", jnp.float32),
    "noncausal_mha_predicted_h128_rect_blocks": (1, 128, 4, 4, 128, 32, 64, False, 0, "predicted",
                                                 jnp.float32),
    "window_gqa_predicted": (1, 128, 4, 2, 64, 32, 32, True, 48, "predicted", jnp.float32),
    "bf16_causal_gqa_random_h128": (1, 128, 4, 2, 128, 32, 32, True, 0, "random", jnp.bfloat16),
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
    assert got.dtype == want.dtype == dtype
    _close(got, want, dtype, f"d{what}")


def test_lse_and_its_gradient():
  B, T, N, K, H, bq, bk = 1, 128, 4, 2, 64, 32, 32
  q, k, v, do = _qkv(11, B, T, N, K, H)
  spec = _spec(True, 0, bq, bk)
  mask = _random_mask(11, B, K, T, T, bq, bk)
  u = jax.random.normal(jax.random.key(12), (B, N, T))

  def loss(fn):
    def f(a, b, c):
      out, lse = fn(a, b, c)
      return jnp.sum(out * do) + jnp.sum(lse * u)
    return f

  ref_fn = lambda a, b, c: (sparse.block_sparse_reference(a, b, c, mask, spec),
                            _ref_lse(a, b, mask, spec))
  out, lse = _kernel(mask, spec, return_lse=True)(q, k, v)
  assert lse.shape == (B, N, T) and lse.dtype == jnp.float32
  _close(lse, ref_fn(q, k, v)[1], jnp.float32, "lse")
  grads = jax.grad(loss(_kernel(mask, spec, return_lse=True)), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
  for what, g, w in zip("qkv", grads, want):
    _close(g, w, jnp.float32, f"d{what}")


def test_density_one_is_dense_attention():
  B, T, N, K, H, b = 1, 128, 4, 2, 64, 64
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


def test_tpu_interpreter_forward():
  # The TPU-simulating interpreter fills uninitialised memory with NaN: a block we
  # forgot to initialise or write would show up.
  B, T, N, K, H, b = 1, 64, 2, 1, 128, 16
  q, k, v, _ = _qkv(5, B, T, N, K, H)
  spec = _spec(True, 24, b, b)
  mask = _random_mask(5, B, K, T, T, b, b, density=0.5)
  out = _kernel(mask, spec, interpret=pltpu.InterpretParams())(q, k, v)
  _close(out, sparse.block_sparse_reference(q, k, v, mask, spec), jnp.float32)


def test_smem_budget_splits_into_batch_and_head_chunks(monkeypatch):
  B, T, N, K, H, b = 2, 64, 4, 2, 64, 16
  q, k, v, do = _qkv(6, B, T, N, K, H)
  spec = _spec(True, 0, b, b)
  mask = _random_mask(6, B, K, T, T, b, b)
  ref, vjp_ref = jax.vjp(lambda a, b_, c: sparse.block_sparse_reference(a, b_, c, mask, spec),
                         q, k, v)
  calls = []
  real = bst._fwd_call
  monkeypatch.setattr(bst, "_fwd_call", lambda *a: calls.append(a[0].shape) or real(*a))
  monkeypatch.setattr(bst, "SMEM_BUDGET_BYTES", bst._smem_bytes(T // b, T // b))  # 1 (b, kh)
  out, vjp = jax.vjp(_kernel(mask, spec), q, k, v)
  assert calls == [(1, N // K, T, H)] * (B * K)
  _close(out, ref, jnp.float32, "out")
  for g, w in zip(vjp(do), vjp_ref(do)):
    _close(g, w, jnp.float32, "grad")


def test_attend_pallas_static_and_predicted_masks():
  B, T, N, K, H = 1, 128, 4, 2, 64
  q, k, v, _ = _qkv(7, B, T, N, K, H)
  for spec in (AttentionSpec(causal=True, sliding_window=40), AttentionSpec(causal=False)):
    _close(bst.attend_pallas(q, k, v, spec, interpret=True), attend_reference(q, k, v, spec),
           jnp.float32, str(spec))
  spec = _spec(True, 0, 32, 32, top_k=0.1, top_p=0.2)
  mask = sparse.predict_block_mask(q, k, spec)
  want = attend_reference(q, k, v, spec, block_mask=mask)
  _close(bst.attend_pallas(q, k, v, spec, block_mask=mask, interpret=True), want, jnp.float32)
  _close(bst.attend_pallas(q, k, v, spec, interpret=True), want, jnp.float32, "predicted here")
  with pytest.raises(AttentionUnsupported, match="segment ids"):
    bst.attend_pallas(q, k, v, spec, segment_ids_BT=jnp.zeros((B, T), jnp.int32))


@pytest.mark.parametrize("T,H,bq,bk,dtype,match", [
    (100, 64, 32, 32, jnp.float32, "block_q=32 does not divide the query length T=100"),
    (128, 48, 32, 32, jnp.float32, r"head_dim=48 .*supported head dims are \(64, 128, 192, 256\)"),
    (128, 320, 32, 32, jnp.float32, "head_dim=320"),
    (128, 64, 32, 12, jnp.float32, "block_k=12 is not a multiple of 8.*128 is preferred"),
    (128, 64, 32, 32, jnp.float16, "dtype float16 is not supported"),
])
def test_unsupported_inputs_say_why(T, H, bq, bk, dtype, match):
  q, k, v, _ = _qkv(8, 1, T, 2, 1, H, dtype, S=128)
  mask = jnp.ones((1, 1, max(T // bq, 1), 128 // bk), bool)
  with pytest.raises(AttentionUnsupported, match=match):
    bst.block_sparse_attention(q, k, v, mask, block_q=bq, block_k=bk, interpret=True)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_tpu_aot_compile_forward_and_backward(topology):
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name="default", num_slices=1)
  except Exception as e:  # noqa: BLE001 - no libtpu / no TPU compiler on this host
    pytest.skip(f"no TPU topology {topology} (libtpu missing?): {e}")
  rep = NamedSharding(Mesh(np.array(topo.devices[:1]).reshape(1), ("d",)), P())
  B, T, N, K, H, b = 1, 1024, 4, 2, 128, 128

  def loss(q, k, v, mask):
    out, lse = bst.block_sparse_attention(q, k, v, mask, block_q=b, block_k=b, causal=True,
                                          sliding_window=512, return_lse=True)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  args = (jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=rep),
          jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16, sharding=rep),
          jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16, sharding=rep),
          jax.ShapeDtypeStruct((B, K, T // b, T // b), jnp.bool_, sharding=rep))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  text = compiled.as_text()
  for name in ("kestrel_block_sparse_fwd", "kestrel_block_sparse_dq", "kestrel_block_sparse_dkv"):
    assert name in text, name
  flops = compiled.cost_analysis()["flops"]
  mem = compiled.memory_analysis()
  print(f"{topology} AOT block-sparse fwd+bwd: flops={flops:.4g} "
        f"args={mem.argument_size_in_bytes} out={mem.output_size_in_bytes} "
        f"temp={mem.temp_size_in_bytes}")
  # Dense-equivalent estimates: 2 matmuls forward, 3 in dq, 4 in dk/dv.
  assert flops >= 9 * 2 * B * N * T * T * H
