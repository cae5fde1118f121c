"""attention/linear.py: chunked vs recurrent twin vs a quadratic formula; layer decode;
context parallelism (sequence-sharded == one device, the op and a hybrid model)."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import placed, tiny
from flax import nnx

from core.errors import ConfigError

# Eager ops compile one by one; the checks run as compiled programs instead, at XLA's
# cheapest setting (tiny programs: compile time is the cost).
fast_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                               "xla_llvm_disable_expensive_passes": True})


@functools.partial(fast_jit, static_argnames=("variant", "chunk_size", "implementation",
                                              "return_state"))
def attend(q, k, v, a, initial_state=None, **kw):
  """``linear_attend``, compiled."""
  return linear_attend(q, k, v, a, initial_state=initial_state, **kw)

from attention import linear
from attention.linear import (VARIANTS, LinearAttention, LinearConfig, feature_map,
                              init_state, linear_attend, linear_context_attend)


def _inputs(seed, B=2, T=13, N=3, H=8, V=6, strong=True, align=False):
  """Random q, k, v and log decays in [-1, 0], some 0 and (``strong``) some -40.

  ``align`` adds 2q to k, keeping every 2mamba row's weight sum (>= (q_i . k_i)^2 / H)
  away from 0. The phi-feature form (the recurrent twin) computes (q . k)^2 as a sum
  of H(H+1)/2 products, whose rounding error relative to a row's weight sum grows as
  that sum shrinks (seen at 1e-2 in gradients against float64 when the sum is ~1e-5,
  while the chunked form stayed at 1e-5); comparisons with that twin need this.
  """
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, N, H), np.float32)
  k = rng.standard_normal((B, T, N, H), np.float32)
  v = rng.standard_normal((B, T, N, V), np.float32)
  k = k + 2 * q if align else k
  a = -rng.random((B, T, N), np.float32)
  u = rng.random((B, T, N), np.float32)
  a = np.where(u < 0.1, 0.0, a).astype(np.float32)
  if strong:
    a = np.where(u > 0.92, -40.0, a).astype(np.float32)
  return tuple(jnp.asarray(x) for x in (q, k, v, a))


def _quadratic(q, k, v, a, variant):
  """The defining formula with an explicit T x T matrix (numpy, float64)."""
  q, k, v, a = (np.asarray(x, np.float64) for x in (q, k, v, a))
  L = np.cumsum(a, axis=1)  # [B, T, N]
  T, H = q.shape[1], q.shape[-1]
  diff = L[:, :, None, :] - L[:, None, :, :]  # [B, i, j, N]
  mask = np.tril(np.ones((T, T), bool))[None, :, :, None]
  decay = np.where(mask, np.exp(np.where(mask, diff, -np.inf)), 0.0)
  s = np.einsum("binh,bjnh->bijn", q, k)
  if variant == "2mamba":
    w = (s / math.sqrt(H)) ** 2 * decay
    return np.einsum("bijn,bjnv->binv", w, v) / (w.sum(2)[..., None] + 1e-6)
  return np.einsum("bijn,bjnv->binv", s * decay, v)


def _close(x, ref, tol):
  ref = np.asarray(ref)
  np.testing.assert_allclose(np.asarray(x), ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("seed,variant", list(enumerate(VARIANTS)))
def test_matches_quadratic_formula(seed, variant):
  q, k, v, a = _inputs(seed, T=11)
  ref = _quadratic(q, k, v, a, variant)
  _close(attend(q, k, v, a, variant=variant, chunk_size=4), ref, 1e-4)
  if variant == "2mamba":  # the phi-feature twin needs well-conditioned rows (_inputs)
    q, k, v, a = _inputs(seed + 100, T=11, align=True)
    ref = _quadratic(q, k, v, a, variant)
  _close(attend(q, k, v, a, variant=variant, implementation="recurrent"), ref, 1e-4)


def test_feature_map_squares_dot_product():
  q, k, _, _ = _inputs(3)
  q, k = np.asarray(q), np.asarray(k)
  np.testing.assert_allclose(np.sum(feature_map(q) * feature_map(k), -1),
                             np.sum(q * k, -1) ** 2, rtol=1e-4, atol=1e-4)


# (T, C): lengths 13 and 37 are not multiples of the chunk; ssd and mamba2s run the same
# op code. Every case is one jit, to keep compile time down on a shared CPU.
_CASES = {"ssd": [(13, 4), (37, 16)], "mamba2s": [(37, 8)],
          "2mamba": [(13, 4), (37, 8), (37, 16)]}


@pytest.mark.parametrize("seed,variant", list(enumerate(VARIANTS)))
def test_chunked_matches_recurrent_forward_and_grad(seed, variant):
  """Outputs and vjp w.r.t. q, k, v, log_decay with a random cotangent."""
  T_max = max(T for T, _ in _CASES[variant])
  q, k, v, a = _inputs(seed, T=T_max, align=variant == "2mamba")
  ct = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(v.shape, np.float32))

  @fast_jit
  def run(q, k, v, a, ct):
    out = {}
    for T, C in _CASES[variant]:
      for impl, chunk in (("chunked", C), ("recurrent", 0)):  # recurrent: once per T
        if (T, chunk, impl) not in out:
          f = functools.partial(linear_attend, variant=variant, chunk_size=chunk or 1,
                                implementation=impl)
          y, vjp = jax.vjp(f, q[:, :T], k[:, :T], v[:, :T], a[:, :T])
          out[T, chunk, impl] = (y,) + vjp(ct[:, :T])
    return out

  out = run(q, k, v, a, ct)
  for T, C in _CASES[variant]:
    for name, x, ref in zip(("y", "dq", "dk", "dv", "dlog_decay"), out[T, C, "chunked"],
                            out[T, 0, "recurrent"]):
      assert np.isfinite(np.asarray(x)).all(), (T, C, name)
      _close(x, ref, 2e-4 if name == "y" else 5e-4)


@pytest.mark.parametrize("seed,variant", [(4, "ssd"), (5, "2mamba")])
def test_final_state_and_resume(seed, variant):
  """Chunked final state == recurrent; prefill 0..t then resume == one pass."""
  q, k, v, a = _inputs(seed, T=21, align=variant == "2mamba")
  kw = dict(variant=variant, chunk_size=8, return_state=True)
  t = 10

  @fast_jit
  def run(q, k, v, a):
    y, s_c = linear_attend(q, k, v, a, **kw)
    _, s_r = linear_attend(q, k, v, a, implementation="recurrent", **kw)
    y1, s1 = linear_attend(*(x[:, :t] for x in (q, k, v, a)), **kw)
    y2, s2 = linear_attend(*(x[:, t:] for x in (q, k, v, a)), initial_state=s1, **kw)
    return y, s_c, s_r, jnp.concatenate([y1, y2], 1), s2

  y, s_c, s_r, y12, s2 = run(q, k, v, a)
  jax.tree.map(lambda x, r: _close(x, r, 2e-4), s_c, s_r)
  _close(y12, y, 2e-4)
  jax.tree.map(lambda x, r: _close(x, r, 2e-4), s2, s_r)


@pytest.mark.parametrize("seed,variant", [(6, "ssd"), (7, "2mamba")])
def test_extreme_decay_stays_finite(seed, variant):
  q, k, v, a = _inputs(seed, T=19, strong=False, align=variant == "2mamba")
  a = jnp.where(a < -0.5, -1e4, a)
  f = lambda *x: jnp.sum(linear_attend(*x, variant=variant, chunk_size=8) ** 2)
  grads = fast_jit(jax.grad(f, argnums=(0, 1, 2, 3)))(q, k, v, a)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  _close(attend(q, k, v, a, variant=variant, chunk_size=8),
         attend(q, k, v, a, variant=variant, implementation="recurrent"), 2e-4)


def test_dtype_and_shapes():
  q, k, v, a = _inputs(8)
  y = attend(q.astype(jnp.bfloat16), k, v, a, variant="2mamba", chunk_size=4)
  assert y.dtype == jnp.bfloat16 and y.shape == v.shape
  s = init_state(2, 3, 8, 6, "2mamba")
  assert s["S"].shape == (2, 3, 36, 6) and s["z"].shape == (2, 3, 36)


@pytest.mark.parametrize("seed,variant", list(enumerate(VARIANTS)))
def test_layer_step_matches_call(seed, variant):
  B, T, D, N, H = 2, 11, 24, 2, 8
  make = lambda: LinearAttention(D, N, H, LinearConfig(variant=variant, chunk_size=4),
                                 rngs=nnx.Rngs(params=seed))

  @fast_jit
  def build():  # compiled: eager initialisers would compile once per parameter shape
    layer = make()
    if variant == "2mamba":  # keys tilted to the queries: well-conditioned rows (see _inputs)
      layer.k[...] = layer.k[...] + 2 * layer.q[...]
      layer.conv_k[...] = layer.conv_q[...]
    return nnx.state(layer)

  graphdef, state = nnx.graphdef(nnx.eval_shape(make)), build()
  x = jnp.asarray(np.random.default_rng(seed + 10).standard_normal((B, T, D), np.float32))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  y = fast_jit(lambda s, x, p: nnx.merge(graphdef, s)(x, p))(state, x, pos)
  assert y.shape == (B, T, D) and np.isfinite(np.asarray(y)).all()
  step = fast_jit(lambda s, c, xt: nnx.merge(graphdef, s).step(c, xt))
  cache, ys = nnx.merge(graphdef, state).init_cache(B), []
  for t in range(T):
    y_t, cache = step(state, cache, x[:, t:t + 1])
    ys.append(y_t)
  _close(jnp.concatenate(ys, 1), y, 2e-4)


def test_layer_logical_axes():
  make = lambda variant: nnx.eval_shape(  # abstract: nothing is initialised
      lambda: LinearAttention(16, 2, 4, LinearConfig(variant=variant), rngs=nnx.Rngs(params=0)))
  layer = make("ssd")
  axes = {"/".join(map(str, p)): v.get_metadata().get("out_sharding")
          for p, v in nnx.iter_graph(layer) if isinstance(v, nnx.Param)}
  expect = {"q": ("embed", "heads", "head_dim"), "o": ("heads", "head_dim", "embed"),
            "w_dt": ("embed", "heads"), "b_dt": ("heads",), "A_log": ("heads",),
            "conv_q": (None, "heads", "head_dim"), "norm_scale": ("heads", "head_dim")}
  for name, ax in expect.items():
    assert axes[name] == ax, (name, axes[name])
  m2s = make("mamba2s")
  assert m2s.w_A.get_metadata()["out_sharding"] == ("embed", "heads")
  assert m2s.conv_q.shape == (2, 2, 4)
  two = make("2mamba")
  assert not hasattr(two, "w_dt") and not hasattr(two, "norm_scale")


def test_official_bias_free_decay_init():
  """``decay_bias=False``: the official Mamba-2S / 2Mamba layer has no b_A / b_dt, so the
  decay starts near exp(-softplus(0)) = 0.5 and dt near softplus(0) = 0.69; ours starts
  near 1 (our biases; here > 0.9). ssd (Mamba-2) keeps its dt bias: a config error."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 64), np.float32)) * 0.3
  for bias, lo, hi in ((True, 0.9, 0.99999), (False, 0.3, 0.7)):
    layer = LinearAttention(64, 2, 8, LinearConfig(variant="mamba2s", decay_bias=bias),
                            rngs=nnx.Rngs(params=1))
    assert hasattr(layer, "b_A") == bias and hasattr(layer, "b_dt") == bias
    _, a, dt = layer._project(x)
    decay = float(jnp.exp(jnp.median(a)))
    assert lo < decay < hi, (bias, decay)
    if not bias:
      assert 0.5 < float(jnp.median(dt)) < 0.9
  assert not hasattr(LinearAttention(16, 2, 4, LinearConfig(variant="2mamba", decay_bias=False),
                                     rngs=nnx.Rngs(params=0)), "b_A")
  with pytest.raises(ConfigError, match="decay_bias"):
    LinearConfig(variant="ssd", decay_bias=False)


