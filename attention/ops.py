"""``attend``: one attention op, many implementations, chosen by a string.

Implementations register under a name. ``implementation`` may be None (the best
available for the platform), a name, or a sequence of names tried in order; when
every candidate fails, one error lists every reason. The XLA reference
(``attention.reference``) is always available and is the ground truth the other
backends are tested against.
"""
from collections.abc import Callable, Sequence

import jax

from attention.reference import attend_reference
from attention.spec import AttentionSpec

AttendFn = Callable[..., jax.Array]

_REGISTRY: dict[str, AttendFn] = {}
# Preference order per platform when implementation=None.
_DEFAULT_ORDER = {"cpu": ("xla",), "gpu": ("jax_nn", "xla"), "tpu": ("xla",)}


class AttentionUnsupported(ValueError):
  """An implementation cannot handle these inputs (shape, dtype, mask, platform)."""


def register(name: str, fn: AttendFn) -> None:
  """Registers ``fn(q, k, v, spec, segment_ids=None)`` under ``name``."""
  _REGISTRY[name] = fn


def available_implementations() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def _jax_nn(q_BTNH, k_BSKH, v_BSKH, spec: AttentionSpec, segment_ids_BT=None):
  """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU when eligible)."""
  if segment_ids_BT is not None:
    raise AttentionUnsupported("jax_nn: segment ids are not wired up")
  local = (spec.sliding_window - 1, 0) if spec.sliding_window else None
  if local is not None and not spec.causal:
    raise AttentionUnsupported("jax_nn: a non-causal sliding window is not supported")
  try:
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, scale=spec.scale, is_causal=spec.causal,
        local_window_size=local)
  except (ValueError, TypeError, NotImplementedError) as e:
    raise AttentionUnsupported(f"jax_nn: {e}") from e


register("xla", attend_reference)
register("jax_nn", _jax_nn)


def _candidates(implementation) -> tuple[str, ...]:
  if implementation is None:
    return _DEFAULT_ORDER.get(jax.default_backend(), ("xla",))
  if isinstance(implementation, str):
    return (implementation,)
  if isinstance(implementation, Sequence) and implementation:
    return tuple(implementation)
  raise ValueError(
      f"implementation={implementation!r}: expected None, a name or a non-empty "
      f"sequence of names. Fix: use one of {available_implementations()}")


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
           spec: AttentionSpec = AttentionSpec(), *, segment_ids_BT=None,
           implementation: None | str | Sequence[str] = None) -> jax.Array:
  """Multi-head / grouped-query attention.

  Args:
    q_BTNH: queries [batch, q_len, heads, head_dim].
    k_BSKH, v_BSKH: keys, values [batch, kv_len, kv_heads, head_dim]; heads must
      be a multiple of kv_heads.
    spec: mask and scale (``AttentionSpec``).
    segment_ids_BT: optional packed-sequence ids; attention stays within a segment.
    implementation: None, a registered name, or names to try in order.

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  N, K = q_BTNH.shape[2], k_BSKH.shape[2]
  if K == 0 or N % K:
    raise ValueError(f"heads={N}, kv_heads={K}: heads must be a multiple of kv_heads. "
                     "Fix: choose kv_heads dividing heads")
  errors = []
  for name in _candidates(implementation):
    fn = _REGISTRY.get(name)
    if fn is None:
      errors.append(f"{name}: not registered (have {available_implementations()})")
      continue
    try:
      return fn(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT)
    except (AttentionUnsupported, NotImplementedError) as e:
      errors.append(f"{name}: {e}")
  raise AttentionUnsupported("no attention implementation could run: " + "; ".join(errors))
