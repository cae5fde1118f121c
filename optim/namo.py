"""NAMO and NAMO-D: Adam-style adaptive step sizes on orthogonalised momentum.

Zhang, Liu, Schaeffer, "Adam Improves Muon: Adaptive Moment Estimation with
Orthogonalized Momentum" (arXiv 2602.17080). Equation numbers below are those
of ``/work/shared/REFERENCES.md`` (Optimizers, NAMO / NAMO-D), which restates
the paper's per-matrix update. For one weight matrix W with gradient G and
t = 1, 2, ...:

1. M = mu1 M + (1 - mu1) G;  N = mu1 M + (1 - mu1) G (Nesterov) or N = M.
2. v = mu2 v + (1 - mu2) ||G||_F^2  (one fp32 scalar per matrix).
3. O = NS5(N)  (Muon's quintic Newton-Schulz).
4. alpha = lr sqrt(1 - mu2^t) / (1 - mu1^t) ||N||_F / (sqrt(v) + eps).
5. W <- W (1 - lambda min(alpha, 1));  W <- W - min(alpha s, 1) O,
   s = scale sqrt(max(m, n)).

NAMO-D keeps v per input feature j, d_j = ||N[:, j]|| / (sqrt(v_j) + eps)
clamped to [c mean(d), mean(d) / c], and uses alpha_j = b d_j with
b = lr sqrt(1 - mu2^t) / (1 - mu1^t) in place of alpha, column by column.

Choices made here (the paper leaves them open or states them for PyTorch):

* Layout. Kestrel stores weights inputs-first (``y = x W``); which axes are
  inputs is given per leaf by ``optax.contrib.MuonDimensionNumbers``, exactly
  as in ``optax.contrib.scale_by_muon``: batch axes (all others) are vmapped,
  several reduction / output axes are flattened to one matrix dimension each,
  giving ``(B, R, O)``. The paper's W (m x n, n = inputs) is our ``W_RO^T``, so
  its column j ("input feature") is our row r of the reduction side, and
  NAMO-D's v, d and per-column step live on the reduction axes.
* State. ``mu`` (M) is shaped like the params (dtype ``mu_dtype``, default the
  param dtype, as optax). ``nu`` (v) is always fp32: NAMO, shape = the batch
  axes' sizes (``()`` for a plain matrix); NAMO-D, batch sizes followed by the
  reduction axes' sizes (the order of ``MuonDimensionNumbers``).
* Step count. ``count`` is the number of updates already applied (0 at init);
  an update uses ``t = count + 1`` in the bias corrections of eq. 4 and
  ``lr = learning_rate(count)`` for a schedule, as ``optax.scale_by_learning_rate``
  does (so a warmup from 0 gives a zero first step, like the AdamW group).
* Clipping. The paper's G is the clipped gradient; ``optim.chain`` clips the
  global norm of the whole gradient before partitioning, so G here is already
  clipped. This module does no clipping of its own.
* Newton-Schulz. ``optax.contrib`` exports no orthogonaliser (it is private in
  ``optax.contrib._muon``), so ``newton_schulz`` below is ours: Frobenius
  normalisation in fp32, then 5 quintic steps in ``ns_dtype`` (bf16 default,
  as the paper), iterating on the wide orientation. It mirrors optax's op
  order (``A = X X^T; B = b A + c A A; X = a X + B X``).
* Weight decay. ``weight_decay_mode='adaptive'`` is eq. 5 as published
  (factor ``1 - lambda min(alpha, 1)``, per column for NAMO-D);
  ``'lr'`` is AdamW-style decoupled decay, factor ``1 - lr lambda``. The decay
  uses the current W, then the step is subtracted (decay then step).
* Additive form. optax updates are added to the params, so both methods
  return ``u = -decay W - min(alpha s, 1) O`` and need ``params`` in
  ``update``.
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

from core.errors import ConfigError, check_choice, check_int, check_positive, check_range

MuonDimensionNumbers = optax_contrib.MuonDimensionNumbers
ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Jordan's quintic (a, b, c).
NS_EPS = 1e-7  # Added to ||X||_F before the first Newton-Schulz step.
WEIGHT_DECAY_MODES = ("adaptive", "lr")


class NamoState(NamedTuple):
  """State of ``namo`` / ``namo_d``.

  Attributes:
    count: int32 scalar, updates applied so far (t - 1 at the next update).
    mu: first moment M (eq. 1), like the params.
    nu: fp32 second moment v (eq. 2): per matrix (NAMO) or per input feature
      (NAMO-D); see the module docstring for shapes.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def newton_schulz(x_RO: jax.Array, ns_steps: int = 5,
                  coeffs: tuple[float, float, float] = NS_COEFFS,
                  dtype: Any = jnp.bfloat16) -> jax.Array:
  """Approximate orthogonalisation ``U V^T`` of one matrix (eq. 3, Jordan 2024).

  ``X = x / (||x||_F + 1e-7)`` in fp32, cast to ``dtype``; if ``X`` is tall it is
  transposed (``NS(X^T) = NS(X)^T``, so only the smaller Gram matrix is
  formed); then ``ns_steps`` times ``A = X X^T; X = a X + (b A + c A A) X``.
  The per-matrix twin of ``newton_schulz_many``.

  Args:
    x_RO: a 2-D matrix.
    ns_steps: number of quintic iterations.
    coeffs: (a, b, c) of the quintic.
    dtype: dtype of the iterations (``jnp.bfloat16`` as the paper).

  Returns:
    fp32 matrix of the shape of ``x_RO`` with singular values near 1.
  """
  x = x_RO.astype(jnp.float32)
  x = x / (jnp.linalg.norm(x) + NS_EPS)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  x = _quintic(x[None].astype(dtype), ns_steps, coeffs)[0].astype(jnp.float32)
  return x.T if tall else x


