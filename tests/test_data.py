"""Tests for lm/data (pipelines, checkpoints, synthetic tasks); tokenizers, formats and
mixtures are in tests/test_data_sources.py."""
import itertools
import string

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import data_config

from core.errors import ConfigError
from lm import data as D
from lm.data.packing import HeldOut, pack_eval

LETTERS = string.ascii_letters[:40]  # one distinct byte per letter document


_cfg = data_config


def _docs(cfg):
  return D.read_documents(D.named_sources(cfg)[""])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture
def letter_corpus(tmp_path):
  """40 files; file i holds letter i repeated 30 times (a traceable document)."""
  folder = tmp_path / "letters"
  folder.mkdir()
  for i, ch in enumerate(LETTERS):
    (folder / f"{i:02d}.txt").write_text(ch * 30)
  return folder


def _stream(batches):
  """The packed token stream of consecutive train batches."""
  rows = [np.concatenate([i, t[-1:]]) for b in batches
          for i, t in zip(b["inputs"], b["targets"])]
  return np.concatenate(rows)


def test_embedded_batches_shapes_and_shift():
  data = D.make_data(_cfg(), seed=0)
  assert data.vocab_size == 257
  batches = _take(data.train_iterator(), 3) + data.eval_batches(2)
  for b in batches:
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (4, 16)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    assert b["weights"].dtype == np.float32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert all(b["weights"].all() for b in batches[:3])


def test_train_val_split_disjoint():
  docs = _docs(_cfg())
  assert len(docs) > 100
  data = D.make_data(_cfg(), seed=0)
  train, val = set(data.train_documents), set(data.val_documents)
  assert val and not train & val and train | val == set(docs)


def test_iterator_state_resumes_exactly():
  data = D.make_data(_cfg(), seed=3)
  it = data.train_iterator()
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 4)
  it2 = data.train_iterator()
  it2.set_state(state)
  _assert_batches_equal(_take(it2, 4), expected)


@pytest.mark.parametrize("source", ["embedded", "synthetic"])
def test_orbax_checkpoint_round_trip(tmp_path, source):
  cfg = _cfg(source=source, seq_len=64)
  data = D.make_data(cfg, seed=1)
  it = data.train_iterator()
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  fresh = D.make_data(cfg, seed=1).train_iterator()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(
        7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(restored["data"], 3), expected)


def test_eval_batches_deterministic_and_cycle():
  data = D.make_data(_cfg(), seed=0)
  _assert_batches_equal(data.eval_batches(3), data.eval_batches(3))
  _assert_batches_equal(data.eval_batches(3),
                        D.make_data(_cfg(), seed=5).eval_batches(3))
  tok = D.ByteTokenizer()
  n_rows = len(pack_eval(tok.encode_batch(data.val_documents), row_len=17, bos=None,
                         eos=tok.eos_id, pad=tok.pad_id)[0])
  many = data.eval_batches(n_rows // 4 + 3)  # more than the val split: cycles
  assert len(many) == n_rows // 4 + 3
  rows = np.concatenate([b["targets"] for b in many])
  np.testing.assert_array_equal(rows[n_rows:n_rows + 4], rows[:4])


def test_epochs_reshuffle(letter_corpus):
  cfg = _cfg(source="files", path=str(letter_corpus), val_fraction=0.1, shuffle_window=0)
  data = D.make_data(cfg, seed=0)
  n_docs = len(data.train_documents)
  stream = _stream(_take(data.train_iterator(), 60))
  ends = np.flatnonzero(stream == 256)
  order = [chr(stream[e - 1]) for e in ends]  # letter before each EOS
  assert len(order) >= 2 * n_docs
  epoch1, epoch2 = order[:n_docs], order[n_docs:2 * n_docs]
  assert sorted(epoch1) == sorted(epoch2) == sorted(d[0] for d in data.train_documents)
  assert epoch1 != epoch2


@pytest.mark.parametrize("bos,eos", [(None, 256), (300, 256), (None, None)])
def test_held_out_rows_read_on_demand_equal_packing_everything(bos, eos):
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 256, rng.integers(0, 40)).astype(np.int32) for _ in range(30)]
  corpus = D.sources.InMemory(docs)
  held = HeldOut(corpus, row_len=17, bos=bos, eos=eos, pad=0)
  tokens, valid = pack_eval(docs, row_len=17, bos=bos, eos=eos, pad=0)
  assert held.n_rows == len(tokens) and held.tokens == valid.sum()
  order = rng.permutation(held.n_rows)  # any rows, in any order
  got_tokens, got_valid = held.rows(order)
  np.testing.assert_array_equal(got_tokens, tokens[order])
  np.testing.assert_array_equal(got_valid, valid[order])


