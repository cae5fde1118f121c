"""Checkpoints: model, optimizer state, step, RNG, data iterator and config together.

Built on orbax's ``CheckpointManager``: each step is written into a temporary
directory and renamed into place only when complete (orbax's atomic commit), so
a crash or kill mid-save leaves the previous checkpoint intact.
"""
import glob
import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from lm.errors import ConfigError

# Config fields that determine the structure and shapes of what is saved: a
# checkpoint from a config that differs in any of them cannot be resumed. Fields
# that only change how the same state is computed (attention_impl, remat, the
# compute dtype, learning rates) may change between runs.
ARCH_FIELDS = tuple(f"model.{f}" for f in (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
    "tie_embeddings", "param_dtype", "moe.num_experts", "moe.every", "moe.d_ff",
    "moe.num_shared", "layer_pattern", "linear.variant")) + ("optimizer.name",
                                                               "optimizer.freeze_axes")
# Fields added after checkpoints existed: a checkpoint without them had this value.
_ARCH_DEFAULTS = {"model.moe.num_experts": 0, "model.layer_pattern": "S"}


def _get(d: dict, dotted: str):
  for part in dotted.split("."):
    d = d[part] if isinstance(d, dict) and part in d else None
  return d


def arch_difference(saved: dict, config: ml_collections.ConfigDict,
                    fields=ARCH_FIELDS) -> tuple[str, object, object] | None:
  """The first of ``fields`` whose value in a saved config (a JSON dict) differs from
  ``config``'s, as (field, saved value, current value); None when they agree."""
  current = json.loads(config.to_json_best_effort())
  for field in fields:
    old, new = _get(saved, field), _get(current, field)
    if old is None:
      # A field added after the checkpoint was written: it had the default
      # (dense softmax layers); fields that only matter beside those are moot.
      old = _ARCH_DEFAULTS.get(field, new)
    if old != new:
      return field, old, new
  return None


class Checkpointer:
  """Saves and restores the train state and the data iterator under ``directory``."""

  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True),
        item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict) -> None:
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))),
        force=True)
    self.manager.wait_until_finished()

  def check_compatible(self, config: ml_collections.ConfigDict, step: int) -> None:
    """Raises ConfigError when the checkpoint at ``step`` came from another architecture."""
    saved = self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
    diff = arch_difference(saved, config)
    if diff is not None:
      field, old, new = diff
      raise ConfigError(
          field, new,
          f"the workdir's checkpoint (step {step}, {self.directory}) was written with "
          f"{field}={old!r}, an incompatible config",
          "use a new --workdir, or the same value as the checkpoint")

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto ``abstract_state``'s shardings (any mesh) and, if
    given, the data iterator in place.

    grain writes one iterator file per process. Kestrel's pipelines are the same
    on every process up to the global batch (each process then keeps its rows),
    so every file holds the same position: when the process count changed, the
    iterator is restored from process 0's file.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    if data_iterator is not None:
      data_dir = os.path.join(self.directory, str(step), "data")
      own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
      files = sorted(glob.glob(os.path.join(data_dir, "process_0-of-*.json")))
      path = own if os.path.exists(own) else (files[0] if files else own)
      with open(path) as f:
        data_iterator.set_state(json.load(f))
    return restored["state"]

  def close(self) -> None:
    self.manager.close()

