"""Our Pallas grouped matmul (moe/kernels/gmm_pallas.py) against the slow reference.

Kernels run interpreted on the CPU; one test compiles forward and backward with the
real TPU compiler for a v5e topology (needs libtpu, skipped without it).
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe import gmm as moe_gmm
from moe.kernels import gmm_pallas as gp


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
  tol = 1e-2 if dtype == jnp.bfloat16 else 2e-5
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                             rtol=tol, atol=tol)


# (M, K, N, group sizes, tiling, dtype)
CASES = {
    "zero_first_middle_tail_rows_unpadded_m": (37, 64, 64, [0, 10, 0, 17], (16, 64, 64),
                                                jnp.float32),
    "single_group_everything_k_n_split": (128, 256, 256, [128], (32, 128, 128), jnp.float32),
    "eight_groups_zero_last_uneven": (200, 256, 64, [30, 1, 45, 0, 64, 33, 27, 0], (32, 128, 64),
                                      jnp.float32),
    "k_n_padded_to_tile": (64, 200, 192, [20, 0, 40], (32, 128, 128), jnp.float32),
    "bf16_straddling_tiles": (200, 128, 128, [50, 0, 77, 60], (16, 128, 128), jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_grads_match_reference(name):
  M, K, N, sizes, tiling, dtype = CASES[name]
  lhs, rhs, dout = _inputs(len(name), M, K, N, len(sizes), dtype)
  gs = jnp.array(sizes, jnp.int32)
  fn = functools.partial(gp.gmm, tiling=tiling, interpret=True)
  out, vjp = jax.vjp(lambda a, b: fn(a, b, gs), lhs, rhs)
  ref, vjp_ref = jax.vjp(lambda a, b: _ref(a, b, gs), lhs, rhs)
  assert out.shape == (M, N) and out.dtype == dtype
  _close(out, ref, dtype)
  assert not np.asarray(out[sum(sizes):]).any(), "rows past the last group must be zero"
  for got, want in zip(vjp(dout), vjp_ref(dout)):
    assert got.dtype == want.dtype
    _close(got, want, dtype)


def test_fp32_output_from_bf16_and_jit_with_traced_sizes():
  lhs, rhs, _ = _inputs(1, 96, 128, 128, 3, jnp.bfloat16)
  gs = jnp.array([40, 0, 41], jnp.int32)
  f = jax.jit(lambda a, b, g: gp.gmm(a, b, g, tiling=(32, 128, 128), interpret=True,
                                     preferred_element_type=jnp.float32))
  out = f(lhs, rhs, gs)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _ref(lhs, rhs, gs, jnp.float32), rtol=1e-5, atol=1e-5)


def test_tgmm_matches_per_group_einsum_and_zero_groups_are_zero():
  sizes = [0, 23, 0, 41, 9, 0]
  x, _, dout = _inputs(7, 80, 64, 128, len(sizes), jnp.float32)
  gs = jnp.array(sizes, jnp.int32)
  got = gp.tgmm(x, dout, gs, tiling=(16, 64, 128), interpret=True)
  gid = np.asarray(moe_gmm.group_ids(gs, 80))
  want = np.stack([np.einsum("mk,mn->kn", x[gid == g], dout[gid == g]) for g in range(6)])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert not np.asarray(got[np.array(sizes) == 0]).any()


def test_metadata_visits_each_tile_in_order():
  meta = gp.make_group_metadata(jnp.array([0, 10, 0, 17, 3], jnp.int32), 64, 16)
  n = int(meta.num_visits_1[0])
  assert list(meta.group_offsets_G1) == [0, 0, 10, 10, 27, 30]
  assert list(meta.group_ids_V[:n]) == [1, 3, 3, 4, 5, 5]  # 5 = the tail pseudo-group
  assert list(meta.m_tile_ids_V) == [0, 0, 1, 1, 2, 3, 3, 3]  # padding repeats the last
  tg = gp.make_group_metadata(jnp.array([0, 10, 0, 17, 3], jnp.int32), 64, 16,
                              visit_empty_groups=True, cover_tail=False)
  assert list(tg.group_ids_V[:int(tg.num_visits_1[0])]) == [0, 1, 2, 3, 3, 4]


def test_misaligned_tile_says_how_to_fix():
  lhs, rhs, _ = _inputs(0, 100, 256, 128, 2)
  with pytest.raises(ValueError, match="multiple of 128"):
    gp.gmm(lhs, rhs, jnp.array([50, 50], jnp.int32), tiling=(16, 96, 128), interpret=True)


def test_registry_implementations_agree():
  lhs, rhs, dout = _inputs(3, 256, 128, 128, 4)
  gs = jnp.array([70, 0, 130, 56], jnp.int32)

  def run(impl):
    f = lambda a, b: moe_gmm.gmm(a, b, gs, implementation=impl, tiling=(64, 128, 128),
                                 interpret=True)
    out, vjp = jax.vjp(f, lhs, rhs)
    return (out, *vjp(dout))

  want = run("xla")
  for impl in ("pallas", "megablox", "ragged_dot"):
    for got, ref in zip(run(impl), want):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=impl)


def test_tpu_interpreter_forward():
  # The TPU-simulating interpreter fills uninitialised memory with NaN: a row we
  # forgot to write would show up.
  lhs, rhs, _ = _inputs(5, 72, 128, 128, 3)
  gs = jnp.array([0, 30, 21], jnp.int32)
  t0 = time.time()
  out = gp.gmm(lhs, rhs, gs, tiling=(16, 128, 128), interpret=pltpu.InterpretParams())
  np.testing.assert_allclose(out, _ref(lhs, rhs, gs), rtol=1e-4, atol=1e-4)
  assert time.time() - t0 < 30


def test_tpu_aot_compile_forward_and_backward():
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                        chip_config_name="default", num_slices=1)
  except Exception as e:  # noqa: BLE001 - no libtpu / no TPU compiler on this host
    pytest.skip(f"no TPU topology (libtpu missing?): {e}")
  mesh = Mesh(np.array(topo.devices), ("d",))
  M, K, N, G = 512, 256, 256, 8

  def loss(x, w, gs):
    out = gp.gmm(x, w, gs, tiling=(128, 128, 128), interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  # Mosaic kernels are not auto-partitioned: run per device under shard_map.
  step = jax.shard_map(jax.value_and_grad(loss, argnums=(0, 1)), mesh=mesh,
                       in_specs=(P(), P(), P()), out_specs=(P(), (P(), P())), check_vma=False)
  rep = NamedSharding(mesh, P())
  args = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16, sharding=rep),
          jax.ShapeDtypeStruct((G, K, N), jnp.bfloat16, sharding=rep),
          jax.ShapeDtypeStruct((G,), jnp.int32, sharding=rep))
  compiled = jax.jit(step).lower(*args).compile()
  text = compiled.as_text()
  assert all(k in text for k in ("kestrel_gmm", "kestrel_gmm_nt", "kestrel_tgmm"))
  flops = compiled.cost_analysis()["flops"]
  mem = compiled.memory_analysis()
  print(f"v5e AOT gmm fwd+bwd: flops={flops:.4g} args={mem.argument_size_in_bytes} "
        f"out={mem.output_size_in_bytes} temp={mem.temp_size_in_bytes}")
  assert flops >= 3 * 2 * M * K * N  # forward + two backward products (cost estimates)
  assert mem.output_size_in_bytes >= (M * K + G * K * N) * 2