@pytest.mark.parametrize("variant,grad", [("ssd", False), ("ssd", True), ("2mamba", False)])
def test_chunked_temp_memory_is_linear_in_length(variant, grad):
  """XLA's temp allocation at T = 4096 is < 2.5x that at T = 2048 (chunk 64)."""
  f = functools.partial(linear_attend, variant=variant, chunk_size=64)
  if grad:
    f = jax.grad(lambda *x: jnp.sum(linear_attend(*x, variant=variant, chunk_size=64)),
                 argnums=(0, 1, 2, 3))

  def temp_bytes(T):
    q = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
    a = jax.ShapeDtypeStruct((1, T, 2), jnp.float32)
    try:
      stats = fast_jit(f).lower(q, q, q, a).compile().memory_analysis()  # same buffers
    except (NotImplementedError, AttributeError) as e:
      pytest.skip(f"memory_analysis unavailable on {jax.default_backend()}: {e}")
    if stats is None or getattr(stats, "temp_size_in_bytes", None) is None:
      pytest.skip(f"memory_analysis returned nothing on {jax.default_backend()}")
    return stats.temp_size_in_bytes
  small, large = temp_bytes(2048), temp_bytes(4096)
  assert 0 < large < 2.5 * small, (small, large)


def test_errors():
  q, k, v, a = _inputs(0)
  with pytest.raises(ValueError, match="chunk_size=0"):
    linear_attend(q, k, v, a, variant="ssd", chunk_size=0)
  with pytest.raises(ValueError, match="chunk_size=-4"):
    linear_attend(q, k, v, a, variant="ssd", chunk_size=-4)
  with pytest.raises(ValueError, match="variant='mamba3'"):
    linear_attend(q, k, v, a, variant="mamba3")
  with pytest.raises(ValueError, match="k_BTNH.shape"):
    linear_attend(q, k[..., :4], v, a, variant="ssd")
  with pytest.raises(ValueError, match="v_BTNV.shape"):
    linear_attend(q, k, v[:, :5], a, variant="ssd")
  with pytest.raises(ValueError, match="log_decay_BTN.shape"):
    linear_attend(q, k, v, a[..., :1], variant="ssd")
  with pytest.raises(ValueError, match="implementation='flash'"):
    linear_attend(q, k, v, a, variant="ssd", implementation="flash")
  with pytest.raises(ConfigError, match="variant='softmax'"):
    LinearConfig(variant="softmax")
  with pytest.raises(ConfigError, match="chunk_size=0"):
    LinearConfig(variant="ssd", chunk_size=0)
  with pytest.raises(ConfigError, match="implementation='flash'"):
    LinearConfig(implementation="flash")


