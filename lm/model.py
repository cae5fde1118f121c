"""Decoder-only transformer LM assembled from a typed config (Flax NNX).

``cfg`` below is ``lm.config.ModelConfig`` (this module does not import it: the
config module knows the loss terms, which run the model).

embedding -> n_layers x [RMSNorm -> token mixer -> residual, RMSNorm -> SwiGLU (or a
mixture of SwiGLU experts, ``model.moe``) -> residual] -> RMSNorm -> head (tied to
the embedding or its own matrix). The token mixer of each layer is softmax
attention (``attention.layer``) or linear attention (``attention.linear``), by
``model.layer_pattern``. Parameters are stored in ``param_dtype`` and cast to
``dtype`` for compute; logits are fp32. Every variable carries logical axis names.
``cfg.act_quant`` (set from the ``quant`` group, ``lm.quant``) names the roles whose
matmul inputs are int8-fake-quantized per token.

Scan over layers (``model.scan_layers``): the layers repeat with a period p (the
smallest one that ``layer_pattern`` and the MoE layers' spacing agree on); p
consecutive blocks form a unit, and the n_layers / p units' parameters are stacked
on a leading ``layers`` axis (``params["blocks"]["block_<j>"]``, j < p) and run by one
``jax.lax.scan``, so XLA compiles one unit whatever the depth. The units are
initialised block by block from the same random stream as the unrolled model, so a
seed gives the same weights in both layouts; ``scan_tree`` / ``unscan_tree`` convert
any tree keyed like the parameters (weights, optimizer moments, logical axes)
between the layouts. Sown statistics come back per block (``block_<i>``) either
way. Decoding runs the unrolled layout (``lm.runs`` converts on read-back).

The functional interface: ``build_model`` returns the graph definition, the
parameters and the model's other state (variables that are not parameters, such
as the MoE balancing bias) as pure dicts, with their logical axes; ``apply`` runs
the model and returns the logits, what the layers sowed and the new state.
"""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from attention.layer import Attention
from attention.linear import LinearAttention
from attention.spec import AttentionSpec
from core.errors import ConfigError
from core.params import logical_param
from core.quant import act_int8
from core.placement import constrain
from moe.layer import MoEFeedForward

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in fp32 (Zhang & Sennrich 2019)."""

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",),
                           eager_sharding=False)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(silu(x gate) * (x up)) (Shazeer 2020)."""

  def __init__(self, d_model: int, d_ff: int, *, rngs, dtype, param_dtype,
               act_quant: bool = False):
    self.dtype, self.act_quant = dtype, act_quant
    self.gate = logical_param(rngs, (d_model, d_ff), ("embed", "mlp"), d_model, param_dtype)
    self.up = logical_param(rngs, (d_model, d_ff), ("embed", "mlp"), d_model, param_dtype)
    self.down = logical_param(rngs, (d_ff, d_model), ("mlp", "embed"), d_ff, param_dtype)

  def __call__(self, x_BTD):
    dt = self.dtype
    q = act_int8 if self.act_quant else (lambda u: u)
    x = q(x_BTD.astype(dt))
    h_BTF = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    return q(h_BTF) @ self.down[...].astype(dt)


def attention_spec(cfg) -> AttentionSpec:
  """The softmax layers' mask: causal, ``sliding_window``, ``model.sparse``'s predicted
  block mask, or ``model.hierarchical``."""
  return AttentionSpec(causal=True, sliding_window=cfg.sliding_window,
                       block_sparse=cfg.sparse, hierarchical=cfg.hierarchical)


class Block(nnx.Module):
  """Pre-norm transformer block: softmax or linear attention, then a dense or MoE
  feed-forward."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype, moe: bool, mixer: str):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
    acts = cfg.act_quant
    if mixer == "L":
      self.attn = LinearAttention(cfg.d_model, cfg.n_heads, cfg.head_size, cfg.linear,
                                  rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                  act_quant="linear" in acts)
    else:
      self.attn = Attention(
          cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size, rngs=rngs,
          rope_theta=cfg.rope_theta, implementation=cfg.attention_impl,
          spec=attention_spec(cfg), dtype=dtype, param_dtype=param_dtype,
          context_parallel=cfg.context_parallel, heads_per_stage=cfg.heads_per_stage,
          act_quant="attention" in acts, qkv_conv=cfg.qkv_conv)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
    if moe:
      self.mlp = MoEFeedForward(cfg.d_model, cfg.moe.d_ff or cfg.d_ff, cfg.moe, rngs=rngs,
                                dtype=dtype, param_dtype=param_dtype,
                                act_quant="experts" in acts)
    else:
      self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                        act_quant="mlp" in acts)

  def __call__(self, x_BTD, positions_BT):
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))

  def extend(self, cache, x_BTD, start_B, n_B, fresh: bool):
    """The block over new tokens with its mixer's cache (``lm.decode``): (x, cache, the
    mixer's input)."""
    h_BTD = self.attn_norm(x_BTD)
    if isinstance(self.attn, LinearAttention):
      y, cache = self.attn.extend(cache, h_BTD, n_B, fresh)
    else:
      y, cache = self.attn.extend(cache, h_BTD, start_B, n_B, fresh)
    x_BTD = x_BTD + y
    return x_BTD + self.mlp(self.mlp_norm(x_BTD)), cache, h_BTD


