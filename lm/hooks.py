"""Update hooks: methods that act on the parameters around the optimizer (the
training-side counterpart of the loss terms, ``lm.losses``): compression and adapters.

A hook, built from the typed config (``build``; None when it is off), may

- transform the parameters the forward pass sees (``forward``: quantization-aware
  training's fake-quantized weights, with a straight-through gradient to the fp32
  master weights the optimizer updates; LoRA's base plus low-rank updates);
- say what the optimizer trains (``trainable``: LoRA's adapters instead of the model's
  parameters; by default the parameters themselves);
- keep state in the train state (``init``: e.g. pruning masks, sharded like the
  parameters they mask; ``state_axes`` gives their logical axes), and may change the
  starting parameters (``init`` returns them);
- change the parameters after every optimizer update (``update``: pruning masks
  applied, recomputed on their schedule);
- take frozen inputs that are not in the train state, as the loss terms do
  (``abstract_aux`` / ``load_aux``: LoRA's base weights, passed to every step as
  ``aux[name]``), and give a new run its starting model (``initial_model``).

``lm.step`` calls every hook in every step, identically for every experiment; the
hooks of a run are ``lm.experiment.HOOKS`` built from its config.
"""
from typing import Any, ClassVar

import jax


class Hook:
  name: ClassVar[str] = ""

  @classmethod
  def build(cls, config, model) -> "Hook | None":
    """The hook for this experiment (``lm.config.ExperimentConfig``; ``model`` is
    ``lm.model.Built``), or None when it is off."""
    raise NotImplementedError

  def forward(self, params: dict, aux: Any = None, rng: jax.Array | None = None) -> dict:
    """The parameters the forward pass (train and eval steps) sees; ``aux`` is what
    ``load_aux`` gave, ``rng`` a key of this train step (None in eval)."""
    return params

  def trainable(self, abstract_params: dict, axes: dict) -> tuple[dict, dict]:
    """(ShapeDtypeStructs, logical axes) of what the optimizer updates, given the
    model's parameters."""
    return abstract_params, axes

  def init(self, params: dict) -> tuple[dict, Any]:
    """(starting parameters, the hook's state in the train state; None: no state)."""
    return params, None

  def state_axes(self, param_axes: dict) -> Any:
    """Logical axes of the state (the tree ``init`` returns), for its shardings."""
    return None

  def update(self, params: dict, state: Any, step: jax.Array) -> tuple[dict, Any]:
    """(parameters, state) after the optimizer update that made the step count
    ``step`` (traced int32, >= 1)."""
    return params, state

  def abstract_aux(self, abstract_model: dict) -> Any:
    """ShapeDtypeStructs (with shardings) of the step's ``aux[name]``; None: nothing."""
    return None

  def load_aux(self, abstract_model: dict, read) -> tuple[Any, str]:
    """(aux, a note for the log), loaded once before training; ``read(workdir,
    abstract_model, flag) -> ({"params", "model_state"}, step)`` reads any run's newest
    weights (``lm.runs.latest_model``, passed in: this layer does not import the runs)."""
    return None, ""

  def initial_model(self, aux) -> dict | None:
    """``{"params", "model_state"}`` a new run starts from (None: not this hook's say)."""
    return None


def forward(hooks, params: dict, aux: dict | None = None, rng=None) -> dict:
  aux = aux or {}
  for hook in hooks:
    params = hook.forward(params, aux.get(hook.name), rng)
  return params


def trainable(hooks, abstract_params: dict, axes: dict) -> tuple[dict, dict]:
  for hook in hooks:
    abstract_params, axes = hook.trainable(abstract_params, axes)
  return abstract_params, axes


def init(hooks, params: dict) -> tuple[dict, dict]:
  """(parameters, {hook name: state} of the hooks that keep state)."""
  states = {}
  for hook in hooks:
    params, s = hook.init(params)
    if s is not None:
      states[hook.name] = s
  return params, states


def update(hooks, params: dict, states: dict, step) -> tuple[dict, dict]:
  states = dict(states)
  for hook in hooks:
    params, s = hook.update(params, states.get(hook.name), step)
    if hook.name in states:
      states[hook.name] = s
  return params, states
