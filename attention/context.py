"""Context parallelism: attention over a sequence sharded across a mesh axis.

The sequence dimension T of q, k, v is sharded over one mesh axis (``sequence``,
size C); the batch may be sharded over further axes. ``context_attend`` wraps a
per-device body in ``jax.shard_map``. Four strategies:

- ``ulysses`` (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv 2309.14509): one
  ``all_to_all`` turns sequence shards into head shards (each device: the full
  sequence, N/C query heads and their kv heads), ``attention.ops.attend`` runs on
  them and a second ``all_to_all`` turns head shards back into sequence shards.
- ``headwise`` (Untied Ulysses / UPipe, Ghadia et al. 2026, arXiv 2602.21196)
  lives in ``attention.upipe``: it starts from the layer's input x, not from q, k,
  v (each stage projects only its own heads), so ``attention.layer`` calls it for the
  whole layer and ``context_attend`` refuses it. Its exchange and GQA rule are the
  ones below.
- ``ring`` (Ring Attention, Liu et al. 2023, arXiv 2310.01889; blockwise online
  softmax of Milakov & Gimelshein 2018 / FlashAttention): k, v blocks travel
  around the ring with ``jax.lax.ppermute`` for C steps; each step scores the local
  queries against the visiting block and folds it into a running max, running sum
  and output (fp32). Masks use global positions: a block wholly in the future (or
  outside the sliding window) is skipped, the diagonal block gets the causal mask.
  A ``custom_vjp`` runs the backward as a second ring pass: dq stays home, dk and
  dv travel with their block and are back at the owner after C hops. Only O(T/C)
  memory per device; ``implementation`` is not used (the block math is here).
  Causal load is unbalanced: device d computes d + 1 of the C blocks, and every
  ring step waits for the busiest device, so the ring costs C full blocks.
- ``zigzag`` (the zigzag layout of Llama 3's context parallelism, Dubey et al. 2024,
  arXiv 2407.21783 sec. 3.3.2; ring-flash-attention): the same ring on a layout
  where the sequence is cut into 2C chunks and device i holds chunks i and 2C-1-i
  (an early and a late one). Each block is two pieces and each step meets them as
  four sub-blocks of [T/2C]^2; causally one is always dead and one always whole,
  of the two diagonal ones exactly one is live off the ring's diagonal step. Every
  device computes 2C + 1 quarter blocks, (2C + 1)/4 blocks, instead of up to C
  (``ring_blocks``). Masks use each piece's global positions.

  Layout: the model keeps contiguous shards (RoPE positions, data, the loss are
  untouched); ``zigzag`` relays q, k, v into the zigzag layout at entry (two
  ``ppermute`` of half a shard each: one for even chunks, one for odd) and the
  output back; the backward relays dout in and dq, dk, dv back. In units of a k
  shard (q and the output are G = N/K times one) that is 2G + 2 moved per pass, on
  top of the ring's 2(C-1) forward and 4(C-1) backward, and not overlapped with
  compute (e.g. 10 vs 14 for G = 4, C = 8). Keeping the whole residual stream in
  zigzag order (tokens permuted once in the data, positions passed to RoPE) would
  remove the relays; it is not done here because every position-dependent part of
  the model (RoPE, masks of other layers, linear-attention scans, the decoder)
  would have to know the layout.

Both ring strategies enumerate, per (device, visiting block), which sub-blocks hold
an allowed pair (``_block_plans``, from ``attention.masks``, at trace time), grouped
into rectangles computed as one matmul each (zigzag, causal: chunk i's queries and
chunk 2C-1-i's against an earlier block's chunk, or chunk 2C-1-i's against a later
block's two); each step runs its pair's plan through a
``lax.switch`` over the plans that occur, so dead sub-blocks cost nothing and
XLA's cost analysis (the largest branch) counts a step as the busiest device's.

GQA (K kv heads, N = G*K query heads): a device holding U query heads needs
Ku = U / gcd(U, G) kv heads (query heads in runs of gcd(U, G) share one). When U is
a multiple of G these are the device's own kv heads and nothing is copied;
otherwise (e.g. K < C for Ulysses) kv heads are gathered, i.e. replicated, before
the exchange so each device receives exactly the kv heads its query heads use.
Only N % C is required of the heads (ulysses; headwise's rule: ``attention.upipe``).

Placement (``core.placement``): the arrays are global; ``context_attend`` runs per
device with the batch and the sequence sharded as the runtime's rules shard the
``batch`` and ``length`` axes. Without a sharded ``length`` every strategy is plain
``attention.ops.attend`` (per device, over the batch shards).
"""
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention import masks
from attention.ops import attend
from attention.spec import AttentionSpec
from core import placement
from core.errors import ConfigError
from core.vma import full_like_varying

