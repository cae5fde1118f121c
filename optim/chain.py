"""Config -> optax chain: global-norm clipping, then AdamW or a matrix|AdamW partition.

Routing uses logical axis names only (never parameter paths). ``logical_axes``
is a pytree with the same structure as the params whose leaves are tuples of
axis names, e.g. ``('embed', 'mlp')``. Tuples are pytree nodes, so every map
over it passes ``is_leaf=_is_axes``.

* any ``vocab`` axis (embedding, output head) or ``router`` axis (MoE router)
  -> ``'adam'``;
* any ``router_bias`` axis (``STATE_AXES``: updated outside the optimizer) ->
  ``'frozen'`` (zero update);
* not a matrix (``is_matrix``: fewer than 2 non-batch axes, or no ``embed`` /
  ``mlp`` axis: norm scales, biases, per-head vectors, short conv kernels) -> ``'adam'``;
* otherwise -> ``'muon'`` (``'namo'`` for the NAMO optimizers). Batch axes
  (``BATCH_AXES``: stacked layers, experts; with ``per_head`` also
  ``HEAD_AXES``) are not part of the matrix; Muon / NAMO treat each batch slice
  as its own matrix.

Muon (Jordan 2024, "modded-nanogpt"; Liu et al. 2025, "Muon is Scalable for LLM
Training") is assembled from optax 0.2.8 pieces, in the same order as
``optax.contrib.muon``'s muon group:
``scale_by_muon -> scale_by_shape -> add_decayed_weights -> scale_by_learning_rate``.
``optax.contrib.scale_by_muon`` applies no shape scaling by itself (the width
factor ``sqrt(max(1, fan_out / fan_in))`` lives in the private
``optax.contrib._muon.scale_by_shape``), so ``scale_by_shape`` below restates it.

NAMO / NAMO-D (Zhang, Liu, Schaeffer 2026) are ``optim.namo.namo`` /
``namo_d`` on the same matrices, with the same dimension numbers.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

from optim import namo as namo_lib
from optim import schedules as sched_lib
from optim.schedules import config_error, get_field

Schedule = sched_lib.Schedule
MuonDimensionNumbers = optax_contrib.MuonDimensionNumbers

# Axes that index a stack of independent matrices rather than a matrix dimension.
BATCH_AXES = ("layers", "expert")
# Attention head axes: batch axes too when ``per_head`` (one matrix per head).
HEAD_AXES = ("heads", "kv_heads")
# Axes whose parameters always stay on AdamW (embedding rows / head columns, the
# MoE router's expert-logit axis: routers are small and stay on AdamW).
ADAM_AXES = ("vocab", "router")
# Axes of state that the optimizer never updates: it is changed outside the
# optimizer (the MoE router's auxiliary-loss-free balancing bias).
STATE_AXES = ("router_bias",)
# The residual-stream axis: on the input side of projections out of the stream,
# on the output side of projections into it.
EMBED_AXIS = "embed"
# Axes of the residual stream and the FFN hidden layer: a matrix has one of them.
FEATURE_AXES = ("embed", "mlp")
OPTIMIZERS = ("adamw", "muon", "namo", "namo_d")


def _is_axes(x: Any) -> bool:
  return isinstance(x, tuple)


def _check_axes(path: Any, axes: Any) -> tuple:
  """Returns ``axes`` if it is a tuple of axis names, else raises ValueError."""
  if not isinstance(axes, tuple) or not all(
      a is None or isinstance(a, str) for a in axes):
    raise config_error(
        f"logical_axes{jax.tree_util.keystr(path)}", axes,
        "leaf must be a tuple of axis names (str or None)",
        "give every parameter a tuple like ('embed', 'mlp')")
  return axes


def _map_axes(fn: Callable[[tuple], Any], logical_axes: Any) -> Any:
  """Maps ``fn`` over the axis tuples of ``logical_axes`` (validating each)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, a: fn(_check_axes(p, a)), logical_axes, is_leaf=_is_axes)


def matrix_axes(axes: tuple, per_head: bool = False) -> tuple[int, ...]:
  """Positions of the non-batch axes of a parameter (the matrix axes).

  Args:
    axes: the parameter's logical axis names.
    per_head: also treat ``HEAD_AXES`` as batch axes.
  """
  batch = BATCH_AXES + (HEAD_AXES if per_head else ())
  return tuple(i for i, a in enumerate(axes) if a not in batch)


