"""One conformance suite for ``attention.ops.attend``: every implementation of the
registry against the reference, forward and gradients, on fresh random inputs.

Implementations: ``xla`` (the reference entry), ``flash``, ``gather`` and ``jax_nn`` (plain XLA),
``blocked`` (hierarchical specs), and the kernels interpreted on the CPU: ``splash``
(JAX's TPU kernel), ``pallas`` (our TPU kernel) and ``pallas_gpu`` (our GPU kernel).
Each case is a spec plus inputs; an implementation either matches
``attention.reference.attend_reference`` (or ``hierarchical_reference``) or refuses the
case with ``core.errors.Unsupported`` and a documented reason (checked for every
pair). ``gather``, ``jax_nn`` and ``blocked`` run every case they support; ``xla`` and
the interpreted kernels (slow) run the cases listed in ``RUNS``.

After the suite: what is not conformance — the kernels' log-sum-exp, empty rows,
input checks, SMEM chunking, the TPU interpreter, TPU AOT compiles, the Triton
lowering, the registry's default order per platform, the attention layer under a
mesh, and hierarchical attention against a per-query loop.
"""
import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (assert_close, conformance_params, placed, topology_or_skip,
                      triton_h100_lowering)

from attention import hierarchical, masks, ops, sparse
from attention.kernels import block_sparse_gpu as bsg
from attention.kernels import block_sparse_tpu as bst
from attention.reference import attend_reference, expand_block_mask
from attention.spec import AttentionSpec, BlockSparse, Hierarchical
from core import platform
from core.errors import Unsupported

# ----------------------------------------------------------------------------- inputs


def qkv(seed, B, T, N, K, H, dtype=jnp.float32, S=None):
  """q [B, T, N, H], k, v [B, S, K, H] and an output cotangent, standard normal (drawn
  in numpy: no per-shape compiles)."""
  S = S or T
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
  return draw(B, T, N, H), draw(B, S, K, H), draw(B, S, K, H), draw(B, T, N, H)


