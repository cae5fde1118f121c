"""Decoder-only transformer LM assembled from config (Flax NNX).

embedding -> n_layers x [RMSNorm -> attention -> residual, RMSNorm -> SwiGLU (or
a mixture of SwiGLU experts, ``model.moe``) -> residual] -> RMSNorm -> head (tied
to the embedding or its own matrix).
Parameters are stored in ``param_dtype`` and cast to ``dtype`` for compute;
logits and the loss are fp32. Every parameter carries logical axis names.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from attention.layer import Attention, logical_param
from attention.linear import LinearAttention
from attention.spec import AttentionSpec, BlockSparse, Hierarchical
from lm.sharding import RULES, constrain
from moe.layer import MoEFeedForward
from moe.router import update_balance_bias

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str, field: str):
  if name not in _DTYPES:
    from lm.errors import ConfigError
    raise ConfigError(field, name, "unknown dtype", f"use one of {sorted(_DTYPES)}")
  return _DTYPES[name]


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

  def __init__(self, d_model: int, d_ff: int, *, rngs, dtype, param_dtype):
    self.dtype = dtype
    self.gate = logical_param(rngs, (d_model, d_ff), ("embed", "mlp"), d_model, param_dtype)
    self.up = logical_param(rngs, (d_model, d_ff), ("embed", "mlp"), d_model, param_dtype)
    self.down = logical_param(rngs, (d_ff, d_model), ("mlp", "embed"), d_ff, param_dtype)

  def __call__(self, x_BTD):
    dt = self.dtype
    x = x_BTD.astype(dt)
    h_BTF = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    return h_BTF @ self.down[...].astype(dt)


def is_moe_layer(cfg: ml_collections.ConfigDict, layer: int) -> bool:
  """Layer ``layer`` is MoE when experts are configured and it is every ``moe.every``-th."""
  moe = cfg.get("moe")
  return bool(moe and moe.num_experts) and (layer + 1) % moe.every == 0


def _batch_mesh_axes() -> tuple[str, ...]:
  """The mesh axes the rules table shards the token batch over."""
  target = dict(RULES)["batch"]
  return (target,) if isinstance(target, str) else tuple(target)


def moe_layer(cfg: ml_collections.ConfigDict, *, rngs, dtype, param_dtype) -> MoEFeedForward:
  m = cfg.moe
  return MoEFeedForward(
      cfg.d_model, num_experts=m.num_experts, top_k=m.top_k, d_ff=m.d_ff or cfg.d_ff,
      num_shared=m.num_shared, score=m.score, strategy=m.dispatch,
      capacity_factor=m.capacity_factor,
      gmm_impl=None if m.gmm_impl == "auto" else m.gmm_impl,
      expert_parallel=m.expert_parallel, batch_axes=_batch_mesh_axes(), rngs=rngs,
      dtype=dtype, param_dtype=param_dtype)


def mixer_of(cfg: ml_collections.ConfigDict, layer: int) -> str:
  """``S`` (softmax attention) or ``L`` (linear attention): ``layer_pattern`` cycled."""
  pattern = cfg.get("layer_pattern", "S") or "S"
  return pattern[layer % len(pattern)]


def attention_spec(cfg: ml_collections.ConfigDict) -> AttentionSpec:
  """The softmax layers' mask: causal, ``sliding_window``, ``model.sparse``'s
  predicted block mask when ``sparse.enabled``, or ``model.hierarchical``."""
  sp = cfg.get("sparse")
  block_sparse = None
  if sp is not None and sp.enabled:
    block_sparse = BlockSparse(block_q=sp.block_q, block_k=sp.block_k, top_k=sp.top_k,
                               top_p=sp.top_p, sink_blocks=sp.sink_blocks,
                               local_blocks=sp.local_blocks)
  h = cfg.get("hierarchical")
  hierarchical = Hierarchical(h.block, h.local_blocks) if h is not None and h.block else None
  return AttentionSpec(causal=True, sliding_window=cfg.get("sliding_window", 0),
                       block_sparse=block_sparse, hierarchical=hierarchical)


class Block(nnx.Module):
  """Pre-norm transformer block: softmax or linear attention (``mixer_of``), then a
  dense or MoE feed-forward (``is_moe_layer``)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs, dtype, param_dtype,
               moe: bool = False, mixer: str = "S"):
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
    if mixer == "L":
      lin = cfg.linear
      self.attn = LinearAttention(cfg.d_model, cfg.n_heads, head_dim, variant=lin.variant,
                                  chunk_size=lin.chunk_size, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)
    else:
      self.attn = Attention(
          cfg.d_model, cfg.n_heads, cfg.n_kv_heads, head_dim, rngs=rngs,
          rope_theta=cfg.rope_theta, implementation=cfg.attention_impl,
          spec=attention_spec(cfg), dtype=dtype, param_dtype=param_dtype,
          context_parallel=cfg.get("context_parallel", "none"),
          heads_per_stage=cfg.get("heads_per_stage", 1), batch_axes=_batch_mesh_axes())
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
    if moe:
      self.mlp = moe_layer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    else:
      self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x_BTD, positions_BT):
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Transformer(nnx.Module):
  """The LM. ``__call__(tokens [B, T]) -> logits [B, T, vocab]`` in fp32."""

  def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, *, rngs: nnx.Rngs):
    dtype = dtype_of(cfg.dtype, "model.dtype")
    param_dtype = dtype_of(cfg.param_dtype, "model.param_dtype")
    self.dtype, self.tie_embeddings = dtype, cfg.tie_embeddings
    self.remat = cfg.get("remat", False)
    D = cfg.d_model
    # Embedding rows have unit variance; the tied head rescales by 1/sqrt(D).
    self.embedding = nnx.Param(
        jax.random.normal(rngs.params(), (vocab_size, D), param_dtype),
        out_sharding=("vocab", "embed"), eager_sharding=False)
    # Named attributes (not a list) keep every parameter path a string, which
    # checkpoints and logs rely on.
    self.n_layers = cfg.n_layers
    for i in range(cfg.n_layers):
      setattr(self, f"block_{i}", Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                        moe=is_moe_layer(cfg, i), mixer=mixer_of(cfg, i)))
    self.final_norm = RMSNorm(D, cfg.norm_eps, param_dtype)
    if not cfg.tie_embeddings:
      self.head = logical_param(rngs, (D, vocab_size), ("embed", "vocab"), D, param_dtype)

  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None):
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    residual = ("batch", "length", "embed")
    x_BTD = jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)
    x_BTD = constrain(x_BTD, residual)
    for i in range(self.n_layers):
      block = getattr(self, f"block_{i}")
      # remat: keep only each block's input for the backward pass, recompute the rest.
      call = nnx.remat(lambda b, x, p: b(x, p)) if self.remat else (lambda b, x, p: b(x, p))
      x_BTD = constrain(call(block, x_BTD, positions_BT), residual)
    x_BTD = self.final_norm(x_BTD)
    if self.tie_embeddings:
      w_DV = self.embedding[...].T * (x_BTD.shape[-1] ** -0.5)
    else:
      w_DV = self.head[...]
    logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, w_DV.astype(self.dtype),
                            preferred_element_type=jnp.float32)
    return constrain(logits_BTV, ("batch", "length", "vocab"))


