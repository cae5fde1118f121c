"""Early-exit training: the cross-entropy of the logit lens after layer n, added to the
objective, so the model's first n layers with its own final norm and head predict well
(LayerSkip, Elhoushi et al. 2024, trains every exit with a rotating curriculum and layer
dropout; this term is its simplest form: one exit, a fixed weight).

What it is for: a self-speculative draft (``experiments.generate --draft=layers:n``,
``lm.decode.drafts``) proposes the lens's tokens; the better they are, the more the full
model accepts. ``early_exit/ce`` logs the lens's cross-entropy.
"""
import dataclasses

from core.errors import ConfigError, check_int, check_range
from lm.losses.base import Forward, Term
from lm.losses.cross_entropy import cross_entropy


@dataclasses.dataclass(frozen=True)
class EarlyExitConfig:
  """The ``early_exit`` config group.

  Attributes:
    layer: n, the exit after the first n blocks (0: off).
    weight: the lens cross-entropy's weight in the objective.
  """
  layer: int = 0
  weight: float = 0.5

  def __post_init__(self):
    check_int("layer", self.layer, 0)
    check_range("weight", self.weight, 0.0, float("inf"))


class EarlyExit(Term):
  name = "early_exit"
  group = "early_exit"
  Config = EarlyExitConfig

  def __init__(self, cfg: EarlyExitConfig):
    self.cfg = cfg
    self.exits = (cfg.layer,)

  @classmethod
  def build(cls, config, model):
    cfg = config.losses[cls.group]
    if not cfg.layer:
      return None
    L = config.model.n_layers
    if cfg.layer >= L:
      raise ConfigError("early_exit.layer", cfg.layer, f"the model has {L} layers (the exit "
                        "must come before the last)", f"use 1 .. {L - 1}, or 0 for off")
    return cls(cfg)

  def loss(self, out: Forward, batch, aux):
    ce, _ = cross_entropy(out.exits[f"layer_{self.cfg.layer}"], batch)
    return self.cfg.weight * ce, {"ce": ce}
