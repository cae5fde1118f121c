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

from attention import context, ops, sparse
from attention.rope import apply_rope, rope_tables
from attention.spec import AttentionSpec
from core.params import logical_param

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
    context_parallel: ``none``, or ``ulysses`` / ``headwise`` / ``ring``
      (``attention.context``): used when the placement shards the ``length`` axis.
    heads_per_stage: ``headwise``: heads per device per stage.

  With ``spec.block_sparse`` the block mask is predicted from q and k
  (``attention.sparse``) and each call sows ``attention_stats`` (``nnx.Intermediate``):
  ``{"density": kept share of the causally valid blocks}``.
  """

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               rngs: nnx.Rngs, rope_theta: float = 10_000.0, implementation=None,
               spec: AttentionSpec = AttentionSpec(), dtype=jnp.float32,
               param_dtype=jnp.float32, context_parallel: str = "none",
               heads_per_stage: int = 1):
    if n_heads % n_kv_heads:
      raise ValueError(f"n_kv_heads={n_kv_heads}: must divide n_heads={n_heads}. "
                       "Fix: choose n_kv_heads among the divisors of n_heads")
    if context_parallel not in CONTEXT_PARALLEL:
      raise ValueError(f"context_parallel={context_parallel!r}: unknown. Fix: use one of "
                       f"{CONTEXT_PARALLEL}")
    if spec.block_sparse is not None and context_parallel != "none":
      raise ValueError(f"context_parallel={context_parallel!r} with block-sparse attention: "
                       "not supported. Fix: use context_parallel='none'")
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    self.rope_theta, self.implementation, self.spec = rope_theta, implementation, spec
    self.dtype = dtype
    self.context_parallel, self.heads_per_stage = context_parallel, heads_per_stage
    D, N, K, H = d_model, n_heads, n_kv_heads, head_dim
    self.q = logical_param(rngs, (D, N, H), ("embed", "heads", "head_dim"), D, param_dtype)
    self.k = logical_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), D, param_dtype)
    self.v = logical_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), D, param_dtype)
    self.o = logical_param(rngs, (N, H, D), ("heads", "head_dim", "embed"), N * H, param_dtype)

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
    dt = self.dtype
    x = x_BTD.astype(dt)
    q_BTNH = jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(dt))
    k_BTKH = jnp.einsum("btd,dkh->btkh", x, self.k[...].astype(dt))
    v_BTKH = jnp.einsum("btd,dkh->btkh", x, self.v[...].astype(dt))
    cos, sin = rope_tables(positions_BT, self.head_dim, self.rope_theta)
    q_BTNH, k_BTKH = apply_rope(q_BTNH, cos, sin), apply_rope(k_BTKH, cos, sin)
    if self.context_parallel != "none":
      out_BTNH = context.context_attend(
          q_BTNH, k_BTKH, v_BTKH, self.spec, strategy=self.context_parallel,
          heads_per_stage=self.heads_per_stage if self.context_parallel == "headwise" else None,
          implementation=self.implementation)
    else:
      block_mask = None
      if self.spec.block_sparse is not None:
        block_mask = sparse.predict_block_mask(q_BTNH, k_BTKH, self.spec)
        self.sow(nnx.Intermediate, "attention_stats",
                 {"density": sparse.block_density(block_mask, self.spec)})
      out_BTNH = ops.attend(q_BTNH, k_BTKH, v_BTKH, self.spec, block_mask=block_mask,
                            implementation=self.implementation)
    return jnp.einsum("btnh,nhd->btd", out_BTNH, self.o[...].astype(dt))
