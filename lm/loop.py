"""The Python loop around the jitted steps: resume, feed data, log, evaluate, save.

Nothing here changes what a step computes (``lm.step``); the loop only moves data
and state between the host, the devices and the workdir. Everything that can be
wrong with a config or a workdir is found before anything is written: a run that
stops with a config error leaves the workdir's checkpoints and ``config.json`` as
they were.
"""
import copy
import json
import math
import os
import shutil
import signal
import time

import jax
import ml_collections
import numpy as np

from core.errors import ConfigError
from lm import experiment as experiment_lib
from lm import flops as flops_lib
from lm import runs
from lm.checkpoint import Checkpointer
from lm.metrics import MetricsLogger, rounded, summarize
from lm.model import active_param_count, count_params


def evaluate(exp: experiment_lib.Experiment, params, model_state, n_batches: int | None = None,
             aux: dict | None = None) -> dict:
  """Token-weighted means over the first ``n_batches`` held-out batches of every source
  (default ``train.eval_batches`` each): ``eval_loss`` (cross-entropy, nats per token),
  ``eval_bpb`` (bits per UTF-8 byte of the evaluated text: summed nats / ln 2 / bytes, so
  runs with different tokenizers compare), ``eval_loss_total`` when terms add to it, and
  ``eval_<group>/<stat>`` for the terms' metrics and the layers' statistics averaged over
  blocks (e.g. ``eval_attention/density``). A mixture adds ``eval_loss/<name>`` and
  ``eval_bpb/<name>`` per source."""
  sets = exp.data.eval_sets(n_batches or exp.config.train.eval_batches)
  total, out = None, {}
  with jax.set_mesh(exp.mesh):
    for name, batches in sets.items():
      sums = None
      for batch in batches:
        s = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(
            exp.eval_step(params, model_state, exp.put_batch(batch), aux or {})))
        s["bytes"] = np.float64(_global_bytes(exp, batch))
        sums = s if sums is None else jax.tree.map(np.add, sums, s)
      total = sums if total is None else jax.tree.map(np.add, total, sums)
      if name:
        tokens = max(float(sums["tokens"]), 1.0)
        out[f"eval_loss/{name}"] = float(sums["loss"]) / tokens
        out[f"eval_bpb/{name}"] = _bpb(sums)
  tokens = max(float(total.pop("tokens")), 1.0)
  n_bytes = total.pop("bytes")
  bpb = _bpb({"loss": total["loss"], "bytes": n_bytes})
  record = summarize([jax.tree.map(lambda x: np.asarray(x) / tokens, total)])
  result = {"eval_loss": record.pop("loss"), "eval_bpb": bpb}
  result.update({f"eval_{k}": v for k, v in record.items()
                 if isinstance(v, float) and "/block_" not in k})
  result.update(out)
  return result


def _global_bytes(exp, batch) -> float:
  """The bytes of this process's rows, summed over processes (the loss sums are global)."""
  own = exp.data.bytes_of(batch) if exp.data.token_bytes is not None else 0.0
  if jax.process_count() == 1:
    return own
  from jax.experimental import multihost_utils
  return float(np.sum(multihost_utils.process_allgather(np.float64(own))))


def _bpb(sums) -> float:
  """Bits per byte from summed nats and bytes (nan without bytes: synthetic data)."""
  n_bytes = float(sums["bytes"])
  return float(sums["loss"]) / math.log(2) / n_bytes if n_bytes > 0 else float("nan")


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


