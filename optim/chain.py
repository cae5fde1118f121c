"""Config -> optax chain: global-norm clipping, then AdamW or a matrix|AdamW partition.

Routing uses logical axis names only (never parameter paths). ``logical_axes``
is a pytree with the same structure as the params whose leaves are tuples of
axis names, e.g. ``('embed', 'mlp')``. Tuples are pytree nodes, so every map
over it passes ``is_leaf=_is_axes``.

* any ``vocab`` axis (embedding, output head) or ``router`` axis (MoE router)
  -> ``'adam'``;
* not a matrix (``is_matrix``: fewer than 2 non-batch axes, or no ``embed`` /
  ``mlp`` axis: norm scales, biases, per-head vectors, short conv kernels) -> ``'adam'``;
* otherwise -> the matrix group of the optimizer (``MATRIX_OPTIMIZERS``: ``'muon'``
  for Muon, ``'namo'`` for NAMO / NAMO-D). Batch axes (``BATCH_AXES``: stacked
  layers, experts; with ``per_head`` also ``HEAD_AXES``) are not part of the
  matrix; the matrix optimizers treat each batch slice as its own matrix.
* any axis of ``optimizer.freeze_axes`` -> ``'frozen'`` (zero update, no state).

AdamW decays the matrices of its group (``decay_mask``); with
``optimizer.decay_vocab=False`` not those with a ``vocab`` axis (embedding, head), as
the official NAMO / Muon code and nanoGPT do.

Only parameters reach the optimizer: model state that is not a parameter (the MoE
router's balancing bias) lives outside it.

Adding an optimizer for the matrices: a file with its ``GradientTransformation``,
its config dataclass and a group builder (``optim/muon.py``, ``optim/namo.py``),
and one entry in ``MATRIX_OPTIMIZERS`` plus its config field in
``OptimizerConfig`` (this file). The experiment config group is generated from
the dataclass (``experiments/configs/base.py``).
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import optax
from optax import contrib as optax_contrib

from core.errors import ConfigError, check_choice, check_int, check_positive, check_range
from optim import muon as muon_lib
from optim import namo as namo_lib
from optim import schedules as sched_lib

Schedule = sched_lib.Schedule
MuonDimensionNumbers = optax_contrib.MuonDimensionNumbers

# Axes that index a stack of independent matrices rather than a matrix dimension.
BATCH_AXES = ("layers", "expert")
# Attention head axes: batch axes too when ``per_head`` (one matrix per head).
HEAD_AXES = ("heads", "kv_heads")
# Axes whose parameters always stay on AdamW (embedding rows / head columns, the
# MoE router's expert-logit axis: routers are small and stay on AdamW).
ADAM_AXES = ("vocab", "router")
# The axis of the embedding's rows and the output head's columns.
VOCAB_AXIS = "vocab"
# The residual-stream axis: on the input side of projections out of the stream,
# on the output side of projections into it.
EMBED_AXIS = "embed"
# Axes of the residual stream and the FFN hidden layer: a matrix has one of them.
FEATURE_AXES = ("embed", "mlp")


def _is_axes(x: Any) -> bool:
  return isinstance(x, tuple)


def _check_axes(path: Any, axes: Any) -> tuple:
  """Returns ``axes`` if it is a tuple of axis names, else raises ValueError."""
  if not isinstance(axes, tuple) or not all(
      a is None or isinstance(a, str) for a in axes):
    raise ConfigError(
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
    raise ConfigError("logical_axes", axes,
                       "Muon needs at least 2 non-batch axes",
                       "route this parameter to adam (see param_labels)")
  if axes[mat[0]] == EMBED_AXIS:
    return MuonDimensionNumbers(reduction_axis=mat[:1], output_axis=mat[1:])
  return MuonDimensionNumbers(reduction_axis=mat[:-1], output_axis=mat[-1:])


def decay_mask(logical_axes: Any, decay_vocab: bool = True) -> Any:
  """True for weight matrices (``is_matrix``: weight decay), False otherwise; with
  ``decay_vocab=False`` also False for parameters with a ``vocab`` axis."""
  return _map_axes(lambda axes: is_matrix(axes) and (decay_vocab or VOCAB_AXIS not in axes),
                   logical_axes)


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


class MatrixOptimizer(NamedTuple):
  """How an optimizer updates the matrix group.

  Attributes:
    group: the group's label (and its learning rate's name in the logs).
    config: the ``OptimizerConfig`` field holding its hyperparameters.
    build: ``(config, schedule, dimension-number tree, spread) ->
      GradientTransformation`` (``spread``: ``optim.namo.Spread`` or None).
  """
  group: str
  config: str
  build: Callable[[Any, Schedule, Any, Any], optax.GradientTransformation]


# optimizer.name -> its matrix group; ``adamw`` has none (AdamW on everything).
MATRIX_OPTIMIZERS = {
    "muon": MatrixOptimizer("muon", "muon", muon_lib.muon_group),
    "namo": MatrixOptimizer("namo", "namo", lambda c, s, d, p: namo_lib.namo_group(
        c, s, d, per_column=False, spread=p)),
    "namo_d": MatrixOptimizer("namo", "namo", lambda c, s, d, p: namo_lib.namo_group(
        c, s, d, per_column=True, spread=p)),
}
OPTIMIZERS = ("adamw",) + tuple(MATRIX_OPTIMIZERS)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The ``optimizer`` config group.

  Attributes:
    name: one of ``OPTIMIZERS``.
    learning_rate: peak learning rate of AdamW (and of the AdamW group of the hybrids).
    schedule: one of ``optim.schedules.SCHEDULES``.
    warmup_steps: linear warmup from 0.
    decay_fraction: ``wsd``: share of the steps spent decaying.
    min_lr_ratio: final learning rate / peak.
    b1, b2, eps, weight_decay: AdamW's (decay on matrices only).
    decay_vocab: AdamW's decay also covers the matrices with a ``vocab`` axis
      (embedding, output head), for ``adamw`` and the AdamW group of the hybrids.
      False: decay 0 there, as the official NAMO code (``adamw_weight_decay: 0`` for
      the hybrids, no decay on ``wte`` / ``lm_head`` for AdamW) and nanoGPT.
    clip_norm: global-norm clipping of the whole gradient; 0 disables.
    freeze_axes: logical axes whose parameters are frozen, e.g. ``('vocab',)``.
    muon, namo: the matrix groups' hyperparameters (``MATRIX_OPTIMIZERS``).
  """
  name: str = "adamw"
  learning_rate: float = 3e-3
  schedule: str = "cosine"
  warmup_steps: int = 0
  decay_fraction: float = 0.2
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  decay_vocab: bool = True
  freeze_axes: tuple[str, ...] = ()
  muon: muon_lib.MuonConfig = muon_lib.MuonConfig()
  namo: namo_lib.NamoConfig = namo_lib.NamoConfig()

  def __post_init__(self):
    check_choice("name", self.name, OPTIMIZERS)
    check_choice("schedule", self.schedule, sched_lib.SCHEDULES)
    check_positive("learning_rate", self.learning_rate)
    check_int("warmup_steps", self.warmup_steps, 0)
    check_range("decay_fraction", self.decay_fraction, 0.0, 1.0, lo_open=True)
    check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
    for name in ("b1", "b2"):
      check_range(name, getattr(self, name), 0.0, 1.0, hi_open=True)
    check_positive("eps", self.eps)
    check_range("weight_decay", self.weight_decay, 0.0, float("inf"))
    check_range("clip_norm", self.clip_norm, 0.0, float("inf"))
    if not isinstance(self.decay_vocab, bool):
      raise ConfigError("decay_vocab", self.decay_vocab, "must be a bool", "use True or False")
    if not all(isinstance(a, str) for a in self.freeze_axes):
      raise ConfigError("freeze_axes", self.freeze_axes, "must be a tuple of axis names",
                        "use e.g. ('vocab',)")


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


