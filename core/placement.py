"""Where arrays live: logical axis names -> mesh axes, decided in one place.

Layers name the axes of their parameters and activations (``batch``, ``length``,
``heads``, ``embed``, ...) and never look at a mesh. The runtime installs a
``Placement`` (a mesh and an ordered rules table) around the traced step with
``use``; then

- ``constrain(x, names)`` pins an activation (a no-op without a placement);
- ``per_device(fn, args, in_axes, out_axes)`` runs ``fn`` on each device's shard
  under ``jax.shard_map``: registry entries that XLA cannot partition (kernels)
  and algorithms written per device (context parallelism, expert parallelism)
  go through it. Inside, ``bound(name)`` gives the mesh axes a logical name is
  sharded over for this call (empty: not sharded), for collectives;
  ``bound_for(name, args, in_axes)`` says the same before the call (to keep a
  plain path when nothing is sharded).

Resolution (``resolve``): for one array the names are resolved left to right; the
first rule of a name whose mesh axes are still free in that array wins, a mesh axis
is never bound twice in one array, and mesh axes of size 1 drop out.
"""
import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


class UnknownAxis(ValueError):
  """A logical axis name with no rule."""

  def __init__(self, name: str, known: Sequence[str]):
    self.name, self.known = name, tuple(sorted(known))
    super().__init__(f"logical axis {name!r} has no rule. Fix: add ('{name}', <mesh axes or "
                     f"None>) to the rules table, or use one of {self.known}")


class Indivisible(ValueError):
  """A dimension that the mesh axes its name maps to do not divide."""

  def __init__(self, dim: int, name: str, size: int, mesh_axes: tuple[str, ...], n: int):
    self.dim, self.name, self.size, self.mesh_axes, self.n = dim, name, size, mesh_axes, n
    super().__init__(f"dimension {dim} ({name!r}, size {size}) is not divisible by the mesh "
                     f"axes {mesh_axes} (size {n})")


def resolve(axes: Sequence[str | None], shape: Sequence[int] | None, mesh_sizes: dict[str, int],
            rules: Rules, *, exclude: frozenset = frozenset()) -> tuple[tuple[str, ...], ...]:
  """The mesh axes of each dimension of one array (see the module docstring).

  Args:
    axes: one logical name (or None: replicated) per dimension.
    shape: the array's shape, to check divisibility (None: not checked).
    mesh_sizes: mesh axis name -> size.
    rules: the ordered rules table.
    exclude: mesh axes treated as absent (size 1).

  Raises:
    UnknownAxis, Indivisible.
  """
  known = {name for name, _ in rules}
  size_of = lambda t: 1 if t in exclude else mesh_sizes.get(t, 1)
  used: set[str] = set()
  out = []
  for dim, name in enumerate(axes):
    if name is None:
      out.append(())
      continue
    if name not in known:
      raise UnknownAxis(name, known)
    chosen: tuple[str, ...] = ()
    for rule_name, target in rules:
      if rule_name != name:
        continue
      targets = (target,) if isinstance(target, str) else tuple(target or ())
      free = tuple(t for t in targets if t not in used and size_of(t) > 1)
      if target is None or free or all(size_of(t) == 1 for t in targets):
        chosen = free
        break
    n = math.prod(mesh_sizes[t] for t in chosen)
    if shape is not None and shape[dim] % n:
      raise Indivisible(dim, name, shape[dim], chosen, n)
    used.update(chosen)
    out.append(chosen)
  return tuple(out)


def to_spec(resolved: Sequence[tuple[str, ...]]) -> P:
  spec = [None if not a else a[0] if len(a) == 1 else a for a in resolved]
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


