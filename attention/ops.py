"""``attend``: one attention op, many implementations, chosen by a string.

Implementations register under a name. ``implementation`` may be None (the best
available for the platform), a name, or a sequence of names tried in order; when
every candidate fails, one error lists every reason. The XLA reference
(``attention.reference``) is always available and is the ground truth the other
backends are tested against.
"""
import contextlib
import contextvars
from collections.abc import Callable, Sequence

import jax

from attention import sparse
from attention.reference import attend_reference
from attention.spec import AttentionSpec

AttendFn = Callable[..., jax.Array]

_REGISTRY: dict[str, AttendFn] = {}
# Preference order per platform when implementation=None: splash takes the static
# masks, our kernel the predicted block masks, XLA whatever is left.
_DEFAULT_ORDER = {"cpu": ("xla",), "gpu": ("jax_nn", "xla"), "tpu": ("splash", "pallas", "xla")}
_PLATFORM = contextvars.ContextVar("attention_platform", default=None)


@contextlib.contextmanager
def target_platform(name: str):
  """Within this context, pick implementations (and interpret mode) for ``name``
  (``cpu``, ``gpu``, ``tpu``) instead of the default backend: a CPU host compiling
  for a TPU topology must trace TPU kernels."""
  token = _PLATFORM.set(name)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


def current_platform() -> str:
  """The platform programs are traced for: ``target_platform``'s, else the default backend."""
  return _PLATFORM.get() or jax.default_backend()


class AttentionUnsupported(ValueError):
  """An implementation cannot handle these inputs (shape, dtype, mask, platform)."""


def register(name: str, fn: AttendFn) -> None:
  """Registers ``fn(q, k, v, spec, segment_ids_BT=None, block_mask=None)`` under ``name``.

  ``block_mask`` is None or bool [B, K, T/block_q, S/block_k] (block sizes from
  ``spec.block_sparse``); an implementation that cannot honour an argument raises
  ``AttentionUnsupported`` saying why.
  """
  _REGISTRY[name] = fn


def available_implementations() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def _jax_nn(q_BTNH, k_BSKH, v_BSKH, spec: AttentionSpec, segment_ids_BT=None,
            block_mask=None):
  """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU when eligible)."""
  if segment_ids_BT is not None:
    raise AttentionUnsupported("jax_nn: segment ids are not wired up")
  if block_mask is not None:
    raise AttentionUnsupported("jax_nn: no block-sparse masks (it would compute the "
                               "dense matrix); use 'xla' or 'pallas'")
  local = (spec.sliding_window - 1, 0) if spec.sliding_window else None
  if local is not None and not spec.causal:
    raise AttentionUnsupported("jax_nn: a non-causal sliding window is not supported")
  try:
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, scale=spec.scale, is_causal=spec.causal,
        local_window_size=local)
  except (ValueError, TypeError, NotImplementedError) as e:
    raise AttentionUnsupported(f"jax_nn: {e}") from e


def _splash(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT=None, block_mask=None):
  """Splash attention (TPU; interpreted elsewhere, which is for tests only)."""
  from attention.splash import attend_splash
  platform = current_platform()
  if platform == "gpu":
    raise AttentionUnsupported("splash: a TPU kernel; not run on GPU")
  return attend_splash(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT, block_mask,
                       interpret=platform != "tpu")


def _pallas(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT=None, block_mask=None):
  """Ours: the block-sparse flash-attention kernel (TPU Mosaic; interpreted on CPU)."""
  from attention.kernels.block_sparse_tpu import attend_pallas
  platform = current_platform()
  if platform == "gpu":
    raise AttentionUnsupported("pallas: the block-sparse kernel is written for TPU (Mosaic); "
                               "on GPU use 'pallas_gpu'")
  return attend_pallas(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT, block_mask,
                       interpret=platform != "tpu")


def _gather(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT=None, block_mask=None):
  """Block-sparse attention in XLA computing only kept blocks (``sparse.block_sparse_gather``)."""
  if segment_ids_BT is not None:
    raise AttentionUnsupported("gather: segment ids are not wired up")
  if block_mask is None:
    raise AttentionUnsupported("gather: needs a block-sparse spec (spec.block_sparse)")
  return sparse.block_sparse_gather(q_BTNH, k_BSKH, v_BSKH, block_mask, spec)