def _quintic(x_BRO: jax.Array, ns_steps: int, coeffs) -> jax.Array:
  """``ns_steps`` quintic iterations on a stack of wide matrices, in their dtype."""
  a, b, c = coeffs
  for _ in range(ns_steps):
    gram = jnp.einsum("bro,bso->brs", x_BRO, x_BRO)
    poly = b * gram + c * jnp.einsum("brs,bst->brt", gram, gram)
    x_BRO = a * x_BRO + jnp.einsum("brs,bso->bro", poly, x_BRO)
  return x_BRO


class Spread(NamedTuple):
  """Where the stacked Newton-Schulz iterations run: split over ``size`` devices (every
  device orthogonalises its share of the matrices), the results gathered back (as
  distributed Muon implementations do). The caller says how (``lm.sharding``): this
  library never sees the devices.

  Attributes:
    size: the number of devices the first axis is split over.
    place: ``place(x, split)``: ``x`` constrained to be split along its first axis over
      those devices (``split=True``) or replicated on them (``False``).
  """
  size: int
  place: Callable[[jax.Array, bool], jax.Array]


def newton_schulz_many(stacks: list[jax.Array], ns_steps: int = 5,
                       dtype: Any = jnp.bfloat16, spread: Spread | None = None,
                       coeffs: tuple[float, float, float] = NS_COEFFS) -> list[jax.Array]:
  """``newton_schulz`` of every matrix of every stack ``[B, R, O]``, batched: matrices of
  one shape (tall ones transposed first) are concatenated and iterate together, one
  batched matmul per shape and step instead of one per matrix. With ``spread`` each
  shape's stack of at least half as many matrices as devices is gathered, padded to a
  multiple of the devices, split over them, and the results gathered (replicated)
  before they are cut back into stacks.

  Returns:
    fp32 stacks shaped like ``stacks``.
  """
  prepared, groups = [], {}
  for i, x in enumerate(stacks):
    x = x.astype(jnp.float32)
    x = x / (jnp.linalg.norm(x, axis=(1, 2), keepdims=True) + NS_EPS)
    tall = x.shape[1] > x.shape[2]
    prepared.append(x.swapaxes(1, 2) if tall else x)
    groups.setdefault(prepared[-1].shape[1:], []).append(i)
  out = [None] * len(stacks)
  for indices in groups.values():
    parts = [prepared[i].astype(dtype) for i in indices]
    count = sum(stacks[i].shape[0] for i in indices)
    # Split when at least half the devices get a matrix (padding at most doubles the work);
    # fewer matrices stay where sharding propagation puts them (each matrix's products
    # partitioned like its parameter).
    split = spread is not None and spread.size > 1 and 2 * count >= spread.size
    if split:  # gathered first (an all-gather), then cut: no resharding XLA cannot do
      parts = [spread.place(p, False) for p in parts]
    x = jnp.concatenate(parts, axis=0)
    n = x.shape[0]
    if split:
      x = spread.place(jnp.pad(x, ((0, -n % spread.size), (0, 0), (0, 0))), True)
      x = spread.place(_quintic(x, ns_steps, coeffs), False)[:n]
    else:
      x = _quintic(x, ns_steps, coeffs)
    x = x.astype(jnp.float32)
    start = 0
    for i in indices:
      size = stacks[i].shape[0]
      y = x[start:start + size]
      out[i] = y.swapaxes(1, 2) if stacks[i].shape[1] > stacks[i].shape[2] else y
      start += size
  return out


