"""Tokenizers, text formats, pretokenized shards, mixtures and curricula (lm/data)."""
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import data_config

from core.errors import ConfigError
from experiments.configs.base import get_config
from lm import data as D
from lm.data import mixture, sources, tokenizers

ADVERSARIAL = ["héllo\tworld\r\n\r\n  trailing  ", "emoji 🙂🙂‍🔥 and ZWJ \u200d\u200b",
               "control \x00\x01\x07\x1b[0m bytes\x7f", "\n\n\t\t  \u00a0nbsp", "日本語のテキスト",
               "\ufeffBOM first", " leading space", "a" * 300]


_cfg = data_config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def corpus():
  return D.embedded_documents()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
  """A Hugging Face and a sentencepiece BPE trained here on part of the corpus."""
  folder = tmp_path_factory.mktemp("tok")
  out = {}
  for suffix in (".json", ".model"):
    path = str(folder / f"bpe{suffix}")
    tokenizers.train(corpus[:60], 600, path)
    out[suffix] = path
  return out


@pytest.mark.parametrize("which", ["byte", "bpe", ".json", ".model"])
def test_tokenizers_round_trip_exactly_and_count_bytes(which, trained, corpus):
  tok = tokenizers.load(trained.get(which, which))
  texts = ADVERSARIAL + corpus[::25]
  for text, ids in zip(texts, tok.encode_batch(texts)):
    assert ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(tok.encode(text), ids)
    # bits per byte rest on this: the tokens' bytes are the text's bytes
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))
  specials = {tok.eos_id, tok.bos_id}
  assert tok.token_bytes[list(specials)].sum() == 0
  assert tok.decode(np.r_[tok.bos_id, tok.encode("ok"), tok.eos_id]) == "ok"
  if which != "byte":
    assert len(tok.sha256) == 64 and tok.vocab_size in (4096, 600)


def test_bpe_is_shorter_than_bytes_and_shipped_matches_training(tmp_path, corpus):
  bpe, byte = tokenizers.load("bpe"), tokenizers.load("byte")
  text = "\n".join(corpus[:20])
  assert len(bpe.encode(text)) < len(byte.encode(text)) / 3
  # the shipped file is what experiments.tokenizer writes for the default config
  cfg = get_config("default")
  tokenizers.train(D.train_texts(cfg.data), 4096, str(tmp_path / "again.json"))
  assert tokenizers.load(str(tmp_path / "again.json")).sha256 == bpe.sha256


def test_bad_tokenizers_are_config_errors(tmp_path):
  (tmp_path / "t.txt").write_text("x")
  (tmp_path / "bad.json").write_text("{not json")
  (tmp_path / "bad.model").write_bytes(b"\x00\x01")
  for spec in ("", "gpt2", str(tmp_path / "missing.json"), str(tmp_path / "t.txt"),
               str(tmp_path / "bad.json"), str(tmp_path / "bad.model")):
    with pytest.raises(ConfigError, match=r"data\.tokenizer") as e:
      tokenizers.load(spec)
    assert "Fix:" in str(e.value)


