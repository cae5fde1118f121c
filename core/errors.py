"""The two errors every Kestrel package raises."""


class ConfigError(ValueError):
  """A config value or input is invalid.

  The message always has the form ``<field>=<value!r>: <problem>. Fix: <fix>``, so a
  user can act on one line. Libraries name their own fields (``top_k``); the
  runtime, which knows where a library's config sits, re-raises with the full
  path (``within("model.moe")`` -> ``model.moe.top_k``).
  """

  def __init__(self, field: str, value, problem: str, fix: str):
    self.field, self.value, self.problem, self.fix = field, value, problem, fix
    super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")

  def within(self, prefix: str) -> "ConfigError":
    """The same error with ``prefix.`` before the field name."""
    return ConfigError(f"{prefix}.{self.field}" if prefix else self.field, self.value,
                       self.problem, self.fix)


class Unsupported(NotImplementedError):
  """An implementation cannot handle these inputs (shape, dtype, mask, platform).

  Registries (``core.registry``) catch it and try the next candidate; when every
  candidate fails one ``Unsupported`` lists every reason, with ``op`` (the registry's
  name) and ``candidates`` (the names tried) set.
  """

  def __init__(self, message: str, *, op: str | None = None, candidates: tuple = ()):
    super().__init__(message)
    self.op, self.candidates = op, tuple(candidates)


def _is_number(value) -> bool:
  import numbers
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_range(field: str, value, lo: float, hi: float, *, lo_open: bool = False,
                hi_open: bool = False) -> float:
  """``float(value)`` if it is a number in the interval, else ``ConfigError``."""
  interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  ok = _is_number(value) and (value > lo if lo_open else value >= lo) and (
      value < hi if hi_open else value <= hi)
  if not ok:
    raise ConfigError(field, value, f"must lie in {interval}", f"choose a value in {interval}")
  return float(value)


def check_positive(field: str, value) -> float:
  """``float(value)`` if it is a number > 0, else ``ConfigError``."""
  if not (_is_number(value) and value > 0):
    raise ConfigError(field, value, "must be a number > 0", "set a positive value")
  return float(value)


def check_int(field: str, value, minimum: int = 0) -> int:
  """``value`` if it is an int >= ``minimum`` (not a bool), else ``ConfigError``."""
  import numbers
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ConfigError(field, value, f"must be an integer >= {minimum}",
                      f"set an integer >= {minimum}")
  return int(value)


def check_choice(field: str, value, choices) -> None:
  """``ConfigError`` unless ``value`` is one of ``choices``."""
  if value not in tuple(choices):
    raise ConfigError(field, value, "unknown choice", f"use one of {', '.join(map(str, choices))}")
