"""Context parallelism (attention/context.py) on 8 simulated CPU devices, against the
single-device reference attention (attention/reference.py), forward and gradients.

``context_attend`` runs per device through the placement (``placed(mesh)``: Kestrel's
rules shard ``batch`` over data and ``length`` over sequence)."""
import contextlib
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import placed
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attention import context
from attention.context import context_attend, ring_blocks
from attention.layer import Attention
from attention.ops import attend
from attention.reference import attend_reference
from attention.spec import AttentionSpec
from core.errors import ConfigError

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


# (mesh, strategy, N, K): GQA everywhere; kv heads fewer than the sequence axis
# (replicated before the exchange). (headwise: the layer tests below.)
CASES = [
    ("seq8", "ulysses", 8, 2),
    ("seq8", "ring", 8, 2),
    ("data2seq4", "ulysses", 8, 2),
    ("data2seq4", "ring", 8, 2),
]


@pytest.mark.parametrize("mesh_kind,strategy,N,K", CASES)
def test_causal_matches_reference(mesh_kind, strategy, N, K):
  q, k, v, ct = _inputs(N, K, seed=len(strategy) + N)
  _check_against_reference(_mesh(mesh_kind), AttentionSpec(causal=True), q, k, v, ct,
                           strategy=strategy)


@pytest.mark.parametrize("strategy,kw", [("ulysses", {}),
                                         ("ring", {})])
def test_non_causal_mha_matches_reference(strategy, kw):
  q, k, v, ct = _inputs(8, 8, seed=11)
  _check_against_reference(_mesh("seq8"), AttentionSpec(causal=False, scale=0.3), q, k, v, ct,
                           strategy=strategy, **kw)


@pytest.mark.parametrize("strategy", ["ulysses", "ring", "zigzag"])
def test_sliding_window_matches_reference(strategy):
  # T/C = 8 keys per ring block: a window of 11 reaches back into the previous block
  # only, so the ring skips both future and too-old blocks (zigzag: pieces of 4, up
  # to 3 back, some only partly in the window).
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
  f = fast_jit(lambda q, k, v: context_attend(q, k, v, strategy="ulysses"))
  with placed(mesh):
    out = f(*(jax.device_put(x, sh) for x in (q, k, v)))
  _close(out, out_ref)
  assert out.sharding.spec == P("data", "sequence", None, None)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
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
    (dict(strategy="flash_ring"), r"strategy='flash_ring': unknown"),
    (dict(strategy="zigzag", T=40), r"sequence length 40: zigzag cuts it into 2 \* 8 chunks"),
])
def test_errors(kw, match):
  N = kw.pop("N", 8)
  q, k, v, _ = _inputs(N, 2, seed=0, T=kw.pop("T", T))
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


# ------------------------------------------------------------- headwise (UPipe): the layer


def _layer_out_and_grads(strategy, mesh, N, K, U, spec, seed, D=32, T=T):
  """A layer's output and gradients (x, then q, k, v, o) for fresh random x and
  cotangent, with the HLO text; ``strategy`` 'none' runs on one device."""
  layer = Attention(D, N, K, H, rngs=nnx.Rngs(seed), spec=spec, context_parallel=strategy,
                    heads_per_stage=U)
  graph, params = nnx.split(layer)
  rng = np.random.default_rng(seed)
  x, ct = (jnp.asarray(rng.standard_normal((B, T, D), np.float32)) for _ in range(2))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))

  def f(params, x, ct):
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graph, p)(x, pos), params, x)
    dp, dx = vjp(ct)
    return y, [dx] + [dp[n][...] for n in "qkvo"]

  with placed(mesh) if mesh is not None else contextlib.nullcontext():
    lowered = fast_jit(f).lower(params, x, ct)
    y, grads = lowered.compile()(params, x, ct)
  return y, grads, lowered.as_text()


# (mesh, N, K, U, spec): per device N/C query heads in runs of g sharing a kv head,
# taken U at a time: kv heads replicated (K < C), several stages per kv block, several
# kv blocks (outer scan), a stage spanning kv heads (U > g); causal, window.
HEADWISE = [
    ("seq8", 16, 2, 1, AttentionSpec(causal=True)),              # g=2: 2 stages, kv replicated
    ("data2seq4", 16, 4, 2, AttentionSpec(sliding_window=11)),   # g=4: 2 stages per kv head
    ("data2seq4", 32, 16, 4, AttentionSpec(causal=True)),        # g=2, U=4: 2 blocks of 2 kv
]


@pytest.mark.parametrize("mesh_kind,N,K,U,spec", HEADWISE)
def test_headwise_layer_matches_single_device(mesh_kind, N, K, U, spec):
  seed = N + K + U
  y, grads, hlo = _layer_out_and_grads("headwise", _mesh(mesh_kind), N, K, U, spec, seed)
  y_ref, grads_ref, _ = _layer_out_and_grads("none", None, N, K, U, spec, seed)
  assert "all_to_all" in hlo and "while" in hlo   # exchanged, stages in a scan
  _close(y, y_ref)
  for name, g, g_ref in zip(["x", "q", "k", "v", "o"], grads, grads_ref):
    assert g.shape == g_ref.shape, name
    _close(g, g_ref)


