"""Routers and load balancing for mixture-of-experts layers.

Routers map each token to ``k`` experts and combine weights, in float32:

- ``softmax``: probabilities ``softmax(x W)``; top-k of them. ``k=1`` with the raw
  probability as the gate is Switch (Fedus et al. 2021); ``k=2`` renormalised over
  the two is Mixtral (Jiang et al. 2024).
- ``sigmoid``: affinities ``sigmoid(x W)``, top-k, normalised to sum 1 over the k
  (DeepSeek-V3, Liu et al. 2024).

Balancing:

- ``load_balancing_loss``: Switch's ``E * sum_e f_e P_e`` (f_e: share of the
  token-to-expert assignments that went to e, P_e: mean router probability of e).
  It is 1 for a perfectly uniform router; multiply by a coefficient (0.01 typical).
- ``router_z_loss``: ST-MoE's mean squared log-partition (Zoph et al. 2022), ~1e-3.
- auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the
  scores for *selection only*, updated outside the optimizer by
  ``update_balance_bias``: ``b_e -= rate * sign(load_e - mean(load))``.

Expert-choice routing (Zhou et al. 2022) is not implemented.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

def _softmax(logits_TE):
  probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  return probs_TE, probs_TE


def _sigmoid(logits_TE):
  scores_TE = jax.nn.sigmoid(logits_TE)
  return scores_TE, scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)


# Router scores: name -> logits [..., E] (fp32) -> (scores that select and weight the
# experts, a distribution over experts for the balancing loss). Adding a router is an
# entry here (``moe.config.MoEConfig.score`` takes its choices from this table).
SCORES = {"softmax": _softmax, "sigmoid": _sigmoid}


class Routing(NamedTuple):
  """A router's decision for ``T`` tokens (any leading shape ``...`` works too).

  weights_TK: float32 combine weight of each chosen expert.
  experts_TK: int32 chosen experts, best first.
  probs_TE: float32 router distribution over experts (sums to 1 per token;
    sigmoid affinities are normalised), for the balancing loss.
  logits_TE: float32 router logits, for the z-loss.
  """
  weights_TK: jax.Array
  experts_TK: jax.Array
  probs_TE: jax.Array
  logits_TE: jax.Array


def check_router_args(num_experts: int, top_k: int, score: str) -> None:
  """Raises ValueError naming the field, value and fix for an impossible router."""
  if num_experts < 1:
    raise ValueError(f"num_experts={num_experts}: must be >= 1. Fix: use at least one expert")
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k={top_k}: must be in [1, num_experts={num_experts}]. "
                     "Fix: lower top_k or add experts")
  if score not in SCORES:
    raise ValueError(f"score={score!r}: unknown router score. Fix: use one of {tuple(SCORES)}")


def route(x_TD: jax.Array, w_DE: jax.Array, *, top_k: int, score: str = "softmax",
          normalize: bool | None = None, bias_E: jax.Array | None = None,
          jitter: float = 0.0, rng: jax.Array | None = None) -> Routing:
  """Chooses ``top_k`` experts per token.

  Args:
    x_TD: tokens [..., D] (any dtype; the router runs in float32).
    w_DE: router weights [D, E].
    top_k: experts per token.
    score: ``softmax`` or ``sigmoid``.
    normalize: renormalise the k weights to sum 1. Default: True except for
      softmax with k=1 (Switch keeps the raw probability so the gate is trained).
    bias_E: auxiliary-loss-free balancing bias, added to the scores for the
      selection only (never to the weights, and it gets no gradient).
    jitter: Switch's multiplicative input noise ``x * U(1 - jitter, 1 + jitter)``;
      needs ``rng``. 0 disables.
    rng: PRNG key for the jitter.

  Returns:
    ``Routing``.
  """
  E = w_DE.shape[-1]
  check_router_args(E, top_k, score)
  x = x_TD.astype(jnp.float32)
  if jitter:
    if rng is None:
      raise ValueError("jitter>0 needs an rng. Fix: pass rng= or set jitter=0")
    x = x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
  logits_TE = x @ w_DE.astype(jnp.float32)
  scores_TE, probs_TE = SCORES[score](logits_TE)
  select_TE = scores_TE if bias_E is None else scores_TE + jax.lax.stop_gradient(bias_E)
  _, experts_TK = jax.lax.top_k(jax.lax.stop_gradient(select_TE), top_k)
  weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
  if normalize is None:
    normalize = not (score == "softmax" and top_k == 1)
  if normalize:
    weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
  return Routing(weights_TK, experts_TK.astype(jnp.int32), probs_TE, logits_TE)


def expert_load(experts_TK: jax.Array, num_experts: int) -> jax.Array:
  """Share of the token-to-expert assignments each expert received [E] (sums to 1)."""
  counts_E = jnp.zeros((num_experts,), jnp.float32).at[experts_TK.reshape(-1)].add(1.0)
  return counts_E / experts_TK.size


def load_balancing_loss(probs_TE: jax.Array, experts_TK: jax.Array) -> jax.Array:
  """Switch Transformer's auxiliary loss ``E * sum_e f_e * P_e`` (1 when uniform).

  ``f_e`` (from the hard top-k choices) carries no gradient; the loss trains the
  router through ``P_e``, the mean probability of expert e.
  """
  E = probs_TE.shape[-1]
  f_E = expert_load(experts_TK, E)
  P_E = jnp.mean(probs_TE.reshape(-1, E), axis=0)
  return E * jnp.sum(f_E * P_E)


def router_z_loss(logits_TE: jax.Array) -> jax.Array:
  """ST-MoE's z-loss: mean over tokens of ``logsumexp(logits)^2``."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)))


def load_cv(load_E: jax.Array) -> jax.Array:
  """Coefficient of variation of the expert load (0 when perfectly balanced)."""
  return jnp.std(load_E) / jnp.maximum(jnp.mean(load_E), 1e-9)


def update_balance_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3's auxiliary-loss-free update: raise under-loaded experts' bias,
  lower over-loaded ones', by ``rate`` each step."""
  return bias_E - rate * jnp.sign(load_E - jnp.mean(load_E)).astype(bias_E.dtype)
