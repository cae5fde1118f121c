"""Splash attention (JAX's Pallas TPU kernel) behind ``attention.ops.attend``.

Splash takes static masks (causal, local) and skips the blocks they rule out; it
cannot take SpargeAttention2's per-example predicted masks (its mask is shared by
the batch and preprocessed on the host), so a ``block_mask`` goes to our kernel
(``attention/kernels/block_sparse_tpu.py``) instead. Grouped-query attention runs
splash's MQA form once per kv head. Splash does not scale the logits: q is scaled
first.
"""
import functools

import jax
import jax.numpy as jnp

from attention.spec import RESIDUALS, AttentionSpec
from core.errors import Unsupported


def _block(n: int) -> int:
  for b in (512, 256, 128):
    if n % b == 0:
      return b
  raise AssertionError(n)


@functools.lru_cache(maxsize=32)
def _kernel(T: int, S: int, G: int, causal: bool, window: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  if window:  # t - s < window on the left; causal: nothing on the right, else no limit
    mask = sm.LocalMask((T, S), window_size=(window - 1, 0 if causal else None), offset=0)
  elif causal:
    mask = sm.CausalMask((T, S))
  else:
    mask = sm.FullMask((T, S))
  bq, bk = _block(T), _block(S)
  sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                        block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  # The kernel holds its preprocessed mask as arrays: make them concrete (this is called
  # while tracing), or the cached kernel would carry the first trace's tracers.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * G), block_sizes=sizes,
                                            residual_checkpoint_name=RESIDUALS,
                                            interpret=interpret)


def attend_splash(q_BTNH, k_BSKH, v_BSKH, spec: AttentionSpec, segment_ids_BT=None, *,
                  interpret: bool = False):
  """``attend`` through splash attention; raises ``Unsupported`` when it cannot."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  if T % 128 or S % 128:
    raise Unsupported(f"sequence lengths must be multiples of 128 (got q_len={T}, kv_len={S})")
  if T != S and (spec.causal or spec.sliding_window):
    raise Unsupported("causal masks here assume q_len == kv_len")
  G = N // K
  scale = spec.scale if spec.scale is not None else H ** -0.5
  kernel = _kernel(T, S, G, spec.causal, spec.sliding_window, bool(interpret))
  q_BKGTH = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
  k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
  if segment_ids_BT is not None:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    seg = sk.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
    per_head = lambda q, k, v, s: kernel(q, k, v, segment_ids=s)
    out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0))(
        q_BKGTH, k_BKSH, v_BKSH, seg)
  else:
    out = jax.vmap(jax.vmap(kernel))(q_BKGTH, k_BKSH, v_BKSH)
  return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)