def remat_policy(name: str):
  """The ``jax.checkpoint`` policy of ``model.remat=name`` (``lm.config.REMAT_POLICIES``;
  None: save nothing but the block's input)."""
  policies = jax.checkpoint_policies
  return {
      "full": None,
      "dots": policies.dots_saveable,
      "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
      "offload": policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
  }[name]


def layer_period(cfg) -> int:
  """The smallest p dividing n_layers such that block i is built like block i mod p
  (its mixer from ``layer_pattern`` and whether it is an MoE layer)."""
  kind = lambda i: (cfg.mixer(i), cfg.moe.is_moe_layer(i))
  L = cfg.n_layers
  return next(p for p in range(1, L + 1)
              if L % p == 0 and all(kind(i) == kind(i % p) for i in range(L)))


class Unit(nnx.Module):
  """p consecutive blocks: the body of the scan over layers."""

  def __init__(self, cfg, first: int, period: int, *, rngs, dtype, param_dtype):
    self.period = period
    for j in range(period):
      setattr(self, f"block_{j}", Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                        moe=cfg.moe.is_moe_layer(first + j),
                                        mixer=cfg.mixer(first + j)))

  def __call__(self, x_BTD, positions_BT, call):
    for j in range(self.period):
      x_BTD = constrain(call(getattr(self, f"block_{j}"), x_BTD, positions_BT),
                        ("batch", "length", "embed"))
    return x_BTD


def _stack_modules(modules: list) -> nnx.Module:
  """One module whose variables are ``modules``' stacked on a new leading ``layers``
  axis (the modules share a structure)."""
  graphdef, _ = nnx.split(modules[0])
  states = [nnx.split(m)[1] for m in modules]
  stacked = jax.tree.map(lambda *vs: jnp.stack(vs), *states)
  is_var = lambda x: isinstance(x, nnx.Variable)
  relabel = lambda v: v.replace(out_sharding=("layers",) + tuple(
      v.get_metadata().get("out_sharding") or ()))
  return nnx.merge(graphdef, jax.tree.map(relabel, stacked, is_leaf=is_var))


