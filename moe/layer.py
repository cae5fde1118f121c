"""The MoE feed-forward block (Flax NNX): router, routed SwiGLU experts, optional
always-on shared experts.

Parameters carry logical axis names (``expert``, ``embed``, ``mlp``, ``router``);
a rules table outside this package maps them to mesh axes, and an optimizer can
route by them (stacked ``expert`` weights are one matrix per expert; the
``router`` matrix belongs to no matrix group).

Each call sows its statistics as ``nnx.Intermediate`` named ``moe_stats``: a
dict with ``load`` [E] (share of assignments per expert), ``dropped``,
``lb_loss`` (Switch balancing loss, 1 when uniform) and ``z_loss``; the runtime
turns the losses into objective terms with its coefficients.

Auxiliary-loss-free balancing (DeepSeek-V3): ``router_bias`` is a ``BalanceBias``,
state that is not a parameter (no gradient, no optimizer); with
``bias_update_rate > 0`` each call moves it by the sign of its own load error
(``moe.router.update_balance_bias``), so a train step that keeps the model's
non-parameter state applies the update. The bias used for routing in a step is
the one before that step's update.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from core.params import logical_param
from core.quant import act_int8
from moe import dispatch, parallel, router
from moe.config import MoEConfig


class BalanceBias(nnx.Variable):
  """Per-expert routing bias of auxiliary-loss-free balancing: state, not a parameter."""


class MoEFeedForward(nnx.Module):
  """Routed SwiGLU experts plus ``config.num_shared`` always-on experts.

  Args:
    d_model: residual width D.
    d_ff: width F of each routed expert (and of each shared one).
    config: ``MoEConfig`` (experts, top_k, score, dispatch, capacity, grouped matmul,
      expert parallelism, bias update rate).
    normalize: renormalise the top-k weights (None: router's default).
    act_quant: int8-fake-quantize per token the experts' inputs (``core.quant``): x
      for the routed gate/up (the router sees it unquantized) and every shared-expert
      matmul input; the routed down projection's input stays in ``dtype`` (it lives
      inside the grouped matmul).
  """

  def __init__(self, d_model: int, d_ff: int, config: MoEConfig, *, rngs: nnx.Rngs,
               normalize: bool | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
               act_quant: bool = False):
    if not config.enabled:
      raise ValueError("config.num_experts=0: a dense layer. Fix: use a SwiGLU, or set "
                       "num_experts >= 1")
    self.config, self.normalize, self.dtype = config, normalize, dtype
    self.act_quant = act_quant
    D, E, F = d_model, config.num_experts, d_ff
    self.router = logical_param(rngs, (D, E), ("embed", "router"), D, param_dtype)
    self.router_bias = BalanceBias(jnp.zeros((E,), jnp.float32), out_sharding=("router_bias",),
                                   eager_sharding=False)
    self.gate = logical_param(rngs, (E, D, F), ("expert", "embed", "mlp"), D, param_dtype)
    self.up = logical_param(rngs, (E, D, F), ("expert", "embed", "mlp"), D, param_dtype)
    self.down = logical_param(rngs, (E, F, D), ("expert", "mlp", "embed"), F, param_dtype)
    if config.num_shared:
      S = config.num_shared * F
      self.shared_gate = logical_param(rngs, (D, S), ("embed", "mlp"), D, param_dtype)
      self.shared_up = logical_param(rngs, (D, S), ("embed", "mlp"), D, param_dtype)
      self.shared_down = logical_param(rngs, (S, D), ("mlp", "embed"), S, param_dtype)

  def __call__(self, x_BSD: jax.Array) -> jax.Array:
    c, dt = self.config, self.dtype
    bias_E = self.router_bias[...]
    routing = router.route(x_BSD, self.router[...], top_k=c.top_k, score=c.score,
                           normalize=self.normalize, bias_E=bias_E)
    w = dispatch.ExpertWeights(self.gate[...], self.up[...], self.down[...])
    q = act_int8 if self.act_quant else (lambda u: u)
    y_BSD, stats = parallel.routed_experts(
        q(x_BSD), routing, w, strategy=c.dispatch, capacity_factor=c.capacity_factor, dtype=dt,
        expert_parallel=c.expert_parallel, gmm_impl=c.gmm_implementation)
    if c.num_shared:
      x = q(x_BSD.astype(dt))
      h = jax.nn.silu(x @ self.shared_gate[...].astype(dt)) * (x @ self.shared_up[...].astype(dt))
      y_BSD = y_BSD + q(h) @ self.shared_down[...].astype(dt)
    if c.bias_update_rate:
      self.router_bias[...] = router.update_balance_bias(
          bias_E, jax.lax.stop_gradient(stats.load_E), c.bias_update_rate)
    self.sow(nnx.Intermediate, "moe_stats", {
        "load": stats.load_E, "dropped": stats.dropped,
        "lb_loss": router.load_balancing_loss(routing.probs_TE, routing.experts_TK),
        "z_loss": router.router_z_loss(routing.logits_TE)})
    return y_BSD.astype(dt)