# ----------------------------------------------------------------- context parallelism
# (mesh, chunk): 8 shards of 8 tokens (2 chunks each), and batch 2 x 4 shards of 16 tokens
# with chunk 3 (shards are not whole chunks; their chunks straddle the one-device ones).
_CP_MESHES = {"seq8": ((8,), ("sequence",), 4), "data2seq4": ((2, 4), ("data", "sequence"), 3)}
# mamba2s's op is ssd's (the variants differ in the layer): the op tests run ssd and
# 2mamba and check that mamba2s traces to ssd's program; the model test runs mamba2s.
_CP_VARIANTS = ("ssd", "2mamba")


def _out_and_grads(f, C, args):
  """Per variant: the output and its vjp w.r.t. q, k, v, log_decay (one program)."""
  out = {}
  for variant, (q, k, v, a, ct) in args.items():
    y, vjp = jax.vjp(functools.partial(f, variant=variant, chunk_size=C), q, k, v, a)
    out[variant] = (y,) + vjp(ct)
  return out


@functools.cache
def _cp_case():
  """Fresh inputs per variant (T = 64; decays include 0 and -40) and the one-device
  outputs and gradients (chunk 8)."""
  args = {}
  for i, variant in enumerate(_CP_VARIANTS):
    q, k, v, a = _inputs(40 + i, T=64, N=2, H=4, V=3, align=variant == "2mamba")
    ct = jnp.asarray(np.random.default_rng(50 + i).standard_normal(v.shape, np.float32))
    args[variant] = (q, k, v, a, ct)
  return args, fast_jit(functools.partial(_out_and_grads, linear_attend, 8))(args)


