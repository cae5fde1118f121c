"""Next-token distributions from logits: greedy, temperature, top-k, top-p.

``distribution`` is the one place the settings act: speculative decoding's rejection
sampling compares the target's and the draft's distributions as this function
makes them, so the tokens it emits follow exactly what plain sampling would draw.
Randomness is a function of (seed, row, position): a row's sampled stream does not
depend on how many chunks the loop ran in, and re-running with the seed repeats it.
"""
import dataclasses

import jax
import jax.numpy as jnp

from core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0: greedy (argmax, ties to the lowest id). top_k 0 and top_p 1: off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ConfigError("--temperature", self.temperature, "must be >= 0",
                        "use 0 for greedy decoding or e.g. 0.8")
    if self.top_k < 0:
      raise ConfigError("--top_k", self.top_k, "must be >= 0", "use 0 to keep every token")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError("--top_p", self.top_p, "must be in (0, 1]", "use 1 to keep every token")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def distribution(logits_BV: jax.Array, s: Sampling) -> jax.Array:
  """fp32 probabilities [..., V] the sampler draws from (one-hot at the argmax when
  greedy): softmax(logits / T), then the top-k tokens, then the smallest
  most-probable set whose mass reaches top_p (ties broken by token id), renormalised."""
  logits = logits_BV.astype(jnp.float32)
  V = logits.shape[-1]
  if s.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=jnp.float32)
  logits = logits / s.temperature
  if s.top_k and s.top_k < V:
    kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  if s.top_p < 1.0:
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    keep_sorted = before < s.top_p
    keep = jnp.zeros_like(keep_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
    probs = jnp.where(keep, probs, 0.0)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
  return probs


def row_keys(seed: int, rows_B: jax.Array, positions_B: jax.Array, stream: int = 0):
  """One key per (row, position) and stream (0: sampling, 1+: speculative uniforms)."""
  base = jax.random.fold_in(jax.random.key(seed), stream)
  return jax.vmap(lambda r, p: jax.random.fold_in(jax.random.fold_in(base, r), p))(
      rows_B, positions_B)


def sample(logits_BV: jax.Array, s: Sampling, keys_B) -> jax.Array:
  """Token ids [B] drawn from ``distribution`` (argmax when greedy)."""
  if s.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return draw(distribution(logits_BV, s), keys_B)


def draw(probs_BV: jax.Array, keys_B) -> jax.Array:
  """One token per row from probabilities (zeros never drawn)."""
  logp = jnp.where(probs_BV > 0, jnp.log(jnp.maximum(probs_BV, 1e-38)), -jnp.inf)
  return jax.vmap(jax.random.categorical)(keys_B, logp).astype(jnp.int32)
