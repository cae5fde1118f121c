"""Loss terms: the training objective is a sum of named terms built from config.

Every module of this package defines one ``Term`` subclass, found and registered
at import (``TERMS``); adding a loss term is one new file here, whose config
group (``Term.group`` / ``Term.Config``, a frozen dataclass) the experiment
configs pick up (``experiments/configs/base.py`` adds every term's group). A term

- is built from the typed experiment config (``build``; None when it is off);
- adds to the objective from the forward pass (logits, the cross-entropy, what
  the layers sowed) and the batch (``loss``), returning its metrics;
- may need inputs that are not in the train state (``aux``: a frozen teacher's
  parameters), loaded once by the loop (``load_aux``) and passed to every step;
- may give the run its starting parameters and model state (``initial_model``);
- may set the weight of the cross-entropy in the objective (``ce_weight``);
- may derive host-side metrics from the averaged logs (``summarize``).

The step (``lm.step``) is the same for every combination: ``train_step(state,
batch, aux)``.
"""
import dataclasses
import importlib
import pkgutil
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
  """
  logits_BTV: jax.Array
  ce: jax.Array
  tokens: jax.Array
  stats: dict


class Term:
  """One named term of the objective (see the module docstring)."""
  name: ClassVar[str] = ""
  group: ClassVar[str | None] = None   # config group of its settings, if any
  Config: ClassVar[type | None] = None  # that group's dataclass
  ce_weight: float | None = None        # set: the cross-entropy's weight in the objective

  @classmethod
  def build(cls, config, model) -> "Term | None":
    """The term for this experiment (``lm.config.ExperimentConfig``; ``model`` is
    ``lm.model.Built``), or None when it is off."""
    raise NotImplementedError

  def loss(self, out: Forward, batch: dict, aux: Any) -> tuple[jax.Array, dict]:
    """(Its contribution to the objective, its metrics) for one batch; ``aux`` is
    what ``load_aux`` gave (None if nothing)."""
    raise NotImplementedError

  def abstract_aux(self, abstract_model: dict) -> Any:
    """ShapeDtypeStructs (with shardings) of what the step gets as ``aux``, for
    compiling it; None: the step gets nothing. ``abstract_model`` is the train
    state's ``{"params", "model_state"}``."""
    return None

  def load_aux(self, abstract_model: dict) -> tuple[Any, str]:
    """(aux, a note for the log), loaded once before training onto
    ``abstract_model``'s shardings."""
    return None, ""

  def initial_model(self, aux) -> dict | None:
    """``{"params", "model_state"}`` a new run starts from (None: a fresh init)."""
    return None

  def summarize(self, record: dict) -> dict:
    """Metrics derived on the host from the averaged, flattened log ``record``."""
    return {}


def _discover() -> dict[str, type[Term]]:
  terms = {}
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    module = importlib.import_module(f"{__name__}.{info.name}")
    for value in vars(module).values():
      if isinstance(value, type) and issubclass(value, Term) and value is not Term and value.name:
        if value.name in terms and terms[value.name] is not value:
          raise ValueError(f"loss term {value.name!r} is defined twice. Fix: rename one")
        terms[value.name] = value
  return terms


TERMS: dict[str, type[Term]] = _discover()


def build_terms(config, model) -> list[Term]:
  """The terms that are on for this experiment, in name order."""
  terms = [t for t in (cls.build(config, model) for cls in TERMS.values()) if t is not None]
  overrides = [t.name for t in terms if t.ce_weight is not None]
  if len(overrides) > 1:
    raise ValueError(f"loss terms {overrides} all set the cross-entropy's weight. Fix: turn "
                     "all but one off")
  return terms


def ce_weight(terms: list[Term]) -> float:
  """The cross-entropy's weight in the objective: 1 unless a term sets it."""
  return next((t.ce_weight for t in terms if t.ce_weight is not None), 1.0)