def _count_calls(monkeypatch, module, name) -> list:
  """Patches ``module.name`` to record each call (at trace time)."""
  calls, f = [], getattr(module, name)
  monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or f(*a, **kw))
  return calls


@pytest.mark.parametrize("mesh_kind", list(_CP_MESHES))
def test_context_parallel_equals_one_device(mesh_kind, monkeypatch):
  """Sequence-sharded: outputs and gradients equal the one-device chunked op's (a shard
  missing its incoming state is off by O(1)); mamba2s is ssd's program."""
  shape, names, C = _CP_MESHES[mesh_kind]
  args, want = _cp_case()
  calls = _count_calls(monkeypatch, linear, "_context_body")
  with placed(jax.make_mesh(shape, names)):
    got = fast_jit(functools.partial(_out_and_grads, linear_context_attend, C))(args)
    jaxpr = lambda variant: str(jax.make_jaxpr(functools.partial(
        linear_context_attend, variant=variant, chunk_size=C))(*args["ssd"][:4]))
    assert jaxpr("mamba2s") == jaxpr("ssd")
  assert len(calls) == len(_CP_VARIANTS) + 2  # the per-device path, not XLA's
  for variant in _CP_VARIANTS:
    for name, x, ref in zip(("y", "dq", "dk", "dv", "dlog_decay"), got[variant], want[variant]):
      assert x.shape == ref.shape, (variant, name)
      _close(x, ref, 2e-5)


