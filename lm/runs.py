"""A trained run, read back from its workdir: its config, tokenizer and weights.

``experiments.evaluate`` and ``experiments.generate`` (and speculative drafts that
are other runs) start here. A workdir written by ``lm.loop.run`` holds
``config.json``, ``checkpoints/<step>/`` and, for file tokenizers, a copy of the
tokenizer; nothing else is needed.

The config is rebuilt on top of ``experiments/configs/base.py``'s defaults (which
hold every field), so runs written before a field existed still load; command-line
overrides (``--config.a.b=v``) are applied last, which is how the same weights are
evaluated under another attention implementation or sparse mask.

Quantization (``lm.quant``) applies when a run is read back: a ``quant`` group with a
weight or activation type (saved, or given as overrides) runs the weights quantized
(post-training quantization; the forward is the one QAT trains, ``quant.mode`` is set
to ``qat`` here). A quantized checkpoint (``experiments.quantize``: ``quantized.npz``
and ``quantized.json`` in place of ``checkpoints/``) is read back dequantized.
"""
import dataclasses
import os

import jax
import ml_collections

from core.errors import ConfigError
from lm import checkpoint
from lm import config as config_lib

def load_config(workdir: str, overrides: dict | None = None,
                flag: str = "--workdir") -> ml_collections.ConfigDict:
  """The run's config (``config.json`` over the base defaults), then ``overrides``
  (``lm.config.load_run_config``)."""
  return config_lib.load_run_config(workdir, overrides, flag)


def latest_model(workdir: str, abstract_model: dict, flag: str = "--workdir"):
  """({"params", "model_state"}, step) of the newest checkpoint of ``workdir`` (or its
  quantized checkpoint, dequantized), restored onto ``abstract_model``'s shardings; the
  saved trees must match it."""
  from lm import quant
  if quant.is_stored(workdir):
    return _stored_model(workdir, abstract_model, flag)
  lora_run = _lora_config(workdir, flag)
  if lora_run is not None:  # adapters only: merged onto their base (lm.lora)
    return read_merged(workdir, lora_run, abstract_model, flag)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise ConfigError(flag, workdir, "has no checkpoints/ folder (not trained yet?)",
                      "train it first with experiments.train, or pass another workdir")
  try:
    return checkpoint.restore_model(directory, abstract_model)
  except checkpoint.NoCheckpoint:
    raise ConfigError(flag, workdir, "holds no checkpoint",
                      "train it first (experiments.train), or pass another workdir") from None
  except checkpoint.OtherTree as e:
    step, diff = e.args
    raise ConfigError(flag, workdir, f"its checkpoint (step {step}) does not fit the "
                      f"config: {diff}", "override only fields that keep the weights' "
                      "shapes (attention_impl, sparse, dtype, ...)") from None


def read_merged(workdir: str, typed, abstract_model: dict, flag: str):
  """({"params", "model_state"}, step) of LoRA run ``workdir`` (typed config ``typed``,
  ``lora`` on) merged: its adapters (newest checkpoint) onto its base (read by
  ``latest_model``, so a LoRA run on a LoRA run merges both; QLoRA: the quantized base
  the adapters were trained on). ``abstract_model`` is the full model's."""
  from lm import lora, sharding
  from lm.model import build_model
  built = build_model(typed.model, typed.seed, abstract=True)
  hook = lora.Lora(typed.lora, built, typed.seed)
  adapters = sharding.abstract_like(hook.adapter_abstract, hook.adapter_axes, abstract_model)
  directory = os.path.join(workdir, "checkpoints")
  try:
    saved, step = checkpoint.restore_model(directory, {"params": adapters, "model_state":
                                                       abstract_model["model_state"]})
  except checkpoint.NoCheckpoint:
    raise ConfigError(flag, workdir, "holds no checkpoint",
                      "train it first (experiments.train), or pass another workdir") from None
  except checkpoint.OtherTree as e:
    raise ConfigError(flag, workdir, f"its adapters (step {e.args[0]}) do not fit its "
                      f"config: {e.args[1]}", "pass the LoRA run as it was trained") from None
  base, _ = latest_model(typed.lora.init_from, abstract_model, flag=f"{flag} (lora.init_from)")
  shardings = jax.tree.map(lambda s: s.sharding, abstract_model["params"])

  def merged(base_params, adapter_params):
    if typed.lora.base_quant != "none":
      base_params = hook.base({"params": hook.quantize(base_params)})
    return hook.merge(base_params, adapter_params)
  params = jax.jit(merged, out_shardings=shardings)(base["params"], saved["params"])
  return {"params": params, "model_state": saved["model_state"]}, step