def _pallas_gpu(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT=None, block_mask=None):
  """Ours: the block-sparse flash-attention kernel for GPU (Triton lowering;
  interpreted off GPU). Tested interpreted and lowered to Triton IR; never run on a GPU."""
  from attention.kernels.block_sparse_gpu import attend_pallas
  return attend_pallas(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT, block_mask,
                       interpret=current_platform() != "gpu")


register("xla", attend_reference)
register("gather", _gather)
register("jax_nn", _jax_nn)
register("splash", _splash)
register("pallas", _pallas)
register("pallas_gpu", _pallas_gpu)


def _candidates(implementation) -> tuple[str, ...]:
  if implementation is None:
    return _DEFAULT_ORDER.get(current_platform(), ("xla",))
  if isinstance(implementation, str):
    return (implementation,)
  if isinstance(implementation, Sequence) and implementation:
    return tuple(implementation)
  raise ValueError(
      f"implementation={implementation!r}: expected None, a name or a non-empty "
      f"sequence of names. Fix: use one of {available_implementations()}")


def _attend_hierarchical(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT, block_mask,
                         implementation):
  """Hierarchical specs have their own two implementations: ``xla`` (the dense twin,
  ``hierarchical_reference``) and ``blocked`` (the block-skipping path, the default)."""
  from attention import hierarchical
  if segment_ids_BT is not None or block_mask is not None:
    raise ValueError("hierarchical attention takes no segment ids or block mask. Fix: drop them")
  impls = {"xla": hierarchical.hierarchical_reference, "blocked": hierarchical.hierarchical_blocked}
  names = ("blocked",) if implementation is None else _candidates(implementation)
  errors = []
  for name in names:
    if name in impls:
      return impls[name](q_BTNH, k_BSKH, v_BSKH, spec)
    errors.append(f"{name}: no hierarchical attention (have {tuple(impls)})")
  raise AttentionUnsupported("no attention implementation could run: " + "; ".join(errors))


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
           spec: AttentionSpec = AttentionSpec(), *, segment_ids_BT=None, block_mask=None,
           implementation: None | str | Sequence[str] = None) -> jax.Array:
  """Multi-head / grouped-query attention.

  Args:
    q_BTNH: queries [batch, q_len, heads, head_dim].
    k_BSKH, v_BSKH: keys, values [batch, kv_len, kv_heads, head_dim]; heads must
      be a multiple of kv_heads.
    spec: mask and scale (``AttentionSpec``). With ``spec.block_sparse`` and no
      ``block_mask``, the mask is predicted here (``attention.sparse``).
    segment_ids_BT: optional packed-sequence ids; attention stays within a segment.
    block_mask: optional bool [B, K, T/block_q, S/block_k]: attend only to kept
      blocks (needs ``spec.block_sparse`` for the block sizes).
    implementation: None, a registered name, or names to try in order.

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  N, K = q_BTNH.shape[2], k_BSKH.shape[2]
  if K == 0 or N % K:
    raise ValueError(f"heads={N}, kv_heads={K}: heads must be a multiple of kv_heads. "
                     "Fix: choose kv_heads dividing heads")
  if spec.hierarchical is not None:
    return _attend_hierarchical(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT, block_mask,
                                implementation)
  if spec.block_sparse is not None:
    sparse.check_blocks(spec.block_sparse, q_BTNH.shape[1], k_BSKH.shape[1])
    if block_mask is None:
      block_mask = sparse.predict_block_mask(q_BTNH, k_BSKH, spec)
  elif block_mask is not None:
    raise ValueError("block_mask given but spec.block_sparse is None: the block sizes are "
                     "unknown. Fix: pass a spec with block_sparse=BlockSparse(...)")
  errors = []
  for name in _candidates(implementation):
    fn = _REGISTRY.get(name)
    if fn is None:
      errors.append(f"{name}: not registered (have {available_implementations()})")
      continue
    try:
      return fn(q_BTNH, k_BSKH, v_BSKH, spec, segment_ids_BT, block_mask)
    except (AttentionUnsupported, NotImplementedError) as e:
      errors.append(f"{name}: {e}")
  raise AttentionUnsupported("no attention implementation could run: " + "; ".join(errors))
