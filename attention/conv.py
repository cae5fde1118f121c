"""The short causal depthwise convolution on q, k and v (the linear layers', and a
softmax layer's with ``qkv_conv``)."""
import jax
import jax.numpy as jnp


def causal_conv(u_BTCH: jax.Array, w_WCH: jax.Array, prefix_BWCH: jax.Array | None = None):
  """out_t = sum_s w_s u_{t-W+1+s} along T, per channel and head: (out [B, T, C, H], the
  padded input [B, W - 1 + T, C, H]). The W - 1 inputs before the first are
  ``prefix_BWCH`` (a decode cache) or zeros."""
  W, T = w_WCH.shape[0], u_BTCH.shape[1]
  if prefix_BWCH is None:
    up = jnp.pad(u_BTCH, ((0, 0), (W - 1, 0), (0, 0), (0, 0)))
  else:
    up = jnp.concatenate([prefix_BWCH.astype(u_BTCH.dtype), u_BTCH], axis=1)
  return sum(up[:, s:s + T] * w_WCH[s] for s in range(W)), up


def conv_tail(up_BSCH: jax.Array, n_B: jax.Array, width: int) -> jax.Array:
  """The decode cache after a call: the W - 1 inputs before each row's token n_b, i.e.
  rows n_b .. n_b + W - 2 of ``causal_conv``'s padded input (later rows are padding)."""
  idx_BW = n_B[:, None] + jnp.arange(width - 1)[None, :]
  return jnp.take_along_axis(up_BSCH, idx_BW[:, :, None, None], axis=1)
