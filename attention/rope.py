"""Rotary position embeddings (Su et al. 2021, RoFormer), rotate-half layout."""
import jax
import jax.numpy as jnp


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float):
  """cos/sin tables [B, T, head_dim // 2] in fp32 for integer positions."""
  if head_dim % 2:
    raise ValueError(f"head_dim={head_dim}: RoPE needs an even head dim. Fix: use an even "
                     "model.head_dim (or d_model / n_heads)")
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles_BTF), jnp.sin(angles_BTF)


def apply_rope(x_BTNH: jax.Array, cos_BTF: jax.Array, sin_BTF: jax.Array) -> jax.Array:
  """Rotates pairs (x[i], x[i + H/2]) by the position angle; fp32 math, x's dtype out."""
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  c, s = cos_BTF[:, :, None, :], sin_BTF[:, :, None, :]
  out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
  return out.astype(x_BTNH.dtype)
