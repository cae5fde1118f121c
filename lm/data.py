"""Data: tokenizers, the embedded default corpus and grain input pipelines.

``make_data(cfg.data, seed=...)`` is the one entry point. It returns a ``Data``
whose ``train_iterator()`` is an infinite, checkpointable grain iterator and
whose ``eval_batches(n)`` is the same n validation batches on every call.
Every batch is a dict of numpy arrays: ``inputs`` int32 [B, T], ``targets``
int32 [B, T] (``inputs`` shifted left by one) and ``weights`` float32 [B, T].

Text sources (``embedded``, ``files``): documents are split into train and val
by document with ``data.shuffle_seed`` only (the val set does not move with the
experiment seed), each document is byte-tokenized with an EOS appended, and the
stream is packed concat-then-split into rows of ``seq_len + 1`` tokens. Train
documents are reshuffled every epoch and repeat forever. Multi-process: every
process runs the same pipeline up to the global batch and keeps only its own
rows of it (``rows = batch_size // process_count``, process p takes rows
``[p * rows, (p + 1) * rows)``), for train and val alike, so the global batches
-- and the training run -- do not depend on ``process_count``. Packing runs on
every process; fine for corpora that fit in memory (this one is 1.4 MB). ``files`` gives one document per file; a single file is
split into blank-line separated chunks so that it can be split train/val.

Synthetic sources (``synthetic``): ``mqar`` and ``copy`` examples generated
from ``np.random.default_rng([seed, stream, example_index])`` (stream 0 train,
1 eval), so a global batch is the same for any ``process_count``. Token ids:
0 pad, 1 separator, symbols in ``[2, 2 + vocab)``.
"""
import dataclasses
import glob
import gzip
import importlib.resources
import os
import pathlib
import re
import sys
from typing import Any

import grain
import numpy as np
from grain import experimental as grain_exp

from core.errors import ConfigError

DOC_SEPARATOR = "\n\x1e\n"  # between documents in lm/corpus/python_docs.txt.gz
EMBEDDED_CORPUS = "python_docs.txt.gz"
TEXT_SUFFIXES = (".txt", ".md")
PAD_ID, SEP_ID, FIRST_SYMBOL = 0, 1, 2  # synthetic tasks
_TRAIN_STREAM, _EVAL_STREAM = 0, 1
# Single-threaded reads: deterministic and cheap; the data are in memory anyway.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

