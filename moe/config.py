"""The mixture-of-experts config group (``model.moe``), validated once, here."""
import dataclasses

from core.errors import ConfigError, check_choice, check_int, check_positive, check_range
from moe import dispatch, gmm, parallel, router

EXPERT_PARALLEL = ("none",) + parallel.EXCHANGES


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Where the experts are, how tokens reach them and how they are balanced.

  Attributes:
    num_experts: routed experts per MoE layer; 0: every layer dense.
    every: MoE in every n-th layer (layers n-1, 2n-1, ...), dense SwiGLU elsewhere.
    top_k: experts per token (1: Switch, 2: Mixtral).
    d_ff: width of each routed expert; 0: the model's d_ff (fine-grained: smaller).
    num_shared: always-on shared experts of width ``d_ff`` (DeepSeek).
    score: router score, one of ``moe.router.SCORES``.
    dispatch: one of ``moe.dispatch.STRATEGIES``.
    capacity_factor: ``dropping`` (and ``fixed`` exchange) slots per expert =
      cf * tokens * k / E.
    gmm_impl: grouped matmul of ``dropless``: ``auto`` (the platform's) or a
      ``moe.gmm.REGISTRY`` name.
    expert_parallel: ``none`` or an exchange of ``moe.parallel.EXCHANGES`` over the
      ``expert`` mesh axis.
    load_balance_coef: Switch balancing-loss coefficient (0 disables). Our loss is
      E * sum_e f_e P_e with f_e the share of all T*k assignments: 1 at perfect
      balance for any k. Hugging Face's Mixtral loss (f_e per choice, summed over
      the k choices) is k at balance, so their coefficient c is our k * c (our
      0.01 is their 0.01 / k); for k = 1 (Switch) the two agree.
    z_loss_coef: ST-MoE router z-loss coefficient (0 disables).
    bias_update_rate: auxiliary-loss-free balancing step (DeepSeek-V3: 1e-3; 0 off).
  """
  num_experts: int = 0
  every: int = 1
  top_k: int = 2
  d_ff: int = 0
  num_shared: int = 0
  score: str = "softmax"
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  gmm_impl: str = "auto"
  expert_parallel: str = "none"
  load_balance_coef: float = 0.01
  z_loss_coef: float = 1e-3
  bias_update_rate: float = 0.0

  def __post_init__(self):
    check_choice("score", self.score, router.SCORES)
    check_choice("dispatch", self.dispatch, dispatch.STRATEGIES)
    check_choice("gmm_impl", self.gmm_impl, ("auto",) + gmm.REGISTRY.names())
    check_choice("expert_parallel", self.expert_parallel, EXPERT_PARALLEL)
    for name in ("num_experts", "d_ff", "num_shared"):
      check_int(name, getattr(self, name), 0)
    check_int("every", self.every, 1)
    check_int("top_k", self.top_k, 1)
    check_positive("capacity_factor", self.capacity_factor)
    for name in ("load_balance_coef", "z_loss_coef", "bias_update_rate"):
      check_range(name, getattr(self, name), 0.0, float("inf"))
    if self.enabled and self.top_k > self.num_experts:
      raise ConfigError("top_k", self.top_k, f"exceeds num_experts={self.num_experts}",
                        "lower top_k or add experts")
    if self.enabled and self.expert_parallel != "none" and self.dispatch != "dropless":
      raise ConfigError("expert_parallel", self.expert_parallel,
                        f"needs dispatch=dropless (got {self.dispatch!r}): expert parallelism "
                        "exchanges sorted tokens", "set dispatch=dropless or expert_parallel=none")

  @property
  def enabled(self) -> bool:
    return self.num_experts > 0

  def is_moe_layer(self, layer: int) -> bool:
    """Layer ``layer`` is MoE when experts are configured and it is every ``every``-th."""
    return self.enabled and (layer + 1) % self.every == 0

  @property
  def gmm_implementation(self):
    """``gmm_impl`` as ``moe.gmm`` takes it (None: the platform's preference)."""
    return None if self.gmm_impl == "auto" else self.gmm_impl
