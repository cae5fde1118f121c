"""A table of named implementations of one op, chosen by a string (tokamax's habit).

``implementation`` is None (the platform's preference order), a name, or a
sequence of names tried in order; when every candidate fails, one
``Unsupported`` gives every reason. Each ``Entry`` declares

- ``native``: the platforms it compiles for. Empty: plain XLA, any platform.
  A kernel (non-empty) runs interpreted on the platforms in ``interpreted``
  (CPU, for tests) and is unsupported elsewhere; it receives ``interpret=``.
- ``supports``: a predicate over the call's arguments returning None (fine) or
  the reason it cannot run them. (Entries may also raise ``Unsupported`` while
  running; it is caught the same way.)
- ``per_device``: XLA cannot partition it (a custom kernel), so it must run on
  each device's shard: the registry runs it under ``core.placement.per_device``
  with the op family's logical axes (``Registry(axes=...)``).
"""
import dataclasses
from collections.abc import Callable, Sequence

from core import placement, platform
from core.errors import Unsupported


@dataclasses.dataclass(frozen=True)
class Entry:
  """One implementation. See the module docstring for the fields."""
  name: str
  fn: Callable
  native: tuple[str, ...] = ()
  interpreted: tuple[str, ...] = ("cpu",)
  supports: Callable[..., str | None] | None = None
  per_device: bool = False
  doc: str = ""

  @property
  def is_kernel(self) -> bool:
    return bool(self.native)

  def unsupported(self, target: str, *args, **kwargs) -> str | None:
    """Why this entry cannot run these arguments on ``target``; None when it can."""
    if self.native and target not in self.native and target not in self.interpreted:
      return (f"a {'/'.join(self.native)} kernel; not run on {target}"
              + (f" (use {self.doc})" if self.doc else ""))
    return self.supports(*args, **kwargs) if self.supports else None

  def interpret(self, target: str) -> bool:
    """Whether this kernel runs interpreted on ``target`` (never for plain XLA)."""
    return bool(self.native) and target not in self.native


@dataclasses.dataclass(frozen=True)
class Axes:
  """Logical axis names of an op's array arguments and outputs (for ``per_device``).

  ``args``: one tuple of names (or None for an unsharded argument) per positional
  array argument; ``out``: a pytree of such tuples matching the output.
  """
  args: tuple
  out: object


class Registry:
  """Named implementations of one op (``what``) and a preference order per platform."""

  def __init__(self, what: str, default_order: dict[str, tuple[str, ...]],
               axes: Axes | None = None):
    self.what, self.default_order, self.axes = what, dict(default_order), axes
    self._entries: dict[str, Entry] = {}

  def register(self, name: str, fn: Callable, **kwargs) -> Entry:
    """Adds ``Entry(name, fn, **kwargs)``; returns it."""
    entry = Entry(name, fn, **kwargs)
    self._entries[name] = entry
    return entry

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def __getitem__(self, name: str) -> Entry:
    return self._entries[name]

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def candidates(self, implementation=None) -> tuple[str, ...]:
    """The names ``implementation`` stands for, in the order they are tried."""
    if implementation is None:
      return self.default_order.get(platform.current(), self.default_order.get("cpu", ()))
    if isinstance(implementation, str):
      return (implementation,)
    if isinstance(implementation, Sequence) and implementation and all(
        isinstance(n, str) for n in implementation):
      return tuple(implementation)
    raise ValueError(f"implementation={implementation!r}: expected None, a name or a "
                     f"non-empty sequence of names. Fix: use one of {self.names()}")

  def call(self, implementation, *args, **kwargs):
    """Runs the first candidate that supports ``args`` on the current platform.

    Kernels get ``interpret=``; ``per_device`` entries run under
    ``core.placement.per_device`` with this registry's axes (positional
    arguments are the arrays those axes describe; keyword arguments are static).
    """
    target = platform.current()
    errors = []
    names = self.candidates(implementation)
    for name in names:
      entry = self._entries.get(name)
      if entry is None:
        errors.append(f"{name}: not registered (have {', '.join(self.names())})")
        continue
      reason = entry.unsupported(target, *args, **kwargs)
      if reason:
        errors.append(f"{name}: {reason}")
        continue
      fn = entry.fn
      if entry.is_kernel:
        interpret = entry.interpret(target)
        fn = lambda *a, _fn=entry.fn, _i=interpret, **k: _fn(*a, interpret=_i, **k)
      try:
        if entry.per_device and self.axes is not None:
          body = lambda *a, _fn=fn: _fn(*a, **kwargs)
          # Interpreted kernels trip shard_map's varying-axes check inside Pallas's
          # interpreter; unchecked, shard_map's transpose sums replicated gradients.
          return placement.per_device(body, args, self.axes.args, self.axes.out,
                                      check_vma=not entry.interpret(target))
        return fn(*args, **kwargs)
      except Unsupported as e:
        errors.append(f"{name}: {e}")
    raise Unsupported(f"no {self.what} implementation could run: " + "; ".join(errors),
                      op=self.what, candidates=names)