class _Layout(NamedTuple):
  """How one leaf maps to a stack of (R, O) matrices."""
  perm: tuple[int, ...]  # batch + reduction + output axes.
  batch: tuple[int, ...]  # Sizes of the batch axes.
  reduction: tuple[int, ...]  # Sizes of the reduction axes.
  output: tuple[int, ...]  # Sizes of the output axes.

  def flat(self, x: jax.Array) -> jax.Array:
    return x.transpose(self.perm).reshape(
        math.prod(self.batch), math.prod(self.reduction), math.prod(self.output))

  def unflat(self, x_BRO: jax.Array) -> jax.Array:
    inverse = tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))
    return x_BRO.reshape(self.batch + self.reduction + self.output).transpose(
        inverse)

  def nu_shape(self, per_column: bool) -> tuple[int, ...]:
    return self.batch + (self.reduction if per_column else ())


def _as_tuple(axis: Any, ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axes)


def _layout(shape: tuple[int, ...], dim_nums: MuonDimensionNumbers) -> _Layout:
  """Batch / reduction / output split of ``shape`` (as optax's scale_by_muon)."""
  ndim = len(shape)
  red = _as_tuple(dim_nums.reduction_axis, ndim)
  out = _as_tuple(dim_nums.output_axis, ndim)
  if not red or not out or set(red) & set(out):
    raise ValueError(f"NAMO: dimension numbers {dim_nums} for shape {shape} "
                     "need disjoint, non-empty reduction and output axes.")
  batch = tuple(sorted(set(range(ndim)) - set(red) - set(out)))
  size = lambda axes: tuple(shape[a] for a in axes)
  return _Layout(batch + red + out, size(batch), size(red), size(out))


def _is_dim_nums(x: Any) -> bool:
  return isinstance(x, MuonDimensionNumbers)


