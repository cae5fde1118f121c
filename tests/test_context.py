"""Context parallelism (attention/context.py) on 8 simulated CPU devices, against the
single-device reference attention (attention/reference.py), forward and gradients.

``context_attend`` runs per device through the placement (``placed(mesh)``: Kestrel's
rules shard ``batch`` over data and ``length`` over sequence)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import placed
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attention.context import context_attend
from attention.ops import attend
from attention.reference import attend_reference
from attention.spec import AttentionSpec

B, T, H = 2, 32, 8
# Tiny programs: XLA's cheapest compile is plenty (compiles dominate this file's time).
fast_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                               "xla_llvm_disable_expensive_passes": True})


def _mesh(kind):
  if kind == "seq8":
    return jax.make_mesh((8,), ("sequence",))
  return jax.make_mesh((2, 4), ("data", "sequence"))


def _inputs(N, K, seed, T=T):
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  return draw(B, T, N, H), draw(B, T, K, H), draw(B, T, K, H), draw(B, T, N, H)


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def _out_and_grads(fn, q, k, v, ct):
  """Output and (dq, dk, dv) for cotangent ``ct``, in one compiled program."""
  def f(q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct)
  return fast_jit(f)(q, k, v, ct)


def _check_against_reference(mesh, spec, q, k, v, ct, **kw):
  with placed(mesh):
    out, grads = _out_and_grads(lambda q, k, v: context_attend(q, k, v, spec, **kw),
                                q, k, v, ct)
  out_ref, grads_ref = _out_and_grads(lambda q, k, v: attend_reference(q, k, v, spec),
                                      q, k, v, ct)
  assert out.shape == q.shape and out.dtype == q.dtype
  _close(out, out_ref)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert g.shape == g_ref.shape, name
    _close(g, g_ref)
  return out


# (mesh, strategy, heads_per_stage, N, K): GQA everywhere; kv heads fewer than the
# sequence axis (replicated before the exchange), headwise with several stages,
# contiguous (U % G == 0) and gathered (U % G != 0) kv heads per stage.
CASES = [
    ("seq8", "ulysses", None, 8, 2),
    ("seq8", "headwise", 1, 8, 2),      # 1 stage: runs as Ulysses
    ("seq8", "headwise", 2, 32, 8),     # 2 stages, U=2 < G=4: kv gathered
    ("seq8", "ring", None, 8, 2),
    ("data2seq4", "ulysses", None, 8, 2),
    ("data2seq4", "headwise", 1, 8, 2),   # 2 stages
    ("data2seq4", "headwise", 2, 16, 8),  # 2 stages, U == G: contiguous kv slices
    ("data2seq4", "ring", None, 8, 2),
]


@pytest.mark.parametrize("mesh_kind,strategy,U,N,K", CASES)
def test_causal_matches_reference(mesh_kind, strategy, U, N, K):
  q, k, v, ct = _inputs(N, K, seed=len(strategy) + N + (U or 0))
  _check_against_reference(_mesh(mesh_kind), AttentionSpec(causal=True), q, k, v, ct,
                           strategy=strategy, heads_per_stage=U)


@pytest.mark.parametrize("strategy,kw", [("ulysses", {}), ("headwise", {}),
                                         ("headwise", {"remat_stages": False}),
                                         ("ring", {})])
def test_non_causal_mha_matches_reference(strategy, kw):
  q, k, v, ct = _inputs(8, 8, seed=11)
  _check_against_reference(_mesh("seq8"), AttentionSpec(causal=False, scale=0.3), q, k, v, ct,
                           strategy=strategy, **kw)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_sliding_window_matches_reference(strategy):
  # T/C = 8 keys per ring block: a window of 11 reaches back into the previous block
  # only, so the ring skips both future and too-old blocks.
  q, k, v, ct = _inputs(8, 4, seed=5)
  _check_against_reference(_mesh("data2seq4"), AttentionSpec(sliding_window=11), q, k, v, ct,
                           strategy=strategy)


def test_sharded_inputs_keep_their_sharding():
  """Inputs laid out as the rules say (batch over data, sequence over sequence) come
  back the same way, with the reference's values."""
  mesh = _mesh("data2seq4")
  q, k, v, _ = _inputs(8, 2, seed=3)
  out_ref = attend_reference(q, k, v, AttentionSpec())
  sh = NamedSharding(mesh, P("data", "sequence", None, None))
  f = fast_jit(lambda q, k, v: context_attend(q, k, v, strategy="headwise"))
  with placed(mesh):
    out = f(*(jax.device_put(x, sh) for x in (q, k, v)))
  _close(out, out_ref)
  assert out.sharding.spec == P("data", "sequence", None, None)


