"""The attention block: q/k/v projections, RoPE, grouped-query attention, output.

Parameters carry logical axis names (``embed``, ``heads``, ``kv_heads``,
``head_dim``) as ``out_sharding`` metadata; a rules table outside this package
maps them to mesh axes. Per-head projection weights are kept 3-D so tensor
parallelism can shard heads and Muon can see the matrix structure.
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from attention import context, ops, sparse
from attention.rope import apply_rope, rope_tables
from attention.spec import AttentionSpec


def logical_param(rngs: nnx.Rngs, shape, axes, fan_in: int, dtype) -> nnx.Param:
  """A truncated-normal (std 1/sqrt(fan_in)) parameter tagged with logical axes."""
  init = jax.nn.initializers.truncated_normal(stddev=fan_in ** -0.5)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes),
                   eager_sharding=False)


class Attention(nnx.Module):
  """Causal self-attention with GQA and RoPE.

  Args:
    d_model: residual width.
    n_heads, n_kv_heads: query and key/value heads (n_heads % n_kv_heads == 0).
    head_dim: per-head width.
    rope_theta: RoPE base.
    implementation: forwarded to ``attention.ops.attend``.
    spec: the mask (causal, sliding window).
    dtype: compute dtype; param_dtype: storage dtype of the weights.
    context_parallel: ``none``, or ``ulysses`` / ``headwise`` / ``ring``
      (``attention.context``) over the ``sequence`` axis of the current mesh
      when that axis has more than one device.
    heads_per_stage: ``headwise``: heads per device per stage.
    batch_axes: mesh axes the batch is sharded over (for context parallelism).

  With ``spec.block_sparse`` the block mask is predicted from q and k
  (``attention.sparse``) and each call sows ``attn_stats`` (``nnx.Intermediate``):
  ``{"density": kept share of the causally valid blocks}``.
  """

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               rngs: nnx.Rngs, rope_theta: float = 10_000.0, implementation=None,
               spec: AttentionSpec = AttentionSpec(), dtype=jnp.float32,
               param_dtype=jnp.float32, context_parallel: str = "none",
               heads_per_stage: int = 1, batch_axes: tuple[str, ...] = ()):
    if n_heads % n_kv_heads:
      raise ValueError(f"n_kv_heads={n_kv_heads}: must divide n_heads={n_heads}. "
                       "Fix: choose n_kv_heads among the divisors of n_heads")
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    self.rope_theta, self.implementation, self.spec = rope_theta, implementation, spec
    self.dtype = dtype
    self.context_parallel, self.heads_per_stage = context_parallel, heads_per_stage
    self.batch_axes = tuple(batch_axes)
    D, N, K, H = d_model, n_heads, n_kv_heads, head_dim
    self.q = logical_param(rngs, (D, N, H), ("embed", "heads", "head_dim"), D, param_dtype)
    self.k = logical_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), D, param_dtype)
    self.v = logical_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), D, param_dtype)
    self.o = logical_param(rngs, (N, H, D), ("heads", "head_dim", "embed"), N * H, param_dtype)

  def _attend(self, mesh, q_BTNH, k_BTKH, v_BTKH, block_mask):
    """``ops.attend``; Pallas kernels (which XLA cannot partition) run per device
    inside ``jax.shard_map`` over the batch axes (and ``tensor`` over heads)."""
    attend = lambda q, k, v, m: ops.attend(q, k, v, self.spec, block_mask=m,
                                           implementation=self.implementation)
    platform = ops.current_platform()
    kernel = self.implementation in ("pallas", "splash") or (
        self.implementation is None and platform == "tpu")
    if not kernel or mesh.empty or mesh.size == 1:
      return attend(q_BTNH, k_BTKH, v_BTKH, block_mask)
    sizes = dict(mesh.shape)
    batch = tuple(a for a in self.batch_axes if sizes.get(a, 1) > 1) or None
    heads = "tensor" if sizes.get("tensor", 1) > 1 and self.n_kv_heads % sizes["tensor"] == 0 else None
    qkv = P(batch, None, heads, None)
    mask_spec = P(batch, heads, None, None)
    fn = jax.shard_map(attend, mesh=mesh, in_specs=(qkv, qkv, qkv, mask_spec if block_mask is not None else None),
                       out_specs=qkv, check_vma=platform == "tpu")
    return fn(q_BTNH, k_BTKH, v_BTKH, block_mask)

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
    dt = self.dtype
    x = x_BTD.astype(dt)
    q_BTNH = jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(dt))
    k_BTKH = jnp.einsum("btd,dkh->btkh", x, self.k[...].astype(dt))
    v_BTKH = jnp.einsum("btd,dkh->btkh", x, self.v[...].astype(dt))
    cos, sin = rope_tables(positions_BT, self.head_dim, self.rope_theta)
    q_BTNH, k_BTKH = apply_rope(q_BTNH, cos, sin), apply_rope(k_BTKH, cos, sin)
    mesh = jax.sharding.get_abstract_mesh()
    if self.spec.block_sparse is not None and self.context_parallel != "none":
      raise ValueError(f"context_parallel={self.context_parallel!r} with block-sparse "
                       "attention: not supported. Fix: use context_parallel='none'")
    if (self.context_parallel != "none" and not mesh.empty
        and dict(mesh.shape).get("sequence", 1) > 1):
      out_BTNH = context.context_attend(
          q_BTNH, k_BTKH, v_BTKH, self.spec, strategy=self.context_parallel, axis="sequence",
          batch_axes=tuple(a for a in self.batch_axes if a in mesh.shape),
          heads_per_stage=self.heads_per_stage if self.context_parallel == "headwise" else None,
          implementation=self.implementation)
    else:
      block_mask = None
      if self.spec.block_sparse is not None:
        block_mask = sparse.predict_block_mask(q_BTNH, k_BTKH, self.spec)
        self.sow(nnx.Intermediate, "attn_stats",
                 {"density": sparse.block_density(block_mask, self.spec)})
      out_BTNH = self._attend(mesh, q_BTNH, k_BTKH, v_BTKH, block_mask)
    return jnp.einsum("btnh,nhd->btd", out_BTNH, self.o[...].astype(dt))