def random_mask(seed, B, K, T, S, bq, bk, density=0.4):
  """Random blocks plus the diagonal ones (so that no causal row is empty)."""
  diag = sparse.forced_blocks(BlockSparse(block_q=bq, block_k=bk, sink_blocks=0), T, S)
  m = np.random.default_rng(seed).random((B, K, T // bq, S // bk)) < density
  return jnp.asarray(m | diag)


def ref_lse(q_BTNH, k_BSKH, block_mask, spec):
  """log-sum-exp [B, N, T] of the allowed scaled logits (-inf for an empty row)."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1:3]
  bs = spec.block_sparse
  scale = spec.scale if spec.scale is not None else H ** -0.5
  logits = jnp.einsum("btkgh,bskh->bkgts", q_BTNH.reshape(B, T, K, N // K, H), k_BSKH,
                      preferred_element_type=jnp.float32) * scale
  allowed = (masks.token_mask(spec.causal, spec.sliding_window, T, S)
             & expand_block_mask(block_mask, bs.block_q, bs.block_k)[:, :, None])
  return jax.nn.logsumexp(jnp.where(allowed, logits, -jnp.inf), axis=-1).reshape(B, N, T)


def tol_of(dtype):
  return 1.5e-2 if dtype == jnp.bfloat16 else 2e-5


def close(got, want, dtype, what=""):
  """Finite, and within ``tol_of(dtype)`` of ``want`` relative to its scale."""
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all(), f"{what}: not finite"
  try:
    assert_close(got, np.asarray(want, np.float32), tol_of(dtype))
  except AssertionError as e:
    raise AssertionError(f"{what}: {e}") from None


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
  """A spec and the inputs it is run on.

  mask: None (dense), ``predicted`` (``attend`` predicts it), ``random`` (diagonal
  kept), ``ones`` (density one: compared with dense attention without a mask) or
  ``empty_row`` (all ones but query block 1: rows with no allowed key).
  """
  seed: int
  B: int = 1
  T: int = 128
  N: int = 4
  K: int = 2
  H: int = 64
  causal: bool = True
  window: int = 0
  scale: float | None = None
  blocks: tuple[int, int] | None = None  # (block_q, block_k) of spec.block_sparse
  mask: str | None = None
  segments: bool = False
  dtype: str = "float32"
  hierarchical: tuple[int, int] | None = None  # (block, local_blocks)

  @property
  def spec(self) -> AttentionSpec:
    bs = None if self.blocks is None else BlockSparse(*self.blocks, top_k=0.2, top_p=0.3)
    hi = None if self.hierarchical is None else Hierarchical(*self.hierarchical)
    return AttentionSpec(causal=self.causal, sliding_window=self.window, scale=self.scale,
                         block_sparse=bs, hierarchical=hi)

  def inputs(self):
    """q, k, v, do, segment ids (or None), the block mask for ``attend`` (or None)."""
    q, k, v, do = qkv(self.seed, self.B, self.T, self.N, self.K, self.H, jnp.dtype(self.dtype))
    seg = None
    if self.segments:  # two segments per row, split at different places
      split = jnp.array([50, 90])[:self.B, None]
      seg = (jnp.arange(self.T)[None, :] >= split).astype(jnp.int32)
    mask = None
    if self.mask is not None and self.mask != "predicted":
      bq, bk = self.blocks
      shape = (self.B, self.K, self.T // bq, self.T // bk)
      if self.mask == "random":
        mask = random_mask(self.seed + 1, self.B, self.K, self.T, self.T, bq, bk)
      else:
        mask = jnp.ones(shape, bool)
        if self.mask == "empty_row":
          mask = mask.at[:, :, 1].set(False)
    return q, k, v, do, seg, mask

  def reference(self, q, k, v, seg, mask):
    spec = self.spec
    if spec.hierarchical is not None:
      return hierarchical.hierarchical_reference(q, k, v, spec)
    if self.mask == "ones":  # density one is dense attention
      return attend_reference(q, k, v, dataclasses.replace(spec, block_sparse=None))
    if self.mask == "predicted":
      mask = sparse.predict_block_mask(q, k, spec)
    return attend_reference(q, k, v, spec, seg, mask)


CASES = {
    # Dense masks; GQA (N = 2 K), MQA (K = 1) and MHA.
    "causal": Case(1),
    "window": Case(2, K=1, window=40),
    "full": Case(3, N=2, K=2, causal=False, scale=0.3),
    "noncausal_window": Case(4, causal=False, window=40),
    "segments": Case(5, B=2, segments=True),
    # Block-sparse: predicted (by ``attend``) and random masks.
    "predicted": Case(6, blocks=(32, 32), mask="predicted"),
    "window_predicted": Case(7, window=48, blocks=(32, 32), mask="predicted"),
    "noncausal_mha_h128_rect_blocks": Case(8, N=4, K=4, H=128, causal=False, blocks=(32, 64),
                                           mask="predicted"),
    "random_b2": Case(9, B=2, blocks=(32, 32), mask="random"),
    "bf16_random_mqa_h128": Case(10, T=64, K=1, H=128, blocks=(16, 16), mask="random",
                                 dtype="bfloat16"),
    "ones_causal": Case(11, scale=0.1, blocks=(64, 64), mask="ones"),
    "ones_full": Case(12, causal=False, scale=0.1, blocks=(64, 64), mask="ones"),
    "empty_row": Case(13, T=64, N=2, K=1, causal=False, blocks=(16, 16), mask="empty_row"),
    # Hierarchical: blocked against its dense twin (xla).
    "hierarchical": Case(14, B=2, T=64, H=8, hierarchical=(8, 1)),
}

IMPLS = ("xla", "flash", "gather", "jax_nn", "blocked", "splash", "pallas", "pallas_gpu")
# The cases each implementation runs (all it supports when absent); every other case
# it must refuse (checked for every pair: cheap). Interpreted kernels are slow: each
# runs a representative subset. ``xla`` *is* the reference function: it runs the cases
# where ``attend`` adds something (mask prediction, density one) and one plain one.
RUNS = {
    "xla": ("causal", "predicted", "window_predicted", "noncausal_mha_h128_rect_blocks",
            "ones_causal", "ones_full"),
    "flash": ("window", "noncausal_window"),
    "splash": ("causal", "window", "full", "noncausal_window", "segments"),
    "pallas": ("noncausal_window", "window_predicted", "noncausal_mha_h128_rect_blocks",
               "random_b2", "bf16_random_mqa_h128", "ones_causal", "empty_row"),
    "pallas_gpu": ("window", "full", "window_predicted", "noncausal_mha_h128_rect_blocks",
                   "random_b2", "bf16_random_mqa_h128", "ones_full", "empty_row"),
}


def refusal(impl: str, case: Case) -> str | None:
  """The documented reason ``impl`` refuses ``case`` (a regex), or None."""
  spec = case.spec
  if spec.hierarchical is not None:
    if impl in ("xla", "blocked"):
      return None
    return "needs a block-sparse spec" if impl == "gather" else "no hierarchical attention"
  if impl == "blocked":
    return "hierarchical specs only"
  if impl == "gather" and case.mask is None:
    return "needs a block-sparse spec"
  if case.segments and impl in ("flash", "jax_nn", "pallas", "pallas_gpu"):
    return "segment ids"
  if case.mask is not None and impl in ("flash", "jax_nn", "splash"):
    return "no predicted block masks"
  if impl == "jax_nn" and case.window and not case.causal:
    return "a non-causal sliding window is not supported"
  return None




# Tiny programs: XLA's cheapest compile is plenty (compiles dominate this suite's time).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


@functools.cache
def _reference(name):
  """For case ``name`` (shared by every implementation): the reference's output and
  (dq, dk, dv), its largest difference from plain attention without the case's masks,
  and the density of the predicted mask (or None)."""
  case = CASES[name]
  q, k, v, do, seg, mask = case.inputs()

  @fast_jit
  def run(q, k, v, do, seg, mask):
    out, vjp = jax.vjp(lambda a, b, c: case.reference(a, b, c, seg, mask), q, k, v)
    plain = attend_reference(q, k, v, AttentionSpec(causal=case.causal, scale=case.scale))
    density = None
    if case.mask == "predicted":
      density = sparse.block_density(sparse.predict_block_mask(q, k, case.spec), case.spec)
    return out, vjp(do), jnp.max(jnp.abs(out.astype(jnp.float32) - plain)), density

  return run(q, k, v, do, seg, mask)


@pytest.mark.parametrize("impl,name", conformance_params(CASES, IMPLS, RUNS, refusal))
def test_conformance(impl, name):
  case = CASES[name]
  q, k, v, do, seg, mask = case.inputs()
  call = lambda a, b, c: ops.attend(a, b, c, case.spec, segment_ids_BT=seg, block_mask=mask,
                                    implementation=impl)
  reason = refusal(impl, case)
  if reason is not None:  # refused while tracing: nothing needs to run
    with pytest.raises(Unsupported, match=f"{impl}: .*{reason}"):
      jax.eval_shape(call, q, k, v)
    return
  want, want_grads, _, density = _reference(name)
  if density is not None:
    assert 0 < float(density) < 1, "want a genuinely sparse mask"

  @fast_jit
  def out_and_grads(q, k, v, do):
    out, vjp = jax.vjp(call, q, k, v)
    return out, vjp(do)

  out, grads = out_and_grads(q, k, v, do)
  assert out.shape == q.shape and out.dtype == q.dtype
  close(out, want, q.dtype, "out")
  if case.mask == "empty_row":  # query block 1 sees no key: zeros, and no gradient
    bq = case.blocks[0]
    assert not np.asarray(out[:, bq:2 * bq]).any()
    assert not np.asarray(grads[0][:, bq:2 * bq]).any()
  for what, g, w, x in zip(("dq", "dk", "dv"), grads, want_grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, what
    close(g, w, q.dtype, what)


def test_the_reference_cases_are_not_trivial():
  """Masks change the answer: each masked case differs from attention with only its
  causality and scale, so an implementation that ignored its mask would fail the suite."""
  for name in ("window", "noncausal_window", "segments", "predicted", "random_b2",
               "empty_row", "hierarchical"):
    assert float(_reference(name)[2]) > 1e-2, name
  # The non-causal window (3) is unbounded to the right: t - s < 3 only.
  m = np.asarray(masks.token_mask(False, 3, 6, 6))
  np.testing.assert_array_equal(m[2], [True, True, True, True, True, True])
  np.testing.assert_array_equal(m[5], [False, False, False, True, True, True])


def test_splash_kernel_cache_survives_a_second_trace():
  """splash's kernel is cached by shape and built while tracing: its mask arrays must be
  concrete, not the first trace's tracers."""
  q, k, v, _ = qkv(20, 1, 128, 3, 1, 64)  # G = 3: a cache key no other test uses
  f = lambda q, k, v: ops.attend(q, k, v, AttentionSpec(), implementation="splash")
  first = jax.jit(f)(q, k, v)
  second = jax.jit(lambda *a: f(*a) * 2)(q, k, v)
  close(second, 2 * first, jnp.float32)


# ----------------------------------------------------------------------------- kernels

KERNEL_MODULES = {"pallas": bst, "pallas_gpu": bsg}


def _kernel(module, mask, spec, interpret=True, return_lse=False):
  bs = spec.block_sparse
  return lambda q, k, v: module.block_sparse_attention(
      q, k, v, mask, block_q=bs.block_q, block_k=bs.block_k, causal=spec.causal,
      sliding_window=spec.sliding_window, scale=spec.scale, interpret=interpret,
      return_lse=return_lse)


def _spec(causal, window, bq, bk, **kw):
  return AttentionSpec(causal=causal, sliding_window=window,
                       block_sparse=BlockSparse(block_q=bq, block_k=bk, **kw))


@pytest.mark.parametrize("impl", list(KERNEL_MODULES))
def test_kernel_lse_and_its_gradient_under_jit_with_a_traced_mask(impl):
  """``return_lse``: the fp32 log-sum-exp [B, N, T] and its gradient (the lse cotangent
  enters the backward), one compiled function for two masks."""
  B, T, N, K, H, b = 1, 64, 4, 2, 64, 16
  q, k, v, do = qkv(11, B, T, N, K, H)
  spec = _spec(True, 0, b, b)
  u = jnp.asarray(np.random.default_rng(12).standard_normal((B, N, T), np.float32))

  def loss(fn):
    def f(a, b_, c, m):
      out, lse = fn(m)(a, b_, c)
      return jnp.sum(out * do) + jnp.sum(lse * u)
    return f

  ref_fn = lambda m: lambda a, b_, c: (sparse.block_sparse_reference(a, b_, c, m, spec),
                                       ref_lse(a, b_, m, spec))
  kernel_fn = lambda m: _kernel(KERNEL_MODULES[impl], m, spec, return_lse=True)

  @fast_jit
  def run(q, k, v, m):
    lse = kernel_fn(m)(q, k, v)[1]
    return lse, jax.grad(loss(kernel_fn), argnums=(0, 1, 2))(q, k, v, m)

  @fast_jit
  def want(q, k, v, m):
    return ref_fn(m)(q, k, v)[1], jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v, m)

  for seed in (11, 13):
    mask = random_mask(seed, B, K, T, T, b, b)
    (lse, grads), (lse_ref, grads_ref) = run(q, k, v, mask), want(q, k, v, mask)
    assert lse.shape == (B, N, T) and lse.dtype == jnp.float32
    close(lse, lse_ref, jnp.float32, "lse")
    for what, g, w in zip(("dq", "dk", "dv"), grads, grads_ref):
      close(g, w, jnp.float32, f"{what} seed={seed}")


@pytest.mark.parametrize("impl", list(KERNEL_MODULES))
def test_kernel_empty_rows_have_zero_output_and_lse_minus_inf(impl):
  B, T, N, K, H, b = 1, 64, 2, 1, 64, 16
  q, k, v, _ = qkv(4, B, T, N, K, H)
  spec = _spec(False, 0, b, b)
  mask = jnp.ones((B, K, T // b, T // b), bool).at[:, :, 1].set(False)  # query block 1: empty
  out, lse = fast_jit(_kernel(KERNEL_MODULES[impl], mask, spec, return_lse=True))(q, k, v)
  assert not np.asarray(out[:, b:2 * b]).any()
  assert np.all(np.asarray(lse[:, :, b:2 * b]) == -np.inf)
  assert np.isfinite(np.asarray(lse[:, :, :b])).all()
  close(lse[:, :, :b], ref_lse(q, k, mask, spec)[:, :, :b], jnp.float32, "lse")


@pytest.mark.parametrize("impl", list(KERNEL_MODULES))
def test_kernel_attend_predicts_the_mask_itself_and_refuses_segment_ids(impl):
  """The registry entry (``KERNEL.attend``) predicts a block-sparse spec's mask when it
  gets none (``ops.attend`` always hands it one)."""
  module = KERNEL_MODULES[impl]
  q, k, v, _ = qkv(7, 1, 128, 2, 1, 64)
  spec = _spec(True, 0, 32, 32, top_k=0.1, top_p=0.2)
  got, want = fast_jit(lambda q, k, v: (
      module.attend_pallas(q, k, v, spec, interpret=True),
      attend_reference(q, k, v, spec, block_mask=sparse.predict_block_mask(q, k, spec))))(q, k, v)
  close(got, want, jnp.float32)
  with pytest.raises(Unsupported, match="segment ids"):
    module.attend_pallas(q, k, v, spec, segment_ids_BT=jnp.zeros((1, 128), jnp.int32))


@pytest.mark.parametrize("impl,T,H,bq,bk,dtype,match", [
    ("pallas", 100, 64, 32, 32, jnp.float32, "block_q=32 does not divide the query length T=100"),
    ("pallas", 128, 48, 32, 32, jnp.float32,
     r"head_dim=48 .*supported head dims are \(64, 128, 192, 256\)"),
    ("pallas", 128, 320, 32, 32, jnp.float32, "head_dim=320"),
    ("pallas", 128, 64, 32, 12, jnp.float32, "block_k=12 is not a multiple of 8.*128 is preferred"),
    ("pallas", 128, 64, 32, 32, jnp.float16, "dtype float16 is not supported"),
    ("pallas_gpu", 100, 64, 32, 32, jnp.float32,
     "block_q=32 does not divide the query length T=100"),
    ("pallas_gpu", 128, 48, 32, 32, jnp.float32,
     r"head_dim=48 .*supported head dims are \(64, 128\)"),
    ("pallas_gpu", 128, 256, 32, 32, jnp.float32, "head_dim=256"),
    ("pallas_gpu", 128, 64, 32, 48, jnp.float32, "block_k=48 is not a power of two >= 16"),
    ("pallas_gpu", 128, 64, 8, 32, jnp.float32, "block_q=8 is not a power of two >= 16"),
    ("pallas_gpu", 128, 64, 32, 32, jnp.float16, "dtype float16 is not supported"),
])
def test_kernel_unsupported_inputs_say_why(impl, T, H, bq, bk, dtype, match):
  q, k, v, _ = qkv(8, 1, T, 2, 1, H, dtype, S=128)
  mask = jnp.ones((1, 1, max(T // bq, 1), 128 // bk), bool)
  with pytest.raises(Unsupported, match=match):
    KERNEL_MODULES[impl].block_sparse_attention(q, k, v, mask, block_q=bq, block_k=bk,
                                                interpret=True)


@pytest.mark.parametrize("impl", list(KERNEL_MODULES))
def test_kernel_malformed_shapes_raise_value_error(impl):
  attention = KERNEL_MODULES[impl].block_sparse_attention
  q, k, v, _ = qkv(9, 1, 64, 3, 2, 64)
  with pytest.raises(ValueError, match="heads must be a multiple of kv_heads"):
    attention(q, k, v, jnp.ones((1, 2, 4, 4), bool), block_q=16, block_k=16)
  q, k, v, _ = qkv(9, 1, 64, 2, 1, 64)
  with pytest.raises(ValueError, match=r"block_mask shape \(1, 1, 2, 4\): expected"):
    attention(q, k, v, jnp.ones((1, 1, 2, 4), bool), block_q=16, block_k=16)


def test_tpu_interpreter_forward():
  # The TPU-simulating interpreter fills uninitialised memory with NaN: a block we
  # forgot to initialise or write would show up.
  from jax.experimental.pallas import tpu as pltpu
  B, T, N, K, H, b = 1, 64, 2, 1, 128, 16
  q, k, v, _ = qkv(5, B, T, N, K, H)
  spec = _spec(True, 24, b, b)
  mask = random_mask(5, B, K, T, T, b, b, density=0.5)
  out = _kernel(bst, mask, spec, interpret=pltpu.InterpretParams())(q, k, v)
  close(out, sparse.block_sparse_reference(q, k, v, mask, spec), jnp.float32)


def test_smem_budget_splits_into_batch_and_head_chunks(monkeypatch):
  B, T, N, K, H, b = 2, 64, 4, 2, 64, 16
  q, k, v, do = qkv(6, B, T, N, K, H)
  spec = _spec(True, 0, b, b)
  mask = random_mask(6, B, K, T, T, b, b)
  calls = []
  real = bst._fwd_call
  monkeypatch.setattr(bst, "_fwd_call", lambda *a: calls.append(a[0].shape) or real(*a))
  monkeypatch.setattr(bst, "SMEM_BUDGET_BYTES", bst._smem_bytes((T // b) ** 2))  # 1 (b, kh)

  @fast_jit
  def run(q, k, v, do):
    (out, vjp), (ref, vjp_ref) = (
        jax.vjp(f, q, k, v) for f in (
            _kernel(bst, mask, spec),
            lambda a, b_, c: sparse.block_sparse_reference(a, b_, c, mask, spec)))
    return out, vjp(do), ref, vjp_ref(do)

  out, grads, ref, grads_ref = run(q, k, v, do)
  assert calls == [(1, N // K, T, H)] * (B * K)
  close(out, ref, jnp.float32, "out")
  for g, w in zip(grads, grads_ref):
    close(g, w, jnp.float32, "grad")


def _visits_twin(mask_RL, valid_RL):
  """In numpy: the kept (row, col) pairs in row-major order, packed row * (L + 1) + col,
  and one no-op visit (col L) for a row with none."""
  L = mask_RL.shape[-1]
  out = []
  for r, row in enumerate(mask_RL & valid_RL):
    cols = np.flatnonzero(row)
    out += [r * (L + 1) + c for c in cols] if len(cols) else [r * (L + 1) + L]
  return out


def test_tpu_kernel_visit_lists_hold_the_kept_blocks_only():
  """One grid step per kept (query block, key block) pair: the lists against a numpy
  twin (rows of different kept counts, empty rows, blocks outside the causal / window
  structure dropped), and the kernels' last grid axis is dynamic, bounded by them."""
  from jax.extend.core import jaxprs_in_params
  rng = np.random.default_rng(21)
  B, K, Q, C, b = 2, 2, 6, 5, 16
  mask = rng.random((B, K, Q, C)) < rng.random((B, K, Q, 1))  # a density per row
  mask[0, 0, 2] = False
  mask[1, 1, 4] = True
  for causal, window in ((False, 0), (True, 0), (True, 40)):
    valid = masks.valid_blocks(causal, window, Q * b, C * b, b, b)
    nvis, visits = (np.asarray(x) for x in bst.visit_lists(jnp.asarray(mask), valid))
    assert visits.shape == (B, K, bst.visit_bound(valid))
    for bb, kh in np.ndindex(B, K):
      want = _visits_twin(mask[bb, kh], valid)
      assert nvis[bb, kh] == len(want), (causal, window)
      assert list(visits[bb, kh, :len(want)]) == want
      assert (visits[bb, kh, len(want):] == want[-1]).all()  # the tail: no new block
  q, k, v, do = qkv(22, B, Q * b, 4, K, 64, S=C * b)
  fn = lambda q, k, v: bst.block_sparse_attention(q, k, v, jnp.asarray(mask), block_q=b,
                                                  block_k=b, causal=False, interpret=True)
  jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(fn, q, k, v)[1](do))(q, k, v)

  def pallas_calls(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name == "pallas_call":
        yield e
      for sub in jaxprs_in_params(e.params):
        yield from pallas_calls(sub)

  grids = {e.params["name"]: e.params["grid_mapping"].grid
           for e in pallas_calls(jaxpr.jaxpr)}
  assert set(grids) == {"kestrel_block_sparse_fwd", "kestrel_block_sparse_dq",
                        "kestrel_block_sparse_dkv"}, grids
  for name, grid in grids.items():
    assert len(grid) == 3 and all(isinstance(d, int) for d in grid[:2]), (name, grid)
    assert not isinstance(grid[2], int), (name, grid)  # set by the lists, not by Q x C


def test_tpu_kernel_equals_reference_on_fresh_masks_of_varied_density():
  """Forward and gradients against the reference, one compile for four masks: rows of
  different kept counts (one empty, one full), an empty key column, blocks above the
  causal diagonal (dropped), density one and the diagonal only; GQA, causal + window."""
  B, T, N, K, H, b = 2, 64, 4, 2, 64, 16
  Q = T // b
  q, k, v, do = qkv(23, B, T, N, K, H)
  spec = _spec(True, 40, b, b)
  rng = np.random.default_rng(24)
  varied = rng.random((B, K, Q, Q)) < rng.random((B, K, Q, 1))
  varied[0, 1, 1] = False  # an empty row
  varied[1, 0, 3] = True  # a full row
  varied[0, 0, :, 2] = False  # an empty key column (dk, dv = 0 there)
  diag = np.broadcast_to(np.eye(Q, dtype=bool), varied.shape)
  ones = np.ones_like(varied)

  @fast_jit
  def run(q, k, v, m):
    (out, vjp), (ref, vjp_ref) = (
        jax.vjp(f, q, k, v) for f in (
            _kernel(bst, m, spec),
            lambda a, b_, c: sparse.block_sparse_reference(a, b_, c, m, spec)))
    return out, vjp(do), ref, vjp_ref(do)

  for name, m in (("varied", varied), ("ones", ones), ("diag", diag),
                  ("fresh", rng.random((B, K, Q, Q)) < 0.3)):
    out, grads, ref, grads_ref = run(q, k, v, jnp.asarray(m))
    close(out, ref, jnp.float32, f"{name} out")
    for what, g, w in zip(("dq", "dk", "dv"), grads, grads_ref):
      close(g, w, jnp.float32, f"{name} {what}")


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_tpu_aot_compile_forward_and_backward(topology):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = topology_or_skip(topology)
  rep = NamedSharding(Mesh(np.array(devices[:1]).reshape(1), ("d",)), P())
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
  # Estimates for every valid block (the causal window's, not the dense square): 2
  # matmuls forward, 3 in dq, 4 in dk/dv.
  visits = bst.visit_bound(masks.valid_blocks(True, 512, T, T, b, b))
  assert 9 * 2 * B * N * visits * b * b * H <= flops < 9 * 2 * B * N * T * T * H


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_triton_lowering_for_abstract_h100_without_gpu(monkeypatch):
  mesh, verified = triton_h100_lowering(monkeypatch)

  def loss(q, k, v, mask, block):
    out, lse = bsg.block_sparse_attention(q, k, v, mask, block_q=block, block_k=block,
                                          causal=True, sliding_window=100, return_lse=True)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  B, T, N, K, b = 2, 512, 8, 2, 64
  for H in bsg.SUPPORTED_HEAD_DIMS:
    for dtype in (jnp.bfloat16, jnp.float32):
      args = (jax.ShapeDtypeStruct((B, T, N, H), dtype),
              jax.ShapeDtypeStruct((B, T, K, H), dtype),
              jax.ShapeDtypeStruct((B, T, K, H), dtype),
              jax.ShapeDtypeStruct((B, K, T // b, T // b), jnp.bool_))
      step = jax.jit(jax.grad(functools.partial(loss, block=b), argnums=(0, 1, 2)))
      with jax.sharding.use_abstract_mesh(mesh):
        text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
      assert text.count("__gpu$xla.gpu.triton") == 3, (H, dtype)  # fwd, dq, dkv
      for name in ("kestrel_block_sparse_gpu_fwd", "kestrel_block_sparse_gpu_dq",
                   "kestrel_block_sparse_gpu_dkv"):
        assert name in text, (name, H, dtype)
  assert verified == [True] * 12


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles Triton kernels: needs a GPU")
def test_gpu_kernel_compiled_on_gpu_matches_reference():
  B, T, N, K, b = 2, 1024, 8, 2, 64
  for H, dtype, tol, window in ((128, jnp.bfloat16, 2e-2, 0), (64, jnp.float32, 1e-4, 300)):
    q, k, v, do = qkv(21, B, T, N, K, H, dtype)
    spec = _spec(True, window, b, b, top_k=0.1, top_p=0.3)
    mask = sparse.predict_block_mask(q, k, spec)
    mask = mask.at[0, 0, 3].set(False)  # an empty row: zeros, no NaN

    @jax.jit
    def f(a, b_, c, m, d):
      out, vjp = jax.vjp(_kernel(bsg, m, spec, interpret=False), a, b_, c)
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


# ----------------------------------------------------------------------------- registry


def test_splash_refuses_lengths_and_every_reason_is_reported():
  q, k, v, _ = qkv(3, 1, 200, 4, 2, 64)
  call = lambda impl: lambda q, k, v: ops.attend(q, k, v, AttentionSpec(), implementation=impl)
  with pytest.raises(Unsupported, match="splash: sequence lengths must be multiples of 128"):
    jax.eval_shape(call("splash"), q, k, v)
  with pytest.raises(Unsupported, match="splash: .*; nope: not registered"):
    jax.eval_shape(call(["splash", "nope"]), q, k, v)


@pytest.mark.parametrize("target,kernel,other", [
    ("gpu", "pallas", "pallas_gpu"), ("gpu", "splash", "'jax_nn' or 'xla'"),
    ("tpu", "pallas_gpu", "pallas")])
def test_a_kernel_off_its_platform_is_unsupported(target, kernel, other):
  q, k, v, _ = qkv(3, 1, 128, 4, 2, 64)
  with platform.target(target), pytest.raises(
      Unsupported, match=re.escape(f"{kernel}: a") + f".* kernel; not run on {target} .*{other}"):
    jax.eval_shape(lambda q, k, v: ops.attend(q, k, v, implementation=kernel), q, k, v)


def _record_calls(monkeypatch, calls):
  """Replaces every registry entry's fn by one that records (name, interpret) and
  returns zeros: which implementation runs becomes observable."""
  for name in ops.REGISTRY.names():
    def fn(q, *args, _name=name, **kwargs):
      calls.append((_name, kwargs.get("interpret")))
      return jnp.zeros_like(q)
    monkeypatch.setitem(ops.REGISTRY._entries, name,
                        dataclasses.replace(ops.REGISTRY[name], fn=fn))


# Per platform, implementation=None: which implementation runs (and whether interpreted).
DEFAULTS = {
    "cpu": {"causal": ("xla", None), "noncausal_window": ("xla", None),
            "segments": ("xla", None), "predicted": ("xla", None),
            "hierarchical": ("blocked", None)},
    "gpu": {"causal": ("jax_nn", None), "noncausal_window": ("xla", None),
            "segments": ("xla", None), "predicted": ("xla", None),
            "hierarchical": ("blocked", None)},
    "tpu": {"causal": ("splash", False), "noncausal_window": ("splash", False),
            "segments": ("splash", False), "predicted": ("pallas", False),
            "hierarchical": ("blocked", None)},
}


@pytest.mark.parametrize("target", list(DEFAULTS))
def test_default_order_per_platform_by_what_runs(monkeypatch, target):
  calls = []
  _record_calls(monkeypatch, calls)
  for name, want in DEFAULTS[target].items():
    case = CASES[name]
    q, k, v, _, seg, mask = case.inputs()
    calls.clear()
    with platform.target(target):
      jax.eval_shape(lambda q, k, v: ops.attend(q, k, v, case.spec, segment_ids_BT=seg,
                                                block_mask=mask), q, k, v)
    assert calls == [want], (target, name, calls)


@pytest.mark.parametrize("target,order", [("cpu", ["blocked", "xla"]),
                                          ("gpu", ["blocked", "jax_nn", "xla"]),
                                          ("tpu", ["blocked", "splash", "pallas", "xla"])])
def test_default_order_per_platform_by_the_refusals(target, order):
  """Hierarchical attention with segment ids: every implementation refuses, and the
  error lists the candidates in the order they were tried."""
  q, k, v, _, _, _ = CASES["hierarchical"].inputs()
  seg = jnp.zeros(q.shape[:2], jnp.int32)
  with platform.target(target), pytest.raises(Unsupported) as e:
    jax.eval_shape(lambda q, k, v: ops.attend(q, k, v, CASES["hierarchical"].spec,
                                              segment_ids_BT=seg), q, k, v)
  tried = str(e.value).split("could run: ", 1)[1].split("; ")
  assert [part.split(":")[0] for part in tried] == order, str(e.value)


# ----------------------------------------------------------------------------- model


def test_attention_layer_runs_our_kernel_per_device_under_a_mesh(monkeypatch):
  """Under a placement the registry runs the kernel on each device's shard (batch over
  data, heads over tensor) and matches XLA's partitioned reference."""
  from flax import nnx

  from attention.layer import Attention
  spec = AttentionSpec(block_sparse=BlockSparse(16, 16, top_k=0.2, top_p=0.3))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 32), np.float32))
  pos = jnp.broadcast_to(jnp.arange(64), (4, 64))
  mesh = jax.make_mesh((4, 2), ("data", "tensor"))
  seen = []
  entry = ops.REGISTRY["pallas"]
  monkeypatch.setitem(ops.REGISTRY._entries, "pallas", dataclasses.replace(
      entry, fn=lambda q, *a, **kw: seen.append(q.shape) or entry.fn(q, *a, **kw)))
  outs, stats = {}, {}
  layer = Attention(32, 4, 2, 64, rngs=nnx.Rngs(params=0), spec=spec)
  for impl in ("xla", "pallas"):
    layer.implementation = impl
    with placed(mesh):
      outs[impl] = nnx.jit(lambda m, x, p: m(x, p))(layer, x, pos)
    stats[impl] = nnx.pop(layer, nnx.Intermediate)["attention_stats"]
  assert seen == [(1, 64, 2, 64)]  # one device's shard: batch 4 / 4, heads 4 / 2
  close(outs["pallas"], outs["xla"], jnp.float32)
  density = jax.tree.leaves(stats["pallas"])[0]
  assert 0 < float(density) < 1
  assert float(density) == float(jax.tree.leaves(stats["xla"])[0])


def test_sparse_model_train_step_compiles_for_tpu_with_our_kernel():
  topology_or_skip("v5e:2x2")
  from experiments.configs import base
  from lm import aot
  c = base.get_config("tiny")
  c.model.d_model, c.model.n_heads, c.model.n_kv_heads = 256, 4, 2  # head dim 64
  c.data.seq_len, c.data.batch_size = 512, 4
  c.model.n_layers = 1
  c.model.attention_impl = "pallas"
  c.model.sparse.enabled = True
  c.model.sparse.block_q = c.model.sparse.block_k = 128
  c.mesh.data = 4
  r = aot.compile_train_step(c, "v5e:2x2")
  assert r.fits and r.devices == 4


def test_distilling_sparse_train_step_compiles_for_tpu():
  topology_or_skip("v5e:2x2")
  from experiments.configs import sparse_attention
  from lm import aot
  c = sparse_attention.get_config("ablation")
  c.mesh.data = 4
  c.model.n_layers = 1
  r = aot.compile_train_step(c, "v5e:2x2")  # the teacher's folder is only read by train.run
  assert r.fits and r.devices == 4


# ----------------------------------------------------------------------------- hierarchical


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
  q, k, v, w = qkv(4 + L, 2, 64, 4, 2, 8)
  spec = AttentionSpec(hierarchical=Hierarchical(block=8, local_blocks=L))

  @fast_jit
  def run(q, k, v, w):
    grads = lambda impl: jax.grad(lambda *x: jnp.sum(ops.attend(*x, spec, implementation=impl)
                                                     * w), argnums=(0, 1, 2))(q, k, v)
    return (ops.attend(q, k, v, spec), hierarchical.hierarchical_reference(q, k, v, spec),
            grads("blocked"), grads("xla"))

  fast, dense, g_blocked, g_xla = run(q, k, v, w)
  np.testing.assert_allclose(fast, dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fast, _loop_hierarchical(q, k, v, 8, L), rtol=1e-4, atol=1e-5)
  for a, b in zip(g_blocked, g_xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_hierarchical_with_every_block_local_is_causal_attention_and_errors():
  q, k, v, _ = qkv(3, 1, 64, 4, 2, 8)
  spec = AttentionSpec(hierarchical=Hierarchical(block=16, local_blocks=4))
  got, want = fast_jit(lambda q, k, v: (ops.attend(q, k, v, spec),
                                        attend_reference(q, k, v, AttentionSpec())))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="block=24: the sequence length 64 is not divisible"):
    ops.attend(q, k, v, AttentionSpec(hierarchical=Hierarchical(block=24)))
  with pytest.raises(ValueError, match="excludes block_sparse and sliding_window"):
    AttentionSpec(sliding_window=8, hierarchical=Hierarchical(block=16))
