"""One conformance suite for ``moe.gmm.gmm``: every implementation of the registry
against the reference (``xla``: every row times every group's matrix, masked),
forward and both gradients, on fresh random inputs.

Implementations: ``xla``, ``ragged_dot`` (plain XLA) and the kernels interpreted on the
CPU: ``megablox`` (JAX's TPU kernel), ``pallas`` (our TPU kernel), ``pallas_gpu`` (our
GPU kernel). Each case has empty groups (first, middle or last), rows past the last
group (which must come out zero), uneven group sizes that straddle tiles, and tiles
that split or pad M, K and N; an implementation either matches or refuses the case
with ``core.errors.Unsupported``.

After the suite: what is not conformance — ``tgmm`` and the visit schedules, tile
errors, shard_map's varying-axes check, the TPU interpreter, a TPU AOT compile, the
Triton lowering, and the registry's default order per platform.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, conformance_params, topology_or_skip, triton_h100_lowering

from core import platform
from core.errors import Unsupported
from moe import gmm as moe_gmm
from moe.kernels import gmm_gpu as gg
from moe.kernels import gmm_pallas as gp

# Tiny programs: XLA's cheapest compile is plenty (compiles dominate this suite's time).
fast_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                               "xla_llvm_disable_expensive_passes": True})


def inputs(seed, M, K, N, G, dtype=jnp.float32):
  """lhs [M, K], rhs [G, K, N] (scaled by 1/sqrt(K)) and an output cotangent [M, N]."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: rng.standard_normal(shape, np.float32)
  return (jnp.asarray(draw(M, K)).astype(dtype),
          jnp.asarray(draw(G, K, N) / np.sqrt(K)).astype(dtype),
          jnp.asarray(draw(M, N)).astype(dtype))


def reference(lhs, rhs, group_sizes, out_dtype=None):
  return moe_gmm.gmm_reference(lhs, rhs, group_sizes, out_dtype=out_dtype or lhs.dtype)


def tol_of(dtype, impl=""):
  if dtype == jnp.bfloat16:
    return 2e-2 if impl == "pallas_gpu" else 1e-2
  return 2e-5


def close(got, want, tol, what=""):
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all(), f"{what}: not finite"
  try:
    assert_close(got, np.asarray(want, np.float32), tol)
  except AssertionError as e:
    raise AssertionError(f"{what}: {e}") from None


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
  """Shapes, group sizes and tiles. ``tiling`` is for the TPU kernels (tiles that split a
  dimension: M a multiple of 8 (16 for bf16), K and N of 128); ``gpu_tiling`` for the
  GPU kernel (powers of two >= 16), default ``tiling``."""
  seed: int
  M: int
  K: int
  N: int
  sizes: tuple[int, ...]
  tiling: tuple[int, int, int]
  gpu_tiling: tuple[int, int, int] | None = None
  dtype: str = "float32"

  def tiles(self, impl):
    return (self.gpu_tiling or self.tiling) if impl == "pallas_gpu" else self.tiling


CASES = {
    "zero_first_middle_tail_rows_unpadded_m": Case(1, 37, 64, 64, (0, 10, 0, 17), (16, 64, 64)),
    "single_group_everything_k_n_split": Case(2, 128, 256, 256, (128,), (32, 128, 128)),
    "eight_groups_zero_last_uneven": Case(3, 200, 256, 64, (30, 1, 45, 0, 64, 33, 27, 0),
                                          (32, 128, 64)),
    "k_n_padded_to_tile": Case(4, 64, 200, 192, (20, 0, 40), (32, 128, 128)),
    "bf16_straddling_tiles": Case(5, 200, 128, 128, (50, 0, 77, 60), (16, 128, 128),
                                  dtype="bfloat16"),
    "small_tiles_zero_last": Case(6, 37, 40, 24, (0, 10, 0, 17, 0), (16, 128, 128),
                                  gpu_tiling=(16, 16, 16)),
    "uneven_groups_k_n_split": Case(7, 100, 48, 40, (13, 0, 30, 1, 20, 9, 0), (16, 128, 128),
                                    gpu_tiling=(16, 16, 16)),
    "one_group_fills_m_exactly": Case(8, 64, 64, 32, (64,), (32, 128, 128),
                                      gpu_tiling=(32, 32, 32)),
    "bf16_small_tiles": Case(9, 72, 64, 32, (20, 0, 33, 10), (16, 128, 128),
                             gpu_tiling=(16, 32, 16), dtype="bfloat16"),
    "every_implementation_runs": Case(10, 256, 128, 128, (70, 0, 130, 56), (64, 128, 128)),
}