def _layouts(tree: Any, dimension_numbers: Any) -> tuple[list[_Layout], Any]:
  """One ``_Layout`` per array leaf of ``tree``, and the tree's structure.

  ``dimension_numbers``: ``None`` (every leaf is a 2-D (input, output)
  matrix), one ``MuonDimensionNumbers`` for every leaf, or a pytree shaped like
  ``tree`` with ``MuonDimensionNumbers`` leaves (``optax.MaskedNode()`` where
  ``optax.partition`` masked a leaf out, e.g. ``chain.muon_dimension_tree``).
  """
  leaves, treedef = jax.tree.flatten(tree)
  if dimension_numbers is None or _is_dim_nums(dimension_numbers):
    dn = dimension_numbers or MuonDimensionNumbers()
    dims = [dn] * len(leaves)
  else:
    dims, dims_def = jax.tree.flatten(dimension_numbers, is_leaf=_is_dim_nums)
    if dims_def != treedef or not all(map(_is_dim_nums, dims)):
      raise ValueError(
          "NAMO: weight_dimension_numbers must be shaped like the params, with "
          f"MuonDimensionNumbers leaves; got {dims_def} for params {treedef}.")
  return [_layout(x.shape, d) for x, d in zip(leaves, dims)], treedef


def orthogonalize(ns_steps: int = 5, dtype: Any = jnp.bfloat16,
                  weight_dimension_numbers: Any = None,
                  spread: Spread | None = None) -> optax.GradientTransformation:
  """Stateless: each matrix of the update becomes ``newton_schulz(update)``.

  The per-leaf layout follows ``weight_dimension_numbers`` as in
  ``optax.contrib.scale_by_muon`` (batch axes are stacks of matrices). Chained after
  ``scale_by_muon(ns_steps=0)`` (momentum and Frobenius normalisation only) it
  gives Muon with its Newton-Schulz iterations in ``dtype`` (bf16, as Jordan's
  Muon), which optax's own routine does not offer (it iterates in the input dtype).
  All matrices of one shape iterate together (``newton_schulz_many``), split over the
  devices of ``spread`` when given.
  """

  def update_fn(updates, state, params=None):
    del params
    layouts, treedef = _layouts(updates, weight_dimension_numbers)
    leaves = treedef.flatten_up_to(updates)
    done = newton_schulz_many([lay.flat(u.astype(jnp.float32)) for lay, u in zip(layouts, leaves)],
                              ns_steps, dtype, spread)
    out = [lay.unflat(o).astype(u.dtype) for lay, o, u in zip(layouts, done, leaves)]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _namo(learning_rate: ScalarOrSchedule, *, per_column: bool, b1: float,
          b2: float, eps: float, weight_decay: float, weight_decay_mode: str,
          nesterov: bool, ns_steps: int, scale: float, clamp_c: float,
          ns_dtype: Any, mu_dtype: Any, weight_dimension_numbers: Any,
          spread: Spread | None = None) -> optax.GradientTransformation:
  """Shared builder of ``namo`` (``per_column=False``) and ``namo_d``."""
  for name, value in (("b1", b1), ("b2", b2)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"NAMO: {name}={value!r} must lie in [0, 1).")
  if weight_decay_mode not in WEIGHT_DECAY_MODES:
    raise ValueError(f"NAMO: weight_decay_mode={weight_decay_mode!r}; use one "
                     f"of {WEIGHT_DECAY_MODES}.")
  if per_column and not 0.0 < clamp_c <= 1.0:
    raise ValueError(f"NAMO-D: clamp_c={clamp_c!r} must lie in (0, 1].")
  if eps <= 0 or weight_decay < 0 or scale <= 0 or ns_steps < 1:
    raise ValueError(f"NAMO: need eps > 0, weight_decay >= 0, scale > 0, "
                     f"ns_steps >= 1; got {eps}, {weight_decay}, {scale}, "
                     f"{ns_steps}.")

  def moments(g_RO, m_RO):
    """Eq. 1 for one (R, O) matrix: (M, N) in fp32."""
    m_RO = b1 * m_RO + (1 - b1) * g_RO
    return m_RO, (b1 * m_RO + (1 - b1) * g_RO if nesterov else m_RO)

  def matrix_step(g_RO, n_RO, o_RO, v, w_RO, lr, bias):
    """Eqs. 2, 4, 5 for one (R, O) matrix given O = NS(N) (eq. 3); returns (u_RO, v)."""
    s = scale * max(g_RO.shape) ** 0.5
    if per_column:  # Paper column j = our reduction row r.
      v = b2 * v + (1 - b2) * jnp.sum(jnp.square(g_RO), axis=1)  # Eq. 2 (D).
      d_R = jnp.linalg.norm(n_RO, axis=1) / (jnp.sqrt(v) + eps)
      mean = jnp.mean(d_R)
      d_R = jnp.clip(d_R, clamp_c * mean, mean / clamp_c)
      alpha = (lr * bias * d_R)[:, None]  # (R, 1)
    else:
      v = b2 * v + (1 - b2) * jnp.sum(jnp.square(g_RO))  # Eq. 2.
      alpha = lr * bias * jnp.linalg.norm(n_RO) / (jnp.sqrt(v) + eps)  # Eq. 4.
    if weight_decay_mode == "adaptive":  # Eq. 5, first half.
      decay = weight_decay * jnp.minimum(alpha, 1.0)
    else:
      decay = lr * weight_decay
    step = jnp.minimum(alpha * s, 1.0) * o_RO  # Eq. 5, second half.
    return -(decay * w_RO + step), v

  def init_fn(params):
    layouts, treedef = _layouts(params, weight_dimension_numbers)
    nu = [jnp.zeros(lay.nu_shape(per_column), jnp.float32) for lay in layouts]
    return NamoState(count=jnp.zeros([], jnp.int32),
                     mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                     nu=jax.tree.unflatten(treedef, nu))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("NAMO: update() needs params (eq. 5 decays W itself); "
                       "call tx.update(grads, state, params).")
    layouts, treedef = _layouts(updates, weight_dimension_numbers)
    if not layouts:  # no matrix in this group
      return updates, state._replace(count=optax.safe_increment(state.count))
    t = (state.count + 1).astype(jnp.float32)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    lr = jnp.asarray(lr, jnp.float32)
    bias = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)  # Eq. 4 bias corrections.
    step = jax.vmap(matrix_step, in_axes=(0, 0, 0, 0, 0, None, None))
    flat = lambda lay, x: lay.flat(x.astype(jnp.float32))
    grads, mus, nus, ws = (treedef.flatten_up_to(x) for x in (updates, state.mu, state.nu, params))
    g_flat = [flat(lay, g) for lay, g in zip(layouts, grads)]
    m_flat, n_flat = zip(*[jax.vmap(moments)(g, flat(lay, m))
                           for lay, g, m in zip(layouts, g_flat, mus)])
    o_flat = newton_schulz_many(list(n_flat), ns_steps, ns_dtype, spread)  # Eq. 3, batched.
    out_u, out_m, out_v = [], [], []
    for lay, grad, g, n, o, m_BRO, m, v, w in zip(layouts, grads, g_flat, n_flat, o_flat,
                                                  m_flat, mus, nus, ws):
      v_B = v.reshape((math.prod(lay.batch),) + ((-1,) if per_column else ()))
      u_BRO, v_B = step(g, n, o, v_B, flat(lay, w), lr, bias)
      out_u.append(lay.unflat(u_BRO).astype(grad.dtype))
      out_m.append(lay.unflat(m_BRO).astype(m.dtype))
      out_v.append(v_B.reshape(v.shape))
    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    return unflatten(out_u), NamoState(count=optax.safe_increment(state.count),
                                       mu=unflatten(out_m), nu=unflatten(out_v))

  return optax.GradientTransformation(init_fn, update_fn)


