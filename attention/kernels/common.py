"""What the TPU and GPU block-sparse kernels' registry entries share."""
import jax
import jax.numpy as jnp

from attention import sparse
from attention.spec import AttentionSpec


def resolve_block_mask(q_BTNH, k_BSKH, spec: AttentionSpec, segment_ids_BT, block_mask,
                       default_block: int, unsupported):
  """Block sizes and the block mask a kernel should run for ``spec``.

  - ``block_mask`` given: block sizes from ``spec.block_sparse``; the mask is
    intersected with the static causal / window block structure (no visits to
    blocks that hold no allowed pair).
  - ``block_mask`` None and ``spec.block_sparse`` set: the mask is predicted
    (``attention.sparse.predict_block_mask``).
  - otherwise (dense causal / sliding-window / full attention): blocks of
    ``min(default_block, T)`` queries and ``min(default_block, S)`` keys, and the
    static mask ``attention.sparse.valid_blocks``, so fully masked blocks are skipped.

  Returns (block_q, block_k, mask [B, K, T/block_q, S/block_k]); raises
  ``unsupported(message)`` for segment ids and lengths that are not whole blocks.
  """
  if segment_ids_BT is not None:
    raise unsupported("segment ids (packed sequences) are not supported. Fix: use "
                      "implementation='xla', or unpack the sequences")
  B, T = q_BTNH.shape[:2]
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  bs = spec.block_sparse
  if block_mask is None and bs is None:
    bq, bk = min(default_block, T), min(default_block, S)
    if T % bq or S % bk:
      raise unsupported(f"T={T}, S={S}: not multiples of the default block {default_block}. "
                        f"Fix: pad the sequence to a multiple of {default_block}, or use "
                        "implementation='xla'")
  else:
    if bs is None:
      raise ValueError("block_mask given but spec.block_sparse is None: the block sizes are "
                       "unknown. Fix: pass a spec with block_sparse=BlockSparse(...)")
    bq, bk = bs.block_q, bs.block_k
    if T % bq or S % bk:
      raise unsupported(f"block_q={bq}, block_k={bk}: T={T} and S={S} must be whole numbers "
                        "of blocks. Fix: choose block sizes dividing the lengths, or pad")
    if block_mask is None:
      block_mask = sparse.predict_block_mask(q_BTNH, k_BSKH, spec)
  valid_QC = jnp.asarray(sparse.valid_blocks(spec, T, S, bq, bk))
  if block_mask is None:
    return bq, bk, jnp.broadcast_to(valid_QC, (B, K) + valid_QC.shape)
  return bq, bk, block_mask & valid_QC


def div(a, b: int):
  """``a // b`` for non-negative grid indices, with integer ops only. (jnp's floor
  division lowers through ``sign``, which Mosaic resolves against the local device:
  it breaks AOT compiles.)"""
  return jax.lax.div(a, jnp.int32(b))


def rem(a, b: int):
  """``a % b`` for non-negative grid indices (see ``div``)."""
  return jax.lax.rem(a, jnp.int32(b))


def check_inputs(q_BTNH, k_BSKH, v_BSKH, block_mask_BKQC, block_q: int, block_k: int,
                 unsupported, *, head_dim_ok, head_dims: str, block_ok, block_rule: str):
  """What both kernels require; raises ``unsupported(message)`` or ValueError (for
  malformed shapes), each with the fix.

  ``head_dim_ok(H)`` / ``block_ok(b)`` are the kernel's own rules, described by
  ``head_dims`` and ``block_rule`` in the messages.
  """
  if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or v_BSKH.shape != k_BSKH.shape:
    raise ValueError(f"q {q_BTNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape}: expected "
                     "q [B, T, N, H] and k, v [B, S, K, H]")
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
    raise ValueError(f"q {q_BTNH.shape} and k {k_BSKH.shape}: batch and head dim must match")
  if K == 0 or N % K:
    raise ValueError(f"heads={N}, kv_heads={K}: heads must be a multiple of kv_heads. "
                     "Fix: choose kv_heads dividing heads")
  if not head_dim_ok(H):
    raise unsupported(f"head_dim={H} is not supported; supported head dims are {head_dims}. "
                      "Fix: choose such a head dim, or use implementation='xla'")
  for name, x in (("q", q_BTNH), ("k", k_BSKH), ("v", v_BSKH)):
    if x.dtype not in (jnp.bfloat16, jnp.float32):
      raise unsupported(f"{name} dtype {x.dtype} is not supported (bfloat16 or float32). "
                        "Fix: cast the inputs to bfloat16, or use implementation='xla'")
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if not block_ok(blk):
      raise unsupported(f"{name}={blk} is not {block_rule}")
  if T % block_q:
    raise unsupported(f"block_q={block_q} does not divide the query length T={T}. Fix: "
                      f"choose a block_q dividing {T} or pad T to a multiple of {block_q}")
  if S % block_k:
    raise unsupported(f"block_k={block_k} does not divide the key length S={S}. Fix: "
                      f"choose a block_k dividing {S} or pad S to a multiple of {block_k}")
  want = (B, K, T // block_q, S // block_k)
  if block_mask_BKQC is not None and tuple(block_mask_BKQC.shape) != want:
    raise ValueError(f"block_mask shape {tuple(block_mask_BKQC.shape)}: expected [B, K, "
                     f"T/block_q, S/block_k] = {want}")
