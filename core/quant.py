"""Fake quantization: quantize to a low-precision type, dequantize, pass the gradient
straight through (Jacob et al. 2018; Bengio et al. 2013's straight-through estimator).

The numerics are qwix's (``qwix.quantize`` / ``qwix.dequantize``) with symmetric
absmax scales: int8 scale = absmax / 127 (values rounded to [-127, 127]), int4 absmax
/ 7 ([-7, 7]), fp8 as float8_e4m3fn (absmax / 448), nf4 (QLoRA's NormalFloat levels
scaled by absmax; stored LoRA bases, ``lm.lora``). (qwix's default integer scale is
absmax / (qmax + 0.5), which puts each group's largest value exactly on a rounding
boundary, so which of two levels it gets depends on how the division rounds; its
``absmax,<factor>`` calibration restores the classic absmax / qmax used here.) One
scale per slice along ``axis`` (per output channel), or per group of ``group``
consecutive elements along it (group-wise).

``fake_quant`` returns x + stop_gradient(dequant(quant(x)) - x): the forward sees the
quantized values, the backward the identity. Weight quantization (``lm.quant``) and
activation quantization (the layers' ``act_quant``) both use it.
"""
import jax
import jax.numpy as jnp
import qwix

# nf4: QLoRA's 4-bit NormalFloat (non-uniform levels; codes are uint4)
QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "fp8": jnp.float8_e4m3fn, "nf4": "nf4"}
# absmax x factor / (qmax + 0.5) = absmax / qmax for the integer types
_CALIBRATION = {"int8": f"absmax,{127.5 / 127!r}", "int4": f"absmax,{7.5 / 7!r}",
                "fp8": "absmax", "nf4": "absmax"}


def quantize(x: jax.Array, qtype: str, axis: int, group: int = 0):
  """qwix's ``QArray`` of ``x`` (fp32): scales per slice along ``axis`` (``group`` 0),
  or per ``group`` consecutive elements along it."""
  axis = axis % x.ndim
  others = tuple(a for a in range(x.ndim) if a != axis)
  tiled = {axis: group} if group and group < x.shape[axis] else {}
  return qwix.quantize(x.astype(jnp.float32), QTYPES[qtype], channelwise_axes=others,
                       tiled_axes=tiled, calibration_method=_CALIBRATION[qtype])


def fake_quant(x: jax.Array, qtype: str, axis: int, group: int = 0) -> jax.Array:
  """``x`` quantized and dequantized (see ``quantize``), in x's dtype, with a
  straight-through gradient."""
  y = qwix.dequantize(quantize(jax.lax.stop_gradient(x), qtype, axis, group)).astype(x.dtype)
  return x + jax.lax.stop_gradient(y - x)


def act_int8(x: jax.Array, n_contract: int = 1) -> jax.Array:
  """Dynamic per-token int8 fake quantization of a matmul input: one scale per token
  over its last ``n_contract`` axes (the contraction)."""
  shape = x.shape
  flat = x.reshape(shape[:x.ndim - n_contract] + (-1,))
  return fake_quant(flat, "int8", -1).reshape(shape)