def namo(learning_rate: ScalarOrSchedule, b1: float = 0.95, b2: float = 0.99,
         eps: float = 1e-8, weight_decay: float = 0.1,
         weight_decay_mode: str = "adaptive", nesterov: bool = True,
         ns_steps: int = 5, scale: float = 0.2, ns_dtype: Any = jnp.bfloat16,
         mu_dtype: Any = None, weight_dimension_numbers: Any = None,
         spread: Spread | None = None) -> optax.GradientTransformation:
  """NAMO (Zhang, Liu, Schaeffer 2026, eqs. 1-5): one adaptive scale per matrix.

  The whole update, learning rate and weight decay included: apply with
  ``optax.apply_updates``. See the module docstring for layout and choices.

  Args:
    learning_rate: lr of eq. 4, a float or a schedule of the update count.
    b1: mu1, momentum of M (eq. 1).
    b2: mu2, decay of v (eq. 2).
    eps: added to sqrt(v) (eq. 4).
    weight_decay: lambda (eq. 5).
    weight_decay_mode: ``'adaptive'`` (eq. 5: ``lambda min(alpha, 1)``) or
      ``'lr'`` (AdamW-style ``lr lambda``).
    nesterov: N = mu1 M + (1 - mu1) G if True, else N = M (eq. 1).
    ns_steps: Newton-Schulz iterations (eq. 3).
    scale: s = scale sqrt(max(m, n)) (eq. 5; 0.2 matches AdamW's RMS).
    ns_dtype: dtype of the Newton-Schulz iterations.
    mu_dtype: dtype of M; None keeps the param dtype.
    weight_dimension_numbers: ``None`` (2-D leaves), one
      ``MuonDimensionNumbers`` or a pytree of them like the params
      (``optax.MaskedNode()`` at leaves masked out by ``optax.partition``).
    spread: split the Newton-Schulz iterations over devices (``Spread``); None: every
      device orthogonalises every matrix.

  Returns:
    An ``optax.GradientTransformation`` with ``NamoState``; its ``update``
    requires ``params``.
  """
  return _namo(learning_rate, per_column=False, b1=b1, b2=b2, eps=eps,
               weight_decay=weight_decay, weight_decay_mode=weight_decay_mode,
               nesterov=nesterov, ns_steps=ns_steps, scale=scale, clamp_c=1.0,
               ns_dtype=ns_dtype, mu_dtype=mu_dtype,
               weight_dimension_numbers=weight_dimension_numbers, spread=spread)


