"""Untied Ulysses / UPipe (Ghadia et al. 2026, arXiv 2602.21196): headwise context
parallelism from the layer's input.

The sequence is sharded over one mesh axis (``length``, C devices). Ulysses projects
all N query heads, exchanges sequence shards for head shards and attends N/C heads
per device at once, so the projected and exchanged q, k, v and the attention output
of every head are live together. UPipe runs the attention in stages of U query
heads per device (C*U globally), one stage per step of a ``jax.lax.scan``, and each
stage works from the layer's input x:

1. project only the stage's query heads from x_BtD (and, at the first stage of a
   kv group, that group's k, v heads, kept for the group's later stages), RoPE;
2. ``all_to_all`` sequence -> heads: each device gets U heads over the full sequence;
3. ``attention.ops.attend`` with the configured implementation: flash-style, O(T)
   memory, with splash or our Pallas kernel on TPU and ``flash`` (``attention.flash``,
   plain XLA) anywhere; the platform default on CPU is the dense XLA reference;
4. ``all_to_all`` heads -> sequence, then the stage's slice of the output projection,
   accumulated into the [B, T/C, D] output (fp32).

Schedule (GQA-aware). Device i owns the query heads Ulysses would give it,
i*N/C ... (i+1)*N/C - 1, and their kv heads (Ku of them; query heads in runs of
g = gcd(N/C, N/K) share one: ``attention.context``'s rule, so kv heads are
replicated when K < C). Those N/C heads are taken U at a time in kv-group order:
an outer scan over blocks of kb = max(1, U/g) local kv heads projects and exchanges
the block's k, v once; an inner scan over the g*kb/U stages that use it projects
and exchanges only q. Live per device: one stage's q and output ([B, T, U, H]) and
one block's k, v ([B, T, kb, H]) instead of N/C and Ku heads of each.

Backward. Both scan bodies are ``jax.checkpoint``-ed with a policy that saves only
values named ``attention.spec.RESIDUALS``: the flash backends name their saved output
and log-sum-exp so (splash: ``residual_checkpoint_name``; ``flash`` and our Pallas
kernel in their ``custom_vjp``), so the backward keeps per stage the attention output
and LSE (the paper's saved O and LSE; all stages' outputs together are one
[B, T/C, N, H]) and recomputes q, k, v from x (projection, RoPE, exchange) before the
kernel's backward.
A backend that names nothing (the XLA reference on CPU) recomputes the stage's
attention forward too: the same live set, one more forward.

Why accumulate into [B, T/C, D] rather than write a preallocated [B, T/C, N, H]
output (the paper): the output projection's weight gradient would keep that buffer
alive beside the per-stage outputs the backward already keeps; accumulating keeps
only the stage outputs (head-sharded) and recomputes the stage's exchange back.
The accumulator is fp32 so the sum over stages rounds once, like one einsum.

Shapes: B batch, T tokens (T/C per device: ``t``), D d_model, N query heads, K kv
heads, H head dim; S = C*U heads of one stage, J = C*kb kv heads of one block.
"""
import jax
import jax.numpy as jnp
import numpy as np

from attention import context
from attention.ops import attend
from attention.rope import apply_rope, rope_tables
from attention.spec import RESIDUALS, AttentionSpec
from core import placement
from core.errors import ConfigError

_SAVE_RESIDUALS = jax.checkpoint_policies.save_only_these_names(RESIDUALS)


