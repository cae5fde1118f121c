"""Linear attention with a scalar decay per head: Mamba-2 (SSD), Mamba-2S and 2Mamba.

Shapes: B batch, T length, N heads, H key/query head dim, V value head dim, C chunk
length, c chunk index, P state features (H, or H(H+1)/2 for ``2mamba``). Per head,
with the causal mask j <= i, A_t = ``log_decay`` <= 0 and L_t = sum_{s<=t} A_s:

* ``ssd`` and ``mamba2s`` (Dao & Gu 2024, SSD as masked attention with the
  1-semiseparable mask exp(L_i - L_j); Mongaras & Larson 2026, arXiv 2602.17363):
  y_i = sum_j (q_i . k_j) exp(L_i - L_j) v_j.
* ``2mamba`` (Mongaras & Larson 2026): w_ij = (q_i . k_j / sqrt(H))^2 exp(L_i - L_j),
  o_i = sum_j w_ij v_j / (sum_j w_ij + EPS). EPS = 1e-6 guards the denominator; it
  only matters when every weight of a row vanishes (then o_i -> 0).

Implementations: ``recurrent`` (the slow twin: a ``lax.scan`` of ``linear_step`` over
time; for 2mamba the state is phi-feature space, S_t = e^{A_t} S_{t-1} + phi(k_t) v_t^T,
z_t = e^{A_t} z_{t-1} + phi(k_t), o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + EPS), with
phi(u) = [u_a^2; sqrt(2) u_a u_b for a < b] so that phi(q) . phi(k) = (q . k)^2) and
``chunked`` (the SSD algorithm of Dao & Gu 2024, Listing 1: quadratic masked attention
inside each chunk, chunk-end states carried between chunks by a scan; O(T) time/memory).

Chunked 2mamba (our derivation; the authors publish no chunked form). For i in chunk c
with chunk start state (S_c, z_c), split the sum over j into j in chunk c and j < c:
  sum_{j<c} w_ij v_j = exp(L_i - L_start) phi(q_i)^T S_c  (the recurrence unrolled),
so numerator = intra-chunk quadratic term with squared scores + exp(local L_i)
phi(q_i)^T S_c, and the same with v replaced by 1 for the denominator. Appending a
column of ones to v (V -> V+1) computes both at once; the state's last column is z.
Chunk states follow S_{c+1} = exp(L_end - L_start) S_c + sum_{j in c} exp(L_end - L_j)
phi(k_j) v_j^T, exactly as for SSD with k replaced by phi(k). 1/sqrt(H) goes into q
(it cancels in the ratio and only sets the scale at which EPS acts).

Accuracy: the phi-feature form (recurrent twin, ``linear_step`` decoding, the chunked
inter-chunk term) computes (q . k)^2 as a sum of H(H+1)/2 signed products, so its
error relative to a row's weight sum grows as that sum shrinks (about 1e-2 in fp32
gradients at sums ~1e-5); the chunked intra-chunk term squares q . k directly.

Decay products are exps of within-chunk segment sums L_i - L_j = sum_{j<k<=i} A_k (the
stable ``segsum`` of the SSD reference: summed, not subtracted, so |L| ~ 1e4 loses no
precision), masked to -inf above the diagonal *before* the exp, so no inf reaches a
product (or a gradient). Lengths not divisible by C are padded with q = k = v = 0 and
A = 0, which leaves the state unchanged and touches no earlier output; the padding is
sliced off.

Context parallelism (``linear_context_attend``): with the sequence sharded over n
devices, each runs the chunked op on its shard from a zero state; a log-depth scan of
``ppermute``s over the shards of (final state, total decay) gives each shard its
incoming state, whose contribution exp(L_t) phi(q_t)^T S_in is added before 2mamba's
division. The layer uses it whenever the placement shards ``length``; its depthwise
convs stay XLA's (its partitioner exchanges halos between neighbouring shards with
collective-permutes; no all-gather of the sequence).

``LinearAttention`` (the layer) keeps / drops per variant (REFERENCES.md):

* ``ssd`` (Mamba-2, simplified): causal depthwise conv, width 4, with bias, then SiLU,
  on q, k, v (Mamba-2's C, B, x); dt_t = softplus(w_dt . x_t + b_dt); A_t =
  -exp(A_log) dt_t; v scaled by dt_t (X = x dt); per-head output RMSNorm. Dropped: the
  Z gate, the D skip, grouped B/C (each head has its own k and q), the separate
  in/out expansion (q/k/v project straight from d_model into heads).
* ``mamba2s``: causal depthwise conv, width 2, with bias and no activation, on q, k,
  v; A_t = -softplus(w_A . x_t + b_A); v scaled by dt_t = softplus(w_dt . x_t + b_dt);
  per-head output RMSNorm. Dropped: SiLU on q/k, D skip, Z gate.
* ``2mamba``: as ``mamba2s`` with the 2mamba core; no dt scaling, no output norm.

Our choices (not fixed by the papers): the output RMSNorm normalises each head over
its head_dim (a grouped norm, groups = heads; shards with heads); biases b_dt and b_A
(not in the official Mamba-2S / 2Mamba layer: ``decay_bias=False`` drops them) start
at softplus^-1 of log-uniform [1e-3, 1e-1] (Mamba-2's dt range), A_log at
log U[1, 16] (Mamba-2's A range); conv kernels ~ N(0, 1/width), conv biases 0.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention.conv import causal_conv, conv_tail
from core import placement
from core.errors import ConfigError, check_choice, check_int
from core.params import logical_param
from core.quant import act_int8
from core.vma import full_like_varying

VARIANTS = ("ssd", "mamba2s", "2mamba")
IMPLEMENTATIONS = ("chunked", "recurrent")
EPS = 1e-6  # 2mamba denominator guard: o = num / (den + EPS).


@dataclasses.dataclass(frozen=True)
class LinearConfig:
  """Linear-attention layers (``model.linear``).

  Attributes:
    variant: ``ssd`` (Mamba-2), ``mamba2s`` or ``2mamba`` (2Mamba2Furious).
    chunk_size: chunk length of the chunked op: quadratic within a chunk, a state
      across chunks.
    implementation: ``chunked`` or ``recurrent`` (the token-by-token twin).
    decay_bias: ``mamba2s`` / ``2mamba``: biases b_A, b_dt in the decay and dt
      projections, started at Mamba-2's dt range (ours: the initial per-token decay is
      0.993-0.997, dt 0.001-0.1). False: the official bias-free layer (2Mamba2Furious'
      code), whose decay starts near exp(-softplus(0)) = 0.5 and dt near 0.69.
  """
  variant: str = "2mamba"
  chunk_size: int = 64
  implementation: str = "chunked"
  decay_bias: bool = True

  def __post_init__(self):
    check_choice("variant", self.variant, VARIANTS)
    check_int("chunk_size", self.chunk_size, 1)
    check_choice("implementation", self.implementation, IMPLEMENTATIONS)
    if not self.decay_bias and self.variant == "ssd":
      raise ConfigError("decay_bias", self.decay_bias, "ssd is Mamba-2, whose dt keeps its "
                        "bias (A = -exp(A_log) dt)", "set decay_bias=True, or use variant "
                        "mamba2s or 2mamba for the official bias-free decay")


def _check_variant(variant) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}: unknown linear-attention variant. "
                     f"Fix: use one of {VARIANTS}")


def feature_map(u_H: jax.Array) -> jax.Array:
  """phi(u) = [u_a^2 ; sqrt(2) u_a u_b for a < b]: [..., H] -> [..., H(H+1)/2].

  phi(q) . phi(k) = (q . k)^2 (2Mamba2Furious' degree-2 feature map).
  """
  a, b = np.triu_indices(u_H.shape[-1])
  weight = np.where(a == b, 1.0, math.sqrt(2.0)).astype(np.float32)
  return u_H[..., a] * u_H[..., b] * weight


def init_state(batch: int, heads: int, dk: int, dv: int, variant: str) -> dict:
  """The zero recurrent state: {"S": [B, N, P, V]} (+ {"z": [B, N, P]} for 2mamba), fp32."""
  _check_variant(variant)
  if variant == "2mamba":
    p = dk * (dk + 1) // 2
    return {"S": jnp.zeros((batch, heads, p, dv), jnp.float32),
            "z": jnp.zeros((batch, heads, p), jnp.float32)}
  return {"S": jnp.zeros((batch, heads, dk, dv), jnp.float32)}


def linear_step(state: dict, q_BNH, k_BNH, v_BNV, log_decay_BN, *, variant: str):
  """One decode step of the recurrence (module docstring): returns (y_BNV, new_state).

  ssd/mamba2s: S_t = e^{A_t} S_{t-1} + k_t v_t^T, y_t = q_t^T S_t.
  2mamba: the phi-feature recurrence with normaliser z; y_t in q's dtype.
  """
  _check_variant(variant)
  f32 = lambda x: x.astype(jnp.float32)
  q, k, v, g = f32(q_BNH), f32(k_BNH), f32(v_BNV), jnp.exp(f32(log_decay_BN))
  if variant == "2mamba":
    fq, fk = feature_map(q / math.sqrt(q.shape[-1])), feature_map(k)
    S = g[..., None, None] * state["S"] + fk[..., :, None] * v[..., None, :]
    z = g[..., None] * state["z"] + fk
    num = jnp.einsum("bnp,bnpv->bnv", fq, S)
    den = jnp.einsum("bnp,bnp->bn", fq, z)
    return (num / (den[..., None] + EPS)).astype(q_BNH.dtype), {"S": S, "z": z}
  S = g[..., None, None] * state["S"] + k[..., :, None] * v[..., None, :]
  return jnp.einsum("bnk,bnkv->bnv", q, S).astype(q_BNH.dtype), {"S": S}


def _check_inputs(q, k, v, a, chunk_size, implementation) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}: unknown. "
                     f"Fix: use one of {IMPLEMENTATIONS}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size={chunk_size!r}: must be a positive int. "
                     "Fix: pass e.g. chunk_size=64")
  if q.ndim != 4:
    raise ValueError(f"q_BTNH.shape={q.shape}: expected [batch, time, heads, head_dim]. "
                     "Fix: reshape q to 4-D")
  if k.shape != q.shape:
    raise ValueError(f"k_BTNH.shape={k.shape}: must equal q_BTNH.shape={q.shape} "
                     "(same heads and head dim). Fix: project q and k to the same head dim")
  if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v_BTNV.shape={v.shape}: batch, time and heads must match "
                     f"q_BTNH.shape={q.shape}. Fix: project v to the same heads")
  if a.shape != q.shape[:3]:
    raise ValueError(f"log_decay_BTN.shape={a.shape}: must be {q.shape[:3]}. "
                     "Fix: give one log decay per (batch, time, head)")


def _recurrent(q, k, v, a, variant, state):
  def body(s, xs):
    y, s = linear_step(s, *xs, variant=variant)
    return s, y
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, a))
  state, y_TBNV = jax.lax.scan(body, state, xs)
  return jnp.moveaxis(y_TBNV, 0, 1), state


def _augment(q, v):
  """2mamba: q / sqrt(H), and v with a ones column (the denominator is the numerator
  with v = 1, so one pass computes both)."""
  ones = jnp.ones(v.shape[:3] + (1,), v.dtype)
  return q / math.sqrt(q.shape[-1]), jnp.concatenate([v, ones], axis=-1)


def _chunked_core(q, k, v, a, two, C, S0):
  """The SSD chunked algorithm from state S0 [B, N, P, W]: (y_BTNW, final state).

  ``two``: 2mamba's squared scores and phi features, on ``_augment``'s q and v; y is
  then unnormalised (numerators, and the denominator in the last column)."""
  B, T, N, H = q.shape
  pad = -T % C
  if pad:  # q = k = v = 0, A = 0: the state and earlier outputs are unchanged.
    widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    q, k, v, a = (jnp.pad(x, widths(x)) for x in (q, k, v, a))
  nc = (T + pad) // C
  q, k, v = (x.reshape(B, nc, C, N, x.shape[-1]) for x in (q, k, v))
  a_bciN = a.reshape(B, nc, C, N)
  L_bciN = jnp.cumsum(a_bciN, axis=2)  # L_i - L_start: within-chunk cumsum
  # Intra-chunk: masked quadratic attention with decay exp(seg_ij), seg_ij = L_i - L_j =
  # sum_{j<k<=i} A_k, summed directly (a cumsum down the masked columns) rather than
  # subtracted, so large |L| does not cancel; -inf above the diagonal before the exp.
  causal = np.tril(np.ones((C, C), bool))[None, None, :, :, None]
  strict = np.tril(np.ones((C, C), bool), -1)[None, None, :, :, None]
  seg_bcijN = jnp.cumsum(jnp.where(strict, a_bciN[:, :, :, None, :], 0.0), axis=2)
  decay_bcijN = jnp.exp(jnp.where(causal, seg_bcijN, -jnp.inf))
  s_bcijN = jnp.einsum("bcinh,bcjnh->bcijn", q, k)
  if two:
    s_bcijN = s_bcijN * s_bcijN
  y_bciNV = jnp.einsum("bcijn,bcjnv->bcinv", s_bcijN * decay_bcijN, v)
  # Chunk-local end states, then the scan over chunks of the incoming states.
  fq, fk = (feature_map(q), feature_map(k)) if two else (q, k)
  to_end_bcjN = jnp.exp(seg_bcijN[:, :, -1])  # L_end - L_j = sum_{k>j} A_k
  Sloc_bcNPV = jnp.einsum("bcjnp,bcjnv->bcnpv", fk * to_end_bcjN[..., None], v)
  gate_cBN = jnp.moveaxis(jnp.exp(L_bciN[:, :, -1, :]), 1, 0)

  def carry_state(S, xs):
    Sloc, g = xs
    return g[..., None, None] * S + Sloc, S
  S_final, Sin_cBNPV = jax.lax.scan(carry_state, S0, (jnp.moveaxis(Sloc_bcNPV, 1, 0), gate_cBN))
  y_bciNV = y_bciNV + jnp.exp(L_bciN)[..., None] * jnp.einsum(
      "bcinp,cbnpv->bcinv", fq, Sin_cBNPV)
  return y_bciNV.reshape(B, nc * C, N, -1)[:, :T], S_final


def _normalise(y_BTNW):
  """2mamba: numerators over the denominator (the last column)."""
  return y_BTNW[..., :-1] / (y_BTNW[..., -1:] + EPS)


def _chunked(q, k, v, a, variant, C, state):
  if variant == "2mamba":
    q, v = _augment(q, v)
    S0 = jnp.concatenate([state["S"], state["z"][..., None]], axis=-1)
    y_BTNW, S_final = _chunked_core(q, k, v, a, True, C, S0)
    return _normalise(y_BTNW), {"S": S_final[..., :-1], "z": S_final[..., -1]}
  y_BTNV, S_final = _chunked_core(q, k, v, a, False, C, state["S"])
  return y_BTNV, {"S": S_final}


def linear_attend(q_BTNH, k_BTNH, v_BTNV, log_decay_BTN, *, variant: str,
                  chunk_size: int = 64, implementation: str = "chunked",
                  initial_state: dict | None = None, return_state: bool = False):
  """Causal linear attention with per-head scalar decay (module docstring equations).

  Args:
    q_BTNH, k_BTNH: queries and keys [B, T, N, H]; v_BTNV: values [B, T, N, V].
    log_decay_BTN: A_t <= 0 (decay e^{A_t}); positive values are not checked.
    variant: "ssd", "mamba2s" (same core) or "2mamba".
    chunk_size: chunk length C of the chunked algorithm (T need not divide).
    implementation: "chunked" (SSD algorithm, O(T)) or "recurrent" (slow twin).
    initial_state: a state as from ``init_state`` (default zeros).
    return_state: also return the state after the last token (for decoding).

  Returns:
    y_BTNV in q's dtype (math in fp32), and the final state if ``return_state``.
  """
  _check_variant(variant)
  _check_inputs(q_BTNH, k_BTNH, v_BTNV, log_decay_BTN, chunk_size, implementation)
  B, T, N, H = q_BTNH.shape
  state = initial_state or init_state(B, N, H, v_BTNV.shape[-1], variant)
  state = jax.tree.map(lambda s: s.astype(jnp.float32), state)
  args = tuple(x.astype(jnp.float32) for x in (q_BTNH, k_BTNH, v_BTNV, log_decay_BTN))
  if implementation == "recurrent":
    y, state = _recurrent(*args, variant, state)
  else:
    y, state = _chunked(*args, variant, chunk_size, state)
  y = y.astype(q_BTNH.dtype)
  return (y, state) if return_state else y


# ---------------------------------------------------------------- context parallelism
def _shard_prefix(S_BNPW, lam_BN, axis, n: int):
  """Each shard's incoming state: an exclusive scan over the n shards of ``axis``.

  Shard i maps the state it receives to exp(lam_i) S + S_i (``S_BNPW``: its final state
  from zeros; ``lam_BN``: its total log decay). These affine maps compose
  associatively; one ``ppermute`` shifts them by one shard (shard 0 gets zeros: the
  identity map), then ceil(log2(n - 1)) rounds of the Hillis-Steele scan compose
  them, shard i taking the composed maps of shard i - d in round d = 1, 2, 4, ...
  (shards i < d get zeros, which change nothing)."""
  def shift(x, d):
    return jax.lax.ppermute(x, axis, [(j, j + d) for j in range(n - d)])

  S_BNPW, lam_BN = shift((S_BNPW, lam_BN), 1)
  d = 1
  while d < n - 1:
    S_got, lam_got = shift((S_BNPW, lam_BN), d)
    S_BNPW = jnp.exp(lam_BN)[..., None, None] * S_got + S_BNPW
    lam_BN = lam_BN + lam_got
    d *= 2
  return S_BNPW


def _context_body(q, k, v, a, *, variant, C, axis, n):
  """One device's sequence shard (fp32 inputs): its outputs given every earlier shard."""
  B, T, N, H = q.shape
  lam_BN = jnp.sum(a, axis=1)
  two = variant == "2mamba"
  if two:
    q, v = _augment(q, v)
  P = H * (H + 1) // 2 if two else H
  S0 = full_like_varying((B, N, P, v.shape[-1]), jnp.float32, q)
  y_BTNW, S_BNPW = _chunked_core(q, k, v, a, two, C, S0)
  S_in_BNPW = _shard_prefix(S_BNPW, lam_BN, axis, n)
  # The incoming state's share: exp(L_t) phi(q_t)^T S_in, L_t = sum_{s<=t} A_s in the shard.
  fq = feature_map(q) if two else q
  y_BTNW = y_BTNW + jnp.exp(jnp.cumsum(a, axis=1))[..., None] * jnp.einsum(
      "btnp,bnpw->btnw", fq, S_in_BNPW)
  return _normalise(y_BTNW) if two else y_BTNW


def linear_context_attend(q_BTNH, k_BTNH, v_BTNV, log_decay_BTN, *, variant: str,
                          chunk_size: int = 64, implementation: str = "chunked"):
  """``linear_attend`` (from a zero state) with the sequence sharded: context parallelism.

  When the placement shards the ``length`` axis (n shards; ``core.placement``), it runs
  per device over the batch, sequence and head shards:

  1. each device runs the chunked algorithm on its shard from a zero state: its local
     outputs, its final state S_i and its total log decay lam_i = sum_t A_t;
  2. ``_shard_prefix`` gives shard i its incoming state sum_{j<i} exp(lam_{j+1} + ... +
     lam_{i-1}) S_j with a log-depth scan of ``ppermute``s: 1 + ceil(log2(n - 1))
     rounds, each sending one state. An ``all_gather`` of the states would be one
     collective, but every device would receive and hold n states (2mamba's is
     H(H+1)/2 x (V+1) per head: at H = 64 as large as ~2k tokens of q), and a ring
     passing one running state on is n - 1 dependent hops;
  3. by linearity in the initial state, the output from state S_in is the local output
     plus exp(L_t) q_t^T S_in (L_t: cumulative log decay from the shard's start); for
     2mamba phi(q_t) against the state's numerator and normaliser columns, before the
     division. That costs one [T/n, P] x [P, V+1] product per head, like the
     chunked op's own inter-chunk term, instead of rerunning the op from S_in.

  Gradients are JAX's autodiff through the ``ppermute``s (whose transpose is the
  reverse ``ppermute``: the backward is the same scan run backwards). Shards need not
  be multiples of the chunk (each pads its last chunk, as ``linear_attend`` does).

  Without a placement, when ``length`` is not sharded (not in the rules, or its mesh
  axes do not divide T), or for ``implementation="recurrent"`` (the slow twin: left to
  XLA's partitioner, as a reference should be), this is exactly ``linear_attend``.

  Args: as ``linear_attend``'s (no initial state, no returned state).

  Returns:
    y_BTNV in q's dtype (math in fp32), sharded like q.
  """
  _check_variant(variant)
  _check_inputs(q_BTNH, k_BTNH, v_BTNV, log_decay_BTN, chunk_size, implementation)
  kw = dict(variant=variant, chunk_size=chunk_size, implementation=implementation)
  args = (q_BTNH, k_BTNH, v_BTNV, log_decay_BTN)
  io = ("batch", "length", "heads", None)
  in_axes = (io, io, io, io[:3])
  if implementation == "recurrent" or not placement.bound_for("length", args, in_axes):
    return linear_attend(*args, **kw)

  def body(q, k, v, a):
    axis = placement.bound("length")
    axis = axis[0] if len(axis) == 1 else axis
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v, a))
    y = _context_body(*f32, variant=variant, C=chunk_size, axis=axis,
                      n=jax.lax.axis_size(axis))
    return y.astype(q.dtype)
  return placement.per_device(body, args, in_axes, io)