class _Profiler:
  """Traces steps ``first..last`` (``train.profile_steps``) with ``jax.profiler`` into
  ``logdir`` (TensorBoard's profile plugin reads it); each traced step is annotated
  (``StepTraceAnnotation`` for xprof's step view, ``kestrel step <n>`` to search for)."""

  def __init__(self, steps: tuple, logdir: str, enabled: bool = True):
    self.first, self.last = steps if steps and enabled else (0, -1)
    self.logdir, self.active = logdir, False

  def annotate(self, step: int):
    """Context of step ``step`` (1-based): starts the trace at ``first``."""
    import contextlib
    if not self.first <= step <= self.last:
      return contextlib.nullcontext()
    if not self.active:
      jax.profiler.start_trace(self.logdir)
      self.active = True
    stack = contextlib.ExitStack()
    stack.enter_context(jax.profiler.StepTraceAnnotation("train", step_num=step))
    stack.enter_context(jax.profiler.TraceAnnotation(f"kestrel step {step}"))
    return stack

  def finish(self, step: int, result, force: bool = False) -> bool:
    """Stops the trace after ``last`` (or when the loop ends); True when it stopped."""
    if self.active and (step >= self.last or force):
      jax.block_until_ready(result)
      jax.profiler.stop_trace()
      self.active = False
      return True
    return False


def apply_xla_flags(flags: str) -> str | None:
  """Adds ``flags`` (``train.xla_flags``) to ``$XLA_FLAGS`` if JAX has not started its
  backends yet; returns a note when they cannot apply any more (None when applied)."""
  missing = [f for f in flags.split() if f.startswith("--xla_")  # the rest: a config error
             and f not in os.environ.get("XLA_FLAGS", "").split()]
  if not missing:
    return None
  try:
    from jax._src import xla_bridge
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # another JAX: do not guess, say so
    started = True
  if started:
    return (f"train.xla_flags not applied ({' '.join(missing)}): JAX already started; set "
            "XLA_FLAGS before the first JAX computation (or run experiments.train)")
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + missing).strip()
  return None


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


TOKENIZER_KEY = "_tokenizer"  # in each checkpoint's config item: {"name", "sha256"}


def _saved_config(config, exp) -> dict:
  """The config item of each checkpoint: the config plus the tokenizer's name and hash."""
  tok = exp.data.tokenizer
  out = _config_dict(config)
  if tok is not None:
    out[TOKENIZER_KEY] = {"name": tok.name, "sha256": tok.sha256}
  return out


def _check_tokenizer(ckpt: Checkpointer, saved_config: dict, spec: str) -> None:
  """ConfigError when the newest checkpoint was written with another tokenizer."""
  step = ckpt.latest_step()
  if step is None:
    return
  try:
    old = ckpt.saved_config(step).get(TOKENIZER_KEY)
  except Exception:  # noqa: BLE001 - a damaged checkpoint: restore_latest deals with it
    return
  new = saved_config.get(TOKENIZER_KEY)
  if old and new and old["sha256"] != new["sha256"]:
    raise ConfigError("data.tokenizer", spec, f"is not the tokenizer the checkpoint (step "
                      f"{step}) was trained with ({old['name']}, sha256 {old['sha256'][:12]})",
                      "resume with the tokenizer saved in the workdir (tokenizer.json or "
                      ".model there), or start a new --workdir")


