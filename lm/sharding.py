"""Meshes and the one logical-axis rules table.

Parameters and key activations carry logical axis names (``embed``, ``mlp``,
``heads``, ``batch``, ...). ``RULES`` maps each name to mesh axes; for one array
the names are resolved left to right, the first rule of a name whose mesh axes
are still free in that array wins, and a mesh axis is never bound twice in one
array. Mesh axes of size 1 drop out, so the same config runs on one CPU device
and on a pod. Nothing in a layer looks at the mesh: layers name their arrays,
this module decides where they live (the resolution itself is
``core.placement.resolve``; ``placed(mesh)`` installs this table for the traced step).

Mesh axes, outermost first: ``dcn`` (slices over the data-center network; data
parallel across slices), ``data``, ``fsdp`` (parameters and optimizer state
sharded, gathered per layer), ``expert``, ``sequence`` and ``tensor`` (heads and
MLP width; innermost, on the fastest links).

The mesh uses ``AxisType.Auto``: shardings are pinned at the jit boundary
(state, batch) and on activations with ``with_sharding_constraint``, and XLA's
partitioner propagates the rest. (Explicit axes would need ``out_sharding``
annotations on ambiguous ops inside optax's Newton-Schulz and our layers.)
"""
import contextlib
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from core import placement, platform
from core.errors import ConfigError

MESH_AXES = ("dcn", "data", "fsdp", "expert", "sequence", "tensor")

