"""Checkpoints: model, optimizer state, step, RNG, data iterator and config together.

Built on orbax's ``CheckpointManager``: each step is written into a temporary
directory and renamed into place only when complete (orbax's atomic commit), so
a crash or kill mid-save leaves the previous checkpoint intact.

Resuming (``restore_latest``):
- compatibility is decided by the saved tree itself: its paths, shapes and dtypes
  (orbax's metadata) must equal the state this config builds; otherwise the run
  stops with one line (a config error: nothing is moved or written);
- a checkpoint that cannot be read (a truncated or missing file, corrupt
  metadata) is moved aside into ``<checkpoints>/damaged/`` with one line saying
  why, and the next older one is tried; when none restores, the run stops naming
  the folder.
"""
import glob
import json
import os
import shutil

import grain
import jax
import orbax.checkpoint as ocp

from core.errors import ConfigError

DAMAGED = "damaged"


def _paths(tree) -> dict[str, tuple]:
  """'a/b/c' -> (shape, dtype) of every array leaf of a state (or its orbax metadata)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): (tuple(x.shape), str(x.dtype))
          for p, x in flat}


def tree_difference(saved, expected) -> str | None:
  """The first difference between a saved tree's metadata and ``expected``'s
  (ShapeDtypeStructs), parameters first, as one phrase; None when they agree."""
  a, b = _paths(saved), _paths(expected)
  order = lambda p: (not p.startswith("params/"), not p.startswith("model_state/"), p)
  for path in sorted(set(a) | set(b), key=order):
    if path not in b:
      return f"{path} is in the checkpoint but not in this config's state"
    if path not in a:
      return f"{path} is in this config's state but not in the checkpoint"
    if a[path] != b[path]:
      (s1, d1), (s2, d2) = a[path], b[path]
      return (f"{path} is {d1}{list(s1)} in the checkpoint, {d2}{list(s2)} in this config")
  return None


def config_difference(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """Leaves of two config dicts that differ, as 'field old -> new' (a hint)."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_difference(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key} {a!r} -> {b!r}")
  return out


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
  """Saves and restores the train state and the data iterator under ``directory``."""

  def __init__(self, directory: str, *, keep: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only,
        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only,
        read_only=read_only, save_interval_steps=0 if read_only else 1)
    # Explicit handlers: a manager that has not saved yet can read the metadata. Read
    # only, the state's is the PyTree handler, which restores part of a tree.
    state = ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "state": state, "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config: dict) -> None:
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config)),
        force=True)
    self.manager.wait_until_finished()

  def save_model(self, step: int, model: dict, config: dict) -> None:
    """Saves a model alone (``{"params", "model_state"}``, no optimizer or data state):
    an exported run that ``restore_model`` reads and a new run starts from
    (``train.init_from``), not one to resume."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(model), config=ocp.args.JsonSave(config)), force=True)
    self.manager.wait_until_finished()

  def check_compatible(self, step: int, abstract_state, current_config: dict | None = None,
                       what: str = "the workdir's checkpoint") -> None:
    """Raises ConfigError when the state saved at ``step`` is not ``abstract_state``'s
    tree (paths, shapes, dtypes). Reading the metadata may raise anything: the
    checkpoint is then damaged (``restore_latest`` moves it aside)."""
    saved = self.manager.item_metadata(step)["state"]
    diff = tree_difference(getattr(saved, "tree", saved), abstract_state)
    if diff is None:
      return
    hint = ""
    if current_config is not None:
      try:
        old = self.saved_config(step)
        changed = config_difference(old, current_config)
        hint = f" (config fields that differ: {'; '.join(changed[:3])})" if changed else ""
      except Exception:  # noqa: BLE001 - only a hint
        pass
    raise ConfigError("--workdir", os.path.dirname(self.directory),
                      f"{what} (step {step}, {self.directory}) was written by an incompatible "
                      f"config: {diff}{hint}",
                      "use a new --workdir, or the config the checkpoint was written with "
                      "(its config.json)")

  def saved_config(self, step: int) -> dict:
    """The config item saved with ``step``."""
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto ``abstract_state``'s shardings (any mesh) and, if
    given, the data iterator in place; the config item is read too (a check).

    grain writes one iterator file per process. Kestrel's pipelines are the same
    on every process up to the global batch (each process then keeps its rows),
    so every file holds the same position: when the process count changed, the
    iterator is restored from process 0's file.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()))
    if data_iterator is not None:
      data_dir = os.path.join(self.directory, str(step), "data")
      own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
      files = sorted(glob.glob(os.path.join(data_dir, "process_0-of-*.json")))
      path = own if os.path.exists(own) else (files[0] if files else own)
      with open(path) as f:
        data_iterator.set_state(json.load(f))
    return restored["state"]

  def restore_latest(self, abstract_state, data_iterator=None, *, config: dict | None = None,
                     log=print):
    """(state, step) of the newest checkpoint that restores, or None without any.

    A checkpoint that cannot be read is moved into ``<directory>/damaged/`` (never
    deleted), with one line through ``log``, and the next older one is tried.

    Raises:
      ConfigError: a checkpoint of another architecture or optimizer (nothing is
        moved), or checkpoints exist but none restores.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        self.check_compatible(step, abstract_state, config)
        return self.restore(step, abstract_state, data_iterator), step
      except ConfigError:
        raise
      except Exception as e:  # noqa: BLE001 - whatever orbax or the files raise
        aside = self._move_aside(step)
        log(f"checkpoint step {step} in {self.directory} cannot be restored ({_first_line(e)}); "
            f"moved to {aside}")
    damaged = os.path.join(self.directory, DAMAGED)
    if steps:
      raise ConfigError("--workdir", os.path.dirname(self.directory),
                        f"none of its checkpoints ({', '.join(map(str, steps))}) restores; "
                        f"they were moved to {damaged}",
                        "inspect them, or start again in a new --workdir")
    if os.path.isdir(damaged) and os.listdir(damaged):
      raise ConfigError("--workdir", os.path.dirname(self.directory),
                        f"it has only damaged checkpoints (in {damaged})",
                        "inspect them; to start again here, delete that folder, or use a new "
                        "--workdir")
    return None

  def _move_aside(self, step: int) -> str:
    """Moves ``<directory>/<step>`` into ``<directory>/damaged/`` and forgets the step."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory, DAMAGED, str(step))
    if jax.process_index() == 0 and os.path.exists(source):
      n = 1
      while os.path.exists(target):
        target = os.path.join(self.directory, DAMAGED, f"{step}.{n}")
        n += 1
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"kestrel_checkpoint_aside_{step}")
    self.manager.reload()  # so a later save of this step is written, not refused
    return target

  def close(self) -> None:
    self.manager.close()


class NoCheckpoint(Exception):
  """The folder holds no checkpoint."""


class OtherTree(Exception):
  """The newest checkpoint's tree is not the one asked for: ``args = (step, difference)``."""


