"""Experiment configs: one file per experiment, each defining ``get_config(arg)``.

The one place configs are loaded and overridden:

- ``load("path.py[:arg]")`` runs a config file's ``get_config``;
- ``override(config, {"a.b": value})`` sets fields, each parsed and checked against
  the field it replaces (the CLI's ``--config.a.b=text``, ``experiments.ablate``'s
  sweeps and the tests all go through it);
- ``group(dataclass_instance)`` turns a library's or loss term's config dataclass
  into a config group, so its defaults live in one place (the dataclass).

Every problem is a ``core.errors.ConfigError``: one line naming the flag or field,
the value and the fix.
"""
import ast
import copy
import dataclasses
import importlib.util
import os
import types
import typing

import ml_collections

from core.errors import ConfigError


def unknown_arg(file: str, arg: str, choices) -> ConfigError:
  """The error a ``get_config`` raises for an argument it does not know."""
  return ConfigError("--config", f"{file}:{arg}", f"unknown {file} argument",
                     f"use one of {', '.join(map(str, choices))}, e.g. "
                     f"--config=experiments/configs/{file}:{next(iter(choices))}")


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:arg]`` (``get_config(arg)``, or ``get_config()``)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError("--config", spec, "no such config file",
                      "pass a path such as experiments/configs/base.py:tiny")
  name = "_kestrel_config_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 - a config file's own failure, in one line
    raise ConfigError("--config", spec, f"the config file failed: {type(e).__name__}: {e}",
                      "fix the config file or its argument") from None


def _field_type(tp):
  """(base type, optional) of a dataclass field annotation."""
  args = typing.get_args(tp)
  if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
    return [a for a in args if a is not type(None)][0], True
  return tp, False


def group(instance, **extra) -> ml_collections.ConfigDict:
  """A config group holding ``instance``'s fields (a frozen dataclass), plus ``extra``
  fields (e.g. ``enabled``); optional fields that are None become typed placeholders."""
  hints = typing.get_type_hints(type(instance))
  node = ml_collections.ConfigDict()
  for key, value in extra.items():
    node[key] = value
  for f in dataclasses.fields(instance):
    value = getattr(instance, f.name)
    base, optional = _field_type(hints[f.name])
    if dataclasses.is_dataclass(value):
      node[f.name] = group(value)
    elif value is None and optional:
      node[f.name] = ml_collections.config_dict.placeholder(base)
    else:
      node[f.name] = value
  return node


def _describe(kind) -> str:
  return {bool: "True or False", int: "an integer", float: "a number", str: "a string",
          tuple: "a tuple such as ('vocab',)"}.get(kind, kind.__name__)


def parse_value(text: str, kind):
  """``text`` (from a command line) as a value of type ``kind``; ValueError if it is not."""
  text = text.strip()
  if kind is bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(text)
  if kind is int:
    return int(text)
  if kind is float:
    return float(text)
  if kind in (tuple, list):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(p.strip() for p in text.split(",") if p.strip())
    if isinstance(value, str):
      value = (value,)
    if not isinstance(value, (tuple, list)):
      raise ValueError(text)
    return tuple(value)
  if kind is str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
      return text[1:-1]
    return text
  return ast.literal_eval(text)


def _node_and_leaf(config: ml_collections.ConfigDict, dotted: str, name: str, value):
  """The group holding field ``dotted`` and the field's name in it."""
  node, parts = config, dotted.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(name, value, f"{'.'.join(parts[:i])} is a value, not a group",
                        f"remove '.{'.'.join(parts[i:])}'")
    if part not in node:
      where = ".".join(parts[:i]) or "the config root"
      raise ConfigError(name, value, f"unknown config field {part!r} under {where}",
                        f"use one of {', '.join(sorted(node.keys()))}")
    if i < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def override(config: ml_collections.ConfigDict, assignments: dict,
             flag: str = "--config") -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``{dotted field: value}`` set. A string value for a
  non-string field is parsed as that field's type (command lines); an int for a
  float field becomes a float. References between fields (``warmup_steps`` following
  ``train.steps``) are kept."""
  config = copy.deepcopy(config)
  for dotted, value in assignments.items():
    name = f"{flag}.{dotted}"
    node, leaf = _node_and_leaf(config, dotted, name, value)
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(name, value, "is a config group, not a value",
                        f"set one of its fields, e.g. {name}.{sorted(current.keys())[0]}=...")
    kind = type(current) if current is not None else node.get_ref(leaf).get_type()
    if isinstance(value, str) and kind is not str:
      try:
        value = None if value.strip() == "None" and current is None else parse_value(value, kind)
      except (ValueError, SyntaxError):
        raise ConfigError(name, value, f"must be {_describe(kind)} (the field's type)",
                          f"pass {_describe(kind)}") from None
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif kind in (tuple, list) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(name, value, f"does not fit the field ({e})",
                        f"pass {_describe(kind)}") from None
  return config


def config_args(argv: list[str]) -> tuple[str | None, dict, list[str]]:
  """(the ``--config=`` spec or None, {dotted field: text} of the ``--config.a.b=value``
  arguments, the other arguments)."""
  spec, assignments, rest = None, {}, []
  for arg in argv:
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      field, sep, value = arg[len("--config."):].partition("=")
      if not sep:
        raise ConfigError(f"--config.{field}", None, "has no value",
                          f"write --config.{field}=<value>")
      assignments[field] = value
    else:
      rest.append(arg)
  return spec, assignments, rest


def from_argv(argv: list[str]) -> tuple[ml_collections.ConfigDict | None, str | None, list[str]]:
  """(config, its spec, the other arguments) from ``--config=path.py[:arg]`` and
  ``--config.a.b=value`` arguments; (None, None, argv) without ``--config=``."""
  spec, assignments, rest = config_args(argv)
  if spec is None:
    if assignments:
      raise ConfigError("--config", None, "field overrides without a config file",
                        "pass --config=experiments/configs/<file>.py[:<arg>]")
    return None, None, rest
  return override(load(spec), assignments), spec, rest
