"""Context parallelism: attention over a sequence sharded across a mesh axis.

The sequence dimension T of q, k, v is sharded over one mesh axis (``sequence``,
size C); the batch may be sharded over further axes. ``context_attend`` wraps a
per-device body in ``jax.shard_map``. Three strategies:

- ``ulysses`` (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv 2309.14509): one
  ``all_to_all`` turns sequence shards into head shards (each device: the full
  sequence, N/C query heads and their kv heads), ``attention.ops.attend`` runs on
  them and a second ``all_to_all`` turns head shards back into sequence shards.
- ``headwise`` (Untied Ulysses / UPipe, Ghadia et al. 2026, arXiv 2602.21196):
  the same exchange, but for N/(C*U) stages of U heads per device (C*U heads
  globally), one stage per step of a ``jax.lax.scan``, so post-exchange
  activations and attention intermediates hold one stage's heads instead of N/C.
  Each stage's output lands in a preallocated [B, T/C, N, H] buffer. The scan (not
  an unrolled loop, which lets XLA overlap stages and erase the saving) is what
  bounds the live set. ``remat_stages`` wraps the stage in ``jax.checkpoint`` so
  the backward recomputes each stage from q, k, v rather than keeping every
  stage's residuals (the paper recomputes each stage from its inputs, output and
  LSE). A single stage (N == C*U) runs as Ulysses: a one-step scan with remat
  would only add recomputation.
- ``ring`` (Ring Attention, Liu et al. 2023, arXiv 2310.01889; blockwise online
  softmax of Milakov & Gimelshein 2018 / FlashAttention): k, v blocks travel
  around the ring with ``jax.lax.ppermute`` for C steps; each step scores the local
  queries against the visiting block and folds it into a running max, running sum
  and output (fp32). Masks use global positions: a block wholly in the future (or
  outside the sliding window) is skipped with ``lax.cond``, the diagonal block gets
  the causal mask. A ``custom_vjp`` runs the backward as a second ring pass: dq
  stays home, dk and dv travel with their block and are back at the owner after C
  hops. Only O(T/C) memory per device; ``implementation`` is not used (the block
  math is here). Causal load is unbalanced (device C-1 does C blocks, device 0
  one); zigzag / striped layouts are not implemented.

GQA (K kv heads, N = G*K query heads): a device holding U query heads needs
Ku = U / gcd(U, G) kv heads (query heads in runs of gcd(U, G) share one). When U is
a multiple of G these are the device's own kv heads and nothing is copied;
otherwise (e.g. K < C for Ulysses) kv heads are gathered, i.e. replicated, before
the exchange so each device receives exactly the kv heads its query heads use.
Only N % C (ulysses) or N % (C*U) (headwise) is required of the heads.

Placement (``core.placement``): the arrays are global; ``context_attend`` runs per
device with the batch and the sequence sharded as the runtime's rules shard the
``batch`` and ``length`` axes. Without a sharded ``length`` every strategy is plain
``attention.ops.attend`` (per device, over the batch shards).
"""
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention import masks
from attention.ops import attend
from attention.spec import AttentionSpec
from core import placement
from core.vma import full_like_varying

STRATEGIES = ("ulysses", "headwise", "ring")


def _kv_per_device(U: int, G: int) -> tuple[int, int]:
  """(Ku, g): kv heads per device for U query heads in groups of G; g query heads
  (a run) share each of them."""
  g = math.gcd(U, G)
  return U // g, g