IMPLS = ("xla", "ragged_dot", "megablox", "pallas", "pallas_gpu")
# The cases each implementation runs (all it supports when absent); megablox refuses
# the others (checked). Interpreted kernels are slow: each runs a representative subset;
# every case runs on at least one kernel.
RUNS = {
    "xla": ("bf16_straddling_tiles", "every_implementation_runs"),  # xla *is* the reference
    "pallas": ("zero_first_middle_tail_rows_unpadded_m", "single_group_everything_k_n_split",
               "eight_groups_zero_last_uneven", "k_n_padded_to_tile", "bf16_straddling_tiles",
               "every_implementation_runs"),
    "pallas_gpu": ("zero_first_middle_tail_rows_unpadded_m", "small_tiles_zero_last",
                   "uneven_groups_k_n_split", "one_group_fills_m_exactly", "bf16_small_tiles",
                   "every_implementation_runs"),
}


def refusal(impl: str, case: Case) -> str | None:
  """The documented reason ``impl`` refuses ``case`` (a regex), or None."""
  if impl == "megablox":
    tiles = [min(t, d) for t, d in zip(case.tiling, (case.M, case.K, case.N))]
    if any(d % t for t, d in zip(tiles, (case.M, case.K, case.N))):
      return "must be multiples of the tiles"
  return None


assert refusal("megablox", CASES["every_implementation_runs"]) is None


def _out_and_grads(fn, lhs, rhs, gs, dout):
  out, vjp = jax.vjp(lambda a, b: fn(a, b, gs), lhs, rhs)
  return out, vjp(dout)


@functools.cache
def _reference(name):
  case = CASES[name]
  lhs, rhs, dout = inputs(case.seed, case.M, case.K, case.N, len(case.sizes),
                          jnp.dtype(case.dtype))
  gs = jnp.array(case.sizes, jnp.int32)
  return fast_jit(functools.partial(_out_and_grads, reference))(lhs, rhs, gs, dout)


@pytest.mark.parametrize("impl,name", conformance_params(CASES, IMPLS, RUNS, refusal))
def test_conformance(impl, name):
  case = CASES[name]
  dtype = jnp.dtype(case.dtype)
  lhs, rhs, dout = inputs(case.seed, case.M, case.K, case.N, len(case.sizes), dtype)
  gs = jnp.array(case.sizes, jnp.int32)
  call = lambda a, b, g: moe_gmm.gmm(a, b, g, implementation=impl, tiling=case.tiles(impl))
  reason = refusal(impl, case)
  if reason is not None:  # refused while tracing: nothing needs to run
    with pytest.raises(Unsupported, match=f"{impl}: .*{reason}"):
      jax.eval_shape(call, lhs, rhs, gs)
    return
  out, grads = fast_jit(functools.partial(_out_and_grads, call))(lhs, rhs, gs, dout)
  want, want_grads = _reference(name)
  assert out.shape == (case.M, case.N) and out.dtype == dtype
  tol = tol_of(dtype, impl)
  close(out, want, tol, "out")
  assert not np.asarray(out[sum(case.sizes):]).any(), "rows past the last group must be zero"
  for what, got, w, x in zip(("d_lhs", "d_rhs"), grads, want_grads, (lhs, rhs)):
    assert got.shape == x.shape and got.dtype == x.dtype, what
    close(got, w, tol, what)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_output_from_bf16_under_jit_with_traced_sizes(impl):
  lhs, rhs, _ = inputs(11, 48, 32, 32, 3, jnp.bfloat16)
  tiling = (16, 32, 32) if impl == "pallas_gpu" else (16, 128, 128)
  f = fast_jit(lambda a, b, g: moe_gmm.gmm(a, b, g, implementation=impl, tiling=tiling,
                                           preferred_element_type=jnp.float32))
  want = fast_jit(lambda a, b, g: reference(a, b, g, jnp.float32))
  for sizes in ([20, 0, 21], [0, 0, 48]):  # same compiled function, other sizes
    gs = jnp.array(sizes, jnp.int32)
    out = f(lhs, rhs, gs)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, want(lhs, rhs, gs), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- kernels

KERNEL_MODULES = {"pallas": (gp, (16, 64, 128)), "pallas_gpu": (gg, (16, 16, 32))}


@pytest.mark.parametrize("impl", list(KERNEL_MODULES))
def test_tgmm_matches_per_group_einsum_and_zero_groups_are_zero(impl):
  module, tiling = KERNEL_MODULES[impl]
  sizes = [0, 23, 0, 41, 9, 0]
  x, _, dout = inputs(7, 80, 64 if impl == "pallas" else 48, 128 if impl == "pallas" else 32,
                      len(sizes))
  gs = jnp.array(sizes, jnp.int32)
  got = fast_jit(lambda x, d, g: module.tgmm(x, d, g, tiling=tiling, interpret=True))(x, dout, gs)
  gid = np.asarray(moe_gmm.group_ids(gs, 80))
  x, dout = np.asarray(x), np.asarray(dout)
  want = np.stack([np.einsum("mk,mn->kn", x[gid == g], dout[gid == g]) for g in range(6)])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert not np.asarray(got[np.array(sizes) == 0]).any()


