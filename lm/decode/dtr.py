"""The Deep-Thinking Ratio (DTR): how many generated tokens settle only in the last layers.

Chen et al., "Deep-Thinking Ratio" (arXiv 2602.13517; no official code). Shapes
follow the letters: L layers, N tokens, D model width, V vocabulary, C a vocabulary
chunk.

Logit lens per layer (nostalgebraist 2020): with h_{t,l} the residual stream of
token t after layer l (l = 1..L; the embedding output is not a layer), ``norm`` the
model's final RMSNorm and W_U the unembedding head [D, V],

  p_{t,l} = softmax(W_U^T norm(h_{t,l}))                                        (1)

so p_{t,L} is the model's own next-token distribution. Each layer's distance from
the final one is the Jensen-Shannon divergence in bits,

  D_{t,l} = JSD(p_{t,L}, p_{t,l}),  JSD(P, Q) = 1/2 KL(P || M) + 1/2 KL(Q || M),
  M = (P + Q) / 2,  KL(P || M) = sum_v P_v log2(P_v / M_v),  0 log 0 = 0,       (2)

which lies in [0, 1] bits, is 0 for P = Q and 1 for disjoint supports. A token's
settling depth is the first layer whose prediction is within g of the final one,

  s_t = min { l in 1..L : D_{t,l} <= g }      (g = 0.5; s_t <= L as D_{t,L} = 0)   (3)

the token is deep-thinking when s_t >= ceil(rho * L) (rho = 0.85), and

  DTR = |{t : s_t >= ceil(rho * L)}| / |{t}|                                      (4)

over the given (generated) tokens, or the tokens of ``mask_N``.

``jsd_streamed`` computes (1)-(2) without materialising [L, N, V]: two passes over
vocabulary chunks of the head, the first an online log-sum-exp of every layer's
logits, the second the JSD sums; memory O(L * N * C). ``jsd_dense`` is its slow
twin. Logits are fp32 (``Precision.HIGHEST``: on TPU the default f32 matmul is
bf16). The head must be the one the model applies: for a tied head
(``lm.model``), ``embedding.T * D ** -0.5``.
"""
import fractions
import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from core.errors import ConfigError

NormFn = Callable[[jax.Array], jax.Array]
_LN2 = math.log(2.0)
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_inputs(hidden_LND, head_DV) -> None:
  if hidden_LND.ndim != 3:
    raise ConfigError("hidden_LND.shape", tuple(hidden_LND.shape), "must be [L, N, D]",
                      "stack the residual stream after each layer as [layers, tokens, "
                      "width]; flatten batch and time into tokens")
  if head_DV.ndim != 2 or head_DV.shape[0] != hidden_LND.shape[2]:
    raise ConfigError("head_DV.shape", tuple(head_DV.shape),
                      f"must be [D, V] with D = {hidden_LND.shape[2]} (the hidden width)",
                      "pass the unembedding as [width, vocab]; a tied head is "
                      "embedding.T (times the model's scale)")