def test_rows_are_shuffled_within_windows_of_the_stream(letter_corpus):
  cfg = _cfg(source="files", path=str(letter_corpus), val_fraction=0.1, shuffle_window=0)
  in_order = np.concatenate([b["inputs"] for b in _take(D.make_data(cfg, seed=0)
                                                        .train_iterator(), 12)])
  cfg.shuffle_window = 8  # two batches of 4 rows
  shuffled = np.concatenate([b["inputs"] for b in _take(D.make_data(cfg, seed=0)
                                                         .train_iterator(), 12)])
  assert not np.array_equal(shuffled, in_order)
  for w in range(0, 48, 8):  # each window holds the same rows, in another order
    key = lambda rows: sorted(map(tuple, rows.tolist()))
    assert key(shuffled[w:w + 8]) == key(in_order[w:w + 8])


def test_files_from_folder_and_glob(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.txt").write_text("alpha " * 20)
  (tmp_path / "sub" / "b.md").write_text("beta " * 20)
  (tmp_path / "sub" / "c.txt").write_text("gamma " * 20)
  (tmp_path / "skip.py").write_text("print('not text')")
  docs = _docs(_cfg(source="files", path=str(tmp_path)))
  assert [d.split()[0] for d in docs] == ["alpha", "beta", "gamma"]
  docs = _docs(_cfg(source="files", path=str(tmp_path / "**" / "*.txt")))
  assert [d.split()[0] for d in docs] == ["alpha", "gamma"]
  data = D.make_data(_cfg(source="files", path=str(tmp_path), val_fraction=0.3), seed=0)
  assert len(data.val_documents) == 1 and len(data.train_documents) == 2
  assert next(data.train_iterator())["inputs"].shape == (4, 16)


def test_single_file_splits_into_paragraphs(tmp_path):
  f = tmp_path / "book.txt"
  f.write_text("\n\n".join(f"paragraph {i} " * 5 for i in range(10)))
  docs = _docs(_cfg(source="files", path=str(f)))
  assert len(docs) == 10 and docs[3].startswith("paragraph 3")


def test_config_errors(tmp_path):
  cases = [
      (dict(seq_len=0), "data.seq_len"),
      (dict(batch_size=0), "data.batch_size"),
      (dict(val_fraction=0.0), "data.val_fraction"),
      (dict(val_fraction=1.0), "data.val_fraction"),
      (dict(source="hdfs"), "data.source"),
      (dict(tokenizer="gpt2"), "data.tokenizer"),
      (dict(source="files", path=""), "data.path"),
      (dict(source="files", path=str(tmp_path / "nothing*.txt")), "data.path"),
      (dict(seq_len=10_000_000), "data.seq_len"),  # corpus smaller than a sequence
  ]
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("  \n")
  (tmp_path / "empty" / "b.md").write_text("")
  cases.append((dict(source="files", path=str(tmp_path / "empty")), "data.path"))
  (tmp_path / "small").mkdir()
  for i in range(4):
    (tmp_path / "small" / f"{i}.txt").write_text("tiny")
  cases.append((dict(source="files", path=str(tmp_path / "small")), "data.seq_len"))
  for overrides, field in cases:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
      D.make_data(_cfg(**overrides), seed=0)
    assert "Fix:" in str(err.value)
  with pytest.raises(ConfigError, match=r"data\.batch_size"):
    D.make_data(_cfg(batch_size=6), seed=0, process_count=4)


@pytest.mark.parametrize("field,value", [
    ("task", "sort"), ("vocab", 300), ("num_pairs", 40), ("copy_len", 0)])
def test_synthetic_config_errors(field, value):
  cfg = _cfg(source="synthetic", seq_len=64)
  cfg.synthetic[field] = value
  if field == "copy_len":
    cfg.synthetic.task = "copy"
  with pytest.raises(ConfigError, match=rf"data\.(synthetic\.{field}|seq_len)"):
    D.make_data(cfg, seed=0)
  cfg = _cfg(source="synthetic", seq_len=20)  # 8 pairs + 8 queries need 32 tokens
  with pytest.raises(ConfigError, match=r"data\.seq_len"):
    D.make_data(cfg, seed=0)


@pytest.mark.parametrize("task", ["mqar", "copy"])
def test_synthetic_deterministic_and_seeded(task):
  cfg = _cfg(source="synthetic", seq_len=64)
  cfg.synthetic.task = task
  a = _take(D.make_data(cfg, seed=0).train_iterator(), 3)
  b = _take(D.make_data(cfg, seed=0).train_iterator(), 3)
  c = _take(D.make_data(cfg, seed=1).train_iterator(), 3)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
  ev = D.make_data(cfg, seed=0).eval_batches(2)
  _assert_batches_equal(ev, D.make_data(cfg, seed=0).eval_batches(2))
  assert not np.array_equal(ev[0]["inputs"], a[0]["inputs"])
  for x in a + ev:
    assert x["inputs"].shape == (4, 64) and x["weights"].dtype == np.float32
    np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])


