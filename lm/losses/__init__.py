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
import importlib
import pkgutil

from lm.losses.base import Forward, Term  # noqa: F401  (the interface, re-exported)


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