def is_matrix(axes: tuple, per_head: bool = False) -> bool:
  """A weight matrix: >= 2 non-batch axes, one of them a ``FEATURE_AXES`` axis (it
  reads from or writes to the residual stream or the FFN). Per-head vectors
  (``('heads', 'head_dim')`` norm scales, biases) and short convolution kernels
  are not matrices."""
  return (len(matrix_axes(axes, per_head)) >= 2
          and any(a in FEATURE_AXES for a in axes))


def label_for(axes: tuple, per_head: bool = False, group: str = "muon") -> str:
  """Optimizer group (``'adam'`` or ``group``) of one parameter's axis names."""
  if any(a in ADAM_AXES for a in axes) or not is_matrix(axes, per_head):
    return "adam"
  return group


def param_labels(logical_axes: Any, per_head: bool = False,
                 group: str = "muon") -> Any:
  """Labels every parameter ``'adam'`` or ``group`` from its logical axes.

  Args:
    logical_axes: pytree of tuples of axis names, shaped like the params.
    per_head: head axes are batch axes (see ``muon_dimension_numbers``).
    group: label of the matrix group (``'muon'`` or ``'namo'``).

  Returns:
    A pytree of the same structure with ``str`` leaves, usable as
    ``optax.partition(..., param_labels=...)``.

  Raises:
    ValueError: if a leaf is not a tuple of names.
  """
  return _map_axes(lambda axes: label_for(axes, per_head, group), logical_axes)


def muon_dimension_numbers(axes: tuple,
                           per_head: bool = False) -> MuonDimensionNumbers:
  """Muon's reduction (input) and output axes for one parameter.

  Batch axes (``BATCH_AXES``) are left out of both, so optax vmaps over them.
  The model stores weights inputs-first, outputs-last. If the first matrix axis
  is ``embed`` (a projection out of the residual stream, e.g. q
  ``('embed', 'heads', 'head_dim')``) it is the reduction axis and all other
  matrix axes are outputs; otherwise (e.g. ``('heads', 'head_dim', 'embed')``,
  ``('mlp', 'embed')``) the last matrix axis is the output and the rest reduce.
  optax flattens several reduction / output axes into one matrix dimension each.
  With ``per_head`` the ``HEAD_AXES`` join the batch axes, so each head's
  slice (q ``('embed', 'head_dim')``, o ``('head_dim', 'embed')``) is its own
  matrix.

  Args:
    axes: the parameter's logical axis names.
    per_head: treat ``heads`` / ``kv_heads`` as batch axes.

  Returns:
    ``MuonDimensionNumbers`` with tuples of non-negative axis positions.

  Raises:
    ValueError: if the parameter has fewer than 2 matrix axes.
  """
  mat = matrix_axes(axes, per_head)
  if len(mat) < 2:
    raise config_error("logical_axes", axes,
                       "Muon needs at least 2 non-batch axes",
                       "route this parameter to adam (see param_labels)")
  if axes[mat[0]] == EMBED_AXIS:
    return MuonDimensionNumbers(reduction_axis=mat[:1], output_axis=mat[1:])
  return MuonDimensionNumbers(reduction_axis=mat[:-1], output_axis=mat[-1:])


def decay_mask(logical_axes: Any) -> Any:
  """True for weight matrices (``is_matrix``: weight decay), False otherwise."""
  return _map_axes(is_matrix, logical_axes)


def muon_dimension_tree(logical_axes: Any, per_head: bool = False) -> Any:
  """Per-leaf dimension numbers for the muon group of ``optax.partition``.

  Inside ``optax.partition`` each group sees the updates through
  ``optax.masked``: leaves of other groups are replaced by ``optax.MaskedNode()``
  (an empty pytree node). ``scale_by_muon`` maps its dimension-number tree
  against those masked updates, so the tree must carry ``MaskedNode()`` at the
  same places (``None`` would not match).

  Args:
    logical_axes: pytree of tuples of axis names, shaped like the params.
    per_head: treat head axes as batch axes (see ``muon_dimension_numbers``).

  Returns:
    A pytree with ``MuonDimensionNumbers`` on muon leaves and ``MaskedNode()``
    on adam leaves.
  """
  return _map_axes(
      lambda axes: (muon_dimension_numbers(axes, per_head)
                    if label_for(axes, per_head) == "muon"
                    else optax.MaskedNode()), logical_axes)