STRATEGIES = ("ulysses", "headwise", "ring", "zigzag")


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


# --------------------------------------------------------------------------- ring


def _piece_first(d, p: int, C: int, Tc: int, zigzag: bool):
  """Global position of the first token of piece p of the block device d holds: the
  ring's block is chunk d of C (one piece of Tc tokens), zigzag's is chunks d and
  2C-1-d of 2C (two pieces). ``d`` may be traced."""
  return (2 * C - 1 - d if zigzag and p == 1 else d) * Tc


def _block_plans(spec: AttentionSpec, C: int, Tc: int, zigzag: bool, diagonal: bool):
  """What device i computes when the block of device src visits it, for every pair
  with (src == i) == diagonal: (plans, index [C, C]), index[i, src] naming the pair's
  plan. A plan is a tuple of rectangles ((r0, r1), (c0, c1)): query pieces r0 .. r1-1
  meet key pieces c0 .. c1-1 in one matmul. Its sub-blocks are exactly the live ones
  (with an allowed pair); those wholly in the future or outside the window are
  skipped. Query pieces attending the same key pieces share a rectangle."""
  P = 2 if zigzag else 1
  plans, index = [], np.zeros((C, C), np.int32)
  for i, src in itertools.product(range(C), range(C)):
    if (i == src) != diagonal:
      continue
    plan = []
    for a in range(P):
      keys = [b for b in range(P) if masks.block_has_allowed(
          _piece_first(i, a, C, Tc, zigzag), _piece_first(src, b, C, Tc, zigzag), Tc, Tc,
          spec.causal, spec.sliding_window)]
      if not keys:
        continue
      cols = (keys[0], keys[-1] + 1)   # contiguous: P <= 2
      if plan and plan[-1][1] == cols:
        plan[-1] = ((plan[-1][0][0], a + 1), cols)
      else:
        plan.append(((a, a + 1), cols))
    if tuple(plan) not in plans:
      plans.append(tuple(plan))
    index[i, src] = plans.index(tuple(plan))
  return plans, index


def ring_blocks(spec: AttentionSpec, C: int, T: int, zigzag: bool = False) -> np.ndarray:
  """int [C]: the score sub-blocks each device computes over the C ring steps (the
  backward recomputes the same ones), of [T/C]^2 scores for the ring and [T/(2C)]^2
  for zigzag. Causal: the ring's device d does d + 1 blocks, zigzag's every device
  2C + 1 quarter blocks."""
  Tc = T // C // (2 if zigzag else 1)
  count = np.zeros(C, np.int64)
  for diagonal in (True, False):
    plans, index = _block_plans(spec, C, Tc, zigzag, diagonal)
    for i, src in itertools.product(range(C), range(C)):
      if (i == src) == diagonal:
        count[i] += sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1) in plans[index[i, src]])
  return count


def _visit(plans_index, Tc: int, i, src, block, carry):
  """Runs the plan of the pair (i, src): ``block(carry, rows, cols)`` for each of its
  rectangles (token slices, pieces of Tc tokens). A ``lax.switch`` over the plans
  that occur (none when only one does) skips the dead sub-blocks, and XLA costs the
  step as its largest plan."""
  plans, index = plans_index

  def run(plan):
    def go(carry):
      for (r0, r1), (c0, c1) in plan:
        carry = block(carry, slice(r0 * Tc, r1 * Tc), slice(c0 * Tc, c1 * Tc))
      return carry
    return go

  if len(plans) == 1:
    return run(plans[0])(carry)
  return jax.lax.switch(jnp.asarray(index)[i, src], [run(p) for p in plans], carry)