def build_optimizer(cfg: OptimizerConfig, logical_axes: Any, total_steps: int,
                    spread: namo_lib.Spread | None = None) -> Built:
  """Builds the optimizer named by ``cfg.name`` for params with these axes.

  Chain: ``clip_by_global_norm(clip_norm)`` on the whole gradient (skipped when
  ``clip_norm == 0``), then

  * ``adamw``: ``optax.adamw`` with weight decay on parameters with >= 2 matrix
    axes only (``decay_mask``; without the ``vocab`` ones unless ``decay_vocab``);
  * a matrix optimizer (``MATRIX_OPTIMIZERS``):
    ``optax.partition({group: ..., 'adam': ...}, param_labels)``; the group is built
    from its config (per-leaf dimension numbers from the axis names, its own
    learning rate with the optimizer's schedule shape); the adam group is the
    AdamW above with the base ``learning_rate`` schedule;
  * ``freeze_axes``: parameters with any of these logical axes get the label
    ``'frozen'`` and a zero update (``optax.set_to_zero``).

  Args:
    cfg: ``OptimizerConfig``.
    logical_axes: pytree like the params with tuples of axis names as leaves.
    total_steps: number of training steps, for the schedules.
    spread: the devices a matrix optimizer may split its Newton-Schulz iterations over
      (``optim.namo.Spread``; used when its config's ``distribute`` is on).

  Returns:
    ``Built(tx, learning_rates, labels)``.

  Raises:
    core.errors.ConfigError: a schedule that does not fit ``total_steps``, or a bad
      logical-axes leaf (one line naming the field, the value and the fix).
  """
  adam_lr = sched_lib.make_schedule(cfg.learning_rate, cfg, total_steps)
  adamw = optax.adamw(adam_lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay,
                      mask=decay_mask(logical_axes, cfg.decay_vocab))
  frozen = _map_axes(lambda axes: any(a in cfg.freeze_axes for a in axes), logical_axes)
  matrix = MATRIX_OPTIMIZERS.get(cfg.name)
  if matrix is None:
    groups, rates = {"adam": adamw}, {"adam": adam_lr}
    labels = _map_axes(lambda axes: "adam", logical_axes)
  else:
    gcfg = getattr(cfg, matrix.config)
    lr = sched_lib.make_schedule(gcfg.learning_rate, cfg, total_steps)
    dim_tree = muon_dimension_tree(logical_axes, gcfg.per_head)
    # Frozen matrices are masked out of the matrix group like AdamW's leaves.
    dim_tree = jax.tree.map(lambda f, d: optax.MaskedNode() if f else d, frozen, dim_tree)
    labels = param_labels(logical_axes, gcfg.per_head, matrix.group)
    groups = {matrix.group: matrix.build(gcfg, lr, dim_tree, spread), "adam": adamw}
    rates = {matrix.group: lr, "adam": adam_lr}
  if any(jax.tree.leaves(frozen)):
    labels = jax.tree.map(lambda f, l: "frozen" if f else l, frozen, labels)
    groups["frozen"] = optax.set_to_zero()
  tx = groups["adam"] if len(groups) == 1 else optax.partition(groups, labels)
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return Built(tx=tx, learning_rates=rates, labels=labels)
