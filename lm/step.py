"""The pure train and eval steps: one forward pass, the objective as a sum of named
terms (``lm.losses``), one optimizer update.

``train_step(state, batch, aux) -> (state, metrics)`` has this one signature for
every experiment: ``state`` is the train state (``lm.state``), ``batch`` a dict
of global arrays, ``aux`` a dict of the terms' extra inputs by term name (a frozen
teacher; ``{}`` when none). The model's non-parameter state comes back updated by
the forward pass (e.g. the MoE balancing bias); parameters by the optimizer.
Both steps trace under ``lm.sharding.placed(mesh)``, so kernels are chosen for
the mesh's platform and per-device code is placed by the rules table.
"""
import jax
import jax.numpy as jnp
import optax

from lm import hooks as hooks_lib
from lm import losses, sharding
from lm.losses.cross_entropy import accuracy, cross_entropy
from lm.model import apply


def make_objective(graphdef, terms: list[losses.Term], hooks=()):
  """``objective(params, model_state, batch, aux, rng=None) -> (total, (Forward, new
  model state, the terms' metrics))``; the forward sees the parameters as the hooks give
  them (``lm.hooks.forward``; ``rng``: this train step's key, None in eval)."""
  w_ce = losses.ce_weight(terms)
  exits = tuple(sorted({n for t in terms for n in t.exits}))

  def objective(params, model_state, batch, aux, rng=None):
    params = hooks_lib.forward(hooks, params, aux, rng)
    lens = {}
    if exits:
      logits_BTV, stats, new_state, lens = apply(graphdef, params, model_state,
                                                 batch["inputs"], exits)
    else:
      logits_BTV, stats, new_state = apply(graphdef, params, model_state, batch["inputs"])
    ce, tokens = cross_entropy(logits_BTV, batch)
    out = losses.Forward(logits_BTV, ce, tokens, stats, lens)
    total, metrics = w_ce * ce, {}
    for term in terms:
      value, m = term.loss(out, batch, aux.get(term.name))
      total = total + value
      if m:
        metrics[term.name] = m
    return total, (out, new_state, metrics)

  return objective


def _metrics(out: losses.Forward, term_metrics: dict) -> dict:
  metrics = {"loss": out.ce, "tokens": out.tokens, **out.stats}
  for name, m in term_metrics.items():
    metrics[name] = {**metrics.get(name, {}), **m}
  return metrics


def make_steps(graphdef, terms: list[losses.Term], tx: optax.GradientTransformation, mesh,
               hooks=()):
  """The pure ``train_step(state, batch, aux)`` and ``eval_step(params, model_state,
  batch, aux)`` (per-batch means of every metric, top-1 ``accuracy`` in eval, and
  ``tokens``); ``hooks``
  (``lm.hooks``) shape the forward's parameters and act after each update."""
  objective = make_objective(graphdef, terms, hooks)

  def train_step(state, batch, aux):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    with sharding.placed(mesh):
      (total, (out, model_state, term_metrics)), grads = jax.value_and_grad(
          objective, has_aux=True)(state["params"], state["model_state"], batch, aux, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    params, hook_states = hooks_lib.update(hooks, params, state.get("hooks", {}), step)
    new_state = dict(state, step=step, params=params, model_state=model_state,
                     opt_state=opt_state)
    if hook_states:
      new_state["hooks"] = hook_states
    metrics = _metrics(out, term_metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if terms:
      metrics["loss_total"] = total
    return new_state, metrics

  def eval_step(params, model_state, batch, aux):
    with sharding.placed(mesh):
      _, (out, _, term_metrics) = objective(params, model_state, batch, aux)
    return {**_metrics(out, term_metrics), "accuracy": accuracy(out.logits_BTV, batch)}

  return train_step, eval_step


def weighted_sums(metrics: dict) -> dict:
  """Every metric times the batch's token weight (for token-weighted means)."""
  tokens = metrics["tokens"]
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) * tokens,
                      {k: v for k, v in metrics.items() if k != "tokens"}) | {"tokens": tokens}