class Transformer(nnx.Module):
  """The LM. ``__call__(tokens [B, T]) -> logits [B, T, vocab]`` in fp32."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    self.dtype, self.tie_embeddings, self.remat = dtype, cfg.tie_embeddings, cfg.remat
    self.act_quant_head = "head" in cfg.act_quant
    D, V = cfg.d_model, cfg.vocab_size
    # Embedding rows have unit variance; the tied head rescales by 1/sqrt(D).
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (V, D), param_dtype),
                               out_sharding=("vocab", "embed"), eager_sharding=False)
    # Named attributes (not a list) keep every parameter path a string, which
    # checkpoints and logs rely on.
    self.n_layers, self.scan_layers = cfg.n_layers, cfg.scan_layers
    if cfg.scan_layers:
      # Built unit after unit from the one random stream (the unrolled model's
      # weights), then stacked.
      p = self.period = layer_period(cfg)
      self.blocks = _stack_modules([
          Unit(cfg, g * p, p, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
          for g in range(cfg.n_layers // p)])
    else:
      for i in range(cfg.n_layers):
        setattr(self, f"block_{i}", Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                          moe=cfg.moe.is_moe_layer(i), mixer=cfg.mixer(i)))
    self.final_norm = RMSNorm(D, cfg.norm_eps, param_dtype)
    if not cfg.tie_embeddings:
      self.head = logical_param(rngs, (D, V), ("embed", "vocab"), D, param_dtype)

  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               exits: tuple = ()):
    """Logits [B, T, V] fp32; with ``exits`` (layer counts n), also {"layer_<n>": the
    logit lens after block n: final norm and head on that residual}."""
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    residual = ("batch", "length", "embed")
    x_BTD = jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)
    x_BTD = constrain(x_BTD, residual)
    # remat: what each block keeps for the backward pass (REMAT_POLICIES), the rest is
    # recomputed there.
    block = lambda b, x, p: b(x, p)
    call = block if self.remat == "none" else nnx.remat(block, policy=remat_policy(self.remat))
    lens = {}
    if self.scan_layers:
      # A scan keeps every intermediate its body's backward reads, stacked per layer;
      # unrolled, XLA recomputes the cheap elementwise ones inside its fusions by itself.
      # So "none" under scan saves the matmul outputs (the `dots` policy), which is what
      # XLA keeps of unrolled layers (benchmarks/results/compile_time.md).
      if self.remat == "none":
        call = nnx.remat(block, policy=remat_policy("dots"))
      return self._scanned(x_BTD, positions_BT, call, exits)
    for i in range(self.n_layers):
      x_BTD = constrain(call(getattr(self, f"block_{i}"), x_BTD, positions_BT), residual)
      if i + 1 in exits:
        lens[f"layer_{i + 1}"] = constrain(self.logits(x_BTD), ("batch", "length", "vocab"))
    logits = constrain(self.logits(x_BTD), ("batch", "length", "vocab"))
    return (logits, lens) if exits else logits

  def _scanned(self, x_BTD, positions_BT, call, exits):
    """The blocks as a scan over the stacked units (``model.scan_layers``); split into
    one scan per segment between asked lens exits (each at a unit boundary). The
    units' sown statistics come back stacked and are sown here as ``scan_stats``
    (``apply`` hands them out per block); their new state (e.g. the MoE bias) is
    written back."""
    graphdef, state = nnx.split(self.blocks)
    p, G = self.period, self.n_layers // self.period

    def body(x_BTD, unit_state):
      unit = nnx.merge(graphdef, unit_state)
      x_BTD, sown = nnx.capture(unit, nnx.Intermediate)(x_BTD, positions_BT, call)
      # Only what the call may change (not the parameters: stacking them again as
      # outputs would copy every weight).
      _, _, rest = nnx.split(unit, nnx.Param, ...)
      return x_BTD, (rest, nnx.to_pure_dict(sown))

    for n in exits:
      if n % p:
        raise ConfigError("model.scan_layers", True, f"a logit-lens exit after layer {n} "
                          f"falls inside a scanned unit of {p} layers",
                          f"ask for exits at multiples of {p}, or set model.scan_layers=False")
    ends = sorted({n // p for n in exits} | {G})
    lens, new, sown, start = {}, [], [], 0
    for end in ends:
      part = jax.tree.map(lambda a: a[start:end], state)
      x_BTD, (new_part, sown_part) = jax.lax.scan(body, x_BTD, part)
      new.append(new_part)
      sown.append(sown_part)
      if end * p in exits:
        lens[f"layer_{end * p}"] = constrain(self.logits(x_BTD), ("batch", "length", "vocab"))
      start = end
    cat = lambda *xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0]
    nnx.update(self.blocks, jax.tree.map(cat, *new))
    self.sow(nnx.Intermediate, "scan_stats", jax.tree.map(cat, *sown))
    logits = constrain(self.logits(x_BTD), ("batch", "length", "vocab"))
    return (logits, lens) if exits else logits

  def head_matrix(self) -> jax.Array:
    """The unembedding [D, V] in the compute dtype (tied: the embedding / sqrt(D))."""
    if self.tie_embeddings:
      w_DV = self.embedding[...].T * (self.embedding.shape[-1] ** -0.5)
    else:
      w_DV = self.head[...]
    return w_DV.astype(self.dtype)

  def logits(self, x_BTD: jax.Array) -> jax.Array:
    """Final norm and head on residuals [..., D]: fp32 logits [..., V]."""
    h = self.final_norm(x_BTD)
    h = act_int8(h) if self.act_quant_head else h
    return jnp.einsum("...d,dv->...v", h, self.head_matrix(),
                      preferred_element_type=jnp.float32)

  # ------------------------------------------------------------------------- decoding
  def _check_unrolled(self):
    if self.scan_layers:
      raise ConfigError("model.scan_layers", True, "decoding runs the unrolled layout",
                        "decode with scan_layers=False (lm.decode.decode_config) and weights "
                        "converted by lm.model.unscan_tree (lm.runs.load_weights does both)")

  def init_cache(self, batch: int, max_len: int, slack: int = 0, dtype=jnp.bfloat16) -> dict:
    """An empty decode cache for ``batch`` rows of up to ``max_len`` tokens:
    ``{"lengths": [B] int32, "block_<i>": the mixer's cache}``; ``slack``: the most
    tokens one later call adds, less one (``attention.cache``)."""
    self._check_unrolled()
    cache = {"lengths": jnp.zeros((batch,), jnp.int32)}
    for i in range(self.n_layers):
      attn = getattr(self, f"block_{i}").attn
      cache[f"block_{i}"] = attn.init_cache(batch, attn.cache_slots(max_len, slack), dtype)
    return cache

  def extend(self, cache: dict, tokens_BT: jax.Array, n_B: jax.Array, *, fresh: bool = False,
             last_only: bool = False, keep: tuple = ()):
    """Runs tokens i < n_b of each row after the ``cache["lengths"]`` already cached:
    (logits, new cache, extras).

    ``fresh``: the cache is empty (a prompt). ``last_only``: logits [B, V] of each row's
    last valid token, else [B, T, V]. ``keep`` asks for extras: ``"inputs"`` (the mixer
    input of each block whose cache ``commit`` recomputes for fewer tokens: linear
    attention, a softmax ``qkv_conv``) and ``"hidden"`` (the residual after every block
    [L, B, T, D], for the logit lens).
    """
    self._check_unrolled()
    start_B = cache["lengths"]
    T = tokens_BT.shape[1]
    residual = ("batch", "length", "embed")
    x_BTD = constrain(jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype),
                      residual)
    new, inputs, hidden = {"lengths": start_B + n_B}, {}, []
    for i in range(self.n_layers):
      block = getattr(self, f"block_{i}")
      x_BTD, new[f"block_{i}"], h_BTD = block.extend(cache[f"block_{i}"], x_BTD, start_B, n_B,
                                                     fresh)
      x_BTD = constrain(x_BTD, residual)
      if isinstance(block.attn, LinearAttention) or getattr(block.attn, "qkv_conv", 0):
        inputs[f"block_{i}"] = h_BTD  # a state or conv inputs to recompute on commit
      hidden.append(x_BTD)
    if last_only:
      idx = jnp.clip(n_B - 1, 0, T - 1)[:, None, None]
      x_BTD = jnp.take_along_axis(x_BTD, idx, axis=1)[:, 0]
    extras = {}
    if "inputs" in keep:
      extras["inputs"] = inputs
    if "hidden" in keep:
      extras["hidden"] = jnp.stack(hidden)
    return self.logits(x_BTD), new, extras

  def commit(self, old: dict, new: dict, inputs: dict, n_B: jax.Array) -> dict:
    """The cache after only the first n_b of the tokens an ``extend`` from ``old`` ran
    (speculative decoding keeps the accepted ones): lengths and softmax K/V come from
    ``new`` (later slots are masked by the length); what has no per-token slots (a
    linear-attention block's state, a softmax block's ``qkv_conv`` inputs) is recomputed
    by the mixer's ``commit`` from ``old`` and the kept ``inputs``."""
    out = dict(new, lengths=old["lengths"] + n_B)
    for name, h_BTD in inputs.items():
      out[name] = getattr(self, name).attn.commit(old[name], new[name], h_BTD, n_B)
    return out


@dataclasses.dataclass(frozen=True)
class Built:
  """``build_model``'s result. ``params`` and ``state`` are pure dicts (arrays, or
  ShapeDtypeStructs when abstract); ``axes`` holds the logical axes of both as
  ``{"params": ..., "state": ...}``."""
  graphdef: nnx.GraphDef
  params: dict
  state: dict
  axes: dict


def _axes(state):
  return nnx.to_pure_dict(jax.tree.map(
      lambda v: tuple(v.get_metadata().get("out_sharding") or ()), state,
      is_leaf=lambda x: isinstance(x, nnx.Variable)))


def build_model(cfg, seed: int, abstract: bool = False) -> Built:
  """The model's graph definition, parameters and other state (see ``Built``) for
  ``cfg``, an ``lm.config.ModelConfig``.

  With ``abstract=True`` nothing is allocated (ShapeDtypeStructs).
  """
  make = lambda: Transformer(cfg, rngs=nnx.Rngs(params=seed))
  model = nnx.eval_shape(make) if abstract else make()
  graphdef, params, state = nnx.split(model, nnx.Param, ...)
  return Built(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(state),
               {"params": _axes(params), "state": _axes(state)})


def count_params(params) -> int:
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))