# ----------------------------------------------------------------------------- layer
_LAYER = {  # conv width, SiLU after conv, decay parametrisation, v * dt, output norm
    "ssd": dict(width=4, silu=True, decay="A_log", dt=True, norm=True),
    "mamba2s": dict(width=2, silu=False, decay="proj", dt=True, norm=True),
    "2mamba": dict(width=2, silu=False, decay="proj", dt=False, norm=False),
}


def _const(value, axes, dtype) -> nnx.Param:
  return nnx.Param(jnp.asarray(value, dtype), out_sharding=tuple(axes), eager_sharding=False)


def _inv_softplus_loguniform(key, shape, lo=1e-3, hi=1e-1) -> jax.Array:
  x = jnp.exp(jax.random.uniform(key, shape, minval=math.log(lo), maxval=math.log(hi)))
  return x + jnp.log(-jnp.expm1(-x))  # softplus^-1(x)


def rms_norm(y_BTNH: jax.Array, scale_NH: jax.Array, eps: float) -> jax.Array:
  """Per-head RMSNorm (Zhang & Sennrich 2019) over head_dim, in fp32."""
  y = y_BTNH.astype(jnp.float32)
  y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + eps)
  return (y * scale_NH.astype(jnp.float32)).astype(y_BTNH.dtype)