Batch = dict[str, np.ndarray]


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255, plus ``eos_id`` = 256."""

  name = "byte"
  eos_id = 256
  vocab_size = 257

  def encode(self, text: str) -> np.ndarray:
    """Returns the utf-8 bytes of ``text`` as an int32 array [L]."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """Returns the text of ``ids``, skipping ids >= 256 (EOS and any padding)."""
    ids_L = np.asarray(ids).reshape(-1)
    return ids_L[(ids_L >= 0) & (ids_L < 256)].astype(np.uint8).tobytes().decode(
        "utf-8", errors="replace")


_TOKENIZERS = {"byte": ByteTokenizer}
TOKENIZERS = tuple(_TOKENIZERS)
SOURCES = ("embedded", "files", "synthetic")
SYNTHETIC_TASKS = ("mqar", "copy")


def get_tokenizer(name: str) -> ByteTokenizer:
  """Returns the tokenizer called ``name`` (config field ``data.tokenizer``)."""
  if name not in _TOKENIZERS:
    raise ConfigError("data.tokenizer", name, "unknown tokenizer",
                      f"use one of {sorted(_TOKENIZERS)}")
  return _TOKENIZERS[name]()


# ----------------------------------------------------------------------------
# Documents.


def _embedded_documents() -> list[str]:
  resource = importlib.resources.files("lm").joinpath("corpus", EMBEDDED_CORPUS)
  text = gzip.decompress(resource.read_bytes()).decode("utf-8")
  return [d for d in (d.strip() for d in text.split(DOC_SEPARATOR)) if d]


def _match_files(path: str) -> list[pathlib.Path]:
  """Returns the text files named by a folder, a file or a glob, sorted."""
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    found = (f for f in p.rglob("*") if f.suffix.lower() in TEXT_SUFFIXES)
  elif p.is_file():
    found = [p]
  else:
    found = map(pathlib.Path, glob.glob(os.path.expanduser(path), recursive=True))
  return sorted((f for f in found if f.is_file()), key=lambda f: f.as_posix())


def _file_documents(path: str) -> list[str]:
  fix = ("set --config.data.path to a folder of .txt/.md files, a text file or a "
         "quoted glob such as 'books/**/*.txt'")
  if not path:
    raise ConfigError("data.path", path, 'is empty but data.source="files" needs '
                      "text files", fix)
  files = _match_files(path)
  if not files:
    raise ConfigError("data.path", path, "matches no file (a folder is searched "
                      f"recursively for {'/'.join(TEXT_SUFFIXES)} files)", fix)
  texts = [f.read_bytes().decode("utf-8", errors="replace").strip() for f in files]
  docs = [t for t in texts if t]
  if not docs:
    raise ConfigError("data.path", path, f"all {len(files)} matched files are "
                      "empty", "point data.path at files that contain text")
  if len(docs) == 1:  # one file: its blank-line separated chunks are the documents
    docs = [c.strip() for c in re.split(r"\n\s*\n", docs[0]) if c.strip()]
  return docs


def load_documents(data_cfg) -> list[str]:
  """Returns the documents of a text source, in a deterministic order.

  Args:
    data_cfg: the ``data`` ConfigDict; ``source`` is ``embedded`` (the docstrings
      of CPython's standard library, shipped in ``lm/corpus``) or ``files``
      (``path`` is a folder searched recursively for ``*.txt``/``*.md``, a file
      or a glob; one document per file, or per blank-line separated chunk when
      exactly one non-empty file matches).

  Returns:
    Non-empty document strings.

  Raises:
    ConfigError: unknown source, empty path, nothing matched or all files empty.
  """
  if data_cfg.source == "embedded":
    return _embedded_documents()
  if data_cfg.source == "files":
    return _file_documents(data_cfg.path)
  raise ConfigError("data.source", data_cfg.source, "is not a text source",
                    "use 'embedded' or 'files' (or 'synthetic' with make_data)")


def split_documents(docs: list[str], val_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
  """Splits ``docs`` into (train, val) by document with a seeded permutation.

  Val gets ``round(len(docs) * val_fraction)`` documents, at least one, and
  train keeps at least one. Both keep the original document order.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ConfigError("data.val_fraction", val_fraction, "must be in (0, 1)",
                      "use e.g. 0.05 to hold out 5% of the documents")
  n = len(docs)
  if n < 2:
    raise ConfigError("data.path", f"<{n} document>", "a train/val split by "
                      "document needs at least 2 documents",
                      "use more files, or blank-line separated paragraphs")
  n_val = min(n - 1, max(1, round(n * val_fraction)))
  order = np.random.default_rng(seed).permutation(n)
  val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
  return [docs[i] for i in train_idx], [docs[i] for i in val_idx]


# ----------------------------------------------------------------------------
# Language-model pipelines.


def _check_enough_tokens(n_tokens: int, seq_len: int, what: str) -> None:
  if n_tokens < seq_len + 1:
    raise ConfigError("data.seq_len", seq_len, f"{what} has {n_tokens} tokens, "
                      f"fewer than one sequence of seq_len + 1 = {seq_len + 1}",
                      "use a shorter data.seq_len or a bigger corpus")


def _to_example(packed: dict[str, np.ndarray]) -> Batch:
  """Packed row of seq_len + 1 tokens -> inputs/targets/weights of length T."""
  tokens_S, segments_S = packed["tokens"], packed["tokens_segment_ids"]
  return {"inputs": tokens_S[:-1].astype(np.int32),
          "targets": tokens_S[1:].astype(np.int32),
          "weights": (segments_S[1:] != 0).astype(np.float32)}


def lm_train_dataset(docs: list[str], tokenizer, *, seq_len: int, global_batch: int,
                     first_row: int, batch_rows: int, seed: int) -> grain.IterDataset:
  """Infinite train batches: shuffle (new order each epoch), tokenize, pack, batch
  to the global batch, keep this process's rows."""
  eos = np.array([tokenizer.eos_id], np.int32)
  ds = grain.MapDataset.source(docs).shuffle(seed=seed).repeat()
  ds = ds.map(lambda doc: {"tokens": np.concatenate([tokenizer.encode(doc), eos])})
  packed = grain_exp.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(_READ_OPTIONS), length_struct={"tokens": seq_len + 1})
  batches = packed.map(_to_example).batch(global_batch, drop_remainder=True)
  if batch_rows == global_batch:
    return batches
  return batches.map(lambda b: {k: v[first_row:first_row + batch_rows] for k, v in b.items()})