def _kv_index(first_head, C: int, U: int, G: int, xp=np):
  """kv head used by each (device, local kv slot) for query heads starting at
  ``first_head``; device i holds query heads first_head + i*U ... + U - 1."""
  Ku, g = _kv_per_device(U, G)
  i = xp.arange(C)[:, None]
  j = xp.arange(Ku)[None, :]
  return ((first_head + i * U + j * g) // G).reshape(-1)


def _seq_to_heads(x_BtMH, axis):
  """[B, T/C, M, H] sequence shard -> [B, T, M/C, H] head shard (device i: heads
  i*M/C ...)."""
  return jax.lax.all_to_all(x_BtMH, axis, 2, 1, tiled=True)


def _heads_to_seq(x_BTmH, axis):
  return jax.lax.all_to_all(x_BTmH, axis, 1, 2, tiled=True)


def _exchange_attend(q_BtMH, k_BtJH, v_BtJH, spec, axis, implementation):
  """Exchange heads for sequence, attend over the full sequence, exchange back."""
  out_BTmH = attend(_seq_to_heads(q_BtMH, axis), _seq_to_heads(k_BtJH, axis),
                    _seq_to_heads(v_BtJH, axis), spec, implementation=implementation)
  return _heads_to_seq(out_BTmH, axis)


def _ulysses_body(q_BtNH, k_BtKH, v_BtKH, *, spec, axis, C, implementation):
  N, K = q_BtNH.shape[2], k_BtKH.shape[2]
  idx = _kv_index(0, C, N // C, N // K)
  if not np.array_equal(idx, np.arange(K)):   # K % C != 0 or groups split: replicate
    k_BtKH, v_BtKH = jnp.take(k_BtKH, idx, axis=2), jnp.take(v_BtKH, idx, axis=2)
  return _exchange_attend(q_BtNH, k_BtKH, v_BtKH, spec, axis, implementation)


def _headwise_body(q_BtNH, k_BtKH, v_BtKH, *, spec, axis, C, U, remat, implementation):
  N, K = q_BtNH.shape[2], k_BtKH.shape[2]
  G, CU = N // K, C * U
  Ku, g = _kv_per_device(U, G)

  def stage_out(q_BtNH, k_BtKH, v_BtKH, s):
    first = s * CU
    q_BtSH = jax.lax.dynamic_slice_in_dim(q_BtNH, first, CU, axis=2)
    if g == G:   # U % G == 0: the stage's kv heads are contiguous, no copies
      k_s = jax.lax.dynamic_slice_in_dim(k_BtKH, first // G, C * Ku, axis=2)
      v_s = jax.lax.dynamic_slice_in_dim(v_BtKH, first // G, C * Ku, axis=2)
    else:
      idx = _kv_index(first, C, U, G, xp=jnp)
      k_s, v_s = jnp.take(k_BtKH, idx, axis=2), jnp.take(v_BtKH, idx, axis=2)
    return _exchange_attend(q_BtSH, k_s, v_s, spec, axis, implementation)

  if remat:
    stage_out = jax.checkpoint(stage_out)

  def step(out_BtNH, s):
    o_BtSH = stage_out(q_BtNH, k_BtKH, v_BtKH, s)
    return jax.lax.dynamic_update_slice_in_dim(out_BtNH, o_BtSH, s * CU, axis=2), None

  out0 = full_like_varying(q_BtNH.shape, q_BtNH.dtype, q_BtNH)
  out_BtNH, _ = jax.lax.scan(step, out0, jnp.arange(N // CU))
  return out_BtNH


# --------------------------------------------------------------------------- ring


def _block_live(spec: AttentionSpec, i, src, Tl: int):
  """Whether queries of shard i may attend to any key of shard src."""
  return masks.block_has_allowed(i * Tl, src * Tl, Tl, Tl, spec.causal, spec.sliding_window)


def _ring_scores(q_BtKGH, k_BsKH, spec, i, src, scale):
  Tl = q_BtKGH.shape[1]
  s_BKGts = jnp.einsum("btkgh,bskh->bkgts", q_BtKGH, k_BsKH,
                       preferred_element_type=jnp.float32) * scale
  allowed_ts = masks.token_mask(spec.causal, spec.sliding_window, Tl, Tl, q_offset=(i - src) * Tl)
  return jnp.where(allowed_ts, s_BKGts, -jnp.inf)


def _ring_attention(q_BtNH, k_BtKH, v_BtKH, *, spec, axis, C):
  """Ring attention with a ring-pass backward (``custom_vjp``); see module doc."""
  B, Tl, N, H = q_BtNH.shape
  K = k_BtKH.shape[2]
  G = N // K
  scale = spec.scale if spec.scale is not None else H ** -0.5
  perm = [(d, (d + 1) % C) for d in range(C)]   # block from d moves to d + 1
  shift = lambda x: jax.lax.ppermute(x, axis, perm)

  def forward(q_BtNH, k_BtKH, v_BtKH):
    i = jax.lax.axis_index(axis)
    q_BtKGH = q_BtNH.reshape(B, Tl, K, G, H)

    def fold(carry, k_BsKH, v_BsKH, src):
      def live(carry):
        m_BKGt, l_BKGt, acc_BtKGH = carry
        s_BKGts = _ring_scores(q_BtKGH, k_BsKH, spec, i, src, scale)
        m_new = jnp.maximum(m_BKGt, jnp.max(s_BKGts, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha_BKGt = jnp.exp(m_BKGt - m_safe)
        p_BKGts = jnp.exp(s_BKGts - m_safe[..., None])
        l_new = alpha_BKGt * l_BKGt + jnp.sum(p_BKGts, axis=-1)
        pv_BtKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGts.astype(v_BsKH.dtype), v_BsKH,
                              preferred_element_type=jnp.float32)
        acc_new = jnp.moveaxis(alpha_BKGt, 3, 1)[..., None] * acc_BtKGH + pv_BtKGH
        return m_new, l_new, acc_new
      return jax.lax.cond(_block_live(spec, i, src, Tl), live, lambda c: c, carry)

    m0 = full_like_varying((B, K, G, Tl), jnp.float32, q_BtNH, -jnp.inf)
    l0 = full_like_varying((B, K, G, Tl), jnp.float32, q_BtNH)
    acc0 = full_like_varying((B, Tl, K, G, H), jnp.float32, q_BtNH)
    carry = fold((m0, l0, acc0), k_BtKH, v_BtKH, i)

    def step(c, j):
      carry, k_BsKH, v_BsKH = c
      k_BsKH, v_BsKH = shift(k_BsKH), shift(v_BsKH)
      return (fold(carry, k_BsKH, v_BsKH, (i - j) % C), k_BsKH, v_BsKH), None

    (carry, _, _), _ = jax.lax.scan(step, (carry, k_BtKH, v_BtKH), jnp.arange(1, C))
    m_BKGt, l_BKGt, acc_BtKGH = carry
    l_ok = l_BKGt > 0
    out_BtKGH = acc_BtKGH / jnp.moveaxis(jnp.where(l_ok, l_BKGt, 1.0), 3, 1)[..., None]
    # Rows with no allowed key: output 0, lse +inf (their probabilities are 0).
    lse_BKGt = jnp.where(l_ok, m_BKGt + jnp.log(jnp.where(l_ok, l_BKGt, 1.0)), jnp.inf)
    return out_BtKGH.reshape(B, Tl, N, H).astype(q_BtNH.dtype), lse_BKGt

  @jax.custom_vjp
  def ring(q_BtNH, k_BtKH, v_BtKH):
    return forward(q_BtNH, k_BtKH, v_BtKH)[0]

  def ring_fwd(q_BtNH, k_BtKH, v_BtKH):
    out_BtNH, lse_BKGt = forward(q_BtNH, k_BtKH, v_BtKH)
    return out_BtNH, (q_BtNH, k_BtKH, v_BtKH, out_BtNH, lse_BKGt)

  def ring_bwd(res, dout_BtNH):
    q_BtNH, k_BtKH, v_BtKH, out_BtNH, lse_BKGt = res
    i = jax.lax.axis_index(axis)
    q_BtKGH = q_BtNH.reshape(B, Tl, K, G, H)
    do_BtKGH = dout_BtNH.reshape(B, Tl, K, G, H)
    # D = rowsum(dO * O): the softmax-Jacobian term (FlashAttention-2, Alg. 2).
    d_BKGt = jnp.einsum("btkgh,btkgh->bkgt", do_BtKGH.astype(jnp.float32),
                        out_BtNH.reshape(B, Tl, K, G, H).astype(jnp.float32))

    def fold(carry, k_BsKH, v_BsKH, src):
      def live(carry):
        dq_BtKGH, dk_BsKH, dv_BsKH = carry
        s_BKGts = _ring_scores(q_BtKGH, k_BsKH, spec, i, src, scale)
        p_BKGts = jnp.exp(s_BKGts - lse_BKGt[..., None])
        dv_BsKH = dv_BsKH + jnp.einsum("bkgts,btkgh->bskh", p_BKGts,
                                       do_BtKGH.astype(jnp.float32))
        dp_BKGts = jnp.einsum("btkgh,bskh->bkgts", do_BtKGH, v_BsKH,
                              preferred_element_type=jnp.float32)
        ds_BKGts = p_BKGts * (dp_BKGts - d_BKGt[..., None]) * scale
        dq_BtKGH = dq_BtKGH + jnp.einsum("bkgts,bskh->btkgh", ds_BKGts,
                                         k_BsKH.astype(jnp.float32))
        dk_BsKH = dk_BsKH + jnp.einsum("bkgts,btkgh->bskh", ds_BKGts,
                                       q_BtKGH.astype(jnp.float32))
        return dq_BtKGH, dk_BsKH, dv_BsKH
      return jax.lax.cond(_block_live(spec, i, src, Tl), live, lambda c: c, carry)

    dq0 = full_like_varying((B, Tl, K, G, H), jnp.float32, q_BtNH)
    dkv0 = full_like_varying(k_BtKH.shape, jnp.float32, q_BtNH)
    dq, dk, dv = fold((dq0, dkv0, dkv0), k_BtKH, v_BtKH, i)

    def step(c, j):
      dq, dk, dv, k_BsKH, v_BsKH = c
      # dk, dv travel with the block they belong to.
      dk, dv, k_BsKH, v_BsKH = shift(dk), shift(dv), shift(k_BsKH), shift(v_BsKH)
      dq, dk, dv = fold((dq, dk, dv), k_BsKH, v_BsKH, (i - j) % C)
      return (dq, dk, dv, k_BsKH, v_BsKH), None

    (dq, dk, dv, _, _), _ = jax.lax.scan(step, (dq, dk, dv, k_BtKH, v_BtKH),
                                         jnp.arange(1, C))
    dk, dv = shift(dk), shift(dv)   # after C - 1 hops the block of i + 1 is here
    return (dq.reshape(B, Tl, N, H).astype(q_BtNH.dtype), dk.astype(k_BtKH.dtype),
            dv.astype(v_BtKH.dtype))

  ring.defvjp(ring_fwd, ring_bwd)
  return ring(q_BtNH, k_BtKH, v_BtKH)


# ------------------------------------------------------------------------- wrapper


def context_attend(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                   spec: AttentionSpec = AttentionSpec(), *, strategy: str,
                   heads_per_stage: int | None = None,
                   implementation: None | str | Sequence[str] = None,
                   remat_stages: bool = True) -> jax.Array:
  """Attention with the sequence sharded over a mesh axis (context parallelism).

  Runs per device (``core.placement.per_device``): the batch is sharded as the
  placement's rules shard ``batch``, the sequence as they shard ``length`` (C
  devices). Without a placement, or when ``length`` is not sharded, it is plain
  ``attention.ops.attend`` (per device, over the batch shards).

  Args:
    q_BTNH: queries [B, T, N, H], global.
    k_BTKH, v_BTKH: keys and values [B, T, K, H]; N % K == 0.
    spec: causal / sliding window / scale, applied over the full sequence.
    strategy: ``ulysses``, ``headwise`` or ``ring`` (see the module docstring).
    heads_per_stage: ``headwise`` only: U query heads per device per stage
      (default 1: C heads per stage globally); N % (C*U) == 0.
    implementation: passed to ``attention.ops.attend`` (ulysses, headwise, and any
      strategy when C == 1); ring computes its blocks itself.
    remat_stages: ``headwise`` only: ``jax.checkpoint`` each stage so the backward
      recomputes it instead of storing every stage's attention residuals.

  Returns:
    [B, T, N, H] in q's dtype, sharded like q.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r}: unknown context-parallel strategy. "
                     f"Fix: use one of {STRATEGIES}")
  if heads_per_stage is not None and strategy != "headwise":
    raise ValueError(f"heads_per_stage={heads_per_stage}: only used by strategy='headwise' "
                     f"(got {strategy!r}). Fix: drop it or use strategy='headwise'")
  if q_BTNH.ndim != 4 or k_BTKH.shape != v_BTKH.shape or k_BTKH.ndim != 4:
    raise ValueError(f"shapes q={q_BTNH.shape}, k={k_BTKH.shape}, v={v_BTKH.shape}: expected "
                     "q [B, T, N, H] and k, v [B, T, K, H]. Fix: pass 4-D arrays")
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  if k_BTKH.shape[:2] != (B, T) or k_BTKH.shape[3] != H or K == 0 or N % K:
    raise ValueError(f"shapes q={q_BTNH.shape}, k={k_BTKH.shape}: need the same B, T, H and "
                     "heads a multiple of kv_heads. Fix: match the shapes")
  U = 1 if heads_per_stage is None else heads_per_stage
  if strategy == "headwise" and U < 1:
    raise ValueError(f"heads_per_stage={U}: must be >= 1. Fix: use e.g. 1")

  def body(q, k, v):
    axis = placement.bound("length")
    if not axis:   # each device holds whole sequences: plain attention, no exchange
      return attend(q, k, v, spec, implementation=implementation)
    axis = axis[0] if len(axis) == 1 else axis
    C = jax.lax.axis_size(axis)
    if strategy == "ulysses" and N % C:
      raise ValueError(f"num_heads={N}: not divisible by the sequence axis size {C} (Ulysses "
                       f"gives each device N/C heads). Fix: use a multiple of {C} heads, a "
                       "smaller sequence axis, or strategy='ring'")
    if strategy == "headwise" and N % (C * U):
      raise ValueError(f"heads_per_stage={U}: num_heads={N} must be divisible by the sequence "
                       f"axis size {C} * heads_per_stage={C * U} (each stage gives every device "
                       f"U heads). Fix: choose U with N % ({C} * U) == 0, e.g. U=1")
    if strategy == "ring":
      return _ring_attention(q, k, v, spec=spec, axis=axis, C=C)
    if strategy == "ulysses" or N == C * U:   # headwise with one stage: exactly Ulysses
      return _ulysses_body(q, k, v, spec=spec, axis=axis, C=C, implementation=implementation)
    return _headwise_body(q, k, v, spec=spec, axis=axis, C=C, U=U, remat=remat_stages,
                          implementation=implementation)

  io = ("batch", "length", None, None)
  return placement.per_device(body, (q_BTNH, k_BTKH, v_BTKH), (io, io, io), io)