def namo_d(learning_rate: ScalarOrSchedule, b1: float = 0.95, b2: float = 0.99,
           eps: float = 1e-8, weight_decay: float = 0.1,
           weight_decay_mode: str = "adaptive", nesterov: bool = True,
           ns_steps: int = 5, scale: float = 0.2, clamp_c: float = 0.5,
           ns_dtype: Any = jnp.bfloat16, mu_dtype: Any = None,
           weight_dimension_numbers: Any = None, spread: Spread | None = None
           ) -> optax.GradientTransformation:
  """NAMO-D (Zhang, Liu, Schaeffer 2026): one adaptive scale per input feature.

  Eqs. 1 and 3 as NAMO; eq. 2 per input feature j (``v_j`` from
  ``||G[:, j]||^2``, i.e. our reduction rows); eq. 4 becomes
  ``d_j = ||N[:, j]|| / (sqrt(v_j) + eps)`` clamped to
  ``[c mean(d), mean(d) / c]`` (mean over the features of one matrix) and
  ``alpha_j = b d_j``, ``b = lr sqrt(1 - mu2^t) / (1 - mu1^t)``; eq. 5 per
  feature: decay ``lambda min(alpha_j, 1)`` (``'adaptive'``) and step
  ``min(alpha_j s, 1) O[:, j]``. With ``c = 1`` every ``d_j`` equals
  ``mean(d)``: one step size per matrix, ``b mean_j(d_j)``, which in general
  differs from NAMO's ``alpha`` (a mean of per-feature ratios, not the ratio of
  the norms).

  Args:
    learning_rate: lr, a float or a schedule of the update count.
    b1: mu1.
    b2: mu2.
    eps: added to sqrt(v_j).
    weight_decay: lambda.
    weight_decay_mode: ``'adaptive'`` or ``'lr'`` (see ``namo``).
    nesterov: Nesterov form of N.
    ns_steps: Newton-Schulz iterations.
    scale: s = scale sqrt(max(m, n)).
    clamp_c: c in (0, 1].
    ns_dtype: dtype of the Newton-Schulz iterations.
    mu_dtype: dtype of M; None keeps the param dtype.
    weight_dimension_numbers: as in ``namo``.
    spread: as in ``namo``.

  Returns:
    An ``optax.GradientTransformation`` with ``NamoState``; its ``update``
    requires ``params``.
  """
  return _namo(learning_rate, per_column=True, b1=b1, b2=b2, eps=eps,
               weight_decay=weight_decay, weight_decay_mode=weight_decay_mode,
               nesterov=nesterov, ns_steps=ns_steps, scale=scale,
               clamp_c=clamp_c, ns_dtype=ns_dtype, mu_dtype=mu_dtype,
               weight_dimension_numbers=weight_dimension_numbers, spread=spread)