def test_tpu_metadata_visits_each_tile_in_order():
  meta = gp.make_group_metadata(jnp.array([0, 10, 0, 17, 3], jnp.int32), 64, 16)
  n = int(meta.num_visits_1[0])
  assert list(meta.group_offsets_G1) == [0, 0, 10, 10, 27, 30]
  assert list(meta.group_ids_V[:n]) == [1, 3, 3, 4, 5, 5]  # 5 = the tail pseudo-group
  assert list(meta.m_tile_ids_V) == [0, 0, 1, 1, 2, 3, 3, 3]  # padding repeats the last
  tg = gp.make_group_metadata(jnp.array([0, 10, 0, 17, 3], jnp.int32), 64, 16,
                              visit_empty_groups=True, cover_tail=False)
  assert list(tg.group_ids_V[:int(tg.num_visits_1[0])]) == [0, 1, 2, 3, 3, 4]


def test_gpu_visits_cover_each_group_tile_and_the_tail():
  offs, tiles, groups = gg.make_visits(jnp.array([0, 10, 0, 17, 3], jnp.int32), 64, 16)
  assert list(offs) == [0, 0, 10, 10, 27, 30, 64]
  # group 1: tile 0; group 3: tiles 0, 1; group 4: tile 1; tail (5): tiles 1, 2, 3; unused: 6.
  assert list(groups) == [1, 3, 3, 4, 5, 5, 5, 6, 6]
  assert list(tiles) == [0, 0, 1, 1, 1, 2, 3, 0, 0]


def test_bad_tiles_say_how_to_fix():
  lhs, rhs, _ = inputs(0, 100, 256, 128, 2)
  with pytest.raises(ValueError, match="multiple of 128"):
    gp.gmm(lhs, rhs, jnp.array([50, 50], jnp.int32), tiling=(16, 96, 128), interpret=True)
  lhs, rhs, _ = inputs(0, 64, 64, 64, 2)
  with pytest.raises(ValueError, match="power of two"):
    gg.gmm(lhs, rhs, jnp.array([30, 30], jnp.int32), tiling=(16, 48, 64), interpret=True)
  # Through the registry the GPU kernel's refusal is an Unsupported, with the fix.
  with pytest.raises(Unsupported, match="pallas_gpu: .*power of two"):
    jax.eval_shape(lambda a, b: moe_gmm.gmm(a, b, jnp.array([30, 30], jnp.int32),
                                            implementation="pallas_gpu", tiling=(16, 48, 64)),
                   lhs, rhs)


def test_gpu_kernel_under_shard_map_with_varying_axes_check():
  mesh = jax.make_mesh((2,), ("d",))
  lhs, rhs, _ = inputs(3, 2 * 40, 32, 32, 3)
  gs = jnp.array([9, 0, 22], jnp.int32)  # per shard: 40 rows, 31 in groups
  lhs = jax.device_put(lhs, jax.sharding.NamedSharding(mesh, jax.P("d")))
  rhs = jax.device_put(rhs, jax.sharding.NamedSharding(mesh, jax.P()))

  def run(gmm_fn):
    def step(x, w):
      value, grads = jax.value_and_grad(lambda a, b: jnp.sum(gmm_fn(a, b) ** 2),
                                        argnums=(0, 1))(x, w)
      return jax.lax.psum(value, "d"), grads  # d_rhs: summed over shards by the VJP
    return fast_jit(jax.shard_map(step, mesh=mesh, in_specs=(jax.P("d"), jax.P()),
                                  out_specs=(jax.P(), (jax.P("d"), jax.P()))))(lhs, rhs)

  got = run(lambda a, b: gg.gmm(a, b, gs, tiling=(16, 16, 16), interpret=True))
  want = run(lambda a, b: reference(a, b, gs))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_tpu_interpreter_forward():
  # The TPU-simulating interpreter fills uninitialised memory with NaN: a row we
  # forgot to write would show up.
  from jax.experimental.pallas import tpu as pltpu
  lhs, rhs, _ = inputs(5, 72, 128, 128, 3)
  gs = jnp.array([0, 30, 21], jnp.int32)
  out = gp.gmm(lhs, rhs, gs, tiling=(16, 128, 128), interpret=pltpu.InterpretParams())
  np.testing.assert_allclose(out, reference(lhs, rhs, gs), rtol=1e-4, atol=1e-4)


