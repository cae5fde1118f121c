"""Kernel outputs and gradients inside ``jax.shard_map``'s varying-axes check.

A ``pallas_call`` declares its output type; inside ``shard_map`` (with
``check_vma``) that type must say which mesh axes the value varies over, and a
``custom_vjp`` must return gradients typed like their primals.
"""
import jax


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
  """The kernel's output type. Inside ``shard_map`` (with its varying-axes check)
  the output varies over every mesh axis any operand varies over."""
  mats = [getattr(jax.typeof(x), "mat", None) for x in operands]
  if any(m is None for m in mats):  # jax without manual-axis types
    return jax.ShapeDtypeStruct(shape, dtype)
  varying = frozenset().union(*(m.varying for m in mats))
  if not varying:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))


def extra_varying_axes(grad, primal) -> tuple[str, ...]:
  """Mesh axes (inside ``shard_map``) the gradient varies over but its primal does
  not: the primal was implicitly broadcast there, so its gradient sums over them."""
  g, p = (getattr(jax.typeof(x), "mat", None) for x in (grad, primal))
  if g is None or p is None:
    return ()
  return tuple(sorted(g.varying - p.varying))


def grad_like(grad: jax.Array, primal: jax.Array) -> jax.Array:
  """A kernel's gradient typed like its primal: summed over the mesh axes the
  primal was implicitly broadcast over (``extra_varying_axes``), in its dtype."""
  axes = extra_varying_axes(grad, primal)
  return (jax.lax.psum(grad, axes) if axes else grad).astype(primal.dtype)
