"""Pure train/eval steps and the loop around them.

The state is a plain dict pytree ``{step, params, opt_state, rng}``; the model's
graph definition is held outside it and merged inside the jitted step, so the
Python graph is walked only when the step is traced, never per step.
"""
import copy
import dataclasses
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attention import ops as attention_ops
from lm import config as config_lib
from lm import data as data_lib
from lm import distill as distill_lib
from lm import sharding
from lm.checkpoint import Checkpointer
from lm.metrics import MetricsLogger
from lm.model import (active_param_count, apply, build_model, count_params, moe_aux_loss,
                      update_balance_biases)
from moe import gmm as gmm_lib
from moe.router import load_cv
from optim.chain import build_optimizer


@dataclasses.dataclass
class Experiment:
  """Everything built from a config: mesh, model graph, optimizer, data, step functions."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  logical_axes: dict
  optimizer: object  # optim.chain.Built: .tx and .learning_rates
  data: object
  state_shardings: dict
  batch_sharding: NamedSharding
  abstract_state: dict  # ShapeDtypeStructs carrying the target shardings
  init_state: callable
  train_step: callable  # (state, batch) or, distilling, (state, batch, teacher_params)
  eval_step: callable
  teacher_graphdef: nnx.GraphDef | None = None  # distilling: the dense teacher's graph

  def put_batch(self, local_batch: dict) -> dict:
    """This process's rows -> global arrays sharded over the mesh's batch axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}


def cross_entropy(logits_BTV, batch):
  """Weighted mean next-token cross-entropy (fp32) and the weight sum."""
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
  weights_BT = batch["weights"].astype(jnp.float32)
  total = jnp.maximum(jnp.sum(weights_BT), 1.0)
  return jnp.sum(losses_BT * weights_BT) / total, total


def loss_fn(graphdef, params, batch):
  """Weighted mean next-token cross-entropy (fp32), the weight sum, the layers'
  statistics (``lm.model.apply``)."""
  logits_BTV, stats = apply(graphdef, params, batch["inputs"])
  ce, total = cross_entropy(logits_BTV, batch)
  return ce, (total, stats)


def make_steps(graphdef, tx, mesh, moe_cfg=None, distill_cfg=None, teacher_graphdef=None):
  """Builds the pure ``train_step(state, batch)`` and ``eval_step(params, batch)``.

  With MoE layers the training objective adds their balancing and z-losses
  (``moe_cfg`` coefficients), the auxiliary-loss-free bias update runs after the
  optimizer, and the metrics carry each layer's statistics under ``moe``.
  The logged ``loss`` stays the cross-entropy, comparable with dense models.

  Distilling (``teacher_graphdef`` given), the step is ``train_step(state, batch,
  teacher_params)``: the frozen teacher's logits on the same inputs enter the
  objective of ``lm.distill`` (``distill_cfg``) and the metrics get
  ``distill/kl``; the teacher's parameters are an argument, not part of the state.
  """

  # Kernels are chosen for the mesh's devices (a CPU host compiling for a TPU
  # topology traces TPU programs).
  platform = mesh.devices.flat[0].platform

  def objective(params, batch, teacher_logits_BTV=None):
    if teacher_logits_BTV is None:
      ce, (tokens, stats) = loss_fn(graphdef, params, batch)
      return ce + moe_aux_loss(stats["moe"], moe_cfg), (ce, tokens, stats, {})
    logits_BTV, stats = apply(graphdef, params, batch["inputs"])
    ce, tokens = cross_entropy(logits_BTV, batch)
    kl = distill_lib.kl_divergence(teacher_logits_BTV, logits_BTV, batch["weights"],
                                   distill_cfg.temperature)
    return (distill_lib.objective(kl, ce, distill_cfg) + moe_aux_loss(stats["moe"], moe_cfg),
            (ce, tokens, stats, {"kl": kl}))

  def train_step(state, batch, teacher_params=None):
    with (sharding.activation_sharding(mesh), gmm_lib.target_platform(platform),
          attention_ops.target_platform(platform),
          jax.sharding.use_abstract_mesh(mesh.abstract_mesh)):
      teacher_logits_BTV = None
      if teacher_params is not None:
        teacher_logits_BTV, _ = apply(teacher_graphdef, teacher_params, batch["inputs"])
        teacher_logits_BTV = jax.lax.stop_gradient(teacher_logits_BTV)
      (total_loss, (loss, tokens, stats, distill)), grads = jax.value_and_grad(
          objective, has_aux=True)(state["params"], batch, teacher_logits_BTV)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if stats["moe"]:
      params = update_balance_biases(params, stats["moe"], moe_cfg.bias_update_rate)
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": tokens}
    if stats["moe"]:
      metrics["loss_total"] = total_loss
      metrics["moe"] = stats["moe"]
    if stats["attention"]:
      metrics["attention"] = stats["attention"]
    if distill:
      metrics["distill"] = distill
    return new_state, metrics

  def eval_step(params, batch):
    with (sharding.activation_sharding(mesh), gmm_lib.target_platform(platform),
          attention_ops.target_platform(platform),
          jax.sharding.use_abstract_mesh(mesh.abstract_mesh)):
      loss, (tokens, _) = loss_fn(graphdef, params, batch)
    return loss * tokens, tokens

  return train_step, eval_step