# Ordered: (logical name, mesh axis or axes or None). A name may appear more than
# once; later entries are fallbacks used when the earlier one's axes are taken.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("dcn", "data", "fsdp", "expert")),
    ("length", "sequence"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("expert", "expert"),
    ("router", None),
    ("router_bias", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)

# Which config field sets the size of an array axis with this logical name.
_SIZE_FIELD = {"batch": "data.batch_size", "length": "data.seq_len", "vocab": "model.vocab_size",
               "heads": "model.n_heads", "kv_heads": "model.n_kv_heads", "mlp": "model.d_ff",
               "embed": "model.d_model", "head_dim": "model.head_dim",
               "expert": "model.moe.num_experts"}


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
  """Axis sizes from the config (``lm.config.MeshConfig``), with one ``-1`` filling
  the remaining devices."""
  sizes = {a: int(getattr(mesh_cfg, a)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{a}", s, "must be a positive size or -1",
                        "use -1 for at most one axis to take the remaining devices")
  if len(fill) > 1:
    raise ConfigError(f"mesh.{fill[1]}", -1, f"only one axis may be -1 (also mesh.{fill[0]})",
                      "give every other axis an explicit size")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n_devices % fixed:
      raise ConfigError(f"mesh.{fill[0]}", -1,
                        f"the other axes multiply to {fixed}, which does not divide the "
                        f"{n_devices} devices", "choose axis sizes whose product divides the device count")
    sizes[fill[0]] = n_devices // fixed
  elif fixed != n_devices:
    shown = " x ".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "all 1"
    raise ConfigError("mesh", shown, f"the mesh has {fixed} devices but {n_devices} are present",
                      "make the axis sizes multiply to the device count, or set one axis to -1")
  return sizes


def make_mesh(mesh_cfg, devices: Sequence | None = None) -> Mesh:
  """Builds the mesh over ``devices`` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (AxisType.Auto,) * len(MESH_AXES)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if sizes["dcn"] > 1 and len(slices) > 1:
    if len(slices) != sizes["dcn"]:
      raise ConfigError("mesh.dcn", sizes["dcn"], f"the devices span {len(slices)} slices",
                        f"set mesh.dcn={len(slices)}")
    ici = (1,) + shape[1:]
    dcn = (sizes["dcn"],) + (1,) * (len(shape) - 1)
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, MESH_AXES, axis_types=auto)
  if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def optimizer_spread(mesh: Mesh):
  """The devices the matrix optimizers split their Newton-Schulz iterations over
  (``optim.namo.Spread``): every mesh axis of size > 1 within a slice (not ``dcn``: the
  gathered results would cross the data-center network); None on one device."""
  from optim.namo import Spread
  axes = tuple(a for a in MESH_AXES if a != "dcn" and mesh.shape[a] > 1)
  if not axes:
    return None

  def place(x, split: bool):
    spec = P(axes if split else None, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return Spread(math.prod(mesh.shape[a] for a in axes), place)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_sizes: dict[str, int],
                    *, what: str = "array", rules=RULES) -> P:
  """The PartitionSpec of one array from its logical axis names.

  Args:
    axes: one logical name (or None: replicated) per array dimension.
    shape: the array's shape, to check each dimension divides by its mesh axes.
    mesh_sizes: mesh axis name -> size.
    what: the array's name, for error messages.
    rules: the ordered rules table.

  Raises:
    ConfigError: an unknown logical name, or a mesh axis that does not divide
      the dimension it shards.
  """
  try:
    return placement.to_spec(placement.resolve(axes, shape, mesh_sizes, rules))
  except placement.UnknownAxis as e:
    raise ConfigError(f"logical axis of {what}", e.name, "has no rule in lm/sharding.py RULES",
                      f"add ('{e.name}', <mesh axes or None>) to RULES, or use one of "
                      f"{list(e.known)}") from None
  except placement.Indivisible as e:
    field = _SIZE_FIELD.get(e.name, f"dimension {e.dim} of {what}")
    mesh_fields = " x ".join(f"mesh.{t}={mesh_sizes[t]}" for t in e.mesh_axes)
    raise ConfigError(mesh_fields, e.n, f"does not divide {field}={e.size} ({what}, axis "
                      f"'{e.name}')", f"choose mesh sizes that divide {e.size}, or change "
                      f"{field}") from None


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x)


def tree_specs(logical_axes, abstract_tree, mesh: Mesh):
  """PartitionSpecs for a pytree of arrays from a same-structured pytree of axis names."""
  sizes = dict(mesh.shape)
  paths = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  axes = jax.tree.leaves(logical_axes, is_leaf=_is_axes)
  specs = [logical_to_spec(a, x.shape, sizes, what=jax.tree_util.keystr(p, simple=True, separator="/"))
           for (p, x), a in zip(paths, axes)]
  return jax.tree.unflatten(jax.tree.structure(abstract_tree), specs)


def _names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", None))
    if isinstance(name, str):
      out.append(name)
  return tuple(out)


def like_params_specs(tree, params_abstract, param_specs):
  """Specs for an optimizer state: a leaf whose path ends with a parameter's path and
  has that parameter's shape is sharded like it (Adam moments, Muon momentum);
  everything else (step counts, scalars) is replicated."""
  by_path = {}
  for (p, x), s in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0],
                       jax.tree.leaves(param_specs, is_leaf=lambda s: isinstance(s, P))):
    by_path[_names(p)] = (tuple(x.shape), s)

  def one(path, leaf):
    names = _names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit and hit[0] == tuple(leaf.shape):
        return hit[1]
    return P()
  return jax.tree_util.tree_map_with_path(one, tree)


def named(mesh: Mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


@contextlib.contextmanager
def placed(mesh: Mesh, rules=RULES):
  """Traces programs for ``mesh``: its platform's kernels (``core.platform``), this
  rules table for activations and per-device entries (``core.placement``), and its
  abstract mesh. Enter it around everything that traces the model."""
  with (platform.target(mesh.devices.flat[0].platform),
        placement.use(placement.Placement(mesh, rules)),
        jax.sharding.use_abstract_mesh(mesh.abstract_mesh)):
    yield


def abstract_model(built, reference) -> dict:
  """``{"params", "model_state"}`` ShapeDtypeStructs of model ``built``
  (``lm.model.Built``) placed by the rules table on ``reference``'s mesh: another run's
  model (a teacher, a reference, a frozen base) beside the train state."""
  return {"params": abstract_like(built.params, built.axes["params"], reference),
          "model_state": abstract_like(built.state, built.axes["state"], reference)}


def abstract_like(tree, axes, reference):
  """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs with logical ``axes``)
  placed by the rules table on the mesh that ``reference``'s shardings use (e.g. a
  teacher of another shape beside the student's train state)."""
  mesh = jax.tree.leaves(reference)[0].sharding.mesh
  specs = tree_specs(axes, tree, mesh)
  return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                        sharding=NamedSharding(mesh, p)),
                      tree, specs)

