"""Distillation: a student learns from a frozen teacher run's next-token distributions.

  objective = T^2 * KL(p_teacher^T || p_student^T)      (``distill.loss = "kl"``)
            + ce_weight * cross-entropy                   (``distill.loss = "kl+ce"``)

where p^T = softmax(logits / T) (fp32 log-softmax) and the KL is the token-weighted
mean over the batch (Hinton et al. 2015; the T^2 factor keeps the gradient scale
independent of T; the logged ``distill/kl`` is the KL itself). ``distill.loss =
"ce"`` is plain cross-entropy training (no KL, no teacher forward): the control that
separates distillation from more training. The logged ``loss`` and ``eval_loss``
stay the student's cross-entropy.

The teacher, ``distill.teacher``, is a run's workdir: its own ``config.json`` gives
its model, which may differ from the student's in shape and architecture (a bigger
dense model for a small one, dense for MoE, softmax for linear or hybrid), as long as
it has the student's vocabulary and tokenizer (checked). Its newest checkpoint's
``params`` and ``model_state`` are restored onto the student's mesh (sharded by the
same rules table) and held frozen outside the train state: the step takes them as
``aux``, runs the teacher's forward in the student's compute dtype (``model.dtype``,
bf16 by default) without gradients and
never returns them. When the teacher's parameters have the student's paths and
shapes (SpargeAttention2's recipe: the same weights with a sparse mask), a student
workdir without a checkpoint starts from a copy of them (fine-tuning); otherwise it
starts fresh. A checkpoints/ folder without a config.json beside it is read as the
student's own model with ``model.sparse`` off.

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
    teacher: "" (off), or a trained run's workdir (or its checkpoints/ folder).
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
                      "pass the workdir of a trained run (or its checkpoints/ folder); "
                      "train one first, e.g. experiments/configs/sparse_attention.py:teacher")
  sub = os.path.join(path, "checkpoints")
  return os.path.abspath(sub if os.path.isdir(sub) else path)


def restore_teacher(teacher: str, abstract_model: dict) -> tuple[dict, int, str]:
  """({"params", "model_state"}, step, folder) of the teacher's latest checkpoint,
  restored onto ``abstract_model``'s shardings; only these two are read, and their
  trees must be ``abstract_model``'s."""
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
                      f"the teacher's checkpoint (step {step} in {directory}) does not fit "
                      f"its model: {diff}", "pass a run whose config.json is the one it "
                      "was trained with") from None
  return model, step, directory


def _teacher_workdir(teacher: str) -> str | None:
  """The teacher run's workdir when it has a ``config.json`` (else None)."""
  folder = teacher.rstrip("/")
  workdir = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
  return workdir if os.path.isfile(os.path.join(workdir, "config.json")) else None


def teacher_model(cfg: DistillConfig, student) -> object:
  """The teacher's ``lm.config.ModelConfig``: its run's (``student.runs``), computed in
  the student's compute dtype (``model.dtype``, bf16 by default); the student's with
  ``model.sparse`` off when only a checkpoints/ folder is given. Its vocabulary and
  tokenizer must be the student's (``student``: the typed config)."""
  workdir = _teacher_workdir(cfg.teacher)
  if workdir is None:
    return dataclasses.replace(student.model, sparse=None)
  typed = student.runs[workdir]
  if typed.model.vocab_size != student.model.vocab_size:
    raise ConfigError("distill.teacher", cfg.teacher,
                      f"the teacher's vocabulary is {typed.model.vocab_size} tokens, the "
                      f"student's {student.model.vocab_size}",
                      "distil from a run with the student's tokenizer and model.vocab_size")
  if tokenizer_id(typed.data) != tokenizer_id(student.data):
    raise ConfigError("distill.teacher", cfg.teacher,
                      f"the teacher was trained with another tokenizer "
                      f"({typed.data.tokenizer!r}, the student's {student.data.tokenizer!r})",
                      "distil from a run with the student's tokenizer")
  return dataclasses.replace(typed.model, dtype=student.model.dtype)


def tokenizer_id(data) -> str:
  """What identifies a run's tokens: the synthetic task and vocabulary, the tokenizer's
  name, or its file's hash."""
  if data.source == "synthetic":
    return f"synthetic:{data.synthetic.task}:{data.synthetic.vocab}"
  spec = data.tokenizer
  if spec in ("byte", "bpe") or not spec:
    return spec or "byte"
  from lm.data.tokenizers import file_sha256
  return file_sha256(os.path.expanduser(spec))


class Distill(Term):
  """``distill.teacher`` set: the student's objective against its frozen teacher."""
  name = "distill"
  group = "distill"
  Config = DistillConfig

  def __init__(self, cfg: DistillConfig, teacher, same_shapes: bool):
    self.cfg, self.teacher, self.same_shapes = cfg, teacher, same_shapes
    self.ce_weight = {"kl": 0.0, "kl+ce": cfg.ce_weight, "ce": 1.0}[cfg.loss]

  @classmethod
  def run_paths(cls, config):
    workdir = _teacher_workdir(config.losses[cls.group].teacher)
    return {"distill.teacher": workdir} if config.losses[cls.group].teacher and workdir else {}

  @classmethod
  def build(cls, config, model):
    cfg = config.losses[cls.group]
    if not cfg.teacher:
      return None
    teacher = build_model(teacher_model(cfg, config), config.seed, abstract=True)
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
    same = shapes(teacher.params) == shapes(model.params)
    return cls(cfg, teacher, same)

  @property
  def uses_teacher(self) -> bool:
    """The step runs the teacher (not for ``ce``: it only starts from its weights)."""
    return self.cfg.loss != "ce"

  def loss(self, out: Forward, batch, aux):
    if not self.uses_teacher:
      return jnp.zeros((), jnp.float32), {}
    teacher_logits_BTV, _, _ = apply(self.teacher.graphdef, aux["params"], aux["model_state"],
                                     batch["inputs"])
    kl = kl_divergence(teacher_logits_BTV, out.logits_BTV, batch["weights"],
                       self.cfg.temperature)
    return self.cfg.temperature ** 2 * kl, {"kl": kl}

  def _abstract_teacher(self, abstract_model):
    from lm import sharding
    return sharding.abstract_model(self.teacher, abstract_model)

  def abstract_aux(self, abstract_model):
    if not self.uses_teacher:
      return None
    return self._abstract_teacher(abstract_model)

  def load_aux(self, abstract_model, read=None):
    if not self.uses_teacher and not self.same_shapes:
      return None, f"distill.loss=ce: training from scratch ({self.cfg.teacher} unused)"
    model, step, directory = restore_teacher(self.cfg.teacher,
                                             self._abstract_teacher(abstract_model))
    how = "its weights as the start" if self.same_shapes else "a fresh student"
    return model, f"distilling from {directory} (step {step}, loss {self.cfg.loss}, {how})"

  def initial_model(self, aux):
    # the jitted init writes new buffers: the teacher's stay untouched
    return aux if self.same_shapes else None
