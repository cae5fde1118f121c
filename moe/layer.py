"""The MoE feed-forward block (Flax NNX): router, routed SwiGLU experts, optional
always-on shared experts.

Parameters carry logical axis names (``expert``, ``embed``, ``mlp``, ``router``,
``router_bias``); a rules table outside this package maps them to mesh axes, and
an optimizer can route by them (stacked ``expert`` weights are one matrix per
expert; the ``router`` matrix and the ``router_bias`` belong to no matrix group).

Each call sows its statistics as ``nnx.Intermediate`` named ``moe_stats``: a
dict with ``load`` [E] (share of assignments per expert), ``dropped``,
``lb_loss`` (Switch balancing loss, 1 when uniform) and ``z_loss``. The trainer
adds the losses with its coefficients and applies the auxiliary-loss-free bias
update (``moe.router.update_balance_bias``) to ``router_bias`` after each step.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moe import dispatch, router

EXCHANGES = ("none", "ragged", "fixed")


def _param(rngs, shape, axes, fan_in, dtype):
  init = jax.nn.initializers.truncated_normal(stddev=fan_in ** -0.5)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes),
                   eager_sharding=False)


class MoEFeedForward(nnx.Module):
  """Routed SwiGLU experts plus ``num_shared`` always-on experts.

  Args:
    d_model: residual width D.
    num_experts: routed experts E (fine-grained MoE: many with a small ``d_ff``).
    top_k: experts per token.
    d_ff: width F of each routed expert.
    num_shared: always-on experts, fused into one SwiGLU of width num_shared * d_ff.
    score: router score, ``softmax`` or ``sigmoid``.
    normalize: renormalise the top-k weights (None: router's default).
    strategy: ``dropping``, ``dropless`` or ``reference`` (``moe.dispatch``).
    capacity_factor: ``dropping`` slots per expert (and ``fixed`` exchange buffers).
    gmm_impl: grouped-matmul implementation for ``dropless`` (``moe.gmm``).
    expert_parallel: ``none``, or ``ragged`` / ``fixed`` to exchange tokens with
      (ragged) all-to-all over the ``expert`` axis of the current mesh
      (``moe.parallel``) when that axis has more than one device.
    batch_axes: mesh axes the token batch is sharded over (for ``expert_parallel``).
  """

  def __init__(self, d_model: int, *, num_experts: int, top_k: int, d_ff: int,
               num_shared: int = 0, score: str = "softmax", normalize: bool | None = None,
               strategy: str = "dropless", capacity_factor: float = 1.25,
               gmm_impl: None | str | Sequence[str] = None, expert_parallel: str = "none",
               batch_axes: tuple[str, ...] = ("expert",), rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    router.check_router_args(num_experts, top_k, score)
    if strategy not in dispatch.STRATEGIES:
      raise ValueError(f"strategy={strategy!r}: unknown dispatch strategy. "
                       f"Fix: use one of {dispatch.STRATEGIES}")
    if strategy == "dropping":
      dispatch.capacity(1, num_experts, top_k, capacity_factor)  # validates the factor
    if expert_parallel not in EXCHANGES:
      raise ValueError(f"expert_parallel={expert_parallel!r}: unknown. Fix: use one of {EXCHANGES}")
    if expert_parallel != "none" and strategy != "dropless":
      raise ValueError(f"expert_parallel={expert_parallel!r} with strategy={strategy!r}: expert "
                       "parallelism exchanges sorted tokens. Fix: use strategy='dropless' "
                       "(or expert_parallel='none': XLA then partitions the dropping einsums)")
    self.top_k, self.score, self.normalize = top_k, score, normalize
    self.strategy, self.capacity_factor, self.gmm_impl = strategy, capacity_factor, gmm_impl
    self.expert_parallel, self.batch_axes = expert_parallel, tuple(batch_axes)
    self.dtype = dtype
    D, E, F = d_model, num_experts, d_ff
    self.router = _param(rngs, (D, E), ("embed", "router"), D, param_dtype)
    self.router_bias = nnx.Param(jnp.zeros((E,), param_dtype), out_sharding=("router_bias",),
                                 eager_sharding=False)
    self.gate = _param(rngs, (E, D, F), ("expert", "embed", "mlp"), D, param_dtype)
    self.up = _param(rngs, (E, D, F), ("expert", "embed", "mlp"), D, param_dtype)
    self.down = _param(rngs, (E, F, D), ("expert", "mlp", "embed"), F, param_dtype)
    self.num_shared = num_shared
    if num_shared:
      S = num_shared * F
      self.shared_gate = _param(rngs, (D, S), ("embed", "mlp"), D, param_dtype)
      self.shared_up = _param(rngs, (D, S), ("embed", "mlp"), D, param_dtype)
      self.shared_down = _param(rngs, (S, D), ("mlp", "embed"), S, param_dtype)

  def _experts(self, x_BSD, routing, w):
    mesh = jax.sharding.get_abstract_mesh()
    if (self.expert_parallel != "none" and not mesh.empty
        and dict(mesh.shape).get("expert", 1) > 1):
      from moe import parallel
      axes = tuple(a for a in self.batch_axes if a in mesh.shape)
      cf = self.capacity_factor if self.expert_parallel == "fixed" else None
      return parallel.ep_moe_ffn(x_BSD, routing, w, mesh=mesh, batch_axes=axes,
                                 exchange=self.expert_parallel, capacity_factor=cf,
                                 dtype=self.dtype, gmm_impl=self.gmm_impl)
    return dispatch.moe_ffn(x_BSD, routing, w, strategy=self.strategy,
                            capacity_factor=self.capacity_factor, dtype=self.dtype,
                            gmm_impl=self.gmm_impl)

  def __call__(self, x_BSD: jax.Array) -> jax.Array:
    dt = self.dtype
    routing = router.route(x_BSD, self.router[...], top_k=self.top_k, score=self.score,
                           normalize=self.normalize, bias_E=self.router_bias[...])
    w = dispatch.ExpertWeights(self.gate[...], self.up[...], self.down[...])
    y_BSD, stats = self._experts(x_BSD, routing, w)
    if self.num_shared:
      x = x_BSD.astype(dt)
      h = jax.nn.silu(x @ self.shared_gate[...].astype(dt)) * (x @ self.shared_up[...].astype(dt))
      y_BSD = y_BSD + h @ self.shared_down[...].astype(dt)
    self.sow(nnx.Intermediate, "moe_stats", {
        "load": stats.load_E, "dropped": stats.dropped,
        "lb_loss": router.load_balancing_loss(routing.probs_TE, routing.experts_TK),
        "z_loss": router.router_z_loss(routing.logits_TE)})
    return y_BSD.astype(dt)