def schedule(N: int, K: int, C: int, U: int) -> dict:
  """The static stage plan of ``headwise_attention`` (see the module docstring).

  Returns dict(g, Ku, kb, Ko, Si, kv_index): g query heads per local kv head, Ku
  local kv heads, kb of them per block, Ko blocks, Si stages per block, and the
  global kv head of each (device, local kv head) as an int array [C, Ku].

  Raises:
    ConfigError: heads not divisible into stages, or U and g not nested.
  """
  if U < 1 or N % (C * U):
    raise ConfigError("heads_per_stage", U, f"num_heads={N} must be divisible by the sequence "
                      f"axis size {C} * heads_per_stage (each stage gives every device U heads)",
                      f"choose heads_per_stage >= 1 with {N} % ({C} * heads_per_stage) == 0, "
                      "e.g. 1")
  Nd, G = N // C, N // K
  Ku, g = context._kv_per_device(Nd, G)
  if g % U and U % g:
    raise ConfigError("heads_per_stage", U, f"each device's {Nd} query heads share kv heads "
                      f"in runs of {g}; a stage must hold part of one run or whole runs",
                      f"choose heads_per_stage dividing {g} or a multiple of {g}")
  kb = max(1, U // g)
  return dict(g=g, Ku=Ku, kb=kb, Ko=Ku // kb, Si=kb * g // U,
              kv_index=context._kv_index(0, C, Nd, G).reshape(C, Ku))


def _stage_weights(wq_DNH, wk_DKH, wv_DKH, wo_NHD, C: int, U: int, plan: dict):
  """The weights in stage order: wq [Ko, Si, D, S, H], wo [Ko, Si, S, H, D] and
  wk, wv [Ko, D, J, H]; a stage's heads (and a block's kv heads) are device-major, so
  the exchange hands device i its own."""
  D, N, H = wq_DNH.shape
  Ko, Si, kb = plan["Ko"], plan["Si"], plan["kb"]
  wq = wq_DNH.reshape(D, C, Ko, Si, U, H).transpose(2, 3, 0, 1, 4, 5)
  wo = wo_NHD.reshape(C, Ko, Si, U, H, D).transpose(1, 2, 0, 3, 4, 5)
  idx_CKu = plan["kv_index"]
  K = wk_DKH.shape[1]
  if np.array_equal(idx_CKu.reshape(-1), np.arange(K)):   # each device its own kv heads
    kv = lambda w: w.reshape(D, C, Ko, kb, H)
  else:                                                  # replicated (K < C or runs split)
    kv = lambda w: jnp.take(w, jnp.asarray(idx_CKu), axis=1).reshape(D, C, Ko, kb, H)
  kv_blocks = lambda w: kv(w).transpose(2, 0, 1, 3, 4).reshape(Ko, D, C * kb, H)
  return (wq.reshape(Ko, Si, D, C * U, H), wo.reshape(Ko, Si, C * U, H, D),
          kv_blocks(wk_DKH), kv_blocks(wv_DKH))


def _headwise_body(x_BtD, positions_Bt, wq_DNH, wk_DKH, wv_DKH, wo_NHD, *, spec, U,
                   rope_theta, implementation):
  axis = placement.bound("length")
  axis = None if not axis else axis[0] if len(axis) == 1 else axis
  C = 1 if axis is None else jax.lax.axis_size(axis)
  to_heads = (lambda a: a) if axis is None else (
      lambda a: jax.lax.all_to_all(a, axis, 2, 1, tiled=True))   # [B,t,S,H] -> [B,T,U,H]
  to_seq = (lambda a: a) if axis is None else (
      lambda a: jax.lax.all_to_all(a, axis, 1, 2, tiled=True))   # [B,T,U,H] -> [B,t,S,H]
  N, K, H = wq_DNH.shape[1], wk_DKH.shape[1], wq_DNH.shape[2]
  plan = schedule(N, K, C, U)
  wq, wo, wk, wv = _stage_weights(wq_DNH, wk_DKH, wv_DKH, wo_NHD, C, U, plan)
  cos, sin = rope_tables(positions_Bt, H, rope_theta)

  def stage(wq_DSH, wo_SHD, k_BTkH, v_BTkH):
    """One stage's share of the output: project, exchange, attend, exchange back."""
    q_BTUH = to_heads(apply_rope(jnp.einsum("btd,dsh->btsh", x_BtD, wq_DSH), cos, sin))
    o_BtSH = to_seq(attend(q_BTUH, k_BTkH, v_BTkH, spec, implementation=implementation))
    return jnp.einsum("btsh,shd->btd", o_BtSH, wo_SHD, preferred_element_type=jnp.float32)

  stage = jax.checkpoint(stage, policy=_SAVE_RESIDUALS, prevent_cse=False)

  def block(y_BtD, ws):
    """One block of kv heads: exchanged once, used by the block's Si stages."""
    wk_DJH, wv_DJH, wq_SiDSH, wo_SiSHD = ws
    k_BTkH = to_heads(apply_rope(jnp.einsum("btd,djh->btjh", x_BtD, wk_DJH), cos, sin))
    v_BTkH = to_heads(jnp.einsum("btd,djh->btjh", x_BtD, wv_DJH))
    step = lambda y, w: (y + stage(*w, k_BTkH, v_BTkH), None)
    return jax.lax.scan(step, y_BtD, (wq_SiDSH, wo_SiSHD))[0], None

  block = jax.checkpoint(block, policy=_SAVE_RESIDUALS, prevent_cse=False)
  y0 = jnp.zeros(x_BtD.shape, jnp.float32)
  y_BtD, _ = jax.lax.scan(block, y0, (wk, wv, wq, wo))
  return y_BtD.astype(x_BtD.dtype)


def headwise_attention(x_BTD: jax.Array, positions_BT: jax.Array, wq_DNH: jax.Array,
                       wk_DKH: jax.Array, wv_DKH: jax.Array, wo_NHD: jax.Array,
                       spec: AttentionSpec = AttentionSpec(), *, heads_per_stage: int = 1,
                       rope_theta: float = 10_000.0, implementation=None) -> jax.Array:
  """Attention layer from its input, context-parallel by UPipe (module docstring).

  Computes ``out_proj(attend(rope(x wq), rope(x wk), x wv))`` as ``attention.layer``
  does, with the sequence sharded over ``length`` (``core.placement.per_device``;
  without a sharded ``length``: the same stages on each device's whole sequences,
  no exchange).

  Args:
    x_BTD: the layer's (normed) input [B, T, D], global, in the compute dtype.
    positions_BT: int positions [B, T] (RoPE).
    wq_DNH, wk_DKH, wv_DKH, wo_NHD: projections (compute dtype); N % K == 0.
      Replicated inside (a ``tensor``-sharded heads axis is gathered).
    spec: causal / sliding window / scale over the full sequence (no block-sparse).
    heads_per_stage: U query heads per device per stage; N % (C*U) == 0, and U
      divides, or is a multiple of, the local run g of query heads sharing a kv head.
    rope_theta: RoPE base.
    implementation: passed to ``attention.ops.attend`` for each stage.

  Returns:
    [B, T, D] in x's dtype (summed over stages in fp32), sharded like x.
  """
  if spec.block_sparse is not None:
    raise ConfigError("spec.block_sparse", spec.block_sparse, "headwise context parallelism "
                      "has no predicted block masks", "use context_parallel='none'")
  D, N, H = wq_DNH.shape
  if (x_BTD.ndim != 3 or x_BTD.shape[2] != D or wk_DKH.shape != wv_DKH.shape
      or wk_DKH.shape[::2] != (D, H) or wo_NHD.shape != (N, H, D) or N % wk_DKH.shape[1]):
    raise ValueError(f"shapes x={x_BTD.shape}, q={wq_DNH.shape}, k={wk_DKH.shape}, "
                     f"v={wv_DKH.shape}, o={wo_NHD.shape}: expected x [B, T, D], q [D, N, H], "
                     "k, v [D, K, H] with K dividing N, o [N, H, D]. Fix: match the shapes")

  def body(x, pos, wq, wk, wv, wo):
    return _headwise_body(x, pos, wq, wk, wv, wo, spec=spec, U=heads_per_stage,
                          rope_theta=rope_theta, implementation=implementation)

  # Unchecked varying axes: splash's pallas_call declares none (jax 0.12), so a checked
  # shard_map refuses it on TPU; unchecked, shard_map's transpose sums the replicated
  # weights' gradients over the devices.
  io = ("batch", "length", None)
  return placement.per_device(body, (x_BTD, positions_BT, wq_DNH, wk_DKH, wv_DKH, wo_NHD),
                              (io, ("batch", "length"), None, None, None, None), io,
                              check_vma=False)