def build(config: ml_collections.ConfigDict, *, devices=None) -> Experiment:
  """Validates ``config`` and builds the experiment on a mesh over ``devices``
  (default: every device of every process). Nothing is allocated yet."""
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  data = data_lib.make_data(config.data, seed=config.seed, process_index=jax.process_index(),
                            process_count=jax.process_count())
  vocab = config_lib.resolve_vocab(config, data.vocab_size)
  with config.unlocked():
    config.model.vocab_size = vocab
  graphdef, abstract_params, axes = build_model(config.model, vocab, config.seed, abstract=True)
  optimizer = build_optimizer(config.optimizer, axes, config.train.steps)
  teacher_graphdef = None
  if distill_lib.enabled(config):
    teacher_graphdef, _, _ = build_model(distill_lib.teacher_model_config(config.model), vocab,
                                         config.seed, abstract=True)
  train_step, eval_step = make_steps(graphdef, optimizer.tx, mesh, config.model.get("moe"),
                                     config.get("distill"), teacher_graphdef)

  def init_fn(params=None):
    """A fresh state; with ``params`` (a distilled student's start: the teacher's)
    a copy of them instead of a random initialisation."""
    if params is None:
      _, params, _ = build_model(config.model, vocab, config.seed)
    else:
      params = jax.tree.map(jnp.copy, params)  # never alias the teacher's buffers
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": optimizer.tx.init(params),
            "rng": jax.random.key_data(jax.random.key(config.seed))}

  shapes = jax.eval_shape(init_fn)
  param_specs = sharding.tree_specs(axes, abstract_params, mesh)
  specs = {"step": P(), "rng": P(), "params": param_specs,
           "opt_state": sharding.like_params_specs(shapes["opt_state"], abstract_params, param_specs)}
  state_shardings = sharding.named(mesh, specs)
  abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, state_shardings)
  batch_spec = sharding.logical_to_spec(("batch", "length"), (config.data.batch_size, config.data.seq_len),
                                        dict(mesh.shape), what="the batch")
  batch_sharding = NamedSharding(mesh, batch_spec)
  replicated = NamedSharding(mesh, P())
  step_in = (state_shardings, batch_sharding)
  if teacher_graphdef is not None:
    step_in += (state_shardings["params"],)
  return Experiment(
      config, mesh, graphdef, axes, optimizer, data, state_shardings, batch_sharding,
      abstract_state,
      init_state=jax.jit(init_fn, out_shardings=state_shardings),
      train_step=jax.jit(train_step, in_shardings=step_in,
                         out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(state_shardings["params"], batch_sharding),
                        out_shardings=replicated),
      teacher_graphdef=teacher_graphdef)


def moe_record(host_metrics: list[dict]) -> dict:
  """Per-layer MoE metrics averaged over the logged steps: ``moe/<block>/load`` (the
  share of assignments per expert), ``load_cv``, ``dropped``, ``lb_loss``, ``z_loss``,
  and their means over layers under ``moe/``."""
  if not host_metrics or "moe" not in host_metrics[0]:
    return {}
  record, per_layer = {}, {}
  for block in host_metrics[0]["moe"]:
    load = np.mean([m["moe"][block]["load"] for m in host_metrics], axis=0)
    layer = {"load_cv": float(load_cv(load)),
             **{k: float(np.mean([m["moe"][block][k] for m in host_metrics]))
                for k in ("dropped", "lb_loss", "z_loss")}}
    record[f"moe/{block}/load"] = [round(float(x), 5) for x in load]
    record.update({f"moe/{block}/{k}": v for k, v in layer.items()})
    per_layer[block] = layer
  for k in ("load_cv", "dropped", "lb_loss", "z_loss"):
    record[f"moe/{k}"] = float(np.mean([layer[k] for layer in per_layer.values()]))
  record["loss_total"] = float(np.mean([m["loss_total"] for m in host_metrics]))
  return record


def attention_record(host_metrics: list[dict]) -> dict:
  """Block-sparse attention density per layer (``attention/<block>/density``) and
  its mean over layers (``attention/density``), averaged over the logged steps."""
  if not host_metrics or "attention" not in host_metrics[0]:
    return {}
  record = {f"attention/{block}/density":
            float(np.mean([m["attention"][block]["density"] for m in host_metrics]))
            for block in host_metrics[0]["attention"]}
  record["attention/density"] = float(np.mean(list(record.values())))
  return record


def distill_record(host_metrics: list[dict]) -> dict:
  """``distill/kl``: KL(teacher || student), averaged over the logged steps."""
  if not host_metrics or "distill" not in host_metrics[0]:
    return {}
  return {"distill/kl": float(np.mean([m["distill"]["kl"] for m in host_metrics]))}


