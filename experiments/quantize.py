"""Write a quantized checkpoint of a trained run:

  python -m experiments.quantize --workdir=W --out=Q [--config.quant.weight=int4]
      [--config.quant.group_size=128] [--config.quant.targets=...] [--json]

Reads ``W``'s newest weights (``lm.runs``) and writes ``Q`` as a run that
``experiments.evaluate`` and ``experiments.generate`` read like any other:
``config.json`` (``W``'s, with ``quant.weight=none``: the stored weights are already
quantized; ``quant.act`` kept), the tokenizer copy, ``quantized.npz`` (per targeted
matrix its integers, int4 packed two per byte, and fp32 scales; everything else as
it was) and ``quantized.json`` (how, per matrix). The weight type defaults to the
run's ``quant.weight``, else int8. Reports the bytes of the weights before and after,
and of int4 as qwix holds it in memory (one byte per value, qwix issue 328).
Evaluating ``Q`` gives what evaluating ``W`` with the same ``--config.quant.*`` gives.
``Q`` must not exist or be empty; nothing is written on a bad input.
"""
import copy
import os

import jax

from experiments import cli


def quantize(workdir: str, out: str, overrides: dict | None = None) -> dict:
  """Writes the quantized checkpoint ``out`` of ``workdir`` (module docstring); returns
  {"out", "step", "weight", "group_size", "bytes_before", "bytes_after",
  "bytes_unpacked"}."""
  from lm import quant, runs
  overrides = dict(overrides or {})
  cli.check_new_folder(out, "quantize")
  config = runs.load_config(workdir, overrides)
  if config.quant.weight == "none":
    config.quant.weight = "int8"
  weights = runs.load_weights(workdir, {**overrides, "quant.weight": "none",
                                        "quant.act": "none"})
  from lm import config as config_lib
  typed = config_lib.resolve(config)
  from lm.model import build_model
  axes = build_model(typed.model, typed.seed, abstract=True).axes["params"]
  quant.check_shapes(typed.quant, weights.params, axes)
  arrays, manifest = quant.store(weights.params, axes, typed.quant)
  manifest["step"] = int(weights.step)
  manifest["source"] = os.path.abspath(workdir)
  before = quant.weight_bytes(weights.params, axes)
  after = quant.weight_bytes(weights.params, axes, typed.quant)
  unpacked = quant.weight_bytes(weights.params, axes, typed.quant, packed=False)
  manifest["bytes"] = {"before": before, "after": after, "unpacked": unpacked}
  saved = copy.deepcopy(config)
  saved.quant.weight, saved.quant.mode = "none", "ptq"  # stored quantized: read back as is
  cli.start_run_folder(workdir, out, saved)
  quant.write_stored(out, arrays, manifest, jax.device_get(weights.model_state))
  return {"out": out, "step": int(weights.step), "weight": typed.quant.weight,
          "group_size": typed.quant.group_size, "bytes_before": before, "bytes_after": after,
          "bytes_unpacked": unpacked}


def describe(r: dict) -> str:
  how = f"group {r['group_size']}" if r["group_size"] else "per channel"
  return (f"{r['out']}: step {r['step']}, weights {r['weight']} {how}: "
          f"{r['bytes_before'] / 1e6:.3f} MB -> {r['bytes_after'] / 1e6:.3f} MB "
          f"({r['bytes_before'] / r['bytes_after']:.2f}x smaller; int4 held one byte "
          f"per value in memory: {r['bytes_unpacked'] / 1e6:.3f} MB)")


if __name__ == "__main__":
  cli.run_export(quantize, describe, "quantized")