def _copy_tokenizer(tokenizer, workdir: str) -> None:
  """Keeps the run's tokenizer file in its workdir (evaluation and generation read it)."""
  if tokenizer is None or tokenizer.path is None:
    return
  from lm.data.tokenizers import file_sha256
  target = os.path.join(workdir, "tokenizer" + os.path.splitext(tokenizer.path)[1])
  if not os.path.exists(target) or file_sha256(target) != tokenizer.sha256:
    shutil.copyfile(tokenizer.path, target + ".tmp")
    os.replace(target + ".tmp", target)


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
  flags_note = apply_xla_flags(config.train.get("xla_flags", ""))
  exp = experiment_lib.build(config, devices=devices)
  tc = exp.config.train
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  model = {"params": exp.state.abstract["params"],
           "model_state": exp.state.abstract["model_state"]}
  loaded, notes = runs.load_aux(exp)
  if flags_note:
    notes.append(flags_note)
  step_aux = {name: loaded[name] for name in exp.abstract_aux()}
  exp.check_step()
  if tc.init_from and not os.path.isdir(os.path.join(tc.init_from, "checkpoints")):
    raise ConfigError("train.init_from", tc.init_from, "has no checkpoints/ folder (not a "
                      "trained run)", "pass the workdir of a trained run with the same "
                      "model, or leave train.init_from empty")
  _writable_workdir(workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
  logger = None
  try:
    saved_config = _saved_config(config, exp)
    _check_tokenizer(ckpt, saved_config, exp.config.data.tokenizer)
    # Batches are a pure function of the step: the data resume from the restored step
    # (the iterator state saved beside each checkpoint is not needed to restore).
    restored = ckpt.restore_latest(exp.state.abstract, config=saved_config, log=say)
    if restored is not None:
      state, resumed_from = restored
    else:
      resumed_from = None
      start = exp.initial_model(loaded)
      if start is None and tc.init_from:
        start, from_step = runs.latest_model(tc.init_from, model, flag="train.init_from")
        notes.append(f"started from {tc.init_from} (step {from_step})")
      state = exp.state.init(start) if start is not None else exp.state.init()
    if lead:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
      _copy_tokenizer(exp.data.tokenizer, workdir)
    step = int(state["step"])
    data_iter = exp.data.train_iterator(step)
    end = min(tc.steps, stop_at) if stop_at else tc.steps
    logger = MetricsLogger(workdir, total_steps=tc.steps, start_step=step,
                           progress=tc.progress, enabled=lead, tensorboard=tc.tensorboard)
    summary = _train(exp, state, step, end, data_iter, step_aux, ckpt, logger, saved_config,
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
  n_params = count_params(exp.model.params)
  n_active = active_param_count(exp.config.model, exp.model.params)
  n_trained = count_params(state["params"])
  mesh_desc = " x ".join(f"{a}={s}" for a, s in exp.mesh.shape.items() if s > 1) or "1 device"
  active = f" ({n_active / 1e6:.2f}M active per token)" if n_active != n_params else ""
  if n_trained != n_params:  # a hook trains something else (LoRA's adapters)
    active += f", {n_trained / 1e6:.3f}M trained"
  logger.info(f"{exp.config.name}: {n_params / 1e6:.2f}M parameters{active}, mesh {mesh_desc}, "
              f"steps {step} -> {end}"
              + (f" (resumed from step {resumed_from})" if resumed_from is not None else "")
              + "".join(f", {n}" for n in notes))
  pending, last_loss, eval_loss = [], float("nan"), None
  t_start = t_last = time.perf_counter()
  multi = jax.process_count() > 1
  groups = list(exp.optimizer.learning_rates)
  c = exp.config
  peak = flops_lib.device_peak_tflops(tc.peak_tflops, list(exp.mesh.devices.flat))
  profiler = _Profiler(tc.profile_steps, os.path.join(logger.workdir, "tensorboard"),
                       enabled=jax.process_index() == 0)
  with _Preemption(enabled=not multi) as preempt, jax.set_mesh(exp.mesh):
    try:
      while step < end:
        with profiler.annotate(step + 1):
          state, metrics = exp.train_step(state, exp.put_batch(next(data_iter)), aux)
        step += 1
        if profiler.finish(step, state):
          logger.info(f"profiled steps {tc.profile_steps[0]}-{step} into "
                      f"{profiler.logdir} (TensorBoard's profile tab)")
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
          step_flops = flops_lib.train_flops(c.model, c.data.batch_size, c.data.seq_len,
                                             density=mean.get("attention/density"))
          record.update(flops_lib.utilisation(step_flops * len(host), now - t_last,
                                              exp.mesh.size, peak))
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
          ckpt.save(step, state, data_iter, config)
          t_last = time.perf_counter()
        if stop:
          logger.info(f"SIGTERM: saved checkpoint at step {step}; exiting")
          break
    finally:
      profiler.finish(step, state, force=True)
  return {"step": step, "loss": last_loss, "eval_loss": eval_loss, "params": n_params,
          "active_params": n_active, "trained_params": n_trained, "state": state}
