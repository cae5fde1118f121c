"""One error type for bad configs and inputs: a single line naming field, value and fix."""


class ConfigError(ValueError):
  """A config value or input is invalid.

  The message always has the form
  ``<field>=<value!r>: <problem>. Fix: <fix>`` so a user can act on one line.
  """

  def __init__(self, field: str, value, problem: str, fix: str):
    self.field, self.value, self.problem, self.fix = field, value, problem, fix
    super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")