def test_without_a_sharded_length_it_is_linear_attend():
  """No placement, a mesh without a sequence axis, a length the sequence axis does not
  divide (T = 13 over 8), or the recurrent twin: exactly ``linear_attend``'s program."""
  q, k, v, a = _inputs(0)
  jaxpr = lambda f, impl="chunked": str(jax.make_jaxpr(functools.partial(
      f, variant="2mamba", chunk_size=4, implementation=impl))(q, k, v, a))
  assert jaxpr(linear_context_attend) == jaxpr(linear_attend)
  for shape, names in (((8,), ("data",)), ((8,), ("sequence",))):
    with placed(jax.make_mesh(shape, names)):
      assert jaxpr(linear_context_attend) == jaxpr(linear_attend)
  with placed(jax.make_mesh((8,), ("sequence",))):
    q, k, v, a = _inputs(0, T=16)
    assert "ppermute" in jaxpr(linear_context_attend)
    assert jaxpr(linear_context_attend, "recurrent") == jaxpr(linear_attend, "recurrent")


def test_hybrid_model_on_a_sequence_sharded_mesh_equals_one_device(monkeypatch):
  """A linear + softmax model (mamba2s, chunk 16 over shards of 8 tokens): loss and
  parameter gradients with batch x sequence sharded 2 x 4 equal one device's."""
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from lm import config as config_lib
  from lm.model import apply, build_model
  cfg = config_lib.resolve(tiny("experiments/configs/ssd.py:tiny,LS", model__dtype="float32",
                                model__linear__variant="mamba2s")).model
  built = build_model(dataclasses.replace(cfg, vocab_size=64), seed=0, abstract=True)
  rng = np.random.default_rng(9)  # random parameters of the right shapes: no init compiles
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        built.params)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 33)), jnp.int32)

  def loss(params, tokens):
    logits = apply(built.graphdef, params, built.state, tokens[:, :-1])[0]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  want = fast_jit(jax.value_and_grad(loss))(params, tokens)
  calls = _count_calls(monkeypatch, linear, "_context_body")
  mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2)
  with placed(mesh):
    got = fast_jit(jax.value_and_grad(loss))(
        params, jax.device_put(tokens, NamedSharding(mesh, P("data"))))
  assert calls, "the linear layer did not take the context-parallel path"
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  for g, ref in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    _close(g, ref, 1e-5)


def test_recall_configs_are_the_synthetic_task():
  from experiments.configs import ssd
  from lm import config as config_lib
  for size in ("mqar", "recall64", "recall128", "recall256"):
    cfg = config_lib.resolve(ssd.get_config(f"{size},S"))
    assert cfg.data.source == "synthetic" and cfg.data.synthetic.task == "mqar", size
    assert cfg.data.seq_len * cfg.data.batch_size == 2048, size
    assert cfg.data.synthetic.spread == (size in ("recall128", "recall256")), size
