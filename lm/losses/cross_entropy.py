"""Next-token cross-entropy: the objective's base term and the logged ``loss``.

Its weight in the objective is 1 unless a term sets it (``Term.ce_weight``, e.g.
distillation on the KL alone).
"""
import jax.numpy as jnp
import optax


def cross_entropy(logits_BTV, batch):
  """(Token-weighted mean next-token cross-entropy in fp32, the weight sum)."""
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
  weights_BT = batch["weights"].astype(jnp.float32)
  total = jnp.sum(weights_BT)  # 0 for a batch of padding only: it then counts for nothing
  return jnp.sum(losses_BT * weights_BT) / jnp.maximum(total, 1.0), total


def accuracy(logits_BTV, batch):
  """Token-weighted share of the weighted targets that are the logits' argmax (top-1; on a
  recall task with one-token answers, the share of queries answered exactly)."""
  hit_BT = jnp.argmax(logits_BTV, axis=-1) == batch["targets"]
  weights_BT = batch["weights"].astype(jnp.float32)
  return jnp.sum(hit_BT * weights_BT) / jnp.maximum(jnp.sum(weights_BT), 1.0)
