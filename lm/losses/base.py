"""What every loss term is: the ``Term`` interface and the ``Forward`` it reads
(the package docstring, ``lm/losses/__init__.py``, says how terms are used)."""
import dataclasses
from typing import Any, ClassVar

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Forward:
  """What one forward pass of the model gives the terms.

  Attributes:
    logits_BTV: fp32 next-token logits.
    ce: token-weighted mean cross-entropy (fp32 scalar).
    tokens: the weight sum of the batch.
    stats: what the layers sowed, by group and block (``lm.model.apply``).
    exits: the logit lens after the layers terms asked for (``Term.exits``):
      {"layer_<n>": fp32 logits [B, T, V]}; empty when none asked.
  """
  logits_BTV: jax.Array
  ce: jax.Array
  tokens: jax.Array
  stats: dict
  exits: dict = dataclasses.field(default_factory=dict)


class Term:
  """One named term of the objective (see ``lm/losses/__init__.py``)."""
  name: ClassVar[str] = ""
  group: ClassVar[str | None] = None   # config group of its settings, if any
  Config: ClassVar[type | None] = None  # that group's dataclass
  ce_weight: float | None = None        # set: the cross-entropy's weight in the objective
  exits: tuple = ()                     # layers whose logit lens the term reads (Forward.exits)
  aux_from: str | None = None           # a hook's name: the step gives the term that hook's aux

  @classmethod
  def build(cls, config, model) -> "Term | None":
    """The term for this experiment (``lm.config.ExperimentConfig``; ``model`` is
    ``lm.model.Built``), or None when it is off."""
    raise NotImplementedError

  @classmethod
  def run_paths(cls, config) -> dict:
    """{config field: workdir} of other runs whose typed configs ``build`` reads from
    ``config.runs[workdir]`` (``lm.experiment.build`` reads them first)."""
    return {}

  def loss(self, out: Forward, batch: dict, aux: Any) -> tuple[jax.Array, dict]:
    """(Its contribution to the objective, its metrics) for one batch; ``aux`` is
    what ``load_aux`` gave (None if nothing)."""
    raise NotImplementedError

  def abstract_aux(self, abstract_model: dict) -> Any:
    """ShapeDtypeStructs (with shardings) of what the step gets as ``aux``, for
    compiling it; None: the step gets nothing. ``abstract_model`` is the train
    state's ``{"params", "model_state"}``."""
    return None

  def load_aux(self, abstract_model: dict, read=None) -> tuple[Any, str]:
    """(aux, a note for the log), loaded once before training onto
    ``abstract_model``'s shardings; ``read`` reads a run's newest weights
    (``lm.hooks.Hook.load_aux``)."""
    return None, ""

  def initial_model(self, aux) -> dict | None:
    """``{"params", "model_state"}`` a new run starts from (None: a fresh init)."""
    return None

  def summarize(self, record: dict) -> dict:
    """Metrics derived on the host from the averaged, flattened log ``record``."""
    return {}