def _check_number(field: str, value, lo: float, hi: float, lo_open: bool = False) -> None:
  """Python numbers are checked; traced values pass (they cannot be inspected)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return
  if (value <= lo if lo_open else value < lo) or value > hi:
    interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
    raise ConfigError(field, value, f"must lie in {interval}", f"choose a value in {interval}")


def _logits(x_LND, head_DC) -> jax.Array:
  """fp32 logits [L, N, C] = x @ head."""
  return jnp.einsum("lnd,dc->lnc", x_LND.astype(jnp.float32), head_DC.astype(jnp.float32),
                    precision=_HIGHEST, preferred_element_type=jnp.float32)


def _jsd_nats(logp_LNC, logq_NC) -> jax.Array:
  """sum_c of 1/2 [p (log p - log m) + q (log q - log m)] in nats, [L, N].

  log m = logaddexp(log p, log q) - log 2; terms with p = 0 (or q = 0) are 0.
  """
  logq_LNC = jnp.broadcast_to(logq_NC[None], logp_LNC.shape)
  logm_LNC = jnp.logaddexp(logp_LNC, logq_LNC) - _LN2
  p_LNC, q_LNC = jnp.exp(logp_LNC), jnp.exp(logq_LNC)
  term_p = jnp.where(p_LNC > 0, p_LNC * (logp_LNC - logm_LNC), 0.0)
  term_q = jnp.where(q_LNC > 0, q_LNC * (logq_LNC - logm_LNC), 0.0)
  return 0.5 * jnp.sum(term_p + term_q, axis=-1)


def jsd_streamed(hidden_LND: jax.Array, norm_fn: NormFn, head_DV: jax.Array, *,
                 chunk: int = 1024) -> jax.Array:
  """D_{t,l} of eq. (2), in bits, streamed over vocabulary chunks of the head.

  Pass 1 accumulates lse_{t,l} = log sum_v exp(z_{t,l,v}) chunk by chunk with
  logaddexp; pass 2 sums the JSD terms of log p = z - lse against the last layer.
  The vocabulary need not be a multiple of ``chunk``: the last chunk is the last
  ``chunk`` columns and its columns already seen get logit -inf, so the result is
  exact; a chunk larger than V is V. Memory O(L * N * chunk); jit-able with
  ``norm_fn`` and ``chunk`` bound (``functools.partial``).

  Args:
    hidden_LND: residual stream after each of the L layers, [L, N, D].
    norm_fn: the model's final norm, [..., D] -> [..., D].
    head_DV: the unembedding, [D, V].
    chunk: vocabulary columns per step.

  Returns:
    float32 [L, N]: JSD(p_{t,L}, p_{t,l}) in bits, clamped below at 0 (rounding).
  """
  _check_inputs(hidden_LND, head_DV)
  if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
    raise ConfigError("chunk", chunk, "must be an integer >= 1",
                      "set chunk to a positive number of vocabulary columns, e.g. 1024")
  L, N, _ = hidden_LND.shape
  V = head_DV.shape[1]
  C = min(int(chunk), V)
  n_chunks = -(-V // C)
  x_LND = norm_fn(hidden_LND)

  def chunk_logits(i):
    """Logits of chunk i, [L, N, C]; columns of an earlier chunk are -inf."""
    start = jnp.minimum(i * C, V - C)  # the last chunk ends at V and may overlap
    head_DC = jax.lax.dynamic_slice_in_dim(head_DV, start, C, axis=1)
    fresh_C = start + jnp.arange(C) >= i * C
    return jnp.where(fresh_C, _logits(x_LND, head_DC), -jnp.inf)

  def lse_step(i, lse_LN):
    return jnp.logaddexp(lse_LN, jax.nn.logsumexp(chunk_logits(i), axis=-1))

  lse_LN = jax.lax.fori_loop(0, n_chunks, lse_step,
                             jnp.full((L, N), -jnp.inf, jnp.float32))

  def jsd_step(i, acc_LN):
    logp_LNC = chunk_logits(i) - lse_LN[..., None]
    return acc_LN + _jsd_nats(logp_LNC, logp_LNC[-1])

  jsd_LN = jax.lax.fori_loop(0, n_chunks, jsd_step, jnp.zeros((L, N), jnp.float32))
  return jnp.maximum(jsd_LN / _LN2, 0.0)


def jsd_dense(hidden_LND: jax.Array, norm_fn: NormFn, head_DV: jax.Array) -> jax.Array:
  """The slow twin of ``jsd_streamed``: materialises p [L, N, V] and M directly.

  JSD = 1/2 sum_v [p log2(p / m) + q log2(q / m)], m = (p + q) / 2, q = p_{t,L},
  terms with a zero probability dropped. float32 [L, N], clamped below at 0.
  """
  _check_inputs(hidden_LND, head_DV)
  logits_LNV = _logits(norm_fn(hidden_LND), head_DV)
  p_LNV = jax.nn.softmax(logits_LNV, axis=-1)
  q_LNV = jnp.broadcast_to(p_LNV[-1:], p_LNV.shape)
  m_LNV = 0.5 * (p_LNV + q_LNV)
  safe_m = jnp.where(m_LNV > 0, m_LNV, 1.0)
  kl_p = jnp.where(p_LNV > 0, p_LNV * jnp.log2(jnp.where(p_LNV > 0, p_LNV, 1.0) / safe_m), 0.0)
  kl_q = jnp.where(q_LNV > 0, q_LNV * jnp.log2(jnp.where(q_LNV > 0, q_LNV, 1.0) / safe_m), 0.0)
  return jnp.maximum(0.5 * jnp.sum(kl_p + kl_q, axis=-1), 0.0)


def threshold_layer(num_layers: int, rho: float = 0.85) -> int:
  """ceil(rho * L), exact for decimal rho: 0.85 * 20 is 17, not 18.

  rho is read as the decimal it prints as (``Fraction(repr(rho))``), so the float
  rounding of 0.85 * 20 = 17.000000000000004 does not push the threshold up.
  """
  if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
    raise ConfigError("rho", rho, "must be a Python number (it sets a layer index)",
                      "pass rho as a float in (0, 1], not an array")
  _check_number("rho", rho, 0.0, 1.0, lo_open=True)
  return max(1, math.ceil(fractions.Fraction(repr(float(rho))) * int(num_layers)))


def settling_depth(jsd_LN: jax.Array, g: float = 0.5) -> jax.Array:
  """s_t of eq. (3): the first layer (1-based) with D_{t,l} <= g; int32 [N].

  The last layer always qualifies (D_{t,L} = 0), also under rounding; g in [0, 1].
  """
  _check_number("g", g, 0.0, 1.0)
  if jsd_LN.ndim != 2:
    raise ConfigError("jsd_LN.shape", tuple(jsd_LN.shape), "must be [L, N]",
                      "pass the output of jsd_streamed / jsd_dense")
  settled_LN = (jsd_LN <= g).at[-1].set(True)
  return (jnp.argmax(settled_LN, axis=0) + 1).astype(jnp.int32)


def deep_thinking_ratio(jsd_LN: jax.Array, g: float = 0.5, rho: float = 0.85,
                        mask_N: jax.Array | None = None) -> dict:
  """Eq. (4) from per-layer divergences.

  Args:
    jsd_LN: D_{t,l} in bits, [L, N].
    g: settling threshold in bits.
    rho: depth fraction; deep-thinking means s_t >= ceil(rho * L).
    mask_N: optional bool [N]; the ratio counts only these tokens (0 if none).

  Returns:
    dict: ``ratio`` float32 scalar, ``settling_depth`` int32 [N], ``deep`` bool [N]
    (not masked), ``threshold_layer`` Python int.
  """
  depth_N = settling_depth(jsd_LN, g)
  threshold = threshold_layer(jsd_LN.shape[0], rho)
  deep_N = depth_N >= threshold
  if mask_N is None:
    mask_N = jnp.ones(deep_N.shape, bool)
  elif tuple(mask_N.shape) != tuple(deep_N.shape):
    raise ConfigError("mask_N.shape", tuple(mask_N.shape),
                      f"must be [N] = {tuple(deep_N.shape)}",
                      "pass one validity flag per token, or None")
  mask_N = mask_N.astype(bool)
  count = jnp.sum(mask_N).astype(jnp.float32)
  ratio = jnp.sum(deep_N & mask_N).astype(jnp.float32) / jnp.maximum(count, 1.0)
  return {"ratio": ratio, "settling_depth": depth_N, "deep": deep_N,
          "threshold_layer": threshold}


def dtr(hidden_LND: jax.Array, norm_fn: NormFn, head_DV: jax.Array, *, g: float = 0.5,
        rho: float = 0.85, chunk: int = 1024, mask_N: jax.Array | None = None) -> dict:
  """``deep_thinking_ratio`` of ``jsd_streamed``, plus ``jsd`` [L, N]."""
  jsd_LN = jsd_streamed(hidden_LND, norm_fn, head_DV, chunk=chunk)
  return {**deep_thinking_ratio(jsd_LN, g, rho, mask_N), "jsd": jsd_LN}