@pytest.mark.parametrize("strategy", ["ulysses", "headwise", "ring"])
def test_axis_size_one_is_plain_attend(strategy):
  mesh = jax.make_mesh((2, 1), ("data", "sequence"), devices=jax.devices()[:2])
  q, k, v, _ = _inputs(8, 2, seed=4)
  f = fast_jit(lambda q, k, v: context_attend(q, k, v, strategy=strategy))
  with placed(mesh):
    hlo = f.lower(q, k, v).as_text()
    out = f(q, k, v)
  assert "all_to_all" not in hlo and "collective_permute" not in hlo
  _close(out, attend(q, k, v, AttentionSpec()))


@pytest.mark.parametrize("kw,match", [
    (dict(strategy="ulysses", N=12), r"num_heads=12: not divisible by the sequence axis size 8"),
    (dict(strategy="headwise", N=8, heads_per_stage=2), r"heads_per_stage=2: num_heads=8"),
    (dict(strategy="flash_ring"), r"strategy='flash_ring': unknown"),
    (dict(strategy="ring", heads_per_stage=2), r"heads_per_stage=2: only used by"),
])
def test_errors(kw, match):
  N = kw.pop("N", 8)
  q, k, v, _ = _inputs(N, 2, seed=0)
  with placed(_mesh("seq8")), pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda q, k, v: context_attend(q, k, v, **kw), q, k, v)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_without_a_sharded_length_it_is_plain_attention(strategy):
  """No placement, or a length the sequence axis does not divide (T=36 over 8: the
  placement leaves the axis out of the call): plain attention, no exchange."""
  q, k, v, _ = _inputs(8, 2, seed=0, T=36)
  want = attend_reference(q, k, v, AttentionSpec())
  _close(fast_jit(lambda q, k, v: context_attend(q, k, v, strategy=strategy))(q, k, v), want)
  f = fast_jit(lambda q, k, v: context_attend(q, k, v, strategy=strategy))
  with placed(_mesh("seq8")):
    hlo = f.lower(q, k, v).as_text()
    out = f(q, k, v)
  assert "all_to_all" not in hlo and "collective_permute" not in hlo
  _close(out, want)


def test_headwise_uses_less_temp_memory_than_ulysses():
  """Untied Ulysses' point: one stage's heads live at a time (arXiv 2602.21196).

  T=2048, N=16, H=64, C=8, fp32, reference attention. Per device Ulysses holds the
  [2 heads, T, T] logits; headwise (U=1) one head's. Seen on XLA:CPU (jax 0.12):
  forward temp 64.0 vs 36.5 MiB, forward+backward 130.0 vs 70.5 MiB (with
  remat_stages; 123.1 MiB without). Ring attention is compiled and read too.
  """
  mesh = _mesh("seq8")
  sh = NamedSharding(mesh, P(None, "sequence", None, None))
  x = jax.ShapeDtypeStruct((1, 2048, 16, 64), jnp.float32, sharding=sh)

  def temp_bytes(strategy):
    f = lambda q, k, v: context_attend(q, k, v, strategy=strategy)
    loss = lambda q, k, v: jnp.sum(f(q, k, v) ** 2)
    with placed(mesh):  # (fast_jit: LLVM settings only; buffer sizes are the same)
      fwd = fast_jit(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
      grad = fast_jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return fwd, grad.memory_analysis().temp_size_in_bytes

  uly_fwd, uly_grad = temp_bytes("ulysses")
  hw_fwd, hw_grad = temp_bytes("headwise")
  ring_fwd, ring_grad = temp_bytes("ring")
  # Logits dominate: halving the heads per stage (2 -> 1) should save ~40-50%.
  assert hw_fwd < 0.75 * uly_fwd, (hw_fwd, uly_fwd)
  assert hw_grad < 0.75 * uly_grad, (hw_grad, uly_grad)
  # Ring holds one [N, T/C, T/C] block of scores at a time (13.1 / 24.0 MiB seen).
  assert ring_fwd < hw_fwd and ring_grad < hw_grad, (ring_fwd, ring_grad)
