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
import contextlib
import dataclasses
import json
import os
import shutil
import sys

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
  if not out:
    raise ConfigError("--out", out, "missing", "pass --out=<a new folder>")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConfigError("--out", out, "exists and is not an empty folder",
                      "pass a new folder (prune never writes over a run)")
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
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "config.json.tmp"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(os.path.join(out, "config.json.tmp"), os.path.join(out, "config.json"))
  for name in os.listdir(workdir):
    if name.startswith("tokenizer."):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(out, name))
  ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=1)
  try:
    ckpt.save_model(weights.step, {"params": params, "model_state": weights.model_state},
                    json.loads(config.to_json_best_effort()))
  finally:
    ckpt.close()
  report = prune_lib.sparsity_report(params, built.axes["params"], typed.prune.targets)
  return {"out": out, "step": int(weights.step), "sparsity": report}


def _main() -> None:
  from absl import flags
  workdir = flags.DEFINE_string("workdir", None, "A trained run's workdir.")
  out = flags.DEFINE_string("out", None, "The new folder for the pruned run.")
  as_json = flags.DEFINE_bool("json", False, "Print one JSON object on stdout.")

  def main(overrides, spec):
    del spec
    if not workdir.value:
      raise ConfigError("--workdir", None, "missing", "pass --workdir=<a trained run>")
    with contextlib.redirect_stdout(sys.stderr) if as_json.value else contextlib.nullcontext():
      r = prune(workdir.value, out.value, overrides)
    if as_json.value:
      print(json.dumps(r))
    else:
      print(f"{r['out']}: step {r['step']}, sparsity {r['sparsity']['all']:.4f} over the "
            "pruned matrices")

  cli.run_workdir(main)


if __name__ == "__main__":
  _main()
