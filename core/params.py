"""Parameters tagged with logical axis names (``core.placement`` maps them to a mesh)."""
import jax
from flax import nnx


def logical_param(rngs: nnx.Rngs, shape, axes, fan_in: int, dtype) -> nnx.Param:
  """A truncated-normal (std 1/sqrt(fan_in)) parameter tagged with logical ``axes``."""
  init = jax.nn.initializers.truncated_normal(stddev=fan_in ** -0.5)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes),
                   eager_sharding=False)
