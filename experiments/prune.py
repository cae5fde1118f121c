"""Prune a trained run once and write the pruned run:

  python -m experiments.prune --workdir=W --out=P --config.prune.method=nm
      [--config.prune.n=2 --config.prune.m=4] [--config.prune.sparsity=0.5]
      [--config.prune.targets=...] [--json]

Reads ``W``'s newest weights (``lm.runs``), applies ``lm.prune``'s masks (magnitude
per matrix, or n:m along the input dimension) and writes ``P`` as a run with one
checkpoint (``checkpoints/<step>``, the same format training writes), ``W``'s
``config.json`` with the ``prune`` group and the tokenizer copy: evaluate and
generate read it, and ``--config.train.init_from=P`` fine-tunes it (keep the same
``prune`` group so the masks hold during the fine-tune). Prints the realised sparsity.
``P`` must not exist or be empty; nothing is written on a bad input.
"""
import dataclasses
import json
import os

import jax

from core.errors import ConfigError
from experiments import cli


def prune(workdir: str, out: str, overrides: dict | None = None) -> dict:
  """Writes the pruned run ``out`` (module docstring); returns {"out", "step",
  "sparsity": lm.prune.sparsity_report}."""
  from lm import config as config_lib
  from lm import prune as prune_lib
  from lm import runs
  from lm.checkpoint import Checkpointer
  from lm.model import build_model
  cli.check_new_folder(out, "prune")
  config = runs.load_config(workdir, overrides)
  if config.prune.method == "none":
    raise ConfigError("prune.method", "none", "nothing to prune",
                      "pass --config.prune.method=magnitude or nm")
  typed = config_lib.resolve(config)
  built = build_model(typed.model, typed.seed, abstract=True)
  hook = prune_lib.Prune(dataclasses.replace(typed.prune, schedule="oneshot", begin=0),
                        built.axes["params"])  # a gradual schedule is for training
  weights = runs.load_weights(workdir, overrides)
  params = jax.jit(lambda p: hook.init(p)[0])(weights.params)
  cli.start_run_folder(workdir, out, config)
  ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=1)
  try:
    ckpt.save_model(weights.step, {"params": params, "model_state": weights.model_state},
                    json.loads(config.to_json_best_effort()))
  finally:
    ckpt.close()
  report = prune_lib.sparsity_report(params, built.axes["params"], typed.prune.targets)
  return {"out": out, "step": int(weights.step), "sparsity": report}


def describe(r: dict) -> str:
  return (f"{r['out']}: step {r['step']}, sparsity {r['sparsity']['all']:.4f} over the "
          "pruned matrices")


if __name__ == "__main__":
  cli.run_export(prune, describe, "pruned")
