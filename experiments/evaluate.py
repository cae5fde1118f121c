"""Evaluate a trained run on its held-out data:

  python -m experiments.evaluate --workdir=W [--eval_batches=N] [--json] [--config.a.b=v ...]

Restores the newest checkpoint of ``W`` under the run's own ``config.json``
(``lm.runs.load``) and evaluates it with the training loop's eval loop
(``lm.loop.evaluate``), so the numbers are the ones the run logged: the step, the
held-out cross-entropy (nats per token), its perplexity, bits per byte (None for
synthetic tasks, which have no text), per-source loss and bits per byte for a
mixture, the layers' eval statistics (e.g. ``eval_attention/density``), and for
synthetic tasks (``data.source=synthetic``) the exact-match accuracy (the share
of examples whose every supervised target is the argmax prediction) beside the
loop's per-token ``eval_accuracy``.

``--config.a.b=v`` overrides fields of the saved config, e.g. the same weights
under another attention implementation (``--config.model.attention_impl=jax_nn``;
``blocked`` runs hierarchical attention only, ``model.hierarchical.block`` > 0)
or a predicted sparse mask (``--config.model.sparse.enabled=True``); an override
that changes the weights' shapes is refused. The reported loss is the model's plain
cross-entropy: loss terms that read inputs from outside the run (a distillation
teacher, ``distill.teacher``) are turned off for evaluation.

Quantization and sparsity: ``--config.quant.weight=int8|int4|fp8`` (with
``quant.group_size``, ``quant.act=int8``, ``quant.targets``) evaluates the weights
quantized after training (``lm.quant``); a quantized checkpoint (``experiments.quantize``)
is read as it was stored. The result says how (``quant``), the weights' bytes as stored
that way (``weight_bytes``) and the share of exact zeros of the weight matrices
(``sparsity``, and per matrix in ``sparsity_per_matrix``: a pruned run's realised
sparsity).

``--json`` prints one JSON object on stdout and nothing else (notes go to stderr).
Bad input (missing workdir, no checkpoint, unknown field, a shape-changing
override) stops with one line ``error: ...``, exit status 2.
"""
import contextlib
import json
import math
import sys

import jax
import jax.numpy as jnp

from core.errors import ConfigError, Unsupported
from experiments import cli

# Fields set for evaluation: the terms that read inputs from outside the run are off
# (the teacher of distillation), so only the run's own weights are needed.
EVAL_OVERRIDES = {"distill.teacher": ""}


