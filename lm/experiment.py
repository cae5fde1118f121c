"""Everything built from a config, before anything is allocated: the typed config,
mesh, data, model, optimizer, loss terms, train state and the jitted steps."""
import dataclasses

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from core.errors import ConfigError, Unsupported
from lm import config as config_lib
from lm import data as data_lib
from lm import losses, sharding
from lm import hooks as hooks_lib
from lm.lora import Lora
from lm.prune import Prune
from lm.quant import Quant
from lm.model import Built, build_model
from lm.state import StateSpec, make_state, replicated
from lm.step import make_steps, weighted_sums
from optim.chain import build_optimizer


# The update hooks (lm.hooks), in the order they act: the forward sees the base plus
# LoRA's adapters, then fake-quantized weights; after an update, pruning masks apply.
HOOKS = (Lora, Quant, Prune)

# The config field that picks each registry's implementation.
_IMPLEMENTATION_FIELDS = {"attention": "model.attention_impl", "grouped-matmul": "model.moe.gmm_impl"}


@dataclasses.dataclass
class Experiment:
  """``build``'s result.

  Attributes:
    config: the typed config (``model.vocab_size`` resolved).
    mesh: the device mesh.
    model: the model's graph definition and abstract variables (``lm.model.Built``).
    optimizer: ``optim.chain.Built`` (``.tx``, ``.learning_rates``).
    data: ``lm.data.Data``.
    terms: the loss terms that are on (``lm.losses``).
    hooks: the update hooks that are on (``lm.hooks``: QAT, pruning).
    state: the train state's abstract tree, shardings and jitted init (``lm.state``).
    train_step: jitted ``(state, batch, aux) -> (state, metrics)``; donates the state.
    eval_step: jitted ``(params, model_state, batch, aux) -> metrics`` (token-weighted sums).
  """
  config: config_lib.ExperimentConfig
  mesh: jax.sharding.Mesh
  model: Built
  optimizer: object
  data: object
  terms: list
  hooks: list
  state: StateSpec
  train_step: object
  eval_step: object

  @property
  def batch_sharding(self) -> NamedSharding:
    spec = sharding.logical_to_spec(("batch", "length"), (self.config.data.batch_size,
                                                          self.config.data.seq_len),
                                    dict(self.mesh.shape), what="the batch")
    return NamedSharding(self.mesh, spec)

  def put_batch(self, local_batch: dict) -> dict:
    """This process's rows -> global arrays sharded over the mesh's batch axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def abstract_batch(self) -> dict:
    """ShapeDtypeStructs (with the batch sharding) of a global batch."""
    shape = (self.config.data.batch_size, self.config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=self.batch_sharding)
            for k, dt in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}

  def check_step(self) -> None:
    """Traces the train step on abstract inputs (nothing is computed or compiled): an
    implementation that cannot run this config is a ``ConfigError`` naming its field,
    before a run writes anything."""
    try:
      jax.eval_shape(self.train_step, self.state.abstract, self.abstract_batch(),
                     self.abstract_aux())
    except Unsupported as e:
      field = _IMPLEMENTATION_FIELDS.get(e.op, "model")
      value = {"model.attention_impl": self.config.model.attention_impl,
               "model.moe.gmm_impl": self.config.model.moe.gmm_impl}.get(field, e.candidates)
      raise ConfigError(field, value, str(e).rstrip("."),
                        f"choose an implementation that supports this config ({field}), or "
                        "change the shapes it refuses") from None

  def abstract_aux(self) -> dict:
    """The step's ``aux``: hook or term name -> ShapeDtypeStructs (only those that take
    one; a term with ``aux_from`` gets that hook's or term's, the same arrays)."""
    model = {"params": self.state.abstract["params"],
             "model_state": self.state.abstract["model_state"]}
    out = {t.name: a for t in (*self.hooks, *self.terms)
           if (a := t.abstract_aux(model)) is not None}
    out.update({t.name: out[t.aux_from] for t in self.terms
                if t.aux_from in out})
    return out

  def load_aux(self, read) -> tuple[dict, list]:
    """(the step's ``aux``, notes for the log): each hook's and term's frozen inputs,
    loaded once; ``read`` reads a run's newest weights (``lm.runs.load_aux`` passes
    ``lm.runs.latest_model``)."""
    model = {"params": self.state.abstract["params"],
             "model_state": self.state.abstract["model_state"]}
    loaded, notes = {}, []
    for t in (*self.hooks, *self.terms):
      value, note = t.load_aux(model, read)
      if value is not None:
        loaded[t.name] = value
      if note:
        notes.append(note)
    for t in self.terms:
      if t.aux_from in loaded:
        loaded[t.name] = loaded[t.aux_from]
    return loaded, notes

  def initial_model(self, loaded: dict) -> dict | None:
    """What a new run starts from: a hook's or term's initial model (LoRA: the base's
    model state; distillation: the teacher's weights), else None."""
    return next((m for t in (*self.hooks, *self.terms)
                 if (m := t.initial_model(loaded.get(t.name))) is not None), None)


def build(config: ml_collections.ConfigDict | config_lib.ExperimentConfig, *,
          devices=None) -> Experiment:
  """Checks ``config`` and builds the experiment on a mesh over ``devices`` (default:
  every device of every process). Nothing is allocated yet. A ConfigDict gets its
  ``model.vocab_size`` resolved in place (so ``config.json`` records it)."""
  typed = config if isinstance(config, config_lib.ExperimentConfig) else config_lib.resolve(config)
  mesh = sharding.make_mesh(typed.mesh, devices)
  data = data_lib.make_data(typed.data, seed=typed.seed, process_index=jax.process_index(),
                            process_count=jax.process_count())
  vocab = config_lib.resolve_vocab(typed.model.vocab_size, data.vocab_size)
  typed = dataclasses.replace(typed, model=dataclasses.replace(typed.model, vocab_size=vocab))
  if isinstance(config, ml_collections.ConfigDict):
    with config.unlocked():
      config.model.vocab_size = vocab
  paths = {p: field for t in losses.TERMS.values() for field, p in t.run_paths(typed).items()}
  if paths:  # other runs the terms read (a teacher): their typed configs
    typed = dataclasses.replace(typed, runs={p: config_lib.resolve(
        config_lib.load_run_config(p, flag=field)) for p, field in paths.items()})
  model = build_model(typed.model, typed.seed, abstract=True)
  hooks = [h for h in (cls.build(typed, model) for cls in HOOKS) if h is not None]
  _, trained_axes = hooks_lib.trainable(hooks, model.params, model.axes["params"])
  try:
    optimizer = build_optimizer(typed.optimizer, trained_axes, typed.train.steps,
                                spread=sharding.optimizer_spread(mesh))
  except ConfigError as e:
    raise e.within("optimizer") from None
  terms = losses.build_terms(typed, model)
  state = make_state(typed.model, typed.seed, model, optimizer.tx, mesh, hooks)
  train_step, eval_step = make_steps(model.graphdef, terms, optimizer.tx, mesh, hooks)
  exp = Experiment(typed, mesh, model, optimizer, data, terms, hooks, state, None, None)
  aux_shardings = jax.tree.map(lambda s: s.sharding, exp.abstract_aux())
  batch, shardings = exp.batch_sharding, state.shardings
  exp.train_step = jax.jit(train_step, in_shardings=(shardings, batch, aux_shardings),
                           out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
  exp.eval_step = jax.jit(lambda *args: weighted_sums(eval_step(*args)),
                          in_shardings=(shardings["params"], shardings["model_state"], batch,
                                        aux_shardings),
                          out_shardings=replicated(mesh))
  return exp
