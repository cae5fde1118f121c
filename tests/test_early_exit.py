"""lm/losses/early_exit.py: the lens after layer n is the layers:n draft's output, the term
trains it, and bad layers are one-line errors."""
import jax
import pytest
from conftest import assert_close, records, tiny

from core.errors import ConfigError
from lm import config as config_lib
from lm import decode, loop
from lm.decode import drafts
from lm.model import apply, build_model


def test_lens_after_layer_n_is_the_layers_n_draft():
  cfg = config_lib.resolve(tiny(model__n_layers=3, model__dtype="float32",
                                model__vocab_size=384)).model
  built = build_model(cfg, 0)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 384)
  logits, _, _, lens = apply(built.graphdef, built.params, built.state, tokens, exits=(1, 2))
  plain = apply(built.graphdef, built.params, built.state, tokens)[0]
  assert_close(logits, plain, 1e-6)
  target = decode.Model.from_weights(cfg, built.params, built.state)
  for n in (1, 2):
    d = drafts.make(f"layers:{n}", target)
    short = build_model(d.cfg, 0, abstract=True)
    assert_close(lens[f"layer_{n}"], apply(short.graphdef, d.params, d.state, tokens)[0], 1e-5)


def test_early_exit_term_trains_the_lens(tmp_path):
  loop.run(tiny(model__n_layers=3, train__steps=12, train__eval_every=12, train__log_every=4,
                early_exit__layer=1, early_exit__weight=1.0), str(tmp_path / "ee"))
  logged = [r for r in records(tmp_path / "ee") if "early_exit/ce" in r]
  assert logged and logged[-1]["early_exit/ce"] < logged[0]["early_exit/ce"]


def test_objective_adds_weight_times_lens_cross_entropy():
  from lm import experiment
  from lm.losses.cross_entropy import cross_entropy
  from lm.step import make_objective
  exp = experiment.build(tiny(model__n_layers=3, early_exit__layer=2, early_exit__weight=0.3))
  state = exp.state.init()
  batch = next(iter(exp.data.train_iterator(0)))
  batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  total, (out, _, metrics) = make_objective(exp.model.graphdef, exp.terms)(
      state["params"], state["model_state"], batch, {})
  _, _, _, lens = apply(exp.model.graphdef, state["params"], state["model_state"],
                        batch["inputs"], exits=(2,))
  lens_ce, _ = cross_entropy(lens["layer_2"], batch)
  assert_close(metrics["early_exit"]["ce"], lens_ce, 1e-6)
  assert_close(total, out.ce + 0.3 * lens_ce, 1e-6)


def test_exit_layer_out_of_range():
  from lm import experiment
  with pytest.raises(ConfigError, match="early_exit.layer=2: the model has 2 layers"):
    experiment.build(tiny(early_exit__layer=2))
