"""What the TPU and GPU block-sparse kernels share: the named kernel config, the
``custom_vjp`` wrapper (block lists, delta, lse, transposed lists for dk/dv), the
input checks and the registry entry.

A backend (``block_sparse_tpu.KERNEL``, ``block_sparse_gpu.KERNEL``) supplies its
rules and two calls in its own layout:

- ``forward(q, k, v, counts, idx, cfg) -> (o, lse_BNT)``
- ``backward(q, k, v, do, lse_BNT, delta_BNT, counts, idx, tcounts, tidx, cfg)
  -> (dq, dk, dv)``

where the layout is [B, N, T, H] (``heads_major``) or the model's [B, T, N, H];
``lse_BNT`` is fp32 and -inf for a row with no allowed key; the backward gets it
with those rows at 0 (all their logits are masked) and ``delta = rowsum(dO * O) -
dlse`` (FlashAttention-2; the lse cotangent enters as -dlse). ``counts``/``idx``
are the backend's two scalar-prefetched block lists of the mask, ``tcounts``/``tidx``
of its transpose: ``attention.sparse.block_indices`` (per-row counts and kept
indices), or what the backend's ``schedule(mask, valid)`` makes of the mask and the
static causal / window block structure (the TPU kernel: flattened visit lists).
"""
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from attention import masks, sparse
from attention.spec import RESIDUALS, AttentionSpec
from core.errors import Unsupported
from core.vma import grad_like


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """The static settings of one block-sparse kernel call."""
  block_q: int
  block_k: int
  scale: float
  causal: bool
  window: int
  interpret: Any = False  # bool, or a Pallas interpreter's params


def div(a, b: int):
  """``a // b`` for non-negative grid indices, with integer ops only. (jnp's floor
  division lowers through ``sign``, which Mosaic resolves against the local device:
  it breaks AOT compiles.)"""
  return jax.lax.div(a, jnp.int32(b))


def rem(a, b: int):
  """``a % b`` for non-negative grid indices (see ``div``)."""
  return jax.lax.rem(a, jnp.int32(b))


def token_mask(q_first, k_first, bq: int, bk: int, cfg: KernelConfig):
  """bool [bq, bk]: allowed (query, key) pairs of one block, from iota positions."""
  q_pos = q_first + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_pos = k_first + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  return masks.allowed(q_pos, k_pos, cfg.causal, cfg.window)


