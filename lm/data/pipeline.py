"""Input pipelines: sources -> tokens -> packed rows -> global batches -> this process's rows.

``make_data(cfg.data, seed=..., process_index=..., process_count=...)`` is the one entry
point. It returns a ``Data`` whose ``train_iterator()`` is an endless, checkpointable grain
iterator and whose ``eval_sets(n)`` gives, per source, the same n held-out batches on
every call. Every batch is a dict of numpy arrays: ``inputs`` int32 [B, T], ``targets``
int32 [B, T] (``inputs`` shifted left by one) and ``weights`` float32 [B, T].

Language-model sources (``data.source``: ``embedded``, ``files``, ``jsonl``,
``parquet``, ``arrayrecord``, or ``mixture`` of several): text is split into train and
held-out documents with ``data.shuffle_seed`` (the split does not move with the
experiment seed; ``eval_path`` replaces it), tokenized with ``data.tokenizer`` and each
document framed by BOS/EOS as ``data.bos``/``data.eos`` say. Train rows come from
``lm.data.packing`` (an endless, reshuffled-every-epoch stream cut into rows, handed
out in a random order within windows of ``data.shuffle_window`` rows) and the
rows of a global batch are assigned to sources by ``lm.data.mixture``; both are pure
functions of the step, so the iterator's state is one counter and a global batch is the
same for any process count. Process ``p`` of ``P`` builds only rows
``[p * B / P, (p + 1) * B / P)`` of each global batch and reads only the documents
those rows overlap. Held-out rows are the held-out documents packed in order (last row
padded, weight 0), cycled when more batches are asked for than they fill.

Preference pairs (``preference``: a JSONL file of prompt / chosen / rejected, or the
synthetic ``synthetic:reverse`` task) for DPO: ``lm.data.preference``.

Synthetic sources (``synthetic``): ``mqar`` and ``copy`` examples generated
from ``np.random.default_rng([seed, stream, example_index])`` (stream 0 train,
1 eval), so a global batch is the same for any ``process_count``. Token ids:
0 pad, 1 separator, symbols in ``[2, 2 + vocab)``.
"""
import dataclasses
import functools
import os
import sys
from typing import Any

import grain
import numpy as np

from core.errors import ConfigError
from lm.data import mixture as mixture_lib
from lm.data import preference as preference_lib
from lm.data import sources as sources_lib
from lm.data import tokenizers as tokenizers_lib
from lm.data.packing import HeldOut, PackedStream

SYNTHETIC_TASKS = ("mqar", "copy")
SOURCES = (*sources_lib.TEXT, *sources_lib.PRETOKENIZED, "mixture", "synthetic", "preference")
PAD_ID, SEP_ID, FIRST_SYMBOL = 0, 1, 2  # synthetic tasks
_TRAIN_STREAM, _EVAL_STREAM = 0, 1
# Single-threaded reads: deterministic and cheap; rows are built by index.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