def _write_formats(folder, docs):
  """The same documents as text files, JSONL shards and Parquet shards."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  (folder / "txt").mkdir()
  for i, d in enumerate(docs):
    (folder / "txt" / f"{i:03d}.txt").write_text(d)
  (folder / "jsonl").mkdir()
  for shard in range(3):
    with open(folder / "jsonl" / f"part-{shard}.jsonl", "w") as f:
      for d in docs[shard * len(docs) // 3:(shard + 1) * len(docs) // 3]:
        f.write(json.dumps({"id": 0, "body": d}) + "\n")
  (folder / "pq").mkdir()
  half = len(docs) // 2
  for shard, part in enumerate((docs[:half], docs[half:])):
    pq.write_table(pa.table({"content": part, "n": list(range(len(part)))}),
                   folder / "pq" / f"part-{shard}.parquet")


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_every_format_gives_the_same_token_stream(tmp_path, corpus, tokenizer):
  docs = [d[:400].strip() for d in corpus[:24]]  # files are stripped; the others kept as is
  _write_formats(tmp_path, docs)
  base = dict(tokenizer=tokenizer, val_fraction=0.2, bos=True)
  cfgs = {"files": _cfg(source="files", path=str(tmp_path / "txt"), **base),
          "jsonl": _cfg(source="jsonl", path=str(tmp_path / "jsonl" / "*.jsonl"), field="body",
                        **base),
          "parquet": _cfg(source="parquet", path=str(tmp_path / "pq"), column="content", **base)}
  data = {k: D.make_data(c, seed=3) for k, c in cfgs.items()}
  # pretokenize the JSONL source, as experiments.pretokenize does
  tok = tokenizers.load(tokenizer)
  train, val = D.text_split(D.named_sources(cfgs["jsonl"])[""], "data", cfgs["jsonl"])
  sources.write_pretokenized(str(tmp_path / "pre"), {"train": tok.encode_batch(train),
                                                     "val": tok.encode_batch(val)},
                             {"train": 1, "val": 1}, tok, shards=3)
  data["arrayrecord"] = D.make_data(_cfg(source="arrayrecord", path=str(tmp_path / "pre"),
                                         **base), seed=3)
  ref = _take(data["files"].train_iterator(), 12) + data["files"].eval_batches(3)
  for name, d in data.items():
    _assert_same(_take(d.train_iterator(), 12) + d.eval_batches(3), ref)
  assert data["files"].train_documents == data["jsonl"].train_documents


def test_pretokenized_tokenizer_must_match(tmp_path):
  tok = tokenizers.load("byte")
  sources.write_pretokenized(str(tmp_path), {"train": [np.arange(50)] * 4,
                                             "val": [np.arange(40)]}, {"train": 1, "val": 1}, tok)
  D.make_data(_cfg(source="arrayrecord", path=str(tmp_path)), seed=0)
  with pytest.raises(ConfigError, match=r"data\.tokenizer.*pretokenized with"):
    D.make_data(_cfg(source="arrayrecord", path=str(tmp_path), tokenizer="bpe"), seed=0)
  index = json.loads((tmp_path / "index.json").read_text())
  index["splits"]["train"]["shards"] = []
  (tmp_path / "index.json").write_text(json.dumps(index))
  with pytest.raises(ConfigError, match=r"data\.path.*empty shard list"):
    D.make_data(_cfg(source="arrayrecord", path=str(tmp_path)), seed=0)


def test_missing_field_and_column_name_the_config_field(tmp_path, corpus):
  _write_formats(tmp_path, corpus[:6])
  with pytest.raises(ConfigError, match=r"data\.field='text': is not a field of .*part-0\.jsonl:1"):
    D.make_data(_cfg(source="jsonl", path=str(tmp_path / "jsonl")), seed=0)
  with pytest.raises(ConfigError, match=r"data\.column='text': is not a column"):
    D.make_data(_cfg(source="parquet", path=str(tmp_path / "pq")), seed=0)
  with pytest.raises(ConfigError, match=r"data\.path=.*matches no file"):
    D.make_data(_cfg(source="jsonl", path=str(tmp_path / "none" / "*.jsonl")), seed=0)


# ----------------------------------------------------------------------------- mixtures


def _letters(folder, letter, n=12):
  """Documents made of one letter, so every token says which source it came from."""
  folder.mkdir()
  for i in range(n):
    (folder / f"{i}.txt").write_text(letter * (20 + 7 * i))
  return str(folder)


def _mix_cfg(tmp_path, weights=(1.0, 3.0), stages=(), batch=8):
  c = _cfg(source="mixture", batch_size=batch, val_fraction=0.2)
  for name, letter, w in zip(("a", "b"), "ab", weights):
    c.mixture[name] = {"source": "files", "path": _letters(tmp_path / name, letter), "weight": w}
  c.stages = stages
  return c


def _source_of_rows(batch):
  """'a' or 'b' for each row (each row holds one letter, EOS and padding)."""
  out = []
  for row in batch["inputs"]:
    letters = set(row[(row > 0) & (row < 256)].tolist())  # not EOS, not eval padding
    assert len(letters) == 1, letters
    out.append(chr(letters.pop()))
  return out


def test_mixture_proportions_follow_the_weights(tmp_path):
  data = D.make_data(_mix_cfg(tmp_path, weights=(1.0, 3.0), batch=16), seed=0)
  rows = [s for b in _take(data.train_iterator(), 150) for s in _source_of_rows(b)]
  share_b = rows.count("b") / len(rows)
  # 2400 Bernoulli(0.75) draws: standard deviation 0.009; 4 sigma
  assert abs(share_b - 0.75) < 0.036, share_b
  evals = data.eval_sets(2)
  assert set(evals) == {"a", "b"}
  assert set(_source_of_rows(evals["a"][0])) == {"a"} and set(_source_of_rows(evals["b"][1])) == {"b"}


def test_stage_switch_happens_at_its_step(tmp_path):
  stages = ((5, {"b": 1.0}), (9, {"a": 1.0, "b": 1.0}))
  data = D.make_data(_mix_cfg(tmp_path, weights=(1.0, 1e-9), stages=stages), seed=1)
  per_step = [set(_source_of_rows(b)) for b in _take(data.train_iterator(), 40)]
  assert all(s == {"a"} for s in per_step[:5]) and all(s == {"b"} for s in per_step[5:9])
  assert set().union(*per_step[9:]) == {"a", "b"}
  assert data.schedule.weights_at(4)[0] > 0.999 and data.schedule.weights_at(5)[0] == 0.0


@pytest.mark.parametrize("stop", [3, 5, 7, 12])  # mid-stage, at and across the switch
def test_resume_is_bitwise_in_a_stage_and_across_a_switch(tmp_path, stop):
  cfg = _mix_cfg(tmp_path, stages=((5, {"a": 1.0, "b": 0.5}),))
  straight = _take(D.make_data(cfg, seed=2).train_iterator(), 16)
  it = D.make_data(cfg, seed=2).train_iterator()
  _take(it, stop)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(stop, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  fresh = D.make_data(cfg, seed=2).train_iterator()  # a new process: no cached counts
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(stop, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))["data"]
  _assert_same(_take(restored, 16 - stop), straight[stop:])


def test_two_processes_build_their_rows_from_their_share_of_the_documents(tmp_path, corpus):
  tok = tokenizers.load("byte")
  docs = [tok.encode(d[:30]) for d in corpus[:300]]  # about 2 documents per row
  sources.write_pretokenized(str(tmp_path), {"train": docs, "val": docs[:5]},
                             {"train": 1, "val": 1}, tok, shards=4)
  # rows in stream order: a process's rows are then contiguous and the overlap is exact
  cfg = _cfg(source="arrayrecord", path=str(tmp_path), batch_size=8, seq_len=64,
             shuffle_window=0)
  single = D.make_data(cfg, seed=0)
  parts = [D.make_data(cfg, seed=0, process_index=p, process_count=2) for p in (0, 1)]
  read = [[], [], []]  # documents fetched from the shards: process 0, process 1, single

  def spy(corpus, log):
    get = corpus.get
    corpus.get = lambda idx: (log.extend(idx), get(idx))[1]

  for data, log in zip((*parts, single), read):
    spy(data.streams[""].corpus, log)
  its = [p.train_iterator() for p in parts]
  for step, ref in enumerate(_take(single.train_iterator(), 6)):
    got = [next(it) for it in its]
    np.testing.assert_array_equal(np.concatenate([g["inputs"] for g in got]), ref["inputs"])
  # each process fetched about half; only documents straddling the halves were fetched twice
  # (at most 2 per step), and together they fetched what one process fetches alone
  assert set(read[0]) | set(read[1]) == set(read[2])
  assert len(set(read[0]) & set(read[1])) <= 2 * 6
  assert max(len(read[0]), len(read[1])) < 0.6 * len(read[2])


def test_mixture_and_stage_config_errors(tmp_path):
  good = _mix_cfg(tmp_path)
  cases = [
      (dict(stages=((5, {"a": 1.0}), (3, {"b": 1.0}))), r"data\.stages.*must increase"),
      (dict(stages=((-1, {"a": 1.0}),)), r"data\.stages.*must increase"),
      (dict(stages=((5, {"c": 1.0}),)), r"data\.stages.*not in data\.mixture"),
      (dict(stages=((5, {"a": 0.0}),)), r"data\.stages.*positive sum"),
      (dict(stages=((5, 1.0),)), r"data\.stages.*not \(step"),
  ]
  for overrides, pattern in cases:
    c = get_config("tiny").data
    c.update(good)
    for k, v in overrides.items():
      c[k] = v
    with pytest.raises(ConfigError, match=pattern):
      D.check(c)
  c = get_config("tiny").data
  c.update(good)
  c.mixture.a.weight = 0.0
  with pytest.raises(ConfigError, match=r"data\.mixture\.a\.weight=0\.0: must be > 0"):
    D.check(c)
  with pytest.raises(ConfigError, match=r"data\.mixture.*is set but data\.source='embedded'"):
    D.check(_cfg(source="embedded", mixture=good.mixture))
  with pytest.raises(ConfigError, match=r"data\.mixture.*is empty"):
    D.check(_cfg(source="mixture"))


def test_schedule_counts_are_a_pure_function_of_the_step():
  s = mixture.Schedule([1, 2, 3], mixture.check_stages(((700, {"x": 1, "z": 1}),), ("x", "y", "z")),
                       batch=8, seed=5)
  fresh = mixture.Schedule([1, 2, 3], s.stages[1:], batch=8, seed=5)
  seen = np.zeros(3, np.int64)
  for t in range(1200):
    src, row = s.assignment(t)
    for k in range(3):  # each source's rows are consecutive and never reused
      np.testing.assert_array_equal(np.sort(row[src == k]), seen[k] + np.arange((src == k).sum()))
      seen[k] += (src == k).sum()
  np.testing.assert_array_equal(fresh.counts_before(1200), seen)  # jumps straight there
  assert seen[1] > 0 and (s.draws(900) != 1).all()


def test_a_curriculum_run_resumes_bitwise_and_logs_bits_per_byte_per_source(tmp_path):
  import jax
  from conftest import records, tiny
  from lm import experiment, loop
  cfg = tiny("experiments/configs/mixture.py:curriculum,tiny", train__steps=8,
             train__eval_every=4, train__eval_batches=2, train__log_every=1,
             train__checkpoint_every=100,
             data__stages=((0, {"docs": 1.0}), (4, {"code": 1.0, "docs": 0.5})))
  full = loop.run(cfg, str(tmp_path / "full"))
  # killed mid-stage (step 3), then across the switch at 4 (step 6), then to the end
  for stop in (3, 6, None):
    part = loop.run(cfg, str(tmp_path / "split"), stop_at=stop)
  assert part["step"] == 8
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(part["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda rs: [(r["step"], r.get("loss"), r.get("eval_bpb/code")) for r in rs]
  assert strip(records(tmp_path / "full")) == strip(records(tmp_path / "split"))

  ev = [r for r in records(tmp_path / "full") if "eval_loss" in r][-1]
  for name in ("docs", "code"):
    assert 0 < ev[f"eval_bpb/{name}"] < 20 and ev[f"eval_loss/{name}"] > 0
  shipped = open(tokenizers.shipped_path(), "rb").read()
  assert (tmp_path / "full" / "tokenizer.json").read_bytes() == shipped
  # the twin: bits per byte from the eval batches' own tokens and bytes
  data = experiment.build(cfg).data
  tokens = n_bytes = 0.0
  for name, batches in data.eval_sets(2).items():
    tokens += sum(b["weights"].sum() for b in batches)
    n_bytes += sum(data.bytes_of(b) for b in batches)
  expected = ev["eval_loss"] * tokens / n_bytes / np.log(2)
  assert abs(ev["eval_bpb"] - expected) < 2e-3 * expected


def test_grain_worker_processes_give_the_same_batches_and_resume(tmp_path):
  cfg = _mix_cfg(tmp_path, stages=((3, {"a": 1.0}),))
  ref = _take(D.make_data(cfg, seed=4).train_iterator(), 8)
  cfg.workers = 1
  it = D.make_data(cfg, seed=4).train_iterator()
  _assert_same(_take(it, 5), ref[:5])
  state = it.get_state()
  again = D.make_data(cfg, seed=4).train_iterator()
  again.set_state(state)
  _assert_same(_take(again, 3), ref[5:])