def needs_mask(q_first, k_first, cfg: KernelConfig):
  """Scalar: does the block at (q_first, k_first) hold any pair the token mask forbids?"""
  return masks.block_needs_mask(q_first, k_first, cfg.block_q, cfg.block_k, cfg.causal,
                                cfg.window)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparseKernel:
  """One block-sparse flash-attention backend (see the module docstring)."""
  name: str
  heads_major: bool
  default_block: int
  head_dim_ok: Callable[[int], bool]
  head_dims: str
  block_ok: Callable[[int], bool]
  block_rule: str
  forward: Callable
  backward: Callable
  extra_check: Callable | None = None  # (q_BTNH, k_BSKH, block_q, block_k) -> raises
  # (block_mask_BKRL, valid_RL numpy) -> the two block lists; None: block_indices(mask)
  schedule: Callable | None = None

  def unsupported(self, msg: str) -> Unsupported:
    return Unsupported(f"{self.name}: {msg}")

  def check(self, q_BTNH, k_BSKH, v_BSKH, block_mask_BKQC, block_q: int, block_k: int):
    """Raises ``Unsupported`` (or ValueError for malformed shapes), each with the fix."""
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or v_BSKH.shape != k_BSKH.shape:
      raise ValueError(f"q {q_BTNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape}: expected "
                       "q [B, T, N, H] and k, v [B, S, K, H]")
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
      raise ValueError(f"q {q_BTNH.shape} and k {k_BSKH.shape}: batch and head dim must match")
    if K == 0 or N % K:
      raise ValueError(f"heads={N}, kv_heads={K}: heads must be a multiple of kv_heads. "
                       "Fix: choose kv_heads dividing heads")
    if not self.head_dim_ok(H):
      raise self.unsupported(f"head_dim={H} is not supported; supported head dims are "
                             f"{self.head_dims}. Fix: choose such a head dim, or use "
                             "implementation='xla'")
    for name, x in (("q", q_BTNH), ("k", k_BSKH), ("v", v_BSKH)):
      if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise self.unsupported(f"{name} dtype {x.dtype} is not supported (bfloat16 or "
                               "float32). Fix: cast the inputs to bfloat16, or use "
                               "implementation='xla'")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
      if not self.block_ok(blk):
        raise self.unsupported(f"{name}={blk} is not {self.block_rule}")
    for name, blk, n, what in (("block_q", block_q, T, "query length T"),
                               ("block_k", block_k, S, "key length S")):
      if n % blk:
        raise self.unsupported(f"{name}={blk} does not divide the {what}={n}. Fix: choose a "
                               f"{name} dividing {n} or pad to a multiple of {blk}")
    want = (B, K, T // block_q, S // block_k)
    if block_mask_BKQC is not None and tuple(block_mask_BKQC.shape) != want:
      raise ValueError(f"block_mask shape {tuple(block_mask_BKQC.shape)}: expected [B, K, "
                       f"T/block_q, S/block_k] = {want}")
    if self.extra_check is not None:
      self.extra_check(q_BTNH, k_BSKH, block_q, block_k)

  def attention(self, q_BTNH, k_BSKH, v_BSKH, block_mask_BKQC, *, block_q: int, block_k: int,
                causal: bool = True, sliding_window: int = 0, scale: float | None = None,
                interpret=False, return_lse: bool = False):
    """Block-sparse flash attention, differentiable in q, k and v.

    Args:
      q_BTNH: queries [B, T, N, H], bfloat16 or float32.
      k_BSKH, v_BSKH: keys, values [B, S, K, H], N % K == 0 (query head n uses kv
        head n // (N / K)).
      block_mask_BKQC: bool [B, K, T / block_q, S / block_k], one mask per kv head
        (True = the block is attended). No gradient.
      block_q, block_k: block sizes in tokens (the backend's rule; they divide T, S).
      causal, sliding_window: token-level mask intersected with the kept blocks
        (query t attends key s iff s <= t if causal, t - s < window if window > 0).
      scale: logit scale; None means 1 / sqrt(H).
      interpret: False on the backend's platform; True elsewhere (tests).
      return_lse: also return the fp32 log-sum-exp (differentiable).

    Returns:
      out [B, T, N, H] in q's dtype (rows with no allowed key are 0), and with
      ``return_lse`` also lse [B, N, T] fp32: natural log of the sum of exp(scaled
      logits) over the allowed keys; -inf for a row with no allowed key.

    Raises:
      core.errors.Unsupported: head dim, dtype or block size the kernel cannot
        handle (the message says which and how to fix it).
    """
    self.check(q_BTNH, k_BSKH, v_BSKH, block_mask_BKQC, block_q, block_k)
    H = q_BTNH.shape[-1]
    cfg = KernelConfig(int(block_q), int(block_k),
                       float(scale if scale is not None else H ** -0.5), bool(causal),
                       int(sliding_window), interpret)
    layout = (lambda x: jnp.swapaxes(x, 1, 2)) if self.heads_major else (lambda x: x)
    out, lse_BNT = _attention(self, layout(q_BTNH), layout(k_BSKH), layout(v_BSKH),
                              block_mask_BKQC.astype(jnp.bool_), cfg)
    out_BTNH = layout(out)
    return (out_BTNH, lse_BNT) if return_lse else out_BTNH

  def attend(self, q_BTNH, k_BSKH, v_BSKH, spec: AttentionSpec, segment_ids_BT=None,
             block_mask=None, *, interpret=False):
    """``attention.ops`` registry entry: this kernel for any ``AttentionSpec``.

    - ``block_mask`` given: block sizes from ``spec.block_sparse``; the mask is
      intersected with the static causal / window block structure (no visits to
      blocks that hold no allowed pair).
    - ``block_mask`` None and ``spec.block_sparse`` set: the mask is predicted.
    - otherwise (dense causal / sliding-window / full attention): blocks of
      ``min(default_block, T)`` queries and ``min(default_block, S)`` keys, and the
      static block mask, so fully masked blocks are skipped.
    """
    if segment_ids_BT is not None:
      raise self.unsupported("segment ids (packed sequences) are not supported. Fix: use "
                             "implementation='xla', or unpack the sequences")
    B, T = q_BTNH.shape[:2]
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    bs = spec.block_sparse
    if bs is None:
      bq, bk = min(self.default_block, T), min(self.default_block, S)
    else:
      bq, bk = bs.block_q, bs.block_k
      if block_mask is None:
        block_mask = sparse.predict_block_mask(q_BTNH, k_BSKH, spec)
    # (Lengths that are not whole blocks are refused by ``check``, with the fix.)
    valid_QC = jnp.asarray(masks.valid_blocks(spec.causal, spec.sliding_window, T, S, bq, bk))
    block_mask = (jnp.broadcast_to(valid_QC, (B, K) + valid_QC.shape) if block_mask is None
                  else block_mask & valid_QC)
    return self.attention(q_BTNH, k_BSKH, v_BSKH, block_mask, block_q=bq, block_k=bk,
                          causal=spec.causal, sliding_window=spec.sliding_window,
                          scale=spec.scale, interpret=interpret)


# ----------------------------------------------------------------------------- custom_vjp


def _lists(kernel: BlockSparseKernel, block_mask_BKQC, cfg: KernelConfig, transpose=False):
  """The backend's block lists of the mask (of its transpose, for dk/dv)."""
  mask = jnp.swapaxes(block_mask_BKQC, -1, -2) if transpose else block_mask_BKQC
  if kernel.schedule is None:
    return sparse.block_indices(mask)
  Q, C = block_mask_BKQC.shape[-2:]
  bq, bk = cfg.block_q, cfg.block_k
  valid_QC = masks.valid_blocks(cfg.causal, cfg.window, Q * bq, C * bk, bq, bk)
  return kernel.schedule(mask, valid_QC.T if transpose else valid_QC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _attention(kernel: BlockSparseKernel, q, k, v, block_mask_BKQC, cfg: KernelConfig):
  return kernel.forward(q, k, v, *_lists(kernel, block_mask_BKQC, cfg), cfg)


def _attention_fwd(kernel, q, k, v, block_mask_BKQC, cfg):
  lists = _lists(kernel, block_mask_BKQC, cfg)
  o, lse_BNT = kernel.forward(q, k, v, *lists, cfg)
  # Named so a checkpoint policy can keep them (attention.spec.RESIDUALS).
  o, lse_BNT = checkpoint_name(o, RESIDUALS), checkpoint_name(lse_BNT, RESIDUALS)
  return (o, lse_BNT), (q, k, v, block_mask_BKQC, lists, o, lse_BNT)


def _attention_bwd(kernel, cfg, res, cotangents):
  q, k, v, block_mask, lists, o, lse_BNT = res
  do, dlse_BNT = cotangents
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  delta_BNT = (delta if kernel.heads_major else jnp.swapaxes(delta, 1, 2)) - dlse_BNT.astype(
      jnp.float32)
  lse_safe = jnp.where(lse_BNT == -jnp.inf, 0.0, lse_BNT)  # empty rows: all logits masked
  tlists = _lists(kernel, block_mask, cfg, transpose=True)
  dq, dk, dv = kernel.backward(q, k, v, do.astype(q.dtype), lse_safe, delta_BNT, *lists,
                               *tlists, cfg)
  return grad_like(dq, q), grad_like(dk, k), grad_like(dv, v), None


_attention.defvjp(_attention_fwd, _attention_bwd)
