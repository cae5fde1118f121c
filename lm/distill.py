"""Distillation fine-tuning: a block-sparse student learns from its frozen dense teacher.

SpargeAttention2's recipe (``../shared/REFERENCES.md``) adapted to causal LMs: the
teacher is a trained dense model, the student the *same* weights run with the
predicted block-sparse mask (``model.sparse``), both see the same inputs, and the
student is fine-tuned to match the teacher's next-token distributions:

  objective = T^2 * KL(p_teacher^T || p_student^T)      (``distill.loss = "kl"``)
            + ce_weight * cross-entropy                   (``distill.loss = "kl+ce"``)

where p^T = softmax(logits / T) (fp32 log-softmax) and the KL is the token-weighted
mean over the batch (the weights of the cross-entropy). The T^2 factor (Hinton et
al. 2015) keeps the gradient scale independent of T; the logged ``distill/kl`` is
the KL itself. The logged ``loss`` and ``eval_loss`` stay the student's
cross-entropy, comparable with every other run.

How a run uses it (``lm/train.py``), when ``distill.teacher`` names a dense run's
workdir (or its ``checkpoints/`` folder):
- the teacher's latest checkpoint's parameters are restored with orbax onto the
  student's abstract parameter shardings (only ``params``; its optimizer state,
  which may belong to another optimizer, is not read) on every run, and held
  frozen outside the train state: the jitted step takes them as a third argument
  and never returns them;
- a student workdir without a checkpoint starts from a copy of those parameters
  with a fresh optimizer state at step 0; with a checkpoint it resumes from its own;
- the teacher model is the student's config with ``model.sparse.enabled=False``;
  its architecture (the ``model.*`` fields that shape parameters, as
  ``lm.checkpoint.Checkpointer.check_compatible`` compares them) must equal the
  student's.
Not implemented: matching attention outputs (SpargeAttention2's output MSE) layer
by layer; the logits are matched.
"""
import copy
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from lm.checkpoint import ARCH_FIELDS, arch_difference
from lm.errors import ConfigError

LOSSES = ("kl", "kl+ce")
# The fields that shape the parameters (the optimizer's do not matter: only the
# teacher's parameters are read).
MODEL_FIELDS = tuple(f for f in ARCH_FIELDS if f.startswith("model."))


def enabled(config: ml_collections.ConfigDict) -> bool:
  """True when ``distill.teacher`` is set."""
  d = config.get("distill")
  return bool(d is not None and d.teacher)


def teacher_model_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The teacher's ``model`` config: the student's with dense attention."""
  t = copy.deepcopy(model_cfg)
  if t.get("sparse") is not None:
    t.sparse.enabled = False
  return t


def kl_divergence(teacher_logits_BTV: jax.Array, student_logits_BTV: jax.Array,
                  weights_BT: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Token-weighted mean KL(softmax(t / T) || softmax(s / T)) in fp32.

  The teacher side carries no gradient (``stop_gradient``); a zero weight sum
  gives 0.
  """
  t = jax.lax.stop_gradient(teacher_logits_BTV).astype(jnp.float32) / temperature
  s = student_logits_BTV.astype(jnp.float32) / temperature
  logp_t, logp_s = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
  kl_BT = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
  w_BT = weights_BT.astype(jnp.float32)
  return jnp.sum(kl_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)


def objective(kl: jax.Array, ce: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
  """The distillation objective from the KL and the cross-entropy (see the module doc)."""
  loss = cfg.temperature ** 2 * kl
  if cfg.loss == "kl+ce":
    loss = loss + cfg.ce_weight * ce
  return loss


def checkpoint_dir(path: str) -> str:
  """The teacher's checkpoint folder: ``<path>/checkpoints`` when it exists, else ``path``."""
  if not path or not os.path.isdir(path):
    raise ConfigError("distill.teacher", path, "no such directory",
                      "pass the workdir of a trained dense run (or its checkpoints/ folder); "
                      "train one first, e.g. experiments/configs/sparse_attention.py:teacher")
  sub = os.path.join(path, "checkpoints")
  return os.path.abspath(sub if os.path.isdir(sub) else path)


def _manager(directory: str) -> ocp.CheckpointManager:
  # Read only: never create, clean up or delete anything in the teacher's folder.
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0, max_to_keep=None,
          enable_async_checkpointing=False),
      item_names=("state", "config"))


def check_teacher(config: ml_collections.ConfigDict, saved: dict, step: int,
                  directory: str) -> None:
  """Raises ConfigError when the teacher's saved config has another architecture."""
  diff = arch_difference(saved, config, MODEL_FIELDS)
  if diff is not None:
    field, old, new = diff
    raise ConfigError(
        field, new,
        f"the teacher (distill.teacher, checkpoint step {step} in {directory}) has "
        f"{field}={old!r}; a student must have its teacher's architecture",
        f"use the teacher's model config ({field}={old!r}; only model.sparse.* and how "
        "the model is computed may differ) or another teacher")


def restore_teacher(config: ml_collections.ConfigDict, abstract_params) -> tuple[dict, int, str]:
  """Restores the teacher's parameters onto ``abstract_params``' shardings.

  Args:
    config: the student's config, with ``model.vocab_size`` resolved (as
      ``lm.train.build`` leaves it).
    abstract_params: ShapeDtypeStructs with shardings (the student's).

  Returns:
    (params, the teacher's step, its checkpoint folder).
  """
  directory = checkpoint_dir(config.distill.teacher)
  manager = _manager(directory)
  try:
    step = manager.latest_step()
    if step is None:
      raise ConfigError("distill.teacher", config.distill.teacher,
                        f"no checkpoint in {directory}",
                        "train the dense teacher to the end first (its workdir gets "
                        "checkpoints/<step>), or pass a run that has one")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    check_teacher(config, saved["config"], step, directory)
    target = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  finally:
    manager.close()
  return restored["state"]["params"], step, directory


def evaluate_kl(exp, params, teacher_params, n_batches: int | None = None) -> float:
  """Token-weighted KL(teacher || student) at ``distill.temperature`` over the first
  ``n_batches`` eval batches (default ``train.eval_batches``) of ``exp``
  (``lm.train.build`` of a distilling config)."""
  from lm.model import apply
  graphdef, teacher_graphdef = exp.graphdef, exp.teacher_graphdef
  temperature = exp.config.distill.temperature

  @jax.jit
  def step(params, teacher_params, batch):
    student, _ = apply(graphdef, params, batch["inputs"])
    teacher, _ = apply(teacher_graphdef, teacher_params, batch["inputs"])
    tokens = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
    return kl_divergence(teacher, student, batch["weights"], temperature) * tokens, tokens

  total, count = 0.0, 0.0
  with jax.set_mesh(exp.mesh):
    for batch in exp.data.eval_batches(n_batches or exp.config.train.eval_batches):
      s, n = step(params, teacher_params, exp.put_batch(batch))
      total, count = total + float(s), count + float(n)
  return total / max(count, 1.0)