def test_headwise_errors():
  mesh, spec = _mesh("seq8"), AttentionSpec()
  with pytest.raises(ConfigError, match=r"heads_per_stage=2: num_heads=8 must be divisible"):
    _layer_out_and_grads("headwise", mesh, 8, 2, 2, spec, 0)
  # 48 heads / 8 devices = 6 per device, sharing kv heads in runs of 3: U=2 straddles them.
  with pytest.raises(ConfigError, match=r"heads_per_stage=2: each device's 6 query heads"):
    _layer_out_and_grads("headwise", mesh, 48, 16, 2, spec, 0)
  with pytest.raises(ConfigError, match=r"act_quant=True: headwise"):
    Attention(32, 8, 2, H, rngs=nnx.Rngs(0), context_parallel="headwise", act_quant=True)
  q, k, v, _ = _inputs(8, 2, seed=0)
  with placed(mesh), pytest.raises(ConfigError, match=r"strategy='headwise': headwise \(UPipe\)"):
    jax.eval_shape(lambda q, k, v: context_attend(q, k, v, strategy="headwise"), q, k, v)


def test_headwise_layer_uses_less_temp_memory_than_ulysses():
  """UPipe's point (arXiv 2602.21196): one stage's heads live at a time.

  One layer, forward + backward, T=1024, 16 heads of 8 (D=128), C=8, fp32, the dense
  XLA attention of the CPU: Ulysses holds 2 heads' [T, T] logits per device,
  headwise (U=1) one head's. Seen on XLA:CPU (jax 0.12): 32.3 vs 17.6 MiB.
  """
  mesh = _mesh("seq8")
  x = jax.ShapeDtypeStruct((1, 1024, 128), jnp.float32,
                           sharding=NamedSharding(mesh, P(None, "sequence")))
  pos = jnp.broadcast_to(jnp.arange(1024), (1, 1024))

  def temp_bytes(strategy):
    layer = Attention(128, 16, 2, 8, rngs=nnx.Rngs(0), context_parallel=strategy)
    graph, params = nnx.split(layer)
    loss = lambda p, x: jnp.sum(nnx.merge(graph, p)(x, pos) ** 2)
    with placed(mesh):
      grad = fast_jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return grad.memory_analysis().temp_size_in_bytes

  uly, hw = temp_bytes("ulysses"), temp_bytes("headwise")
  assert hw < 0.75 * uly, (hw, uly)


@pytest.mark.parametrize("mesh_kind", ["seq8", "data2seq4"])
def test_zigzag_causal_gqa_matches_reference(mesh_kind):
  # seq8: pieces of 2 tokens; data2seq4: of 4, the batch over data.
  q, k, v, ct = _inputs(8, 2, seed=21)
  _check_against_reference(_mesh(mesh_kind), AttentionSpec(causal=True), q, k, v, ct,
                           strategy="zigzag")


def test_zigzag_balances_causal_work():
  """Causal ring: device d computes d + 1 of its C blocks; zigzag: every device
  2C + 1 quarter blocks (``ring_blocks``, the plans the ring switches over). The
  compiled forward agrees: XLA costs each step's ``lax.switch`` as its largest branch
  (the busiest device), and with the ring's scan unrolled every step is counted, so
  the program's FLOPs are the busiest device's live blocks (ring C, zigzag
  (2C + 1) / 4), within the softmax's elementwise work."""
  causal = AttentionSpec(causal=True)
  for C in (4, 8):
    assert list(ring_blocks(causal, C, 16 * C)) == list(range(1, C + 1))
    assert list(ring_blocks(causal, C, 16 * C, zigzag=True)) == [2 * C + 1] * C
  mesh = jax.make_mesh((4,), ("sequence",), devices=jax.devices()[:4])
  Tq, N, Hd = 128, 2, 64
  x = jax.ShapeDtypeStruct((1, Tq, N, Hd), jnp.float32,
                           sharding=NamedSharding(mesh, P(None, "sequence")))
  scan = jax.lax.scan
  for strategy, blocks in (("ring", 4), ("zigzag", 9 / 4)):
    f = fast_jit(lambda q, k, v, s=strategy: context_attend(q, k, v, causal, strategy=s))
    with placed(mesh), mock.patch.object(jax.lax, "scan", functools.partial(scan, unroll=True)):
      flops = f.lower(x, x, x).compile().cost_analysis()["flops"]
    matmuls = blocks * 4 * N * (Tq // 4) ** 2 * Hd   # scores and p @ v per full block
    assert matmuls <= flops < 1.1 * matmuls, (strategy, flops, matmuls)


def test_zigzag_relay_round_trips():
  """Device i holds chunks i and 2C-1-i of 2C after the relay; back is the identity."""
  mesh = _mesh("seq8")
  x = jnp.arange(64.0).reshape(1, 64, 1, 1)   # chunk c: tokens 4c .. 4c + 3
  io = P(None, "sequence")

  def body(x):
    z = context._to_zigzag(x, "sequence", 8)
    return z, context._from_zigzag(z, "sequence", 8)
  relay = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=io, out_specs=(io, io)))
  z, back = relay(jax.device_put(x, NamedSharding(mesh, io)))
  chunks = np.asarray(z).reshape(8, 2, 4)[..., 0] // 4
  np.testing.assert_array_equal(chunks, [[i, 15 - i] for i in range(8)])
  np.testing.assert_array_equal(back, x)