@dataclasses.dataclass(frozen=True)
class NamoConfig:
  """The NAMO / NAMO-D group's hyperparameters (``optimizer.namo``); see ``namo``.

  Attributes:
    learning_rate: peak lr (the paper's GPT-2-small peak; NAMO-D: 9e-3).
    b1, b2: mu1, mu2.
    eps: added to sqrt(v).
    weight_decay: lambda.
    weight_decay_mode: ``adaptive`` (the paper) or ``lr`` (AdamW-style).
    nesterov: Nesterov form of N.
    ns_steps: Newton-Schulz iterations.
    ns_dtype: dtype of the Newton-Schulz iterations.
    scale: step scale s = scale * sqrt(max(m, n)).
    clamp_c: NAMO-D: per-column scales clamped to [c, 1/c] x mean.
    per_head: each attention head's projection is its own matrix.
    distribute: on a mesh of several devices, each device orthogonalises its share of
      the matrices and the results are gathered (``Spread``); False: every device
      orthogonalises every matrix.
  """
  learning_rate: float = 1.2e-2
  b1: float = 0.95
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.1
  weight_decay_mode: str = "adaptive"
  nesterov: bool = True
  ns_steps: int = 5
  ns_dtype: str = "bfloat16"
  scale: float = 0.2
  clamp_c: float = 0.5
  per_head: bool = False
  distribute: bool = True

  def __post_init__(self):
    check_positive("learning_rate", self.learning_rate)
    for name in ("b1", "b2"):
      check_range(name, getattr(self, name), 0.0, 1.0, hi_open=True)
    check_positive("eps", self.eps)
    check_range("weight_decay", self.weight_decay, 0.0, float("inf"))
    check_choice("weight_decay_mode", self.weight_decay_mode, WEIGHT_DECAY_MODES)
    check_int("ns_steps", self.ns_steps, 1)
    check_choice("ns_dtype", self.ns_dtype, NS_DTYPES)
    check_positive("scale", self.scale)
    check_range("clamp_c", self.clamp_c, 0.0, 1.0, lo_open=True)
    for name in ("nesterov", "per_head", "distribute"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(name, getattr(self, name), "must be a bool", "use True or False")


NS_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def namo_group(cfg: NamoConfig, schedule, dim_tree: Any, *, per_column: bool,
               spread: Spread | None = None) -> optax.GradientTransformation:
  """The namo group: ``namo`` (``per_column=False``) or ``namo_d`` from ``cfg``
  (``spread`` used when ``cfg.distribute``)."""
  kwargs = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                weight_decay_mode=cfg.weight_decay_mode, nesterov=cfg.nesterov,
                ns_steps=cfg.ns_steps, scale=cfg.scale, ns_dtype=NS_DTYPES[cfg.ns_dtype],
                weight_dimension_numbers=dim_tree,
                spread=spread if cfg.distribute else None)
  if per_column:
    return namo_d(schedule, clamp_c=cfg.clamp_c, **kwargs)
  return namo(schedule, **kwargs)
