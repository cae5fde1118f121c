"""Experiment configs: one file per experiment, each defining ``get_config(arg)``."""
import importlib.util
import os
import sys

import ml_collections


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:arg]`` the way ``--config=`` does."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={spec!r}: no such config file. Fix: pass a path such as "
                            "experiments/configs/base.py:tiny")
  module_spec = importlib.util.spec_from_file_location(
      f"_kestrel_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def load_with_overrides(spec: str, assignments: list[str]) -> ml_collections.ConfigDict:
  """``load(spec)`` then apply ``['a.b=value', ...]`` (Python literals, else strings)."""
  import ast
  config = load(spec)
  for assignment in assignments:
    field, _, value = assignment.partition("=")
    message = unknown_override(config, field)
    if message:
      raise ValueError(message)
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return config


def unknown_override(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """A one-line message if ``dotted`` is not a field of ``config``, else None."""
  node, seen = config, []
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(seen) or "the config root"
      fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      return (f"--config.{dotted}: unknown config field {part!r} under {where}. "
              f"Fix: use one of {', '.join(fields)}" if fields else
              f"--config.{dotted}: {'.'.join(seen)} is a value, not a group. Fix: remove '.{part}'")
    node = node[part]
    seen.append(part)
  return None


def check_overrides(argv: list[str]) -> None:
  """Stops with one clear line on an override of a field the config does not have."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return
  try:
    config = load(spec)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for arg in argv:
    if arg.startswith("--config."):
      message = unknown_override(config, arg[len("--config."):].split("=", 1)[0])
      if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