Batch = dict[str, np.ndarray]


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
      if getattr(syn, name) < 1:
        raise ConfigError(f"data.synthetic.{name}", getattr(syn, name), "must be >= 1",
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
                 vocab: int, seq_len: int, spread: bool = False) -> Batch:
  """Multi-query associative recall: ``k1 v1 .. kP vP q1 a1 .. qQ aQ`` then pad.

  Keys are distinct symbols from the first half of the vocabulary, values from
  the second half; each query is a seen key and its answer the paired value.
  Weights are 1 exactly where the target is an answer. ``spread`` (Zoology's layout):
  the query-answer pairs sit at random 2-token slots, in order, over the whole rest of
  the sequence with padding between them, so the distance from a pair to its query
  grows with ``seq_len`` (the length-generalisation test trains short, tests long).
  """
  half = vocab // 2
  keys_P = rng.choice(half, size=num_pairs, replace=False) + FIRST_SYMBOL
  values_P = rng.integers(half, vocab, size=num_pairs) + FIRST_SYMBOL
  asked_Q = rng.choice(num_pairs, size=num_queries, replace=num_queries > num_pairs)
  kv = np.stack([keys_P, values_P], 1).reshape(-1)
  qa = np.stack([keys_P[asked_Q], values_P[asked_Q]], 1).reshape(-1)
  tokens_S = np.full(seq_len + 1, PAD_ID, np.int32)
  answer_S = np.zeros(seq_len + 1, np.float32)
  if spread:
    slots = np.sort(rng.choice((seq_len + 1 - kv.size) // 2, size=num_queries, replace=False))
    starts_Q = kv.size + 2 * slots
    tokens_S[:kv.size] = kv
    tokens_S[starts_Q], tokens_S[starts_Q + 1] = qa[0::2], qa[1::2]
    answer_S[starts_Q + 1] = 1.0
  else:
    tokens_S[:kv.size + qa.size] = np.concatenate([kv, qa])
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
                        vocab=syn.vocab, seq_len=seq_len, spread=syn.spread)
  return copy_example(rng, copy_len=syn.copy_len, vocab=syn.vocab, seq_len=seq_len)


# ----------------------------------------------------------------------------
# Checks (``lm.config.DataConfig`` calls ``check``).


def named_sources(data_cfg) -> dict[str, sources_lib.SourceConfig]:
  """{name: source} of a config: ``data.mixture``'s entries, or ``{"": data's own}``."""
  if data_cfg.source != "mixture":
    return {"": sources_lib.SourceConfig(
        source=data_cfg.source, path=data_cfg.path, field=data_cfg.field,
        column=data_cfg.column, eval_path=data_cfg.eval_path)}
  out = {}
  for name in data_cfg.mixture:
    e = data_cfg.mixture[name]
    out[name] = e if isinstance(e, sources_lib.SourceConfig) else sources_lib.SourceConfig(
        **{f.name: e[f.name] for f in dataclasses.fields(sources_lib.SourceConfig)
           if f.name in e})
  return out


def check(data_cfg) -> None:
  """What a data config can get wrong before any file is read (ConfigError)."""
  if data_cfg.source not in SOURCES:
    raise ConfigError("data.source", data_cfg.source, "unknown source",
                      f"use one of {', '.join(SOURCES)}")
  mix = data_cfg.mixture
  if data_cfg.source == "mixture":
    if not mix:
      raise ConfigError("data.mixture", "{}", "is empty but data.source='mixture'",
                        "add named sources, e.g. c.data.mixture.code = {'source': 'jsonl', "
                        "'path': ..., 'weight': 0.5} (see experiments/configs/mixture.py)")
    for name, src in named_sources(data_cfg).items():
      where = f"data.mixture.{name}"
      if src.source not in (*sources_lib.TEXT, *sources_lib.PRETOKENIZED):
        raise ConfigError(f"{where}.source", src.source, "cannot be mixed",
                          f"use one of {', '.join(sources_lib.TEXT + sources_lib.PRETOKENIZED)}")
      if not isinstance(src.weight, (int, float)) or not src.weight > 0:
        raise ConfigError(f"{where}.weight", src.weight, "must be > 0",
                          "give every source a positive weight (a stage may set 0)")
    mixture_lib.check_stages(data_cfg.stages, tuple(named_sources(data_cfg)))
  else:
    if mix:
      raise ConfigError("data.mixture", sorted(mix), f"is set but data.source="
                        f"{data_cfg.source!r}", "set data.source='mixture' to mix them")
    if data_cfg.stages:
      raise ConfigError("data.stages", data_cfg.stages, "needs data.source='mixture'",
                        "remove it, or mix sources with data.mixture")
  if data_cfg.source == "preference":
    preference_lib.check(data_cfg)
  if data_cfg.shuffle_window < 0:
    raise ConfigError("data.shuffle_window", data_cfg.shuffle_window, "must be >= 0",
                      "use 0 (rows in stream order) or e.g. 1024")
  if data_cfg.workers < 0:
    raise ConfigError("data.workers", data_cfg.workers, "must be >= 0",
                      "use 0 (build batches in the training process) or e.g. 2")


# ----------------------------------------------------------------------------
# Entry point.


@dataclasses.dataclass
class Data:
  """What the trainer needs from the data.

  Attributes:
    vocab_size: the tokenizer's vocabulary size (257 for ``byte``).
    batch_rows: rows per batch on this process (global batch // process_count).
    seq_len: T, the length of ``inputs``/``targets``/``weights``.
    tokenizer: the tokenizer (``lm.data.tokenizers``); None for synthetic data.
    token_bytes: int64 [vocab]: UTF-8 bytes per token (None for synthetic data).
    train_documents / val_documents: the text of single text sources (tests).
  """

  vocab_size: int
  batch_rows: int
  seq_len: int
  _train_from: Any  # step -> grain.IterDataset of the batches from that step on
  _eval_fns: dict[str, Any]
  tokenizer: Any = None
  token_bytes: np.ndarray | None = None
  train_documents: list[str] = dataclasses.field(default_factory=list)
  val_documents: list[str] = dataclasses.field(default_factory=list)
  streams: dict[str, Any] = dataclasses.field(default_factory=dict)
  schedule: Any = None

  def train_iterator(self, step: int = 0) -> grain.DatasetIterator:
    """An endless iterator of the batches from global batch ``step`` on. Batches are a
    pure function of the step, so resuming needs only the step (``lm.loop`` does that);
    the iterator also has grain's ``get_state``/``set_state`` (and orbax's
    ``grain.checkpoint`` handlers); without worker processes its state is the step."""
    ds, start = self._train_from(step)
    it = iter(ds)
    if start:
      it.set_state({"next_index": start})
    return it

  def eval_sets(self, n: int) -> dict[str, list[Batch]]:
    """{source name: its first ``n`` held-out batches}, identical on every call
    (one source: the name is ``""``)."""
    return {name: [fn(i) for i in range(n)] for name, fn in self._eval_fns.items()}

  def eval_batches(self, n: int) -> list[Batch]:
    """The first ``n`` held-out batches of every source, one source after another."""
    return [b for batches in self.eval_sets(n).values() for b in batches]

  def bytes_of(self, batch: Batch) -> float:
    """The UTF-8 bytes the weighted targets of ``batch`` stand for."""
    return float((self.token_bytes[batch["targets"]] * batch["weights"]).sum())


def _mix_seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _check_process(data_cfg, process_index: int, process_count: int) -> int:
  if data_cfg.seq_len <= 0:
    raise ConfigError("data.seq_len", data_cfg.seq_len, "must be positive", "use e.g. 128")
  if data_cfg.batch_size <= 0:
    raise ConfigError("data.batch_size", data_cfg.batch_size, "must be positive",
                      "use e.g. 16")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError("process_index", process_index, f"must be in [0, "
                      f"{process_count}) with process_count >= 1",
                      "pass jax.process_index() and jax.process_count()")
  if data_cfg.batch_size % process_count:
    raise ConfigError("data.batch_size", data_cfg.batch_size, f"is the global batch and "
                      f"must be divisible by process_count={process_count}",
                      f"use a multiple of {process_count}")
  return data_cfg.batch_size // process_count


def _steps(batch_at, workers: int):
  """step -> the grain dataset of ``batch_at(step), batch_at(step + 1), ...``, built in
  ``workers`` processes (0: in this one)."""
  def train_from(step: int) -> tuple[grain.IterDataset, int]:
    """(dataset, position to set): in process, the dataset of every step and the position
    ``step`` (the iterator's state is then the global step); with workers, the dataset
    from ``step`` on (their state counts from there)."""
    first = step if workers else 0
    ds = grain.MapDataset.range(first, sys.maxsize).map(batch_at)
    return _with_workers(ds.to_iter_dataset(_READ_OPTIONS), workers), step - first
  return train_from


def _with_workers(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
  if workers == 0:
    return ds
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (a notebook, a script)
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def _synthetic(data_cfg, seed, rows, first_row) -> Data:
  syn, seq_len, global_batch = data_cfg.synthetic, data_cfg.seq_len, data_cfg.batch_size
  _check_synthetic(syn, seq_len)

  def batch(stream: int, b: int) -> Batch:  # this process's rows of global batch b
    rows_ = [synthetic_example(syn, seq_len, seed, stream, b * global_batch + first_row + r)
             for r in range(rows)]
    return {k: np.stack([r[k] for r in rows_]) for k in rows_[0]}

  # token_bytes None: synthetic symbols are not text, eval_bpb is nan
  return Data(tokenizers_lib.ByteTokenizer.vocab_size, rows, seq_len,
              _steps(functools.partial(batch, _TRAIN_STREAM), data_cfg.workers),
              {"": functools.partial(batch, _EVAL_STREAM)})


def _check_enough(n_tokens: int, seq_len: int, what: str) -> None:
  if n_tokens < seq_len + 1:
    raise ConfigError("data.seq_len", seq_len, f"{what} has {n_tokens} tokens, "
                      f"fewer than one sequence of seq_len + 1 = {seq_len + 1}",
                      "use a shorter data.seq_len or more data")


def text_split(src, prefix: str, data_cfg) -> tuple[list[str], list[str]]:
  """(train, held-out) documents of a text source: its ``eval_path``'s as held-out, or a
  split by document with ``data.val_fraction`` and ``data.shuffle_seed``."""
  docs = sources_lib.read_documents(src, prefix)
  if src.eval_path:
    return docs, sources_lib.read_documents(src, prefix, held_out=True)
  if not 0.0 < data_cfg.val_fraction < 1.0:
    raise ConfigError("data.val_fraction", data_cfg.val_fraction, "must be in (0, 1)",
                      "use e.g. 0.05 to hold out 5% of the documents, or give eval_path")
  return sources_lib.split_documents(docs, data_cfg.val_fraction, data_cfg.shuffle_seed,
                                     f"{prefix}.path")


def train_texts(data_cfg) -> list[str]:
  """The train documents of every text source of a config (tokenizer training)."""
  check(data_cfg)
  out = []
  for name, src in named_sources(data_cfg).items():
    prefix = f"data.mixture.{name}" if name else "data"
    if src.source not in sources_lib.TEXT:
      raise ConfigError(f"{prefix}.source", src.source, "is not text (a tokenizer is "
                        "trained on text)", f"use one of {', '.join(sources_lib.TEXT)}")
    out.extend(text_split(src, prefix, data_cfg)[0])
  return out


def _text_corpora(src, prefix, tokenizer, data_cfg):
  """(train corpus, held-out corpus, train docs, held-out docs) of a text source."""
  train_docs, val_docs = text_split(src, prefix, data_cfg)
  corpus = lambda docs: sources_lib.InMemory(tokenizer.encode_batch(docs))
  return corpus(train_docs), corpus(val_docs), train_docs, val_docs


def _pretokenized_index(folder: str, field: str, tokenizer) -> dict:
  index = sources_lib.read_index(folder, field)
  if index["tokenizer_sha256"] != tokenizer.sha256:
    raise ConfigError("data.tokenizer", tokenizer.name, f"is not the tokenizer {folder} "
                      f"was pretokenized with ({index['tokenizer']}, sha256 "
                      f"{index['tokenizer_sha256'][:12]})", "use that tokenizer, or "
                      "pretokenize again with this one")
  return index


def _pretokenized_corpora(src, prefix, tokenizer):
  """(train corpus, held-out corpus, [], []): the folder's train and val splits, or all of
  ``eval_path``'s splits as held-out data; documents are read on demand."""
  folder = os.path.expanduser(src.path)
  index = _pretokenized_index(folder, f"{prefix}.path", tokenizer)
  train = sources_lib.Pretokenized(folder, ["train"], index)
  if src.eval_path:
    held = os.path.expanduser(src.eval_path)
    eval_index = _pretokenized_index(held, f"{prefix}.eval_path", tokenizer)
    return train, sources_lib.Pretokenized(held, sorted(eval_index["splits"]), eval_index), [], []
  if "val" not in index["splits"]:
    raise ConfigError(f"{prefix}.path", src.path, "has no val split",
                      "pretokenize with a data.val_fraction > 0, or give eval_path")
  return train, sources_lib.Pretokenized(folder, ["val"], index), [], []


def make_data(data_cfg, *, seed: int, process_index: int = 0,
              process_count: int = 1) -> Data:
  """Builds the train iterator and held-out batches for this process.

  Args:
    data_cfg: ``cfg.data`` (``lm.config.DataConfig`` or the ConfigDict).
    seed: experiment seed; drives the train order (mixed with ``data.shuffle_seed``),
      the mixture draws and the synthetic streams.
    process_index: this process, in [0, process_count).
    process_count: number of processes; ``data.batch_size`` is the global batch.

  Raises:
    ConfigError: naming the offending ``data.*`` field.
  """
  check(data_cfg)
  rows = _check_process(data_cfg, process_index, process_count)
  first_row = process_index * rows
  seq_len, global_batch = data_cfg.seq_len, data_cfg.batch_size
  if data_cfg.source == "synthetic":
    return _synthetic(data_cfg, seed, rows, first_row)

  tokenizer = tokenizers_lib.load(data_cfg.tokenizer)
  if data_cfg.source == "preference":
    train_at, held_at = preference_lib.batches(data_cfg, tokenizer, seed, rows, first_row)
    return Data(tokenizer.vocab_size, rows, seq_len, _steps(train_at, data_cfg.workers),
                {"": held_at}, tokenizer, tokenizer.token_bytes)
  bos = tokenizer.bos_id if data_cfg.bos else None
  eos = tokenizer.eos_id if data_cfg.eos else None
  named = named_sources(data_cfg)
  streams, eval_fns, text = {}, {}, ([], [])
  for k, (name, src) in enumerate(named.items()):
    prefix = f"data.mixture.{name}" if name else "data"
    label = f"source {name!r}" if name else "the source"
    if src.source in sources_lib.PRETOKENIZED:
      train, held, train_docs, val_docs = _pretokenized_corpora(src, prefix, tokenizer)
    else:
      train, held, train_docs, val_docs = _text_corpora(src, prefix, tokenizer, data_cfg)
    stream = PackedStream(train, row_len=seq_len + 1, bos=bos, eos=eos,
                          seed=_mix_seed(seed, data_cfg.shuffle_seed, k),
                          shuffle_window=data_cfg.shuffle_window)
    _check_enough(stream.epoch_tokens, seq_len, f"the train split of {label}")
    held_rows = HeldOut(held, row_len=seq_len + 1, bos=bos, eos=eos, pad=tokenizer.pad_id)
    _check_enough(held_rows.tokens, seq_len, f"the held-out split of {label}")
    streams[name] = stream
    eval_fns[name] = _eval_fn(held_rows, global_batch, first_row, rows)
    if not name:
      text = (train_docs, val_docs)

  weights = [src.weight for src in named.values()]
  stages = mixture_lib.check_stages(data_cfg.stages, tuple(named)) if data_cfg.stages else ()
  schedule = mixture_lib.Schedule(weights, stages, batch=global_batch,
                                  seed=_mix_seed(seed, data_cfg.shuffle_seed, 1 << 20))
  stream_list = list(streams.values())

  def batch_at(step: int) -> Batch:
    src_B, row_B = schedule.assignment(step)
    src_B, row_B = src_B[first_row:first_row + rows], row_B[first_row:first_row + rows]
    tokens_BS = np.empty((rows, seq_len + 1), np.int32)
    for s, stream in enumerate(stream_list):
      mask = src_B == s
      if mask.any():
        tokens_BS[mask] = stream.rows(row_B[mask])
    return {"inputs": tokens_BS[:, :-1], "targets": tokens_BS[:, 1:],
            "weights": np.ones((rows, seq_len), np.float32)}

  return Data(tokenizer.vocab_size, rows, seq_len, _steps(batch_at, data_cfg.workers),
              eval_fns, tokenizer, tokenizer.token_bytes, text[0], text[1], streams, schedule)


def _eval_fn(held: HeldOut, global_batch, first_row, rows):
  def eval_fn(b: int) -> Batch:  # rows of global batch b, cycling the held-out rows
    idx_B = (b * global_batch + first_row + np.arange(rows)) % held.n_rows
    tokens_BS, valid_BS = held.rows(idx_B)
    return {"inputs": tokens_BS[:, :-1], "targets": tokens_BS[:, 1:],
            "weights": valid_BS[:, 1:].astype(np.float32)}
  return eval_fn