@dataclasses.dataclass(frozen=True)
class Placement:
  """A mesh and the rules that map logical axis names onto it."""
  mesh: jax.sharding.Mesh
  rules: Rules

  @property
  def sizes(self) -> dict[str, int]:
    return dict(self.mesh.shape)

  def spec(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> P:
    return to_spec(resolve(axes, shape, self.sizes, self.rules))


_CURRENT = contextvars.ContextVar("kestrel_placement", default=None)
_BOUND = contextvars.ContextVar("kestrel_bound_axes", default=None)


@contextlib.contextmanager
def use(placement: Placement | None):
  """Within this context ``constrain`` and ``per_device`` place arrays by ``placement``."""
  token = _CURRENT.set(placement)
  try:
    yield
  finally:
    _CURRENT.reset(token)


def current() -> Placement | None:
  """The placement in force (None outside ``use`` and inside a ``per_device`` body)."""
  return _CURRENT.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical names; a no-op without a placement."""
  p = current()
  if p is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(p.mesh, p.spec(axes, x.shape)))


def bound(name: str) -> tuple[str, ...]:
  """Inside a ``per_device`` body: the mesh axes ``name`` is sharded over in this call."""
  names = _BOUND.get()
  return tuple((names or {}).get(name, ()))


def _is_axes(x) -> bool:
  return type(x) is tuple and all(a is None or isinstance(a, str) for a in x)


def _map_axes(f, axes, tree):
  """``f(axes, leaf)`` for every array leaf of ``tree``; ``axes`` mirrors ``tree``
  down to a tuple of logical names (or None), which then covers the whole subtree."""
  if tree is None:
    return None
  if axes is None or _is_axes(axes):
    return jax.tree.map(lambda leaf: f(axes, leaf), tree)
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_map_axes(f, ax, t) for ax, t in zip(axes, tree)))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_axes(f, ax, t) for ax, t in zip(axes, tree))
  if isinstance(tree, dict):
    return {k: _map_axes(f, axes[k], v) for k, v in tree.items()}
  raise TypeError(f"axes {axes!r} do not describe {type(tree).__name__}")


def _resolve_call(p: Placement, args: Sequence, in_axes: Sequence):
  """(leaf index tree, mesh axes per leaf, logical name -> mesh axes) of a
  ``per_device`` call: a mesh axis that does not divide a dimension it shards is
  left out of the whole call."""
  sizes = p.sizes
  leaves: list = []
  index = tuple(_map_axes(lambda ax, a: leaves.append((ax, a)) or len(leaves) - 1, ax, a)
                for ax, a in zip(in_axes, args))
  exclude: frozenset = frozenset()
  while True:
    try:
      resolved = [None if ax is None else resolve(ax, a.shape, sizes, p.rules, exclude=exclude)
                  for ax, a in leaves]
      break
    except Indivisible as e:
      exclude = exclude | set(e.mesh_axes)
  names: dict[str, tuple[str, ...]] = {}
  for (ax, _), res in zip(leaves, resolved):
    for name, mesh_axes in zip(ax or (), res or ()):
      if name is not None:
        names.setdefault(name, mesh_axes)
  return index, resolved, names


def bound_for(name: str, args: Sequence, in_axes: Sequence) -> tuple[str, ...]:
  """The mesh axes ``bound(name)`` would give inside ``per_device(fn, args, in_axes,
  ...)`` under the placement in force (empty: none, one device, or not sharded), so a
  caller can keep its plain path when an algorithm written per device is not needed."""
  p = current()
  if p is None or p.mesh.empty or p.mesh.size == 1:
    return ()
  return tuple(_resolve_call(p, args, in_axes)[2].get(name, ()))


def per_device(fn: Callable, args: Sequence, in_axes: Sequence, out_axes, *,
               check_vma: bool = True):
  """Runs ``fn(*args)`` on each device's shard under ``jax.shard_map``.

  Args:
    fn: the per-device body; inside it ``bound(name)`` gives the mesh axes of each
      logical name (for collectives) and ``current()`` is None, so nested
      ``per_device`` calls run directly.
    args: the arguments: arrays, pytrees of arrays, or None.
    in_axes: per argument, a tuple of logical names (None: replicated), or a
      container like the argument's holding such tuples.
    out_axes: a pytree of such tuples matching ``fn``'s output; its names must
      appear in ``in_axes``.
    check_vma: shard_map's varying-axes check.

  Each mesh axis shards every dimension its rule assigns it to in this call or
  none: a mesh axis that does not divide one of them is left out of the call
  (those dimensions are gathered), so the shards of related arguments (query
  heads and kv heads) stay consistent. Without a placement, or on one device,
  ``fn`` runs directly on the global arrays.
  """
  p = current()
  if p is None or p.mesh.empty or p.mesh.size == 1:
    token = _BOUND.set({})
    try:
      return fn(*args)
    finally:
      _BOUND.reset(token)
  index, resolved, names = _resolve_call(p, args, in_axes)
  leaf_specs = [P() if r is None else to_spec(r) for r in resolved]
  in_specs = jax.tree.map(lambda i: leaf_specs[i], index)

  def out_spec(ax):
    missing = [n for n in ax if n is not None and n not in names]
    if missing:
      raise ValueError(f"out_axes name {missing[0]!r} is not among the in_axes names "
                       f"{sorted(names)}. Fix: name output axes after input axes")
    return to_spec([names.get(n, ()) if n is not None else () for n in ax])

  out_specs = jax.tree.map(out_spec, out_axes, is_leaf=_is_axes)

  def body(*local):
    token_p, token_b = _CURRENT.set(None), _BOUND.set(names)
    try:
      return fn(*local)
    finally:
      _CURRENT.reset(token_p)
      _BOUND.reset(token_b)

  args = tuple(args)
  if any(t == AxisType.Explicit for t in getattr(p.mesh, "axis_types", ())):
    # Explicit axes: shard_map wants its inputs already laid out as in_specs.
    args = jax.tree.map(
        lambda a, s: a if a is None else jax.sharding.reshard(a, NamedSharding(p.mesh, s)),
        args, in_specs, is_leaf=lambda x: x is None)
  return jax.shard_map(body, mesh=p.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=check_vma)(*args)
