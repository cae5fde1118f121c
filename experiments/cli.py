"""What the command-line entry points share: ``--config=path.py[:arg]`` and
``--config.a.b=value`` are parsed here (``experiments.configs.from_argv``), every
other flag by absl, and every bad input ends the same way: one line ``error:
<field>=<value>: <problem>. Fix: <fix>`` on stderr, exit status 2, no traceback."""
import sys
from collections.abc import Callable

from absl import app, flags

from core.errors import ConfigError
from experiments.configs import from_argv


def fail(error: Exception) -> None:
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)


def run(main: Callable, *, config_required: bool = True) -> None:
  """Runs ``main(config, spec)`` under absl with Kestrel's config flags and errors."""
  parsed = {}

  def parse(argv):
    try:
      config, spec, rest = from_argv(argv[1:])
      if config is None and config_required:
        raise ConfigError("--config", None, "missing",
                          "pass --config=experiments/configs/<file>.py[:<arg>]")
      parsed.update(config=config, spec=spec)
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
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    try:
      main(parsed["config"], parsed["spec"])
    except ConfigError as e:
      fail(e)

  app.run(_main, flags_parser=parse)


def overrides_from_argv(argv: list[str]) -> tuple[dict, list[str]]:
  """({dotted field: text}, other arguments) from ``--config.a.b=value`` arguments (for
  commands that read a run's saved config, ``lm.runs.load_config``, not a config file)."""
  assignments, rest = {}, []
  for arg in argv:
    if arg.startswith("--config="):
      raise ConfigError("--config", arg.split("=", 1)[1], "not taken here: the run's own "
                        "config.json is used", "drop --config=; override fields with "
                        "--config.a.b=value")
    if arg.startswith("--config."):
      field, sep, value = arg[len("--config."):].partition("=")
      if not sep:
        raise ConfigError(f"--config.{field}", None, "has no value",
                          f"write --config.{field}=<value>")
      assignments[field] = value
    else:
      rest.append(arg)
  return assignments, rest


def run_workdir(main: Callable) -> None:
  """Runs ``main(overrides, None)`` for a command on a trained run's workdir: flags by
  absl, ``--config.a.b=v`` collected as overrides, every bad input one line (exit 2)."""
  parsed = {}

  def parse(argv):
    try:
      overrides, rest = overrides_from_argv(argv[1:])
      parsed["overrides"] = overrides
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
    logging.set_verbosity(logging.ERROR)  # orbax warns that a run it only reads is read-only
    try:
      main(parsed["overrides"], None)
    except ConfigError as e:
      fail(e)

  app.run(_main, flags_parser=parse)