class LinearAttention(nnx.Module):
  """Mamba-2 / Mamba-2S / 2Mamba mixer with the call signature of ``Attention``.

  Args:
    d_model: residual width; n_heads, head_dim: heads and their width (q, k, v alike).
    config: ``LinearConfig`` (variant: module docstring says what each keeps;
      chunk size; chunked or recurrent).
    norm_eps: epsilon of the output RMSNorm.
    dtype: compute dtype; param_dtype: storage dtype of the weights.
    act_quant: int8-fake-quantize the inputs of the projections per token
      (``core.quant.act_int8``).

  When the placement shards ``length``, ``__call__`` runs the core op context-parallel
  (``linear_context_attend``); the convs and projections are left to XLA. Decoding
  (``extend``, ``step``) is unchanged.
  """

  def __init__(self, d_model: int, n_heads: int, head_dim: int, config: LinearConfig, *,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               norm_eps: float = 1e-6, act_quant: bool = False):
    variant = config.variant
    self.act_quant = act_quant
    self.variant, self.chunk_size = variant, config.chunk_size
    self.implementation = config.implementation
    self.n_heads, self.head_dim, self.dtype, self.norm_eps = n_heads, head_dim, dtype, norm_eps
    self.cfg = cfg = _LAYER[variant]
    D, N, H, W = d_model, n_heads, head_dim, cfg["width"]
    proj = lambda: logical_param(rngs, (D, N, H), ("embed", "heads", "head_dim"), D, param_dtype)
    self.q, self.k, self.v = proj(), proj(), proj()
    self.o = logical_param(rngs, (N, H, D), ("heads", "head_dim", "embed"), N * H, param_dtype)
    conv = lambda: logical_param(rngs, (W, N, H), (None, "heads", "head_dim"), W, param_dtype)
    self.conv_q, self.conv_k, self.conv_v = conv(), conv(), conv()
    bias = lambda: _const(jnp.zeros((N, H)), ("heads", "head_dim"), param_dtype)
    self.conv_q_bias, self.conv_k_bias, self.conv_v_bias = bias(), bias(), bias()
    self.decay_bias = config.decay_bias
    if cfg["dt"]:
      self.w_dt = logical_param(rngs, (D, N), ("embed", "heads"), D, param_dtype)
      if self.decay_bias:
        self.b_dt = _const(_inv_softplus_loguniform(rngs.params(), (N,)), ("heads",),
                           param_dtype)
    if cfg["decay"] == "A_log":
      A = jax.random.uniform(rngs.params(), (N,), minval=1.0, maxval=16.0)
      self.A_log = _const(jnp.log(A), ("heads",), param_dtype)
    else:
      self.w_A = logical_param(rngs, (D, N), ("embed", "heads"), D, param_dtype)
      if self.decay_bias:
        self.b_A = _const(_inv_softplus_loguniform(rngs.params(), (N,)), ("heads",),
                          param_dtype)
    if cfg["norm"]:
      self.norm_scale = _const(jnp.ones((N, H)), ("heads", "head_dim"), param_dtype)

  def _w(self, p):
    return p[...].astype(self.dtype)

  def _project(self, x_BTD):
    """Pre-conv q, k, v [B, T, N, H] and the log decay and dt [B, T, N] (fp32)."""
    x_BTD = act_int8(x_BTD) if self.act_quant else x_BTD
    q, k, v = (jnp.einsum("btd,dnh->btnh", x_BTD, self._w(p)) for p in (self.q, self.k, self.v))
    def lin(w, bias):
      y = jnp.einsum("btd,dn->btn", x_BTD.astype(jnp.float32), w[...].astype(jnp.float32))
      b = getattr(self, bias) if self.decay_bias else None  # official: no bias
      return y if b is None else y + b[...].astype(jnp.float32)
    dt = jax.nn.softplus(lin(self.w_dt, "b_dt")) if self.cfg["dt"] else None
    if self.cfg["decay"] == "A_log":
      a = -jnp.exp(self.A_log[...].astype(jnp.float32)) * dt
    else:
      a = -jax.nn.softplus(lin(self.w_A, "b_A"))
    return (q, k, v), a, dt

  def _finish(self, qkv, a, dt, core):
    """Activation, dt scaling, the core op, the output norm and projection."""
    q, k, v = (jax.nn.silu(u) for u in qkv) if self.cfg["silu"] else qkv
    if dt is not None:
      v = (v * dt[..., None]).astype(v.dtype)
    y_BTNH = core(q, k, v, a)
    if self.cfg["norm"]:
      y_BTNH = rms_norm(y_BTNH, self.norm_scale[...], self.norm_eps)
    y_BTNH = act_int8(y_BTNH, 2) if self.act_quant else y_BTNH
    return jnp.einsum("btnh,nhd->btd", y_BTNH, self._w(self.o))

  def _convs(self):
    return ((self.conv_q, self.conv_q_bias), (self.conv_k, self.conv_k_bias),
            (self.conv_v, self.conv_v_bias))

  def _conv(self, u_BTNH, w, b, prefix_BWNH=None):
    """``attention.conv.causal_conv`` plus the bias: (out, padded input)."""
    out, up = causal_conv(u_BTNH, self._w(w), prefix_BWNH)
    return out + self._w(b), up

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
    """[B, T, D] -> [B, T, D]; ``positions_BT`` is unused (no RoPE)."""
    del positions_BT
    qkv, a, dt = self._project(x_BTD.astype(self.dtype))
    qkv = tuple(self._conv(u, w, b)[0] for u, (w, b) in zip(qkv, self._convs()))
    core = lambda q, k, v, a: linear_context_attend(q, k, v, a, variant=self.variant,
                                                    chunk_size=self.chunk_size,
                                                    implementation=self.implementation)
    return self._finish(qkv, a, dt, core)

  def extend(self, cache: dict, x_BTD: jax.Array, n_B: jax.Array, fresh: bool = False):
    """Adds tokens i < n_b of ``x_BTD`` to the decode cache: (y_BTD, new cache).

    Tokens at or after n_b (padding) are inert: their pre-conv inputs, keys, values and
    log decays are zeroed, which leaves the recurrent state as it was after token
    n_b - 1, and the conv cache keeps the last W - 1 inputs before n_b. ``fresh`` (a
    prompt) runs the layer's own implementation; later calls the token recurrence."""
    T = x_BTD.shape[1]
    valid_BT = jnp.arange(T)[None, :] < n_B[:, None]
    qkv, a, dt = self._project(x_BTD.astype(self.dtype))
    qkv = tuple(u * valid_BT[:, :, None, None].astype(u.dtype) for u in qkv)
    new, conv_out = {}, []
    for name, u, (w, b) in zip("qkv", qkv, self._convs()):
      out, window = self._conv(u, w, b, cache[f"conv_{name}"])
      conv_out.append(out)
      new[f"conv_{name}"] = conv_tail(window, n_B, self.cfg["width"]).astype(
          cache[f"conv_{name}"].dtype)
    a = jnp.where(valid_BT[:, :, None], a, 0.0)
    mask = lambda u: u * valid_BT[:, :, None, None].astype(u.dtype)

    def core(q, k, v, a):
      y, new["state"] = linear_attend(
          q, mask(k), mask(v), a, variant=self.variant, chunk_size=self.chunk_size,
          implementation=self.implementation if fresh else "recurrent",
          initial_state=cache["state"], return_state=True)
      return y
    return self._finish(tuple(conv_out), a, dt, core), new

  def init_cache(self, batch: int, slots: int = 0, dtype=None) -> dict:
    """Zero decode cache: the last width-1 pre-conv q/k/v inputs (``dtype``, default the
    compute dtype; an integer ``dtype``, meant for softmax K/V, gives the compute dtype)
    and the core state (fp32, whatever ``dtype``). ``slots`` is unused: the cache does
    not grow with the context."""
    del slots
    shape = (batch, self.cfg["width"] - 1, self.n_heads, self.head_dim)
    if dtype is None or jnp.issubdtype(dtype, jnp.integer):
      dtype = self.dtype
    cache = {f"conv_{n}": jnp.zeros(shape, dtype) for n in "qkv"}
    cache["state"] = init_state(batch, self.n_heads, self.head_dim, self.head_dim, self.variant)
    return cache

  def cache_slots(self, max_len: int, slack: int) -> int:
    del max_len, slack
    return 0

  def commit(self, old: dict, new: dict, x_BTD: jax.Array, n_B: jax.Array) -> dict:
    """The cache after only the first n_b of the tokens an ``extend`` from ``old`` ran on
    ``x_BTD``: recomputed from ``old`` (the state has no per-token slots to mask)."""
    del new
    return self.extend(old, x_BTD, n_B)[1]

  def step(self, cache: dict, x_B1D: jax.Array):
    """One decode token: (y_B1D, new cache); token by token it equals ``__call__``."""
    return self.extend(cache, x_B1D, jnp.ones((x_B1D.shape[0],), jnp.int32))