def _ring_scores(q_BtKGH, k_BsKH, spec, q_pos_t, k_pos_s, scale):
  """fp32 scores, masked by the queries' and keys' global positions."""
  s_BKGts = jnp.einsum("btkgh,bskh->bkgts", q_BtKGH, k_BsKH,
                       preferred_element_type=jnp.float32) * scale
  allowed_ts = masks.allowed(q_pos_t[:, None], k_pos_s[None, :], spec.causal,
                             spec.sliding_window)
  return jnp.where(allowed_ts, s_BKGts, -jnp.inf)


def _ring_attention(q_BtNH, k_BtKH, v_BtKH, *, spec, axis, C, zigzag=False):
  """Ring attention with a ring-pass backward (``custom_vjp``); see module doc.
  ``zigzag``: the local block is chunks i and 2C-1-i of 2C (``_to_zigzag``)."""
  B, Tl, N, H = q_BtNH.shape
  K = k_BtKH.shape[2]
  G = N // K
  P = 2 if zigzag else 1
  Tc = Tl // P   # tokens per piece
  scale = spec.scale if spec.scale is not None else H ** -0.5
  perm = [(d, (d + 1) % C) for d in range(C)]   # block from d moves to d + 1
  shift = lambda x: jax.lax.ppermute(x, axis, perm)
  own, visiting = (_block_plans(spec, C, Tc, zigzag, diagonal) for diagonal in (True, False))

  def positions(d):   # [Tl] global position of each token of device d's block
    return jnp.concatenate([_piece_first(d, p, C, Tc, zigzag) + jnp.arange(Tc)
                            for p in range(P)])

  def forward(q_BtNH, k_BtKH, v_BtKH):
    i = jax.lax.axis_index(axis)
    q_BtKGH = q_BtNH.reshape(B, Tl, K, G, H)
    q_pos_t = positions(i)

    def fold(plans, carry, k_BsKH, v_BsKH, src):
      k_pos_s = positions(src)

      def block(carry, rows, cols):
        m_BKGt, l_BKGt, acc_BtKGH = carry
        m_BKGr, l_BKGr, acc_BrKGH = m_BKGt[..., rows], l_BKGt[..., rows], acc_BtKGH[:, rows]
        v_BcKH = v_BsKH[:, cols]
        s_BKGrc = _ring_scores(q_BtKGH[:, rows], k_BsKH[:, cols], spec, q_pos_t[rows],
                               k_pos_s[cols], scale)
        m_new, l_new, acc_new = masks.online_fold(m_BKGr, l_BKGr, acc_BrKGH, s_BKGrc, v_BcKH)
        return (m_BKGt.at[..., rows].set(m_new), l_BKGt.at[..., rows].set(l_new),
                acc_BtKGH.at[:, rows].set(acc_new))
      return _visit(plans, Tc, i, src, block, carry)

    m0 = full_like_varying((B, K, G, Tl), jnp.float32, q_BtNH, -jnp.inf)
    l0 = full_like_varying((B, K, G, Tl), jnp.float32, q_BtNH)
    acc0 = full_like_varying((B, Tl, K, G, H), jnp.float32, q_BtNH)
    carry = fold(own, (m0, l0, acc0), k_BtKH, v_BtKH, i)

    def step(c, j):
      carry, k_BsKH, v_BsKH = c
      k_BsKH, v_BsKH = shift(k_BsKH), shift(v_BsKH)
      return (fold(visiting, carry, k_BsKH, v_BsKH, (i - j) % C), k_BsKH, v_BsKH), None

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
    q_pos_t = positions(i)

    def fold(plans, carry, k_BsKH, v_BsKH, src):
      k_pos_s = positions(src)

      def block(carry, rows, cols):
        dq_BtKGH, dk_BsKH, dv_BsKH = carry
        q_BrKGH, do_BrKGH = q_BtKGH[:, rows], do_BtKGH[:, rows]
        k_BcKH, v_BcKH = k_BsKH[:, cols], v_BsKH[:, cols]
        s_BKGrc = _ring_scores(q_BrKGH, k_BcKH, spec, q_pos_t[rows], k_pos_s[cols], scale)
        p_BKGrc = jnp.exp(s_BKGrc - lse_BKGt[..., rows, None])
        dv_BcKH = jnp.einsum("bkgts,btkgh->bskh", p_BKGrc, do_BrKGH.astype(jnp.float32))
        dp_BKGrc = jnp.einsum("btkgh,bskh->bkgts", do_BrKGH, v_BcKH,
                              preferred_element_type=jnp.float32)
        ds_BKGrc = p_BKGrc * (dp_BKGrc - d_BKGt[..., rows, None]) * scale
        dq_BrKGH = jnp.einsum("bkgts,bskh->btkgh", ds_BKGrc, k_BcKH.astype(jnp.float32))
        dk_BcKH = jnp.einsum("bkgts,btkgh->bskh", ds_BKGrc, q_BrKGH.astype(jnp.float32))
        return (dq_BtKGH.at[:, rows].add(dq_BrKGH), dk_BsKH.at[:, cols].add(dk_BcKH),
                dv_BsKH.at[:, cols].add(dv_BcKH))
      return _visit(plans, Tc, i, src, block, carry)

    dq0 = full_like_varying((B, Tl, K, G, H), jnp.float32, q_BtNH)
    dkv0 = full_like_varying(k_BtKH.shape, jnp.float32, q_BtNH)
    dq, dk, dv = fold(own, (dq0, dkv0, dkv0), k_BtKH, v_BtKH, i)

    def step(c, j):
      dq, dk, dv, k_BsKH, v_BsKH = c
      # dk, dv travel with the block they belong to.
      dk, dv, k_BsKH, v_BsKH = shift(dk), shift(dv), shift(k_BsKH), shift(v_BsKH)
      dq, dk, dv = fold(visiting, (dq, dk, dv), k_BsKH, v_BsKH, (i - j) % C)
      return (dq, dk, dv, k_BsKH, v_BsKH), None

    (dq, dk, dv, _, _), _ = jax.lax.scan(step, (dq, dk, dv, k_BtKH, v_BtKH),
                                         jnp.arange(1, C))
    dk, dv = shift(dk), shift(dv)   # after C - 1 hops the block of i + 1 is here
    return (dq.reshape(B, Tl, N, H).astype(q_BtNH.dtype), dk.astype(k_BtKH.dtype),
            dv.astype(v_BtKH.dtype))

  ring.defvjp(ring_fwd, ring_bwd)
  return ring(q_BtNH, k_BtKH, v_BtKH)


