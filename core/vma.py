"""Typing of values inside ``jax.shard_map`` (its varying-manual-axes check).

Inside ``shard_map`` with ``check_vma`` every value carries the set of mesh axes it
varies over. A ``pallas_call`` declares its output type, so it must say so; a
``custom_vjp`` must return gradients typed like their primals; a constant that
starts a loop carry must vary like what the loop puts in it. Outside
``shard_map`` (or on a jax without these types) every helper is the identity.
"""
import jax


def varying_axes(x) -> frozenset:
  """The mesh axes ``x`` varies over (empty outside ``shard_map``)."""
  aval = jax.typeof(x)
  if hasattr(aval, "vma"):                       # jax <= 0.8
    return frozenset(aval.vma)
  mat = getattr(aval, "manual_axis_type", None)  # later: ManualAxisType.varying
  return frozenset(getattr(mat, "varying", ()))


def varying_like(x: jax.Array, ref) -> jax.Array:
  """``x`` typed as varying over every mesh axis ``ref`` varies over."""
  missing = tuple(sorted(varying_axes(ref) - varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def full_like_varying(shape, dtype, ref, fill=0.0) -> jax.Array:
  """``jnp.full(shape, fill, dtype)`` varying like ``ref`` (a scan carry's start)."""
  import jax.numpy as jnp
  return varying_like(jnp.full(shape, fill, dtype), ref)


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
  """A kernel's output type: it varies over every mesh axis any operand varies over."""
  mats = [getattr(jax.typeof(x), "mat", None) for x in operands]
  if any(m is None for m in mats):  # jax without manual-axis types
    return jax.ShapeDtypeStruct(shape, dtype)
  varying = frozenset().union(*(m.varying for m in mats))
  if not varying:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))


def grad_like(grad: jax.Array, primal: jax.Array) -> jax.Array:
  """A kernel's gradient typed like its primal: summed over the mesh axes the
  gradient varies over but the primal does not (the primal was implicitly
  broadcast there), in the primal's dtype."""
  axes = tuple(sorted(varying_axes(grad) - varying_axes(primal)))
  return (jax.lax.psum(grad, axes) if axes else grad).astype(primal.dtype)