def pack_rows(docs: list[str], tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Concat-then-split ``docs`` (EOS after each) into rows, zero-padding the last.

  Returns:
    tokens [R, seq_len + 1] int32 and valid [R, seq_len + 1] bool.
  """
  eos = np.array([tokenizer.eos_id], np.int32)
  stream_N = np.concatenate([x for d in docs for x in (tokenizer.encode(d), eos)])
  n_rows = -(-len(stream_N) // (seq_len + 1))
  tokens_RS = np.zeros(n_rows * (seq_len + 1), np.int32)
  tokens_RS[:len(stream_N)] = stream_N
  valid_RS = np.arange(tokens_RS.size) < len(stream_N)
  return tokens_RS.reshape(n_rows, -1), valid_RS.reshape(n_rows, -1)


# ----------------------------------------------------------------------------
# Synthetic tasks.


def _check_synthetic(syn, seq_len: int) -> None:
  if syn.task not in SYNTHETIC_TASKS:
    raise ConfigError("data.synthetic.task", syn.task, "unknown synthetic task",
                      "use 'mqar' or 'copy'")
  if not 2 <= syn.vocab <= 255:
    raise ConfigError("data.synthetic.vocab", syn.vocab, "must be in [2, 255] so "
                      "ids 2..vocab+1 fit the byte vocabulary", "use e.g. 64")
  if syn.task == "mqar":
    for name in ("num_pairs", "num_queries"):
      if syn[name] < 1:
        raise ConfigError(f"data.synthetic.{name}", syn[name], "must be >= 1",
                          "use e.g. 8")
    if syn.num_pairs > syn.vocab // 2:
      raise ConfigError("data.synthetic.num_pairs", syn.num_pairs, "keys are "
                        f"distinct ids from vocab // 2 = {syn.vocab // 2} symbols",
                        "use fewer pairs or a bigger data.synthetic.vocab")
    need = 2 * (syn.num_pairs + syn.num_queries)
  else:
    if syn.copy_len < 1:
      raise ConfigError("data.synthetic.copy_len", syn.copy_len, "must be >= 1",
                        "use e.g. 16")
    need = 2 * syn.copy_len + 1
  if need > seq_len + 1:
    raise ConfigError("data.seq_len", seq_len, f"a {syn.task} example needs "
                      f"{need} tokens, more than seq_len + 1", f"use data.seq_len "
                      f">= {need - 1} or fewer pairs/queries/copy_len")


def mqar_example(rng: np.random.Generator, *, num_pairs: int, num_queries: int,
                 vocab: int, seq_len: int) -> Batch:
  """Multi-query associative recall: ``k1 v1 .. kP vP q1 a1 .. qQ aQ`` then pad.

  Keys are distinct symbols from the first half of the vocabulary, values from
  the second half; each query is a seen key and its answer the paired value.
  Weights are 1 exactly where the target is an answer.
  """
  half = vocab // 2
  keys_P = rng.choice(half, size=num_pairs, replace=False) + FIRST_SYMBOL
  values_P = rng.integers(half, vocab, size=num_pairs) + FIRST_SYMBOL
  asked_Q = rng.choice(num_pairs, size=num_queries, replace=num_queries > num_pairs)
  kv = np.stack([keys_P, values_P], 1).reshape(-1)
  qa = np.stack([keys_P[asked_Q], values_P[asked_Q]], 1).reshape(-1)
  tokens_S = np.full(seq_len + 1, PAD_ID, np.int32)
  tokens_S[:kv.size + qa.size] = np.concatenate([kv, qa])
  answer_S = np.zeros(seq_len + 1, np.float32)
  answer_S[kv.size + 1:kv.size + qa.size:2] = 1.0
  return {"inputs": tokens_S[:-1], "targets": tokens_S[1:], "weights": answer_S[1:]}


def copy_example(rng: np.random.Generator, *, copy_len: int, vocab: int,
                 seq_len: int) -> Batch:
  """Copy task: ``s SEP s`` then pad; weights on the copied ``s`` only."""
  s_L = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + vocab, size=copy_len)
  tokens_S = np.full(seq_len + 1, PAD_ID, np.int32)
  tokens_S[:copy_len], tokens_S[copy_len] = s_L, SEP_ID
  tokens_S[copy_len + 1:2 * copy_len + 1] = s_L
  copied_S = np.zeros(seq_len + 1, np.float32)
  copied_S[copy_len + 1:2 * copy_len + 1] = 1.0
  return {"inputs": tokens_S[:-1], "targets": tokens_S[1:], "weights": copied_S[1:]}


def synthetic_example(syn, seq_len: int, seed: int, stream: int, index: int) -> Batch:
  """Example ``index`` of a stream, a pure function of its arguments."""
  rng = np.random.default_rng([seed, stream, index])
  if syn.task == "mqar":
    return mqar_example(rng, num_pairs=syn.num_pairs, num_queries=syn.num_queries,
                        vocab=syn.vocab, seq_len=seq_len)
  return copy_example(rng, copy_len=syn.copy_len, vocab=syn.vocab, seq_len=seq_len)


# ----------------------------------------------------------------------------
# Entry point.


@dataclasses.dataclass
class Data:
  """What the trainer needs from the data.

  Attributes:
    vocab_size: the tokenizer's vocabulary size (257 for ``byte``).
    batch_rows: rows per batch on this process (global batch // process_count).
    seq_len: T, the length of ``inputs``/``targets``/``weights``.
    train_documents: the train documents (empty for synthetic).
    val_documents: all val documents (empty for synthetic).
  """

  vocab_size: int
  batch_rows: int
  seq_len: int
  train_dataset: grain.IterDataset
  _eval_fn: Any
  train_documents: list[str] = dataclasses.field(default_factory=list)
  val_documents: list[str] = dataclasses.field(default_factory=list)

  def train_iterator(self) -> grain.DatasetIterator:
    """A fresh infinite iterator; ``get_state``/``set_state`` and orbax via
    ``grain.checkpoint.CheckpointSave/CheckpointRestore``."""
    return iter(self.train_dataset)

  def eval_batches(self, n: int) -> list[Batch]:
    """The first ``n`` val batches, identical on every call."""
    return [self._eval_fn(i) for i in range(n)]


def _mix_seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def make_data(data_cfg, *, seed: int, process_index: int = 0,
              process_count: int = 1) -> Data:
  """Builds the train iterator factory and eval batches for this process.

  Args:
    data_cfg: the ``data`` ConfigDict of ``experiments/configs/base.py``.
    seed: experiment seed; drives the train shuffle (mixed with
      ``data.shuffle_seed``) and the synthetic streams.
    process_index: this process, in [0, process_count).
    process_count: number of processes; ``data.batch_size`` is the global batch.

  Returns:
    A ``Data``.

  Raises:
    ConfigError: naming the offending ``data.*`` field.
  """
  seq_len, global_batch = data_cfg.seq_len, data_cfg.batch_size
  if seq_len <= 0:
    raise ConfigError("data.seq_len", seq_len, "must be positive", "use e.g. 128")
  if global_batch <= 0:
    raise ConfigError("data.batch_size", global_batch, "must be positive",
                      "use e.g. 16")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError("process_index", process_index, f"must be in [0, "
                      f"{process_count}) with process_count >= 1",
                      "pass jax.process_index() and jax.process_count()")
  if global_batch % process_count:
    raise ConfigError("data.batch_size", global_batch, f"is the global batch and "
                      f"must be divisible by process_count={process_count}",
                      f"use a multiple of {process_count}")
  rows = global_batch // process_count
  first_row = process_index * rows
  tokenizer = get_tokenizer(data_cfg.tokenizer)

  if data_cfg.source == "synthetic":
    syn = data_cfg.synthetic
    _check_synthetic(syn, seq_len)

    def example_index(i: int) -> int:  # local row i -> global example index
      return (i // rows) * global_batch + first_row + i % rows

    train = (grain.MapDataset.range(sys.maxsize)
             .map(lambda i: synthetic_example(syn, seq_len, seed, _TRAIN_STREAM,
                                              example_index(i)))
             .batch(rows, drop_remainder=True).to_iter_dataset(_READ_OPTIONS))

    def eval_fn(b: int) -> Batch:
      rows_ = [synthetic_example(syn, seq_len, seed, _EVAL_STREAM,
                                 example_index(b * rows + r)) for r in range(rows)]
      return {k: np.stack([r[k] for r in rows_]) for k in rows_[0]}

    return Data(tokenizer.vocab_size, rows, seq_len, train, eval_fn)

  docs = load_documents(data_cfg)
  train_docs, val_docs = split_documents(docs, data_cfg.val_fraction,
                                         data_cfg.shuffle_seed)
  n_train = sum(len(tokenizer.encode(d)) + 1 for d in train_docs)  # tokens + EOS
  _check_enough_tokens(n_train, seq_len, "the train split")
  val_tokens_RS, val_valid_RS = pack_rows(val_docs, tokenizer, seq_len)
  _check_enough_tokens(int(val_valid_RS.sum()), seq_len, "the val split")
  train = lm_train_dataset(train_docs, tokenizer, seq_len=seq_len, global_batch=global_batch,
                           first_row=first_row, batch_rows=rows,
                           seed=_mix_seed(seed, data_cfg.shuffle_seed))

  def eval_fn(b: int) -> Batch:  # rows of global batch b, cycling the val split
    idx_B = (b * global_batch + first_row + np.arange(rows)) % len(val_tokens_RS)
    tokens_BS, valid_BS = val_tokens_RS[idx_B], val_valid_RS[idx_B]
    return {"inputs": tokens_BS[:, :-1], "targets": tokens_BS[:, 1:],
            "weights": valid_BS[:, 1:].astype(np.float32)}

  return Data(tokenizer.vocab_size, rows, seq_len, train, eval_fn, train_docs, val_docs)
