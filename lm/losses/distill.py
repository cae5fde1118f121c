"""Distillation fine-tuning: a student learns from a frozen teacher of the same architecture.

SpargeAttention2's recipe (``../shared/REFERENCES.md``) adapted to causal LMs: the
teacher is a trained dense model, the student the *same* weights run with the
predicted block-sparse mask (``model.sparse``), both see the same inputs, and the
student is fine-tuned to match the teacher's next-token distributions:

  objective = T^2 * KL(p_teacher^T || p_student^T)      (``distill.loss = "kl"``)
            + ce_weight * cross-entropy                   (``distill.loss = "kl+ce"``)

where p^T = softmax(logits / T) (fp32 log-softmax) and the KL is the token-weighted
mean over the batch. The T^2 factor (Hinton et al. 2015) keeps the gradient scale
independent of T; the logged ``distill/kl`` is the KL itself. ``distill.loss =
"ce"`` is plain cross-entropy fine-tuning from the teacher's weights (no KL, no
teacher forward): the control that separates distillation from more training.
The logged ``loss`` and ``eval_loss`` stay the student's cross-entropy.

How a run uses it, when ``distill.teacher`` names a dense run's workdir (or its
``checkpoints/`` folder):
- the teacher's latest checkpoint's parameters are restored onto the student's
  parameter shardings (only ``params``: its optimizer state, which may belong to
  another optimizer, is not read) on every run, and held frozen outside the train
  state: the step takes them as ``aux`` and never returns them;
- a student workdir without a checkpoint starts from a copy of them with a fresh
  optimizer state at step 0; with a checkpoint it resumes from its own;
- the teacher model is the student's config with ``model.sparse`` off; its saved
  parameters must have the student's paths and shapes.
Not implemented: matching attention outputs (SpargeAttention2's output MSE) layer
by layer; the logits are matched.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp

from core.errors import ConfigError, check_choice, check_positive, check_range
from lm import checkpoint
from lm.losses.base import Forward, Term
from lm.model import apply, build_model

LOSSES = ("kl", "kl+ce", "ce")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The ``distill`` config group.

  Attributes:
    teacher: "" (off), or a dense run's workdir (or its checkpoints/ folder).
    loss: ``kl``: T^2 KL(teacher || student); ``kl+ce``: plus ``ce_weight`` x
      cross-entropy; ``ce``: cross-entropy only, from the teacher's weights.
    ce_weight: ``kl+ce`` only: the weight of the student's cross-entropy.
    temperature: T: both distributions are softmax(logits / T).
  """
  teacher: str = ""
  loss: str = "kl"
  ce_weight: float = 1.0
  temperature: float = 1.0

  def __post_init__(self):
    check_choice("loss", self.loss, LOSSES)
    check_positive("temperature", self.temperature)
    check_range("ce_weight", self.ce_weight, 0.0, float("inf"))


def kl_divergence(teacher_logits_BTV: jax.Array, student_logits_BTV: jax.Array,
                  weights_BT: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Token-weighted mean KL(softmax(t / T) || softmax(s / T)) in fp32.

  The teacher side carries no gradient (``stop_gradient``); a zero weight sum gives 0.
  """
  t = jax.lax.stop_gradient(teacher_logits_BTV).astype(jnp.float32) / temperature
  s = student_logits_BTV.astype(jnp.float32) / temperature
  logp_t, logp_s = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
  kl_BT = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
  w_BT = weights_BT.astype(jnp.float32)
  return jnp.sum(kl_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)


def checkpoint_dir(path: str) -> str:
  """The teacher's checkpoint folder: ``<path>/checkpoints`` when it exists, else ``path``."""
  if not path or not os.path.isdir(path):
    raise ConfigError("distill.teacher", path, "no such directory",
                      "pass the workdir of a trained dense run (or its checkpoints/ folder); "
                      "train one first, e.g. experiments/configs/sparse_attention.py:teacher")
  sub = os.path.join(path, "checkpoints")
  return os.path.abspath(sub if os.path.isdir(sub) else path)


def restore_teacher(teacher: str, abstract_model: dict) -> tuple[dict, int, str]:
  """({"params", "model_state"}, step, folder) of the teacher's latest checkpoint,
  restored onto ``abstract_model``'s shardings (the student's); only these two are
  read, and their trees must be the student's."""
  directory = checkpoint_dir(teacher)
  try:
    model, step = checkpoint.restore_model(directory, abstract_model)
  except checkpoint.NoCheckpoint:
    raise ConfigError("distill.teacher", teacher, f"no checkpoint in {directory}",
                      "train the dense teacher to the end first (its workdir gets "
                      "checkpoints/<step>), or pass a run that has one") from None
  except checkpoint.OtherTree as e:
    step, diff = e.args
    raise ConfigError("distill.teacher", teacher,
                      f"the teacher (checkpoint step {step} in {directory}) has another "
                      f"architecture: {diff}; a student must have its teacher's "
                      "architecture (only model.sparse and how the model is computed may "
                      "differ)", "use the teacher's model config, or another teacher") from None
  return model, step, directory


class Distill(Term):
  """``distill.teacher`` set: the student's objective against its frozen teacher."""
  name = "distill"
  group = "distill"
  Config = DistillConfig

  def __init__(self, cfg: DistillConfig, teacher_graphdef):
    self.cfg, self.teacher_graphdef = cfg, teacher_graphdef
    self.ce_weight = {"kl": 0.0, "kl+ce": cfg.ce_weight, "ce": 1.0}[cfg.loss]

  @classmethod
  def build(cls, config, model):
    cfg = config.losses[cls.group]
    if not cfg.teacher:
      return None
    teacher = dataclasses.replace(config.model, sparse=None)
    return cls(cfg, build_model(teacher, config.seed, abstract=True).graphdef)

  @property
  def uses_teacher(self) -> bool:
    """The step runs the teacher (not for ``ce``: it only starts from its weights)."""
    return self.cfg.loss != "ce"

  def loss(self, out: Forward, batch, aux):
    if not self.uses_teacher:
      return jnp.zeros((), jnp.float32), {}
    teacher_logits_BTV, _, _ = apply(self.teacher_graphdef, aux["params"], aux["model_state"],
                                     batch["inputs"])
    kl = kl_divergence(teacher_logits_BTV, out.logits_BTV, batch["weights"],
                       self.cfg.temperature)
    return self.cfg.temperature ** 2 * kl, {"kl": kl}

  def abstract_aux(self, abstract_model):
    return abstract_model if self.uses_teacher else None

  def load_aux(self, abstract_model):
    model, step, directory = restore_teacher(self.cfg.teacher, abstract_model)
    return model, f"distilling from {directory} (step {step}, loss {self.cfg.loss})"

  def initial_model(self, aux):
    return aux  # the jitted init writes new buffers: the teacher's stay untouched