def load_aux(exp) -> tuple[dict, list]:
  """(aux, notes) of experiment ``exp``'s hooks and terms (a LoRA base, a DPO reference),
  with ``latest_model`` as their reader of other runs."""
  return exp.load_aux(lambda workdir, abstract, flag: latest_model(workdir, abstract, flag))


def _lora_config(workdir: str, flag: str):
  """The typed config of ``workdir`` when it is a LoRA run (adapters on a base), else None."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  import json
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None
  if not (saved.get("lora") or {}).get("init_from"):
    return None
  return config_lib.resolve(config_lib.load_run_config(workdir, flag=flag, merged=False))


def _stored_model(workdir: str, abstract_model: dict, flag: str):
  from lm import quant
  from lm.model import is_scanned, scan_tree, unscan_tree
  params, state, manifest = quant.read_stored(workdir)
  model = {"params": params, "model_state": state}
  want = abstract_model["params"]
  if is_scanned(params) and not is_scanned(want):
    model = unscan_tree(model, len(params["blocks"]))
  elif is_scanned(want) and not is_scanned(params):
    model = scan_tree(model, len(want["blocks"]))
  diff = checkpoint.tree_difference(model, {k: abstract_model[k] for k in model})
  if diff is not None:
    raise ConfigError(flag, workdir, f"its quantized checkpoint does not fit the config: "
                      f"{diff}", "override only fields that keep the weights' shapes")
  shardings = jax.tree.map(lambda a: a.sharding, abstract_model)
  return jax.device_put(model, shardings), manifest.get("step", 0)


@dataclasses.dataclass
class Run:
  """A trained run ready to evaluate: its experiment (data, eval step) and weights."""
  workdir: str
  config: ml_collections.ConfigDict
  experiment: object  # lm.experiment.Experiment (mesh, data, model, steps)
  params: dict
  model_state: dict
  step: int


def load(workdir: str, overrides: dict | None = None, *, devices=None,
         flag: str = "--workdir") -> Run:
  """Builds the run's experiment (mesh over ``devices``) and restores its newest
  weights. Raises ``ConfigError`` for a missing or incompatible workdir."""
  from lm import experiment as experiment_lib
  config = load_config(workdir, overrides, flag)
  exp = experiment_lib.build(config, devices=devices)
  abstract = {"params": exp.state.abstract["params"],
              "model_state": exp.state.abstract["model_state"]}
  model, step = latest_model(workdir, abstract, flag)
  return Run(workdir, config, exp, model["params"], model["model_state"], step)


@dataclasses.dataclass
class Weights:
  """A trained model without its data pipeline: what decoding needs."""
  workdir: str
  config: object  # the typed ExperimentConfig
  mesh: object
  tokenizer: object  # None for synthetic tasks
  params: dict
  model_state: dict
  step: int


def load_weights(workdir: str, overrides: dict | None = None, *, devices=None,
                 flag: str = "--workdir") -> Weights:
  """The run's typed config, tokenizer and newest weights, placed on a mesh over
  ``devices`` by the rules table (the data are not built); layers unrolled
  (``model.scan_layers`` off, a scanned run's weights converted)."""
  from lm import sharding
  from lm.data import tokenizers
  from lm.model import build_model
  typed = config_lib.resolve(load_config(workdir, overrides, flag))
  # Decoding runs the unrolled layout: a scanned run's weights are converted on restore.
  typed = dataclasses.replace(typed, model=dataclasses.replace(typed.model, scan_layers=False))
  from lm import quant
  if not os.path.isdir(os.path.join(workdir, "checkpoints")) and not quant.is_stored(workdir):
    raise ConfigError(flag, workdir, "has no checkpoints/ folder (not trained yet?)",
                      "train it first with experiments.train, or pass another workdir")
  tokenizer = None if typed.data.source == "synthetic" else tokenizers.load(typed.data.tokenizer)
  if not typed.model.vocab_size:
    raise ConfigError(flag, workdir, "config.json has no resolved model.vocab_size",
                      "re-save the run with this version (train for one more step)")
  mesh = sharding.make_mesh(typed.mesh, devices)
  built = build_model(typed.model, typed.seed, abstract=True)
  specs = {"params": sharding.tree_specs(built.axes["params"], built.params, mesh),
           "model_state": sharding.tree_specs(built.axes["state"], built.state, mesh)}
  shardings = sharding.named(mesh, specs)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          {"params": built.params, "model_state": built.state}, shardings)
  model, step = latest_model(workdir, abstract, flag)
  params = model["params"]
  if typed.quant.weight != "none":  # post-training quantization, once (lm.quant)
    from lm import quant
    quant.check_shapes(typed.quant, params, built.axes["params"])
    params = jax.jit(lambda p: quant.quantize_params(p, built.axes["params"], typed.quant))(
        params)
  return Weights(workdir, typed, mesh, tokenizer, params, model["model_state"], step)
