"""What the command-line entry points share: ``--config=path.py[:arg]`` and
``--config.a.b=value`` are parsed here (``experiments.configs.from_argv``), every
other flag by absl, and every bad input ends the same way: one line ``error:
<field>=<value>: <problem>. Fix: <fix>`` on stderr, exit status 2, no traceback."""
import sys
from collections.abc import Callable

from absl import app, flags

from core.errors import ConfigError
from experiments.configs import config_args, from_argv


def fail(error: Exception) -> None:
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)


def _run(main: Callable, split: Callable) -> None:
  """absl around ``main(*split(args))``: ``split`` takes the command-line arguments and
  returns (what ``main`` gets, the arguments left for absl's flags)."""
  parsed = {}

  def parse(argv):
    try:
      parsed["args"], rest = split(argv[1:])
      return flags.FLAGS(argv[:1] + rest)
    except ConfigError as e:
      fail(e)
    except flags.Error as e:
      fail(ConfigError("flags", " ".join(argv[1:]), str(e).rstrip("."),
                       "see --help for the flags and their types"))

  def _main(argv):
    if len(argv) > 1:
      fail(ConfigError("arguments", argv[1:], "unexpected", "pass only --flags"))
    from absl import logging
    # orbax logs every file it renames at INFO, and warns that a run it reads is read-only
    logging.set_verbosity(logging.ERROR)
    try:
      main(*parsed["args"])
    except ConfigError as e:
      fail(e)

  app.run(_main, flags_parser=parse)


def run(main: Callable, *, config_required: bool = True) -> None:
  """Runs ``main(config, spec)`` under absl with Kestrel's config flags and errors."""
  def split(args):
    config, spec, rest = from_argv(args)
    if config is None and config_required:
      raise ConfigError("--config", None, "missing",
                        "pass --config=experiments/configs/<file>.py[:<arg>]")
    return (config, spec), rest
  _run(main, split)


def run_workdir(main: Callable) -> None:
  """Runs ``main(overrides, None)`` for a command on a trained run's workdir: flags by
  absl, ``--config.a.b=v`` collected as overrides ({dotted field: text}; the run's
  ``config.json`` is the config, ``lm.runs.load_config``), every bad input one line."""
  def split(args):
    spec, assignments, rest = config_args(args)
    if spec is not None:
      raise ConfigError("--config", spec, "not taken here: the run's own config.json is "
                        "used", "drop --config=; override fields with --config.a.b=value")
    return (assignments, None), rest
  _run(main, split)


# ----------------------------------------------------------------------------- exports


def check_new_folder(out: str, what: str) -> None:
  """``--out`` is given and is a new (or empty) folder: exports never write over a run."""
  import os
  if not out:
    raise ConfigError("--out", out, "missing", "pass --out=<a new folder>")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConfigError("--out", out, "exists and is not an empty folder",
                      f"pass a new folder ({what} never writes over a run)")


def start_run_folder(workdir: str, out: str, config) -> None:
  """``out`` made a run folder: ``config`` as its ``config.json`` (written atomically) and
  the tokenizer copy of ``workdir``."""
  import os
  import shutil
  os.makedirs(out, exist_ok=True)
  tmp = os.path.join(out, "config.json.tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, os.path.join(out, "config.json"))
  for name in os.listdir(workdir):
    if name.startswith("tokenizer."):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(out, name))


def run_export(export: Callable, describe: Callable, what: str) -> None:
  """The command line of an export from a trained run: ``--workdir``, ``--out``,
  ``--json`` and ``--config.a.b=v`` overrides; prints ``describe(export(workdir, out,
  overrides))`` (or the JSON)."""
  import contextlib
  import json
  workdir = flags.DEFINE_string("workdir", None, "A trained run's workdir.")
  out = flags.DEFINE_string("out", None, f"The new folder for the {what} run.")
  as_json = flags.DEFINE_bool("json", False, "Print one JSON object on stdout.")

  def main(overrides, spec):
    del spec
    if not workdir.value:
      raise ConfigError("--workdir", None, "missing", "pass --workdir=<a trained run>")
    with contextlib.redirect_stdout(sys.stderr) if as_json.value else contextlib.nullcontext():
      result = export(workdir.value, out.value, overrides)
    print(json.dumps(result) if as_json.value else describe(result))

  run_workdir(main)

