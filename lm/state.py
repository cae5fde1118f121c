"""The train state: ``{step, params, model_state, opt_state, rng}`` (and ``hooks``: the
update hooks' state, e.g. pruning masks, when a hook keeps any), its shardings and
its initialisation.

``params`` are what the optimizer updates (the model's parameters, or what a hook
trains instead: LoRA's adapters, ``lm.hooks``); ``model_state`` the model's other
variables (updated by the forward pass, e.g. the MoE balancing bias); both carry
logical axes (``lm.model.build_model``) that ``lm.sharding``'s rules place on the
mesh. The optimizer state is sharded like the parameters it belongs to.
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm import hooks as hooks_lib
from lm import sharding
from lm.model import Built, build_model


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """The state's ShapeDtypeStructs (with shardings), its shardings, and ``init``:
  a jitted ``init(model=None) -> state`` (``model``: ``{"params", "model_state"}``
  to start from, e.g. a teacher's, instead of a fresh initialisation)."""
  abstract: dict
  shardings: dict
  init: Callable


def make_state(model_cfg, seed: int, model: Built, tx, mesh, hooks=()) -> StateSpec:
  """The train state of ``model`` (abstract) under optimizer ``tx`` on ``mesh``, with
  the state of ``hooks`` (``lm.hooks``)."""

  def init_fn(start=None):
    if start is None:
      built = build_model(model_cfg, seed)
      start = {"params": built.params, "model_state": built.state}
    # ``start["params"]`` None: a hook makes the parameters (LoRA's adapters)
    params, hook_states = hooks_lib.init(hooks, start["params"])
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "model_state": start["model_state"], "opt_state": tx.init(params),
             "rng": jax.random.key_data(jax.random.key(seed))}
    if hook_states:
      state["hooks"] = hook_states
    return state

  shapes = jax.eval_shape(init_fn)
  trained, trained_axes = hooks_lib.trainable(hooks, model.params, model.axes["params"])
  param_specs = sharding.tree_specs(trained_axes, trained, mesh)
  specs = {"step": P(), "rng": P(), "params": param_specs,
           "model_state": sharding.tree_specs(model.axes["state"], model.state, mesh),
           "opt_state": sharding.like_params_specs(shapes["opt_state"], trained,
                                                   param_specs)}
  if "hooks" in shapes:
    specs["hooks"] = {h.name: sharding.tree_specs(h.state_axes(trained_axes),
                                                  shapes["hooks"][h.name], mesh)
                      for h in hooks if h.name in shapes["hooks"]}
  shardings = sharding.named(mesh, specs)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return StateSpec(abstract, shardings, jax.jit(init_fn, out_shardings=shardings))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