def _is_dim_nums(x: Any) -> bool:
  return isinstance(x, MuonDimensionNumbers)


def _fans(shape: tuple[int, ...], dim_nums: MuonDimensionNumbers) -> tuple[int, int]:
  """(fan_in, fan_out): products of the reduction and output axis sizes."""
  fan_in = fan_out = 1
  for ax in dim_nums.reduction_axis:
    fan_in *= shape[ax]
  for ax in dim_nums.output_axis:
    fan_out *= shape[ax]
  return fan_in, fan_out


def scale_by_shape(dimension_numbers: Any,
                   consistent_rms: float | None = None
                   ) -> optax.GradientTransformation:
  """Scales each orthogonalised update by a factor of its matrix shape.

  ``consistent_rms=None``: ``sqrt(max(1, fan_out / fan_in))`` (Jordan's Muon;
  what ``optax.contrib.muon`` applies by default). A float ``r``:
  ``r * sqrt(max(fan_in, fan_out))`` (Liu et al. 2025, matching AdamW's update
  RMS with ``r = 0.2``). Fans exclude batch axes.

  Args:
    dimension_numbers: pytree like the (masked) updates with
      ``MuonDimensionNumbers`` leaves, e.g. from ``muon_dimension_tree``.
    consistent_rms: optional RMS target, see above.

  Returns:
    A stateless ``optax.GradientTransformation``.
  """

  def scale(u: jax.Array, dim_nums: MuonDimensionNumbers) -> jax.Array:
    fan_in, fan_out = _fans(u.shape, dim_nums)
    if consistent_rms is None:
      factor = max(1.0, fan_out / fan_in) ** 0.5
    else:
      factor = consistent_rms * max(fan_in, fan_out) ** 0.5
    return u * jnp.asarray(factor, u.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(scale, updates, dimension_numbers,
                        is_leaf=_is_dim_nums), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


class Built(NamedTuple):
  """What ``build_optimizer`` returns.

  Attributes:
    tx: the whole gradient transformation (clip, then the optimizer).
    learning_rates: group name (``'adam'``, ``'muon'``, ``'namo'``) ->
      schedule, for logging the learning rate of each group at a step.
    labels: pytree like the params with each parameter's group name.
  """
  tx: optax.GradientTransformation
  learning_rates: dict[str, Schedule]
  labels: Any


def _sub(cfg: Any) -> Any:
  """Accepts the ``optimizer`` node or a whole experiment config."""
  if isinstance(cfg, dict):
    return cfg.get("optimizer", cfg)
  return getattr(cfg, "optimizer", cfg)


def _optional(cfg: Any, name: str, default: Any) -> Any:
  if isinstance(cfg, dict) or hasattr(cfg, "get"):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def _adamw(cfg: Any, schedule: Schedule, mask: Any) -> optax.GradientTransformation:
  b1 = sched_lib.check_range("optimizer.b1", get_field(cfg, "b1"), 0.0, 1.0,
                             hi_open=True)
  b2 = sched_lib.check_range("optimizer.b2", get_field(cfg, "b2"), 0.0, 1.0,
                             hi_open=True)
  eps = sched_lib.check_positive("optimizer.eps", get_field(cfg, "eps"))
  wd = sched_lib.check_range("optimizer.weight_decay",
                             get_field(cfg, "weight_decay"), 0.0, float("inf"))
  return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                     mask=mask)


def _bool(cfg: Any, name: str, prefix: str, default: Any = None) -> bool:
  """Reads a bool field (required when ``default`` is None)."""
  value = (get_field(cfg, name, prefix) if default is None
           else _optional(cfg, name, default))
  if not isinstance(value, bool):
    raise config_error(f"{prefix}.{name}", value, "must be a bool",
                       "use True or False")
  return value


def _ns_steps(cfg: Any, prefix: str) -> int:
  ns_steps = get_field(cfg, "ns_steps", prefix)
  if not sched_lib.is_int(ns_steps) or ns_steps < 1:
    raise config_error(f"{prefix}.ns_steps", ns_steps, "must be an int >= 1",
                       "use 5 (Jordan's default)")
  return int(ns_steps)


