"""Merge a LoRA run's adapters into its base and write a plain run:

  python -m experiments.export --workdir=W --out=M [--json]

``W`` is a run trained with the ``lora`` group (adapters on ``lora.init_from``); ``M``
gets one checkpoint (``checkpoints/<step>``, the format training writes) of the merged
weights W + (alpha / rank) A B (QLoRA: the quantized base the adapters were trained on,
dequantized, plus the adapters), ``W``'s ``config.json`` with ``lora`` off, and the
tokenizer copy: evaluate, generate and ``train.init_from`` read it like any other run.
``M`` must not exist or be empty; nothing is written on a bad input.
"""
import json
import os

from core.errors import ConfigError
from experiments import cli


def export(workdir: str, out: str, overrides: dict | None = None) -> dict:
  """Writes the merged run ``out``; returns {"out", "step", "adapter_bytes", "bytes"}."""

  from lm import config as config_lib
  from lm import lora, runs
  from lm.checkpoint import Checkpointer
  cli.check_new_folder(out, "export")
  raw = config_lib.load_run_config(workdir, overrides, merged=False)
  if not raw.lora.init_from:
    raise ConfigError("--workdir", workdir, "is not a LoRA run (its lora.init_from is "
                      "empty): there are no adapters to merge", "pass the workdir of a run "
                      "trained with --config.lora.init_from=<base>")
  typed = config_lib.resolve(raw)
  config = runs.load_config(workdir, overrides)  # lora cleared: the merged model's config
  weights = runs.load_weights(workdir, overrides)
  cli.start_run_folder(workdir, out, config)
  ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=1)
  try:
    ckpt.save_model(weights.step, {"params": weights.params,
                                   "model_state": weights.model_state},
                    json.loads(config.to_json_best_effort()))
  finally:
    ckpt.close()
  from lm.model import build_model
  built = build_model(typed.model, typed.seed, abstract=True)
  adapters, _ = lora.adapter_shapes(built.params, built.axes["params"], typed.lora)
  return {"out": out, "step": int(weights.step), "adapter_bytes": lora.tree_bytes(adapters),
          "bytes": lora.tree_bytes(weights.params)}


def describe(r: dict) -> str:
  return (f"{r['out']}: step {r['step']}, merged {r['adapter_bytes'] / 1e6:.2f} MB of "
          f"adapters into {r['bytes'] / 1e6:.2f} MB of weights")


if __name__ == "__main__":
  cli.run_export(export, describe, "merged")