def _zigzag_perms(C: int):
  """ppermute pairs from contiguous shards (device d: chunks 2d, 2d+1 of 2C) to the
  zigzag layout (device i: chunks i, 2C-1-i), one for the even chunks and one for the
  odd: each device sends one of each and receives one of each."""
  owner = lambda c: c if c < C else 2 * C - 1 - c
  return [[(d, owner(2 * d + h)) for d in range(C)] for h in (0, 1)]


def _to_zigzag(x_BtMH, axis, C: int):
  """[B, T/C, M, H] contiguous shard -> the zigzag block (chunk i, then 2C-1-i)."""
  Tc = x_BtMH.shape[1] // 2
  even, odd = (jax.lax.ppermute(x, axis, perm) for x, perm in
               zip((x_BtMH[:, :Tc], x_BtMH[:, Tc:]), _zigzag_perms(C)))
  i_even = jax.lax.axis_index(axis) % 2 == 0   # then chunk i is the even one
  return jnp.concatenate([jnp.where(i_even, even, odd), jnp.where(i_even, odd, even)], axis=1)


def _from_zigzag(x_BtMH, axis, C: int):
  """Inverse of ``_to_zigzag``."""
  Tc = x_BtMH.shape[1] // 2
  first, second = x_BtMH[:, :Tc], x_BtMH[:, Tc:]
  i_even = jax.lax.axis_index(axis) % 2 == 0
  even, odd = (jax.lax.ppermute(x, axis, [(dst, src) for src, dst in perm]) for x, perm in
               zip((jnp.where(i_even, first, second), jnp.where(i_even, second, first)),
                   _zigzag_perms(C)))
  return jnp.concatenate([even, odd], axis=1)