def evaluate(exp: Experiment, params) -> float:
  total, count = 0.0, 0.0
  for batch in exp.data.eval_batches(exp.config.train.eval_batches):
    s, n = exp.eval_step(params, exp.put_batch(batch))
    total, count = total + float(s), count + float(n)
  return total / max(count, 1.0)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step.

  Single process only: with several processes every one must stop at the same
  step, which JAX's preemption sync point (through orbax's
  ``reached_preemption``) decides, so no handler is installed there.
  """

  def __init__(self, enabled: bool = True):
    self.requested = False
    self.enabled = enabled
    self._previous = None

  def __enter__(self):
    if not self.enabled:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
        devices=None) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Args:
    config: an experiment config (see experiments/configs/base.py).
    workdir: where metrics.jsonl, config.json, checkpoints/ and TensorBoard
      events go. Re-running with the same workdir resumes.
    stop_at: stop (and checkpoint) after this step without changing the
      schedule, as a preemption would; None runs to ``train.steps``.
    devices: the devices of the mesh (default: all devices of all processes).

  Returns:
    A summary: final step, last train loss, last eval loss, parameter count.
  """
  config = copy.deepcopy(config)  # ConfigDict(config) would share (and mutate) the caller's
  exp = build(config, devices=devices)
  tc = config.train
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
  data_iter = exp.data.train_iterator()
  latest = ckpt.latest_step()
  teacher_args, teacher_note = (), ""
  if exp.teacher_graphdef is not None:
    # Restored on every run (and held frozen); the student starts from a copy.
    teacher, teacher_step, teacher_dir = distill_lib.restore_teacher(
        config, exp.abstract_state["params"])
    teacher_args = (teacher,)
    teacher_note = f", distilling from {teacher_dir} (step {teacher_step})"
  if latest is not None:
    ckpt.check_compatible(config, latest)
    state = ckpt.restore(latest, exp.abstract_state, data_iter)
  elif teacher_args:
    state = exp.init_state(teacher_args[0])
  else:
    state = exp.init_state()
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  step = int(state["step"])
  end = min(tc.steps, stop_at) if stop_at else tc.steps
  logger = MetricsLogger(workdir, total_steps=tc.steps, start_step=step,
                         progress=tc.progress, enabled=lead)
  n_params = count_params(state["params"])
  n_active = active_param_count(config.model, state["params"])
  mesh_desc = " x ".join(f"{a}={s}" for a, s in exp.mesh.shape.items() if s > 1) or "1 device"
  active = f" ({n_active / 1e6:.2f}M active per token)" if n_active != n_params else ""
  logger.info(f"{config.name}: {n_params / 1e6:.2f}M parameters{active}, mesh {mesh_desc}, steps {step} -> {end}"
              + (f" (resumed from step {latest})" if latest is not None else "") + teacher_note)
  pending, last_loss, eval_loss = [], float("nan"), None
  t_start = t_last = time.perf_counter()
  multi = jax.process_count() > 1
  with _Preemption(enabled=not multi) as preempt, jax.set_mesh(exp.mesh):
    while step < end:
      state, metrics = exp.train_step(state, exp.put_batch(next(data_iter)), *teacher_args)
      step += 1
      pending.append(metrics)
      stop = preempt.requested or (multi and ckpt.manager.reached_preemption(step))
      if step % tc.log_every == 0 or step == end or step == 1:
        host = jax.device_get(pending)
        now = time.perf_counter()
        tokens = sum(float(m["tokens"]) for m in host)
        last_loss = float(host[-1]["loss"])
        record = {"step": step, "loss": last_loss,
                  "loss_avg": float(np.mean([m["loss"] for m in host])),
                  "grad_norm": float(host[-1]["grad_norm"]),
                  "tokens_per_sec": tokens / max(now - t_last, 1e-9),
                  "elapsed_s": now - t_start}
        record.update(moe_record(host))
        record.update(attention_record(host))
        record.update(distill_record(host))
        for group, schedule in exp.optimizer.learning_rates.items():
          record[f"learning_rate/{group}"] = float(schedule(step - 1))
        record["learning_rate"] = record[f"learning_rate/{next(iter(exp.optimizer.learning_rates))}"]
        logger.log(record)
        pending, t_last = [], time.perf_counter()
      if step % tc.eval_every == 0 or step == tc.steps:
        eval_loss = evaluate(exp, state["params"])
        logger.log({"step": step, "eval_loss": eval_loss,
                    "elapsed_s": time.perf_counter() - t_start})
        t_last = time.perf_counter()
      if step % tc.checkpoint_every == 0 or step == end or stop:
        ckpt.save(step, state, data_iter, config)
        t_last = time.perf_counter()
      if stop:
        logger.info(f"SIGTERM: saved checkpoint at step {step}; exiting")
        break
  ckpt.close()
  logger.close(plot=tc.plot)
  return {"step": step, "loss": last_loss, "eval_loss": eval_loss, "params": n_params,
          "active_params": n_active, "state": state}