def _muon(mcfg: Any, schedule: Schedule, dim_tree: Any
          ) -> optax.GradientTransformation:
  """The muon group: momentum + Newton-Schulz, shape scale, decay, -lr."""
  p = "optimizer.muon"
  beta = sched_lib.check_range(f"{p}.momentum", get_field(mcfg, "momentum", p),
                               0.0, 1.0, hi_open=True)
  nesterov = _bool(mcfg, "nesterov", p)
  ns_steps = _ns_steps(mcfg, p)
  wd = sched_lib.check_range(f"{p}.weight_decay",
                             get_field(mcfg, "weight_decay", p), 0.0,
                             float("inf"))
  rms = _optional(mcfg, "consistent_rms", None)
  if rms is not None:
    rms = sched_lib.check_positive(f"{p}.consistent_rms", rms)
  ns_dtype = _optional(mcfg, "ns_dtype", "float32")
  if ns_dtype not in NS_DTYPES:
    raise config_error(f"{p}.ns_dtype", ns_dtype, "unknown dtype",
                       f"use one of {', '.join(NS_DTYPES)}")
  if ns_dtype == "float32":  # optax's own Newton-Schulz, in the update's dtype
    orthogonalised = [optax_contrib.scale_by_muon(
        ns_steps=ns_steps, beta=beta, nesterov=nesterov, weight_dimension_numbers=dim_tree)]
  else:  # optax's momentum and normalisation, then our Newton-Schulz in bf16
    orthogonalised = [
        optax_contrib.scale_by_muon(ns_steps=0, beta=beta, nesterov=nesterov,
                                    weight_dimension_numbers=dim_tree),
        namo_lib.orthogonalize(ns_steps, NS_DTYPES[ns_dtype], dim_tree)]
  return optax.chain(
      *orthogonalised,
      scale_by_shape(dim_tree, consistent_rms=rms),
      optax.add_decayed_weights(wd),
      optax.scale_by_learning_rate(schedule),
  )


NS_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _namo(ncfg: Any, schedule: Schedule, dim_tree: Any, per_column: bool
          ) -> optax.GradientTransformation:
  """The namo group: ``optim.namo.namo`` (or ``namo_d``) from ``optimizer.namo``."""
  p = "optimizer.namo"
  field = lambda name: get_field(ncfg, name, p)
  unit = lambda name: sched_lib.check_range(f"{p}.{name}", field(name), 0.0,
                                            1.0, hi_open=True)
  mode = field("weight_decay_mode")
  if mode not in namo_lib.WEIGHT_DECAY_MODES:
    raise config_error(f"{p}.weight_decay_mode", mode, "unknown mode",
                       f"use one of {', '.join(namo_lib.WEIGHT_DECAY_MODES)}")
  ns_dtype = _optional(ncfg, "ns_dtype", "bfloat16")
  if ns_dtype not in NS_DTYPES:
    raise config_error(f"{p}.ns_dtype", ns_dtype, "unknown dtype",
                       f"use one of {', '.join(NS_DTYPES)}")
  kwargs = dict(
      b1=unit("b1"), b2=unit("b2"),
      eps=sched_lib.check_positive(f"{p}.eps", field("eps")),
      weight_decay=sched_lib.check_range(f"{p}.weight_decay",
                                         field("weight_decay"), 0.0,
                                         float("inf")),
      weight_decay_mode=mode, nesterov=_bool(ncfg, "nesterov", p),
      ns_steps=_ns_steps(ncfg, p),
      scale=sched_lib.check_positive(f"{p}.scale", field("scale")),
      ns_dtype=NS_DTYPES[ns_dtype], weight_dimension_numbers=dim_tree)
  if not per_column:
    return namo_lib.namo(schedule, **kwargs)
  clamp_c = sched_lib.check_range(f"{p}.clamp_c", field("clamp_c"), 0.0, 1.0,
                                  lo_open=True)
  return namo_lib.namo_d(schedule, clamp_c=clamp_c, **kwargs)


