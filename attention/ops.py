"""``attend``: one attention op, many implementations, chosen by a string.

The implementations are entries of ``REGISTRY`` (``core.registry``): each declares
the platforms it compiles for, the specs and arguments it supports, and whether
it must run per device (kernels, which XLA cannot partition: the registry runs
them under ``core.placement.per_device`` over the batch and head axes).
``implementation`` may be None (the platform's preference order), a name, or a
sequence of names tried in order; when every candidate fails, one
``core.errors.Unsupported`` lists every reason. ``xla`` (``attention.reference``)
handles every spec and is the ground truth the others are tested against.

Adding a backend: write ``fn(q, k, v, segment_ids, block_mask, *, spec)`` (plus
``interpret=`` for a kernel) and register it below; one file, plus the
conformance suite's parameter list (``tests/test_attention_conformance.py``).
"""
from collections.abc import Sequence

import jax

from attention import flash, hierarchical, sparse
from attention.reference import attend_reference
from attention.spec import AttentionSpec
from core.errors import Unsupported
from core.registry import Axes, Registry

_QKV = ("batch", None, "heads", None)
_KV = ("batch", None, "kv_heads", None)
REGISTRY = Registry(
    "attention",
    # Preference order per platform when implementation=None: hierarchical specs take
    # their blocked path, splash the static masks, our kernel the predicted block
    # masks, XLA whatever is left.
    default_order={"cpu": ("blocked", "xla"), "gpu": ("blocked", "jax_nn", "xla"),
                   "tpu": ("blocked", "splash", "pallas", "xla")},
    axes=Axes(args=(_QKV, _KV, _KV, ("batch", None), ("batch", "kv_heads", None, None)),
              out=_QKV))


def _only(spec: AttentionSpec, segment_ids, block_mask, *, what: str, segments=True,
          masks=True, hierarchical_ok=False, non_causal_window=True) -> str | None:
  """The common refusals, as a ``supports`` predicate's reason (None: fine)."""
  if spec.hierarchical is not None and not hierarchical_ok:
    return "no hierarchical attention (use 'blocked' or its dense twin 'xla')"
  if not segments and segment_ids is not None:
    return "segment ids (packed sequences) are not wired up; use 'xla'"
  if not masks and block_mask is not None:
    return f"no predicted block masks ({what}); use 'pallas', 'gather' or 'xla'"
  if not non_causal_window and spec.sliding_window and not spec.causal:
    return "a non-causal sliding window is not supported"
  return None


def _xla(q, k, v, segment_ids, block_mask, *, spec):
  if spec.hierarchical is not None:
    return hierarchical.hierarchical_reference(q, k, v, spec)
  return attend_reference(q, k, v, spec, segment_ids, block_mask)


def _blocked(q, k, v, segment_ids, block_mask, *, spec):
  return hierarchical.hierarchical_blocked(q, k, v, spec)


def _flash(q, k, v, segment_ids, block_mask, *, spec):
  return flash.flash_attention(q, k, v, spec)


def _flash_supports(q, k, v, s, m, *, spec):
  reason = _only(spec, s, m, what="static causal / window masks only", segments=False,
                 masks=False)
  if reason is None:
    try:
      flash.block_size(q.shape[1]), flash.block_size(k.shape[1])
    except Unsupported as e:
      return str(e).removeprefix("flash: ")
  return reason


def _gather(q, k, v, segment_ids, block_mask, *, spec):
  return sparse.block_sparse_gather(q, k, v, block_mask, spec)


def _jax_nn(q, k, v, segment_ids, block_mask, *, spec):
  """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU when eligible)."""
  local = (spec.sliding_window - 1, 0) if spec.sliding_window else None
  try:
    return jax.nn.dot_product_attention(q, k, v, scale=spec.scale, is_causal=spec.causal,
                                        local_window_size=local)
  except (ValueError, TypeError, NotImplementedError) as e:
    raise Unsupported(str(e)) from e


def _splash(q, k, v, segment_ids, block_mask, *, spec, interpret):
  from attention.splash import attend_splash
  return attend_splash(q, k, v, spec, segment_ids, interpret=interpret)


def _pallas(q, k, v, segment_ids, block_mask, *, spec, interpret):
  from attention.kernels.block_sparse_tpu import KERNEL
  return KERNEL.attend(q, k, v, spec, segment_ids, block_mask, interpret=interpret)


def _pallas_gpu(q, k, v, segment_ids, block_mask, *, spec, interpret):
  from attention.kernels.block_sparse_gpu import KERNEL
  return KERNEL.attend(q, k, v, spec, segment_ids, block_mask, interpret=interpret)


REGISTRY.register(
    "xla", _xla,
    supports=lambda q, k, v, s, m, *, spec: (
        "hierarchical attention takes no segment ids"
        if spec.hierarchical is not None and s is not None else None))
REGISTRY.register(
    "blocked", _blocked,
    supports=lambda q, k, v, s, m, *, spec: (
        "hierarchical specs only" if spec.hierarchical is None else
        "takes no segment ids or block mask" if s is not None or m is not None else None))
REGISTRY.register("flash", _flash, supports=_flash_supports)
REGISTRY.register(
    "gather", _gather,
    supports=lambda q, k, v, s, m, *, spec: (
        "needs a block-sparse spec (spec.block_sparse)" if m is None else
        _only(spec, s, m, what="", segments=False)))
REGISTRY.register(
    "jax_nn", _jax_nn,
    supports=lambda q, k, v, s, m, *, spec: _only(
        spec, s, m, what="it would compute the dense matrix", segments=False, masks=False,
        non_causal_window=False))
REGISTRY.register(
    "splash", _splash, native=("tpu",), per_device=True, doc="'jax_nn' or 'xla'",
    supports=lambda q, k, v, s, m, *, spec: _only(
        spec, s, m, what="splash masks are static and shared by the batch", masks=False))
REGISTRY.register(
    "pallas", _pallas, native=("tpu",), per_device=True, doc="'pallas_gpu'",
    supports=lambda q, k, v, s, m, *, spec: _only(spec, s, m, what="", segments=False))
REGISTRY.register(
    "pallas_gpu", _pallas_gpu, native=("gpu",), per_device=True, doc="'pallas'",
    supports=lambda q, k, v, s, m, *, spec: _only(spec, s, m, what="", segments=False))


def available_implementations() -> tuple[str, ...]:
  return REGISTRY.names()


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
  if spec.block_sparse is not None:
    if block_mask is None:
      block_mask = sparse.predict_block_mask(q_BTNH, k_BSKH, spec)  # checks the blocks
    else:
      sparse.check_blocks(spec.block_sparse, q_BTNH.shape[1], k_BSKH.shape[1])
  elif block_mask is not None:
    raise ValueError("block_mask given but spec.block_sparse is None: the block sizes are "
                     "unknown. Fix: pass a spec with block_sparse=BlockSparse(...)")
  return REGISTRY.call(implementation, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, block_mask,
                       spec=spec)