def answer_sums(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> dict:
  """Counts for exact match over the supervised targets (``weights > 0``): ``exact``
  (rows with supervised targets, all of them the argmax prediction) and ``examples``
  (rows with supervised targets). int32 scalars. The per-token share is the eval
  loop's ``eval_accuracy`` (``lm.losses.cross_entropy.accuracy``)."""
  supervised_BT = weights_BT > 0
  correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
  has_answer_B = jnp.any(supervised_BT, axis=-1)
  exact_B = jnp.all(correct_BT | ~supervised_BT, axis=-1) & has_answer_B
  count = lambda x: jnp.sum(x, dtype=jnp.int32)
  return {"exact": count(exact_B), "examples": count(has_answer_B)}


def accuracy(exp, params, model_state, n_batches: int) -> dict:
  """``exact_match`` of the argmax predictions over the first ``n_batches`` held-out
  batches of every source (the batches ``lm.loop.evaluate`` reads), and ``examples``:
  how many examples they cover."""
  from lm import hooks, sharding
  from lm.model import apply
  from lm.state import replicated
  graphdef, mesh = exp.model.graphdef, exp.mesh

  def step(params, model_state, batch):
    with sharding.placed(mesh):
      logits_BTV, _, _ = apply(graphdef, hooks.forward(exp.hooks, params), model_state,
                               batch["inputs"])
    return answer_sums(logits_BTV, batch["targets"], batch["weights"])

  shardings = exp.state.shardings
  step = jax.jit(step, in_shardings=(shardings["params"], shardings["model_state"],
                                     exp.batch_sharding), out_shardings=replicated(mesh))
  total = {"exact": 0, "examples": 0}
  with jax.set_mesh(mesh):
    for batch in exp.data.eval_batches(n_batches):
      sums = jax.device_get(step(params, model_state, exp.put_batch(batch)))
      total = {k: total[k] + int(sums[k]) for k in total}
  return {"exact_match": total["exact"] / max(total["examples"], 1),
          "examples": total["examples"]}


def _finite_or_none(value):
  return None if isinstance(value, float) and not math.isfinite(value) else value


def evaluate(workdir: str, overrides: dict | None = None, eval_batches: int | None = None,
             *, devices=None) -> dict:
  """The held-out metrics of ``workdir``'s newest checkpoint (see the module docstring):
  ``workdir``, ``step``, ``eval_batches``, ``eval_loss``, ``perplexity``, ``eval_bpb``
  (None without bytes), the other ``eval_*`` entries of ``lm.loop.evaluate``, and
  for synthetic tasks ``exact_match`` and ``examples``."""
  from lm import loop, runs
  if eval_batches is not None and eval_batches < 1:
    raise ConfigError("--eval_batches", eval_batches, "must be >= 1",
                      "pass a positive number of held-out batches per source")
  run = runs.load(workdir, {**(overrides or {}), **EVAL_OVERRIDES}, devices=devices)
  exp = run.experiment
  needs = sorted(exp.abstract_aux())
  if needs:  # a loss term this file does not know to turn off
    raise ConfigError("losses", needs, "need inputs from outside the run to evaluate",
                      "turn these terms off with --config overrides")
  n = eval_batches or exp.config.train.eval_batches
  try:
    metrics = loop.evaluate(exp, run.params, run.model_state, n)
  except Unsupported:
    exp.check_step()  # names the implementation field that refuses this config
    raise
  out = {"workdir": workdir, "step": int(run.step), "eval_batches": n,
         "eval_loss": metrics.pop("eval_loss")}
  out["perplexity"] = math.exp(min(out["eval_loss"], 700.0))  # no OverflowError
  out["eval_bpb"] = metrics.pop("eval_bpb")
  out.update(metrics)
  if exp.config.data.source == "synthetic":
    out.update(accuracy(exp, run.params, run.model_state, n))
  out.update(_weights(exp, run))
  return {k: _finite_or_none(v) if not isinstance(v, dict) else v for k, v in out.items()}


def _weights(exp, run) -> dict:
  """How the weights are held: ``quant`` (the read-back quantization, or the stored
  one of a quantized checkpoint), ``weight_bytes`` as stored that way, and
  ``sparsity``: the share of exact zeros per matrix (``lm.prune.sparsity_report``)."""
  import json
  import os
  from lm import prune, quant
  axes = exp.model.axes["params"]
  q = exp.config.quant
  how = {"weight": q.weight, "act": q.act, "group_size": q.group_size}
  manifest = os.path.join(run.workdir, quant.MANIFEST)
  nbytes = quant.weight_bytes(run.params, axes, q)
  if os.path.isfile(manifest):
    with open(manifest) as f:
      stored = json.load(f)
    how.update(weight=stored["weight"], group_size=stored["group_size"], stored=True)
    nbytes = stored["bytes"]["after"]
  from lm import hooks
  seen = jax.jit(lambda p: hooks.forward(exp.hooks, p))(run.params)  # as the forward sees them
  report = prune.sparsity_report(seen, axes)
  return {"quant": how, "weight_bytes": nbytes, "sparsity": report["all"],
          "sparsity_per_matrix": {k: v for k, v in report.items() if k != "all"}}


def report(result: dict) -> str:
  """``evaluate``'s result as text, one metric per line."""
  lines = [f"{result['workdir']}: step {result['step']}, {result['eval_batches']} held-out "
           "batches per source",
           f"eval_loss       {result['eval_loss']:.4f} nats/token",
           f"perplexity      {result['perplexity']:.3f}"]
  if result["eval_bpb"] is not None:
    lines.append(f"eval_bpb        {result['eval_bpb']:.4f} bits/byte")
  for key, value in result.items():
    if key.startswith("eval_loss/"):
      name = key.split("/", 1)[1]
      bpb = result.get(f"eval_bpb/{name}")
      lines.append(f"  {name}: eval_loss {value:.4f}" +
                   (f", eval_bpb {bpb:.4f}" if bpb is not None else ""))
  if "exact_match" in result:
    lines.append(f"exact_match     {result['exact_match']:.4f} ({result['examples']} examples)")
    lines.append(f"eval_accuracy   {result['eval_accuracy']:.4f} (per supervised token)")
  q = result["quant"]
  if q["weight"] != "none" or q["act"] != "none":
    group = f"group {q['group_size']}" if q["group_size"] else "per channel"
    lines.append(f"quantized       weights {q['weight']} ({group}), activations {q['act']}"
                 + (" (stored)" if q.get("stored") else ""))
  lines.append(f"weight_bytes    {result['weight_bytes'] / 1e6:.3f} MB")
  if result["sparsity"]:
    per = result["sparsity_per_matrix"].values()
    lines.append(f"sparsity        {result['sparsity']:.4f} of the matrices' weights are zero "
                 f"(per matrix {min(per):.4f} to {max(per):.4f})"
                 + ("; quantization rounds small weights to zero too"
                    if q["weight"] != "none" else ""))
  for key, value in result.items():  # the layers' statistics
    if key.startswith("eval_") and key not in ("eval_loss", "eval_bpb", "eval_batches") \
        and not key.startswith(("eval_loss/", "eval_bpb/")) and value is not None:
      lines.append(f"{key:<15} {value:.4f}")
  return "\n".join(lines)


def _define_flags():
  """The flags, defined when this file runs as a program: importing it (tests, notebooks)
  registers none, so it sits beside experiments.train and .generate (--workdir too)."""
  from absl import flags
  return (flags.DEFINE_string("workdir", None, "A trained run's workdir."),
          flags.DEFINE_integer("eval_batches", None, "Held-out batches per source "
                               "(default: the run's train.eval_batches)."),
          flags.DEFINE_bool("json", False, "Print one JSON object (and nothing else) on stdout."))


def _main() -> None:
  workdir, eval_batches, as_json = _define_flags()

  def main(overrides, spec):
    del spec
    if not workdir.value:
      raise ConfigError("--workdir", None, "missing", "pass --workdir=<a trained run>")
    # --json: stdout carries the one object; notes (e.g. config fields this version
    # lacks) go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if as_json.value else contextlib.nullcontext():
      result = evaluate(workdir.value, overrides, eval_batches.value)
    print(json.dumps(result) if as_json.value else report(result))

  cli.run_workdir(main)


if __name__ == "__main__":
  _main()