def build_optimizer(cfg: Any, logical_axes: Any, total_steps: int) -> Built:
  """Builds the optimizer named by ``cfg.name`` for params with these axes.

  Chain: ``clip_by_global_norm(clip_norm)`` on the whole gradient (skipped when
  ``clip_norm == 0``), then

  * ``adamw``: ``optax.adamw`` with weight decay on parameters with >= 2 matrix
    axes only;
  * ``muon``: ``optax.partition({'muon': ..., 'adam': ...}, param_labels)``;
    the muon group is ``scale_by_muon`` (per-leaf dimension numbers from the
    axis names) -> ``scale_by_shape`` -> ``add_decayed_weights(muon.weight_decay)``
    -> ``scale_by_learning_rate(muon schedule)``; the adam group is the AdamW
    above with the base ``learning_rate`` schedule;
  * ``optimizer.freeze_axes`` (optional): parameters with any of these logical
    axes get the label ``'frozen'`` and a zero update (``optax.set_to_zero``);
    so do parameters with a ``STATE_AXES`` axis (updated outside the optimizer);
  * ``namo`` / ``namo_d``: the same partition with group ``'namo'`` =
    ``optim.namo.namo`` / ``namo_d`` configured by ``optimizer.namo``
    (learning_rate, b1, b2, eps, weight_decay, weight_decay_mode, nesterov,
    ns_steps, scale; clamp_c for ``namo_d``; optional ns_dtype, per_head).

  ``optimizer.<muon|namo>.per_head`` (optional, default False) makes the head
  axes batch axes of the matrix group (one matrix per attention head).

  Args:
    cfg: the ``optimizer`` config node (or a whole config with ``.optimizer``).
    logical_axes: pytree like the params with tuples of axis names as leaves.
    total_steps: number of training steps, for the schedules.

  Returns:
    ``Built(tx, learning_rates, labels)``.

  Raises:
    ValueError: unknown optimizer or schedule, out-of-range values, or a bad
      logical-axes leaf (one line naming the field, the value and the fix).
  """
  cfg = _sub(cfg)
  name = get_field(cfg, "name")
  if name not in OPTIMIZERS:
    raise config_error("optimizer.name", name, "unknown optimizer",
                       f"use one of {', '.join(OPTIMIZERS)}")
  clip = sched_lib.check_range("optimizer.clip_norm", get_field(cfg, "clip_norm"),
                               0.0, float("inf"))
  adam_lr = sched_lib.make_schedule(get_field(cfg, "learning_rate"), cfg,
                                    total_steps)
  adamw = _adamw(cfg, adam_lr, decay_mask(logical_axes))
  freeze = tuple(_optional(cfg, "freeze_axes", ()) or ()) + STATE_AXES
  frozen = _map_axes(lambda axes: any(a in freeze for a in axes), logical_axes)
  if name == "adamw":
    groups, rates = {"adam": adamw}, {"adam": adam_lr}
    labels = _map_axes(lambda axes: "adam", logical_axes)
  else:
    group = "muon" if name == "muon" else "namo"
    prefix = f"optimizer.{group}"
    gcfg = _optional(cfg, group, {})  # Missing: errors name its first field.
    per_head = _bool(gcfg, "per_head", prefix, default=False)
    lr = sched_lib.make_schedule(
        get_field(gcfg, "learning_rate", prefix), cfg, total_steps,
        field=f"{prefix}.learning_rate")
    dim_tree = muon_dimension_tree(logical_axes, per_head)
    # Frozen matrices are masked out of the matrix group like AdamW's leaves.
    dim_tree = jax.tree.map(lambda f, d: optax.MaskedNode() if f else d, frozen, dim_tree)
    if group == "muon":
      matrices = _muon(gcfg, lr, dim_tree)
    else:
      matrices = _namo(gcfg, lr, dim_tree, per_column=name == "namo_d")
    labels = param_labels(logical_axes, per_head, group)
    groups, rates = {group: matrices, "adam": adamw}, {group: lr, "adam": adam_lr}
  if any(jax.tree.leaves(frozen)):
    labels = jax.tree.map(lambda f, l: "frozen" if f else l, frozen, labels)
    groups["frozen"] = optax.set_to_zero()
  tx = groups["adam"] if len(groups) == 1 else optax.partition(groups, labels)
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return Built(tx=tx, learning_rates=rates, labels=labels)