def restore_model(directory: str, abstract_model: dict) -> tuple[dict, int]:
  """(the newest checkpoint's items named by ``abstract_model`` (e.g. ``params`` and
  ``model_state``: nothing else is read), its step), restored onto ``abstract_model``'s
  shardings. Raises ``NoCheckpoint`` or ``OtherTree`` (callers word the error)."""
  ckpt = read_only(directory)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise NoCheckpoint(directory)
    saved = ckpt.manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    saved = {k: saved.get(k, {}) for k in abstract_model}
    target, convert = abstract_model, None
    if tree_difference(saved, abstract_model) is not None:
      target, convert = _other_layout(saved, abstract_model)
    diff = tree_difference(saved, target)
    if diff is not None:
      raise OtherTree(step, tree_difference(saved, abstract_model))
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  finally:
    ckpt.close()
  model = restored["state"]
  if convert is not None:
    shardings = jax.tree.map(lambda a: a.sharding, abstract_model)
    model = jax.jit(convert, out_shardings=shardings)(model)
  return model, step


def _other_layout(saved: dict, abstract_model: dict):
  """(the abstract model in the layer layout ``saved`` has, the conversion from that
  layout to ``abstract_model``'s) when the two differ only in scanning over layers
  (``lm.model.scan_tree``): a scanned run starts from an unrolled one and back.
  Otherwise (``abstract_model``, None). The other layout is restored replicated over
  the abstract model's mesh, then converted onto its shardings."""
  from lm.model import is_scanned, scan_tree, unscan_tree
  params = abstract_model.get("params", {})
  saved_scanned = "blocks" in (saved.get("params") or {})
  if is_scanned(params) == saved_scanned:
    return abstract_model, None
  if is_scanned(params):
    p = len(params["blocks"])
    to_saved, convert = (lambda t: unscan_tree(t, p)), (lambda t: scan_tree(t, p))
  else:
    p = len(saved["params"]["blocks"])
    to_saved, convert = (lambda t: scan_tree(t, p)), (lambda t: unscan_tree(t, p))
  shapes = jax.eval_shape(to_saved, abstract_model)
  some = next((a.sharding for a in jax.tree.leaves(abstract_model)
               if isinstance(getattr(a, "sharding", None), jax.sharding.NamedSharding)), None)
  place = (jax.sharding.NamedSharding(some.mesh, jax.sharding.PartitionSpec()) if some
           else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=place), shapes)
  return target, convert


def read_only(directory: str) -> Checkpointer:
  """A checkpointer that never creates, cleans up or deletes anything in ``directory``."""
  return Checkpointer(directory, read_only=True)
