"""Our Pallas GPU (Triton) grouped matmul (moe/kernels/gmm_gpu.py) against the slow reference.

Kernels run in Pallas's generic interpreter on the CPU (it fills unwritten output
with NaN, so a forgotten row fails). One test lowers forward and backward to
Triton IR for an abstract H100 without a GPU and verifies the Triton modules;
one compiles and runs them for real, only where the default backend is a GPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import gmm as moe_gmm
from moe.kernels import gmm_gpu as gg


def _inputs(seed, M, K, N, G, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  lhs_MK = jax.random.normal(k1, (M, K), jnp.float32).astype(dtype)
  rhs_GKN = (jax.random.normal(k2, (G, K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
  dout_MN = jax.random.normal(k3, (M, N), jnp.float32).astype(dtype)
  return lhs_MK, rhs_GKN, dout_MN


def _ref(lhs_MK, rhs_GKN, group_sizes_G, out_dtype=None):
  return moe_gmm.gmm_reference(lhs_MK, rhs_GKN, group_sizes_G,
                               out_dtype=out_dtype or lhs_MK.dtype)


def _close(a, b, dtype):
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                             rtol=tol, atol=tol)


# (M, K, N, group sizes, tiling, dtype)
CASES = {
    "zero_first_middle_last_tail_rows_unpadded_m": (37, 40, 24, [0, 10, 0, 17, 0], (16, 16, 16),
                                                    jnp.float32),
    "uneven_groups_k_n_split": (100, 48, 40, [13, 0, 30, 1, 20, 9, 0], (16, 16, 16),
                                jnp.float32),
    "one_group_fills_m_exactly": (64, 64, 32, [64], (32, 32, 32), jnp.float32),
    "bf16_straddling_tiles": (72, 64, 32, [20, 0, 33, 10], (16, 32, 16), jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_grads_match_reference(name):
  M, K, N, sizes, tiling, dtype = CASES[name]
  lhs, rhs, dout = _inputs(len(name), M, K, N, len(sizes), dtype)
  gs = jnp.array(sizes, jnp.int32)
  fn = functools.partial(gg.gmm, tiling=tiling, interpret=True)
  out, vjp = jax.vjp(lambda a, b: fn(a, b, gs), lhs, rhs)
  ref, vjp_ref = jax.vjp(lambda a, b: _ref(a, b, gs), lhs, rhs)
  assert out.shape == (M, N) and out.dtype == dtype
  _close(out, ref, dtype)
  assert not np.asarray(out[sum(sizes):]).any(), "rows past the last group must be zero"
  for got, want in zip(vjp(dout), vjp_ref(dout)):
    assert got.shape == want.shape and got.dtype == want.dtype
    _close(got, want, dtype)


def test_fp32_output_from_bf16_under_jit_with_traced_sizes():
  lhs, rhs, _ = _inputs(1, 48, 32, 32, 3, jnp.bfloat16)
  f = jax.jit(lambda a, b, g: gg.gmm(a, b, g, tiling=(16, 32, 32), interpret=True,
                                     preferred_element_type=jnp.float32))
  for sizes in ([20, 0, 21], [0, 0, 48]):  # same compiled function, other sizes
    gs = jnp.array(sizes, jnp.int32)
    out = f(lhs, rhs, gs)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _ref(lhs, rhs, gs, jnp.float32), rtol=1e-5, atol=1e-5)


def test_tgmm_matches_per_group_einsum_and_zero_groups_are_zero():
  sizes = [0, 23, 0, 41, 9, 0]
  x, _, dout = _inputs(7, 80, 48, 32, len(sizes), jnp.float32)
  gs = jnp.array(sizes, jnp.int32)
  got = gg.tgmm(x, dout, gs, tiling=(16, 16, 32), interpret=True)
  gid = np.asarray(moe_gmm.group_ids(gs, 80))
  want = np.stack([np.einsum("mk,mn->kn", x[gid == g], dout[gid == g]) for g in range(6)])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert not np.asarray(got[np.array(sizes) == 0]).any()


def test_visits_cover_each_group_tile_and_the_tail():
  offs, tiles, groups = gg.make_visits(jnp.array([0, 10, 0, 17, 3], jnp.int32), 64, 16)
  assert list(offs) == [0, 0, 10, 10, 27, 30, 64]
  # group 1: tile 0; group 3: tiles 0, 1; group 4: tile 1; tail (5): tiles 1, 2, 3; unused: 6.
  assert list(groups) == [1, 3, 3, 4, 5, 5, 5, 6, 6]
  assert list(tiles) == [0, 0, 1, 1, 1, 2, 3, 0, 0]


def test_bad_tile_says_how_to_fix():
  lhs, rhs, _ = _inputs(0, 64, 64, 64, 2)
  with pytest.raises(ValueError, match="power of two"):
    gg.gmm(lhs, rhs, jnp.array([30, 30], jnp.int32), tiling=(16, 48, 64), interpret=True)


def test_under_shard_map_with_varying_axes_check():
  mesh = jax.make_mesh((2,), ("d",))
  lhs, rhs, _ = _inputs(3, 2 * 40, 32, 32, 3)
  gs = jnp.array([9, 0, 22], jnp.int32)  # per shard: 40 rows, 31 in groups
  lhs = jax.device_put(lhs, jax.sharding.NamedSharding(mesh, jax.P("d")))
  rhs = jax.device_put(rhs, jax.sharding.NamedSharding(mesh, jax.P()))

  def run(gmm_fn):
    def step(x, w):
      value, grads = jax.value_and_grad(lambda a, b: jnp.sum(gmm_fn(a, b) ** 2),
                                        argnums=(0, 1))(x, w)
      return jax.lax.psum(value, "d"), grads  # d_rhs: summed over shards by the VJP
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(jax.P("d"), jax.P()),
                                 out_specs=(jax.P(), (jax.P("d"), jax.P()))))(lhs, rhs)

  got = run(lambda a, b: gg.gmm(a, b, gs, tiling=(16, 16, 16), interpret=True))
  want = run(lambda a, b: _ref(a, b, gs))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def _loss(x, w, gs, tiling):
  return jnp.sum(gg.gmm(x, w, gs, tiling=tiling, interpret=False).astype(jnp.float32) ** 2)


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
  M, K, N, G = 200, 96, 80, 5
  for dtype in (jnp.bfloat16, jnp.float32):
    args = (jax.ShapeDtypeStruct((M, K), dtype), jax.ShapeDtypeStruct((G, K, N), dtype),
            jax.ShapeDtypeStruct((G,), jnp.int32))
    step = jax.jit(jax.value_and_grad(functools.partial(_loss, tiling=gg.DEFAULT_TILING),
                                      argnums=(0, 1)))
    with jax.sharding.use_abstract_mesh(mesh):
      text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # gmm, gmm_nt (d_lhs), tgmm (d_rhs)
  assert verified == [True] * 6


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles Triton kernels: needs a GPU")
def test_compiled_on_gpu_matches_reference():
  M, K, N = 1000, 256, 384
  sizes = [0, 130, 7, 0, 300, 64, 255, 0]  # sum 756 < M
  gs = jnp.array(sizes, jnp.int32)
  for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)):
    lhs, rhs, dout = _inputs(11, M, K, N, len(sizes), dtype)
    f = jax.jit(lambda a, b, g: jax.vjp(lambda x, w: gg.gmm(x, w, g), a, b)[1](dout))
    out = jax.jit(lambda a, b, g: gg.gmm(a, b, g))(lhs, rhs, gs)
    with jax.default_matmul_precision("highest"):
      ref, vjp_ref = jax.vjp(lambda a, b: _ref(a, b, gs), lhs, rhs)
      want = vjp_ref(dout)
    for got, exp in ((out, ref), *zip(f(lhs, rhs, gs), want)):
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(exp, np.float32),
                                 rtol=tol, atol=tol)
    assert not np.asarray(out[sum(sizes):]).any()