def apply(graphdef, params, state, tokens_BT: jax.Array, exits: tuple = ()):
  """Runs the model: (logits [B, T, V] fp32, statistics, new state); with ``exits``
  (layer counts), a fourth item: the logit lens after those layers (``Transformer``).

  The statistics group what the layers sowed as ``<group>_stats`` by group and
  block: ``{"moe": {block: {load, dropped, lb_loss, z_loss}}, "attention": {block:
  {density}}}``. The new state holds the non-parameter variables as the call left
  them (e.g. the MoE balancing bias after its update).
  """
  model = nnx.merge(graphdef, params, state)
  out, sown = nnx.capture(model, nnx.Intermediate)(tokens_BT, exits=tuple(exits))
  logits_BTV, lens = out if exits else (out, None)
  sown = nnx.to_pure_dict(sown)
  _, _, new_state = nnx.split(model, nnx.Param, ...)
  stats = {}

  def collect(block, node):
    for name, value in node.items():
      if name.endswith("_stats") and isinstance(value, (tuple, list)):
        stats.setdefault(name[:-len("_stats")], {})[block] = value[0]
      elif isinstance(value, dict):
        collect(block, value)

  for block, node in sown.items():
    if block == "scan_stats":  # stacked over the scanned units: per block again
      units, p = node[0], model.period
      for g in range(model.n_layers // p):
        for j, unit in units.items():
          collect(f"block_{g * p + int(j[len('block_'):])}", jax.tree.map(lambda a: a[g], unit))
    else:
      collect(block, node)
  if exits:
    return logits_BTV, stats, nnx.to_pure_dict(new_state), lens
  return logits_BTV, stats, nnx.to_pure_dict(new_state)


_BLOCK = re.compile(r"block_(\d+)$")


def _is_unrolled(node) -> bool:
  return isinstance(node, dict) and any(isinstance(k, str) and _BLOCK.match(k) for k in node)


def _is_scanned(node) -> bool:
  return isinstance(node, dict) and isinstance(node.get("blocks"), dict)


def scan_tree(tree, period: int):
  """``tree`` with every dict keyed like the unrolled parameters (``block_<i>``: a
  model's weights, an optimizer's moments, ...) in the scanned layout: ``blocks`` /
  ``block_<j>`` (j < period) holding blocks j, j + p, ... stacked on a leading axis.
  Works on arrays and, under ``jax.eval_shape``, on shapes."""
  def convert(node):
    if not _is_unrolled(node):
      return node
    present = {int(_BLOCK.match(k).group(1)) for k in node if _BLOCK.match(k)}
    G = -(-(max(present) + 1) // period)
    units = {}
    for j in range(period):  # a tree may hold only some blocks (state: MoE layers')
      members = [g * period + j for g in range(G)]
      if not present & set(members):
        continue
      if not set(members) <= present:
        raise ValueError(f"blocks {sorted(present)} do not form units of {period} layers")
      units[f"block_{j}"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                         *[node[f"block_{i}"] for i in members])
    return {**{k: v for k, v in node.items() if not _BLOCK.match(k)}, "blocks": units}
  return jax.tree.map(convert, tree, is_leaf=_is_unrolled)


def unscan_tree(tree, period: int | None = None):
  """The inverse of ``scan_tree``: every ``blocks`` dict back into ``block_<i>``
  (``period``: the model's, needed only when a tree holds some units, e.g. the
  model state of MoE layers; default: the number of units the dict holds)."""
  def convert(node):
    if not _is_scanned(node):
      return node
    units = node["blocks"]
    p = period or len(units)
    G = jax.tree.leaves(units)[0].shape[0]
    blocks = {f"block_{g * p + int(j[len('block_'):])}": jax.tree.map(lambda a: a[g], unit)
              for j, unit in units.items() for g in range(G)}
    return {**{k: v for k, v in node.items() if k != "blocks"}, **blocks}
  return jax.tree.map(convert, tree, is_leaf=_is_scanned)


def is_scanned(params: dict) -> bool:
  """Whether ``params`` (a model's weights) are in the scanned layout."""
  return _is_scanned(params)


def active_param_count(cfg, params) -> int:
  """Parameters one token meets: all of them, less the routed experts it is not
  sent to (``num_experts - top_k`` of each MoE layer). Works on abstract params."""
  total = count_params(params)
  moe = cfg.moe
  if not moe.enabled:
    return total
  if is_scanned(params):  # a stacked unit counts once per unit
    params = jax.eval_shape(unscan_tree, params)
  for block in params.values():
    mlp = block.get("mlp", {}) if isinstance(block, dict) else {}
    if "router" in mlp:
      per_expert = sum(math.prod(mlp[k].shape) for k in ("gate", "up", "down")) // moe.num_experts
      total -= (moe.num_experts - moe.top_k) * per_expert
  return total
