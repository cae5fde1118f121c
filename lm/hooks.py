"""Update hooks: compression methods that act on the parameters around the optimizer
(the training-side counterpart of the loss terms, ``lm.losses``).

A hook, built from the typed config (``build``; None when it is off), may

- transform the parameters the forward pass sees (``forward``: quantization-aware
  training's fake-quantized weights, with a straight-through gradient to the fp32
  master weights the optimizer updates);
- keep state in the train state (``init``: e.g. pruning masks, sharded like the
  parameters they mask; ``state_axes`` gives their logical axes), and may change the
  starting parameters (``init`` returns them);
- change the parameters after every optimizer update (``update``: pruning masks
  applied, recomputed on their schedule).

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

  def forward(self, params: dict) -> dict:
    """The parameters the forward pass (train and eval steps) sees."""
    return params

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


def forward(hooks, params: dict) -> dict:
  for hook in hooks:
    params = hook.forward(params)
  return params


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
