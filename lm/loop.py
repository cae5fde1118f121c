"""The Python loop around the jitted steps: resume, feed data, log, evaluate, save.

Nothing here changes what a step computes (``lm.step``); the loop only moves data
and state between the host, the devices and the workdir. Everything that can be
wrong with a config or a workdir is found before anything is written: a run that
stops with a config error leaves the workdir's checkpoints and ``config.json`` as
they were.
"""
import copy
import json
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from core.errors import ConfigError
from lm import experiment as experiment_lib
from lm.checkpoint import Checkpointer
from lm.metrics import MetricsLogger, rounded, summarize
from lm.model import active_param_count, count_params


def evaluate(exp: experiment_lib.Experiment, params, model_state, n_batches: int | None = None,
             aux: dict | None = None) -> dict:
  """Token-weighted means over the first ``n_batches`` eval batches (default
  ``train.eval_batches``): ``eval_loss`` (cross-entropy), ``eval_loss_total``
  when terms add to it, and ``eval_<group>/<stat>`` for the terms' metrics and the
  layers' statistics averaged over blocks (e.g. ``eval_attention/density``,
  ``eval_distill/kl``)."""
  sums = None
  with jax.set_mesh(exp.mesh):
    for batch in exp.data.eval_batches(n_batches or exp.config.train.eval_batches):
      s = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(
          exp.eval_step(params, model_state, exp.put_batch(batch), aux or {})))
      sums = s if sums is None else jax.tree.map(np.add, sums, s)
  tokens = max(float(sums.pop("tokens")), 1.0)
  record = summarize([jax.tree.map(lambda x: np.asarray(x) / tokens, sums)])
  out = {"eval_loss": record.pop("loss")}
  out.update({f"eval_{k}": v for k, v in record.items()
              if isinstance(v, float) and "/block_" not in k})
  return out


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


def _writable_workdir(workdir: str) -> None:
  """Creates ``workdir`` or stops with a config error saying why it cannot."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".kestrel-write-test-{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ConfigError("--workdir", workdir, f"cannot be created or written ({e.strerror})",
                      "pass a folder you can write to") from None


def _config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
        devices=None) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its newest checkpoint that restores.

  Args:
    config: an experiment config (see experiments/configs/base.py).
    workdir: where metrics.jsonl, config.json, checkpoints/ and TensorBoard
      events go. Re-running with the same workdir resumes.
    stop_at: stop (and checkpoint) after this step without changing the
      schedule, as a preemption would; None runs to ``train.steps``.
    devices: the devices of the mesh (default: all devices of all processes).

  Returns:
    A summary: final step, last train loss, last eval loss, parameter counts, state.
  """
  config = copy.deepcopy(config)  # ConfigDict(config) would share (and mutate) the caller's
  exp = experiment_lib.build(config, devices=devices)
  tc = exp.config.train
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  model = {"params": exp.state.abstract["params"],
           "model_state": exp.state.abstract["model_state"]}
  loaded, notes = {}, []
  for term in exp.terms:
    value, note = term.load_aux(model)
    if value is not None:
      loaded[term.name] = value
    if note:
      notes.append(note)
  step_aux = {name: loaded[name] for name in exp.abstract_aux()}
  exp.check_step()
  _writable_workdir(workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
  logger = None
  try:
    data_iter = exp.data.train_iterator()
    restored = ckpt.restore_latest(exp.state.abstract, data_iter, config=_config_dict(config),
                                   log=say)
    if restored is not None:
      state, resumed_from = restored
    else:
      resumed_from = None
      start = next((m for t in exp.terms if (m := t.initial_model(loaded.get(t.name)))), None)
      state = exp.state.init(start) if start is not None else exp.state.init()
    if lead:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    step = int(state["step"])
    end = min(tc.steps, stop_at) if stop_at else tc.steps
    logger = MetricsLogger(workdir, total_steps=tc.steps, start_step=step,
                           progress=tc.progress, enabled=lead, tensorboard=tc.tensorboard)
    summary = _train(exp, state, step, end, data_iter, step_aux, ckpt, logger, config,
                     resumed_from, notes)
  finally:
    ckpt.close()
    if logger is not None:
      logger.close(plot=False)
  if lead and tc.plot:
    from lm.metrics import plot_losses
    plot_losses(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curve.png"))
  return summary


def _train(exp, state, step, end, data_iter, aux, ckpt, logger, config, resumed_from, notes):
  tc = exp.config.train
  n_params = count_params(state["params"])
  n_active = active_param_count(exp.config.model, state["params"])
  mesh_desc = " x ".join(f"{a}={s}" for a, s in exp.mesh.shape.items() if s > 1) or "1 device"
  active = f" ({n_active / 1e6:.2f}M active per token)" if n_active != n_params else ""
  logger.info(f"{exp.config.name}: {n_params / 1e6:.2f}M parameters{active}, mesh {mesh_desc}, "
              f"steps {step} -> {end}"
              + (f" (resumed from step {resumed_from})" if resumed_from is not None else "")
              + "".join(f", {n}" for n in notes))
  pending, last_loss, eval_loss = [], float("nan"), None
  t_start = t_last = time.perf_counter()
  multi = jax.process_count() > 1
  groups = list(exp.optimizer.learning_rates)
  with _Preemption(enabled=not multi) as preempt, jax.set_mesh(exp.mesh):
    while step < end:
      state, metrics = exp.train_step(state, exp.put_batch(next(data_iter)), aux)
      step += 1
      pending.append(metrics)
      stop = preempt.requested or (multi and ckpt.manager.reached_preemption(step))
      if step % tc.log_every == 0 or step == end or step == 1:
        host = jax.device_get(pending)
        now = time.perf_counter()
        tokens = sum(float(m["tokens"]) for m in host)
        last_loss = float(host[-1]["loss"])
        mean = summarize(host)
        record = {"step": step, "loss": last_loss, "loss_avg": mean.pop("loss"),
                  "grad_norm": float(host[-1]["grad_norm"]),
                  "tokens_per_sec": tokens / max(now - t_last, 1e-9),
                  "elapsed_s": now - t_start}
        record.update({k: v for k, v in mean.items() if k not in ("tokens", "grad_norm")})
        for term in exp.terms:
          record.update(term.summarize(record))
        for group, schedule in exp.optimizer.learning_rates.items():
          record[f"learning_rate/{group}"] = float(schedule(step - 1))
        record["learning_rate"] = record[f"learning_rate/{groups[0]}"]
        logger.log(rounded(record))
        pending, t_last = [], time.perf_counter()
      if step % tc.eval_every == 0 or step == tc.steps:
        evals = evaluate(exp, state["params"], state["model_state"], aux=aux)
        eval_loss = evals["eval_loss"]
        logger.log({"step": step, **evals, "elapsed_s": time.perf_counter() - t_start})
        t_last = time.perf_counter()
      if step % tc.checkpoint_every == 0 or step == end or stop:
        ckpt.save(step, state, data_iter, _config_dict(config))
        t_last = time.perf_counter()
      if stop:
        logger.info(f"SIGTERM: saved checkpoint at step {step}; exiting")
        break
  return {"step": step, "loss": last_loss, "eval_loss": eval_loss, "params": n_params,
          "active_params": n_active, "state": state}