def build_model(model_cfg: ml_collections.ConfigDict, vocab_size: int, seed: int,
                abstract: bool = False):
  """Returns (graphdef, params as a pure dict, logical axes with the same structure).

  With ``abstract=True`` the params are ShapeDtypeStructs and nothing is allocated.
  """
  make = lambda: Transformer(model_cfg, vocab_size, rngs=nnx.Rngs(params=seed))
  model = nnx.eval_shape(make) if abstract else make()
  graphdef, state = nnx.split(model, nnx.Param)
  axes = jax.tree.map(lambda v: tuple(v.get_metadata().get("out_sharding") or ()), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(axes)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def apply(graphdef, params, tokens_BT: jax.Array):
  """Runs the model: (logits [B, T, V] fp32, statistics).

  The statistics are ``{"moe": {block: ...}, "attention": {block: ...}}``: what each
  MoE layer sowed (``moe.layer``: ``load`` [E], ``dropped``, ``lb_loss``,
  ``z_loss``) and each block-sparse attention layer (``density``); a group is
  empty when no layer of its kind sowed.
  """
  model = nnx.merge(graphdef, params)
  logits_BTV, sown = nnx.capture(model, nnx.Intermediate)(tokens_BT)
  sown = nnx.to_pure_dict(sown)
  stats = {"moe": {}, "attention": {}}
  for block, node in sown.items():
    if "moe_stats" in node.get("mlp", {}):
      stats["moe"][block] = node["mlp"]["moe_stats"][0]
    if "attn_stats" in node.get("attn", {}):
      stats["attention"][block] = node["attn"]["attn_stats"][0]
  return logits_BTV, stats


def moe_aux_loss(stats: dict, moe_cfg) -> jax.Array:
  """Balancing and z-losses summed over MoE layers, times their coefficients."""
  if not stats:
    return jnp.zeros((), jnp.float32)
  lb = sum(s["lb_loss"] for s in stats.values())
  z = sum(s["z_loss"] for s in stats.values())
  return moe_cfg.load_balance_coef * lb + moe_cfg.z_loss_coef * z


def update_balance_biases(params: dict, stats: dict, rate: float) -> dict:
  """Auxiliary-loss-free balancing (DeepSeek-V3): each MoE layer's ``router_bias``
  moves by ``rate`` against the sign of its load error. Outside the optimizer."""
  if not stats or not rate:
    return params
  params = dict(params)
  for block, s in stats.items():
    mlp = dict(params[block]["mlp"])
    mlp["router_bias"] = update_balance_bias(mlp["router_bias"], s["load"], rate)
    params[block] = dict(params[block], mlp=mlp)
  return params


def active_param_count(model_cfg: ml_collections.ConfigDict, params) -> int:
  """Parameters one token meets: all of them, less the routed experts it is not
  sent to (``num_experts - top_k`` of each MoE layer). Works on abstract params."""
  size = lambda x: int(math.prod(x.shape))
  total = count_params(params)
  moe = model_cfg.get("moe")
  if not moe or not moe.num_experts:
    return total
  for block in params.values():
    mlp = block.get("mlp", {}) if isinstance(block, dict) else {}
    if "router" in mlp:
      per_expert = sum(size(mlp[k]) for k in ("gate", "up", "down")) // moe.num_experts
      total -= (moe.num_experts - moe.top_k) * per_expert
  return total
