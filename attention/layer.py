"""The attention block: q/k/v projections, RoPE, grouped-query attention, output.

Parameters carry logical axis names (``embed``, ``heads``, ``kv_heads``,
``head_dim``) as ``out_sharding`` metadata; a rules table outside this package
maps them to mesh axes. Per-head projection weights are kept 3-D so tensor
parallelism can shard heads and Muon can see the matrix structure. The layer never
looks at a mesh: kernels that must run per device say so in the registry
(``attention.ops``), and context parallelism runs per device over the ``length``
axis (``attention.context``); ``core.placement`` wraps both.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from attention import cache as kv_cache
from attention import context, ops, sparse, upipe
from attention.conv import causal_conv, conv_tail
from attention.rope import apply_rope, rope_tables
from attention.spec import AttentionSpec
from core.errors import ConfigError
from core.params import logical_param
from core.quant import act_int8

CONTEXT_PARALLEL = ("none",) + context.STRATEGIES


class Attention(nnx.Module):
  """Causal self-attention with GQA and RoPE.

  Args:
    d_model: residual width.
    n_heads, n_kv_heads: query and key/value heads (n_heads % n_kv_heads == 0).
    head_dim: per-head width.
    rope_theta: RoPE base.
    implementation: forwarded to ``attention.ops.attend``.
    spec: the mask (causal, sliding window, block-sparse, hierarchical).
    dtype: compute dtype; param_dtype: storage dtype of the weights.
    context_parallel: ``none``, or a strategy of ``attention.context``: used when the
      placement shards the ``length`` axis. ``headwise`` (UPipe, ``attention.upipe``)
      takes the whole layer: it projects each stage's heads from x itself.
    heads_per_stage: ``headwise``: heads per device per stage.
    act_quant: int8-fake-quantize the inputs of the q/k/v and output projections
      per token (``core.quant.act_int8``; w8a8 with ``lm.quant``'s weights).
    qkv_conv: width W > 0 of a causal depthwise convolution (no bias, no activation) on
      each of q, k and v after their projections and before RoPE, as the linear layers
      have (``attention.conv``): out_t = sum_s w_s u_{t-W+1+s}. The recall ablation's
      control (a softmax layer with the linear layers' short conv); 0: none. Decoding
      caches each conv's last W - 1 inputs beside K/V.

  With ``spec.block_sparse`` the block mask is predicted from q and k
  (``attention.sparse``) and each call sows ``attention_stats`` (``nnx.Intermediate``):
  ``{"density": kept share of the causally valid blocks}``. With the attribute
  ``capture_qkv`` set True (by analysis tools, on a built model) each call also sows
  ``qkv_stats``: ``{"q", "k", "v"}`` as attended (after the conv and RoPE).
  """

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               rngs: nnx.Rngs, rope_theta: float = 10_000.0, implementation=None,
               spec: AttentionSpec = AttentionSpec(), dtype=jnp.float32,
               param_dtype=jnp.float32, context_parallel: str = "none",
               heads_per_stage: int = 1, act_quant: bool = False, qkv_conv: int = 0):
    if n_heads % n_kv_heads:
      raise ValueError(f"n_kv_heads={n_kv_heads}: must divide n_heads={n_heads}. "
                       "Fix: choose n_kv_heads among the divisors of n_heads")
    if context_parallel not in CONTEXT_PARALLEL:
      raise ValueError(f"context_parallel={context_parallel!r}: unknown. Fix: use one of "
                       f"{CONTEXT_PARALLEL}")
    if spec.block_sparse is not None and context_parallel != "none":
      raise ValueError(f"context_parallel={context_parallel!r} with block-sparse attention: "
                       "not supported. Fix: use context_parallel='none'")
    if act_quant and context_parallel == "headwise":
      raise ConfigError("act_quant", act_quant, "headwise context parallelism projects the "
                        "output per stage, so there is no per-token scale over all heads",
                        "use context_parallel='ulysses' (or 'ring'), or act_quant=False")
    if qkv_conv and context_parallel == "headwise":
      raise ConfigError("qkv_conv", qkv_conv, "headwise context parallelism projects q, k, v "
                        "per stage, without the convolution", "use qkv_conv=0 or another "
                        "context_parallel strategy")
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    self.rope_theta, self.implementation, self.spec = rope_theta, implementation, spec
    self.dtype, self.act_quant = dtype, act_quant
    self.context_parallel, self.heads_per_stage = context_parallel, heads_per_stage
    D, N, K, H = d_model, n_heads, n_kv_heads, head_dim
    self.q = logical_param(rngs, (D, N, H), ("embed", "heads", "head_dim"), D, param_dtype)
    self.k = logical_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), D, param_dtype)
    self.v = logical_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), D, param_dtype)
    self.o = logical_param(rngs, (N, H, D), ("heads", "head_dim", "embed"), N * H, param_dtype)
    self.qkv_conv, self.capture_qkv = qkv_conv, False
    if qkv_conv:  # created after o, so the projections' init does not depend on it
      W = qkv_conv
      self.conv_q = logical_param(rngs, (W, N, H), (None, "heads", "head_dim"), W, param_dtype)
      self.conv_k = logical_param(rngs, (W, K, H), (None, "kv_heads", "head_dim"), W,
                                  param_dtype)
      self.conv_v = logical_param(rngs, (W, K, H), (None, "kv_heads", "head_dim"), W,
                                  param_dtype)

  def _project(self, x_BTD):
    """q [B, T, N, H], k, v [B, T, K, H] before the conv and RoPE."""
    dt = self.dtype
    x = x_BTD.astype(dt)
    x = act_int8(x) if self.act_quant else x
    return (jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(dt)),
            jnp.einsum("btd,dkh->btkh", x, self.k[...].astype(dt)),
            jnp.einsum("btd,dkh->btkh", x, self.v[...].astype(dt)))

  def _convs(self):
    return {"q": self.conv_q, "k": self.conv_k, "v": self.conv_v}

  def _qkv(self, x_BTD, positions_BT, windows=None):
    """q, k, v as attended (conv, RoPE) and, with ``qkv_conv``, each conv's padded input
    (``attention.conv``; ``windows``: the decode cache's last inputs, else zeros)."""
    qkv = self._project(x_BTD)
    padded = {}
    if self.qkv_conv:
      out = []
      for name, u in zip("qkv", qkv):
        y, padded[name] = causal_conv(u, self._convs()[name][...].astype(self.dtype),
                                      None if windows is None else windows[name])
        out.append(y)
      qkv = tuple(out)
    q_BTNH, k_BTKH, v_BTKH = qkv
    cos, sin = rope_tables(positions_BT, self.head_dim, self.rope_theta)
    return apply_rope(q_BTNH, cos, sin), apply_rope(k_BTKH, cos, sin), v_BTKH, padded

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
    dt = self.dtype
    if self.context_parallel == "headwise":   # UPipe: projections inside the stages
      w = [p[...].astype(dt) for p in (self.q, self.k, self.v, self.o)]
      return upipe.headwise_attention(
          x_BTD.astype(dt), positions_BT, *w, self.spec, heads_per_stage=self.heads_per_stage,
          rope_theta=self.rope_theta, implementation=self.implementation)
    q_BTNH, k_BTKH, v_BTKH, _ = self._qkv(x_BTD, positions_BT)
    if self.capture_qkv:
      self.sow(nnx.Intermediate, "qkv_stats", {"q": q_BTNH, "k": k_BTKH, "v": v_BTKH})
    if self.context_parallel != "none":
      out_BTNH = context.context_attend(
          q_BTNH, k_BTKH, v_BTKH, self.spec, strategy=self.context_parallel,
          implementation=self.implementation)
    else:
      block_mask = None
      if self.spec.block_sparse is not None:
        block_mask = sparse.predict_block_mask(q_BTNH, k_BTKH, self.spec)
        self.sow(nnx.Intermediate, "attention_stats",
                 {"density": sparse.block_density(block_mask, self.spec)})
      out_BTNH = ops.attend(q_BTNH, k_BTKH, v_BTKH, self.spec, block_mask=block_mask,
                            implementation=self.implementation)
    return self._out(out_BTNH)

  def _out(self, out_BTNH):
    out_BTNH = act_int8(out_BTNH, 2) if self.act_quant else out_BTNH
    return jnp.einsum("btnh,nhd->btd", out_BTNH, self.o[...].astype(self.dtype))

  # ------------------------------------------------------------------------- decoding
  def cache_slots(self, max_len: int, slack: int) -> int:
    """Slots of this layer's cache (``attention.cache``): a ring of window + slack for
    a plain sliding window, else the whole context rounded up to whole blocks."""
    spec = self.spec
    if spec.sliding_window and spec.block_sparse is None and spec.hierarchical is None:
      if spec.sliding_window + slack < max_len:
        return spec.sliding_window + slack
    block = (spec.block_sparse.block_k if spec.block_sparse is not None else
             spec.hierarchical.block if spec.hierarchical is not None else 1)
    return -(-(max_len + slack) // block) * block

  def init_cache(self, batch: int, slots: int, dtype) -> dict:
    """K/V slots (``attention.cache.init``); with ``qkv_conv`` also the last W - 1
    pre-conv q, k, v inputs (``qkv_conv_q`` [B, W-1, N, H], ``qkv_conv_k`` / ``_v``
    [B, W-1, K, H]; ``dtype``, or the compute dtype for an int8 cache)."""
    cache = kv_cache.init(batch, slots, self.n_kv_heads, self.head_dim, dtype)
    if self.qkv_conv:
      wdt = self.dtype if jnp.issubdtype(dtype, jnp.integer) else dtype
      for name, heads in (("q", self.n_heads), ("k", self.n_kv_heads), ("v", self.n_kv_heads)):
        cache[f"qkv_conv_{name}"] = jnp.zeros((batch, self.qkv_conv - 1, heads, self.head_dim),
                                              wdt)
    return cache

  def _windows(self, cache):
    return {n: cache[f"qkv_conv_{n}"] for n in "qkv"} if self.qkv_conv else None

  def _new_windows(self, cache, padded, n_B) -> dict:
    return {f"qkv_conv_{n}": conv_tail(padded[n], n_B, self.qkv_conv).astype(
        cache[f"qkv_conv_{n}"].dtype) for n in padded}

  def extend(self, cache: dict, x_BTD: jax.Array, start_B: jax.Array, n_B: jax.Array,
             fresh: bool = False):
    """Adds tokens i < n_b of ``x_BTD`` (positions start_b + i) to the cache and attends
    them over it: (y_BTD, new cache). ``fresh`` (an empty cache: a prompt) attends the
    new tokens among themselves with the layer's implementation, as in training."""
    T = x_BTD.shape[1]
    positions = start_B[:, None] + jnp.arange(T)[None, :]
    q_BTNH, k_BTKH, v_BTKH, padded = self._qkv(x_BTD, positions, self._windows(cache))
    slots = cache["k"].shape[1]
    new = kv_cache.write(cache, k_BTKH, v_BTKH, start_B, n_B)
    new.update(self._new_windows(cache, padded, n_B))
    plain = self.spec.block_sparse is None and self.spec.hierarchical is None
    if fresh and plain:
      out_BTNH = ops.attend(q_BTNH, k_BTKH, v_BTKH, self.spec,
                            implementation=self.implementation)
    else:
      # A ring must have slack >= T - 1 (attention.cache); the decoder builds it so.
      kpos = kv_cache.slot_positions(start_B + n_B - 1, slots)
      k_BSKH, v_BSKH = kv_cache.read(new, q_BTNH.dtype)
      out_BTNH = kv_cache.attend_cached(q_BTNH, positions, k_BSKH, v_BSKH, kpos, self.spec)
    return self._out(out_BTNH), new

  def commit(self, old: dict, new: dict, x_BTD: jax.Array, n_B: jax.Array) -> dict:
    """The cache after only the first n_b of the tokens an ``extend`` from ``old`` ran
    on ``x_BTD``: K/V slots from ``new`` (later slots are masked by the length), the
    conv inputs recomputed from ``old``'s."""
    if not self.qkv_conv:
      return new
    positions = jnp.zeros(x_BTD.shape[:2], jnp.int32)  # the conv inputs do not depend on them
    padded = self._qkv(x_BTD, positions, self._windows(old))[3]
    return dict(new, **self._new_windows(old, padded, n_B))