def test_mqar_answers_are_the_paired_values():
  cfg = _cfg(source="synthetic", seq_len=64)
  syn = cfg.synthetic
  for b in _take(D.make_data(cfg, seed=4).train_iterator(), 4):
    for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
      keys, values = inp[0:2 * syn.num_pairs:2], inp[1:2 * syn.num_pairs:2]
      assert len(set(keys)) == syn.num_pairs and keys.min() >= 2
      assert values.max() < 2 + syn.vocab
      pos = np.flatnonzero(w)
      assert len(pos) == syn.num_queries and set(w) <= {0.0, 1.0}
      for p in pos:
        assert inp[p] in keys
        assert tgt[p] == values[list(keys).index(inp[p])]
      n = 2 * (syn.num_pairs + syn.num_queries)
      assert (inp[n:] == D.pipeline.PAD_ID).all()


def test_mqar_spread_places_queries_over_the_whole_sequence():
  # Zoology's layout: the pairs first, then each query-answer pair at a random 2-token
  # slot of the rest; the answers are still the paired values, padding in between.
  cfg = _cfg(source="synthetic", seq_len=256)
  syn = cfg.synthetic
  syn.spread = True
  last = []
  for b in _take(D.make_data(cfg, seed=4).train_iterator(), 2):
    for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
      P = syn.num_pairs
      keys, values = list(inp[0:2 * P:2]), inp[1:2 * P:2]
      pos = np.flatnonzero(w)
      assert len(pos) == syn.num_queries and (pos >= 2 * P).all()
      assert ((pos - 2 * P) % 2 == 0).all()  # queries sit on slot starts
      for p in pos:
        assert tgt[p] == values[keys.index(inp[p])]
      used = set(range(2 * P)) | set(pos) | set(pos + 1)
      rest = np.array(sorted(set(range(len(inp))) - used))
      assert (inp[rest] == D.pipeline.PAD_ID).all()
      last.append(pos.max())
  assert max(last) > 128  # spread: queries reach far past the contiguous layout's end


def test_copy_targets_are_the_string():
  cfg = _cfg(source="synthetic", seq_len=40)
  cfg.synthetic.task, cfg.synthetic.copy_len = "copy", 12
  b = next(D.make_data(cfg, seed=2).train_iterator())
  for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
    assert inp[12] == D.pipeline.SEP_ID and w.sum() == 12
    np.testing.assert_array_equal(tgt[w == 1], inp[:12])


def test_process_rows_glue_into_the_single_process_batch(letter_corpus):
  cfg = _cfg(source="files", path=str(letter_corpus), val_fraction=0.1)
  shards = [D.make_data(cfg, seed=0, process_index=p, process_count=2) for p in (0, 1)]
  single = D.make_data(cfg, seed=0)
  its = [s.train_iterator() for s in shards]
  full = single.train_iterator()
  for _ in range(5):
    parts = [next(it) for it in its]
    assert parts[0]["inputs"].shape == (2, 16)
    assert not np.array_equal(parts[0]["inputs"], parts[1]["inputs"])
    whole = next(full)
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
  # The global eval batch is the same for any process_count.
  glued = [np.concatenate([s.eval_batches(2)[i]["inputs"] for s in shards])
           for i in range(2)]
  for g, e in zip(glued, single.eval_batches(2)):
    np.testing.assert_array_equal(g, e["inputs"])


def test_synthetic_process_sharding_matches_global_batch():
  cfg = _cfg(source="synthetic", seq_len=64)
  single = _take(D.make_data(cfg, seed=0).train_iterator(), 2)
  parts = [_take(D.make_data(cfg, seed=0, process_index=p, process_count=2)
                 .train_iterator(), 2) for p in (0, 1)]
  for step, ref in enumerate(single):
    glued = np.concatenate([parts[p][step]["inputs"] for p in (0, 1)])
    np.testing.assert_array_equal(glued, ref["inputs"])
  assert not any(np.array_equal(x, y) for x, y in
                 itertools.product(parts[0][0]["inputs"], parts[1][0]["inputs"]))


@pytest.mark.parametrize("source", ["embedded", "synthetic"])
def test_an_iterator_started_at_a_step_is_the_straight_one_from_there(source):
  cfg = _cfg(source=source, seq_len=64)
  data = D.make_data(cfg, seed=1)
  straight = _take(data.train_iterator(), 7)
  late = data.train_iterator(4)
  assert late.get_state() == data.train_iterator().get_state() | {"next_index": 4}
  _assert_batches_equal(_take(late, 3), straight[4:])