def _zigzag_attention(q_BtNH, k_BtKH, v_BtKH, *, spec, axis, C):
  """Ring attention on the zigzag layout, from and back to contiguous shards."""
  q, k, v = (_to_zigzag(x, axis, C) for x in (q_BtNH, k_BtKH, v_BtKH))
  return _from_zigzag(_ring_attention(q, k, v, spec=spec, axis=axis, C=C, zigzag=True), axis, C)


# ------------------------------------------------------------------------- wrapper


def context_attend(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                   spec: AttentionSpec = AttentionSpec(), *, strategy: str,
                   implementation: None | str | Sequence[str] = None) -> jax.Array:
  """Attention with the sequence sharded over a mesh axis (context parallelism).

  Runs per device (``core.placement.per_device``): the batch is sharded as the
  placement's rules shard ``batch``, the sequence as they shard ``length`` (C
  devices). Without a placement, or when ``length`` is not sharded, it is plain
  ``attention.ops.attend`` (per device, over the batch shards).

  Args:
    q_BTNH: queries [B, T, N, H], global.
    k_BTKH, v_BTKH: keys and values [B, T, K, H]; N % K == 0.
    spec: causal / sliding window / scale, applied over the full sequence.
    strategy: ``ulysses``, ``ring`` or ``zigzag`` (see the module docstring);
      zigzag needs T % (2C) == 0. (``headwise``: ``attention.upipe``.)
    implementation: passed to ``attention.ops.attend`` (ulysses, and any
      strategy when C == 1); ring and zigzag compute their blocks themselves.

  Returns:
    [B, T, N, H] in q's dtype, sharded like q.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r}: unknown context-parallel strategy. "
                     f"Fix: use one of {STRATEGIES}")
  if strategy == "headwise":
    raise ConfigError("strategy", strategy, "headwise (UPipe) projects each stage's heads "
                      "from the layer's input, so it takes x and the weights, not q, k, v",
                      "call attention.upipe.headwise_attention (attention.layer does for "
                      "context_parallel='headwise')")
  if q_BTNH.ndim != 4 or k_BTKH.shape != v_BTKH.shape or k_BTKH.ndim != 4:
    raise ValueError(f"shapes q={q_BTNH.shape}, k={k_BTKH.shape}, v={v_BTKH.shape}: expected "
                     "q [B, T, N, H] and k, v [B, T, K, H]. Fix: pass 4-D arrays")
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  if k_BTKH.shape[:2] != (B, T) or k_BTKH.shape[3] != H or K == 0 or N % K:
    raise ValueError(f"shapes q={q_BTNH.shape}, k={k_BTKH.shape}: need the same B, T, H and "
                     "heads a multiple of kv_heads. Fix: match the shapes")

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
    if strategy == "zigzag" and q.shape[1] % 2:
      raise ValueError(f"sequence length {T}: zigzag cuts it into 2 * {C} chunks (two per "
                       f"device). Fix: use a multiple of {2 * C} tokens or strategy='ring'")
    if strategy == "ring":
      return _ring_attention(q, k, v, spec=spec, axis=axis, C=C)
    if strategy == "zigzag":
      return _zigzag_attention(q, k, v, spec=spec, axis=axis, C=C)
    return _ulysses_body(q, k, v, spec=spec, axis=axis, C=C, implementation=implementation)

  io = ("batch", "length", None, None)
  return placement.per_device(body, (q_BTNH, k_BTKH, v_BTKH), (io, io, io), io)