def test_tpu_aot_compile_forward_and_backward():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(topology_or_skip("v5e:2x2")), ("d",))
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
  assert flops >= 3 * 2 * M * K * N  # forward + two backward products (cost estimates)
  assert mem.output_size_in_bytes >= (M * K + G * K * N) * 2


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_triton_lowering_for_abstract_h100_without_gpu(monkeypatch):
  mesh, verified = triton_h100_lowering(monkeypatch)

  def loss(x, w, gs):
    return jnp.sum(gg.gmm(x, w, gs, tiling=gg.DEFAULT_TILING).astype(jnp.float32) ** 2)

  M, K, N, G = 200, 96, 80, 5
  for dtype in (jnp.bfloat16, jnp.float32):
    args = (jax.ShapeDtypeStruct((M, K), dtype), jax.ShapeDtypeStruct((G, K, N), dtype),
            jax.ShapeDtypeStruct((G,), jnp.int32))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with jax.sharding.use_abstract_mesh(mesh):
      text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # gmm, gmm_nt (d_lhs), tgmm (d_rhs)
  assert verified == [True] * 6


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles Triton kernels: needs a GPU")
def test_gpu_kernel_compiled_on_gpu_matches_reference():
  M, K, N = 1000, 256, 384
  sizes = [0, 130, 7, 0, 300, 64, 255, 0]  # sum 756 < M
  gs = jnp.array(sizes, jnp.int32)
  for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)):
    lhs, rhs, dout = inputs(11, M, K, N, len(sizes), dtype)
    f = jax.jit(lambda a, b, g: jax.vjp(lambda x, w: gg.gmm(x, w, g), a, b)[1](dout))
    out = jax.jit(lambda a, b, g: gg.gmm(a, b, g))(lhs, rhs, gs)
    with jax.default_matmul_precision("highest"):
      ref, vjp_ref = jax.vjp(lambda a, b: reference(a, b, gs), lhs, rhs)
      want = vjp_ref(dout)
    for got, exp in ((out, ref), *zip(f(lhs, rhs, gs), want)):
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(exp, np.float32),
                                 rtol=tol, atol=tol)
    assert not np.asarray(out[sum(sizes):]).any()


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("target,want", [("cpu", ("ragged_dot", None)),
                                         ("gpu", ("ragged_dot", None)),
                                         ("tpu", ("pallas", False))])
def test_default_order_per_platform_by_what_runs(monkeypatch, target, want):
  """implementation=None: which implementation runs (and whether interpreted)."""
  calls = []
  for name in moe_gmm.REGISTRY.names():
    def fn(lhs, rhs, gs, *, _name=name, out_dtype, tiling=None, **kwargs):
      calls.append((_name, kwargs.get("interpret")))
      return jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype)
    monkeypatch.setitem(moe_gmm.REGISTRY._entries, name,
                        dataclasses.replace(moe_gmm.REGISTRY[name], fn=fn))
  lhs, rhs, _ = inputs(0, 64, 32, 32, 2)
  with platform.target(target):
    jax.eval_shape(lambda a, b: moe_gmm.gmm(a, b, jnp.array([30, 30], jnp.int32)), lhs, rhs)
  assert calls == [want]


def test_refusals_are_reported_and_a_list_falls_through():
  """Kernels off their platform and inputs a kernel cannot take are ``Unsupported``
  with the reason; a list of names tries each in order and reports every reason."""
  lhs, rhs, _ = inputs(0, 37, 32, 32, 2)
  gs = jnp.array([10, 20], jnp.int32)
  with platform.target("gpu"), pytest.raises(
      Unsupported, match=r"pallas: a tpu kernel; not run on gpu \(use 'pallas_gpu' or "
                         r"'ragged_dot'\); megablox: a tpu kernel; not run on gpu "
                         r"\(use 'ragged_dot'\); nope: not registered"):
    jax.eval_shape(lambda a, b: moe_gmm.gmm(a, b, gs, implementation=["pallas", "megablox",
                                                                       "nope"]), lhs, rhs)
  with pytest.raises(Unsupported, match="megablox: shapes M=37.*multiples of the tiles"):
    jax.eval_shape(lambda a, b: moe_gmm.gmm(a, b, gs, implementation="megablox",
                                            tiling=(16, 128, 128)), lhs, rhs)
  # A list falls through to the first implementation that runs.
  out = moe_gmm.gmm(lhs, rhs, gs, implementation=["megablox", "ragged_dot"], tiling=(16, 32, 32))
  np.testing.assert_allclose(out, reference(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
