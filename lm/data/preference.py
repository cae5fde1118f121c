"""Preference pairs for DPO (``data.source = "preference"``): rows of prompt, chosen and
rejected completions -> batches of (chosen, rejected) row pairs.

``data.path`` is a JSONL file (or folder / glob of them) with ``prompt``, ``chosen`` and
``rejected`` text fields per line, split into train and held-out pairs by
``data.val_fraction`` and ``data.shuffle_seed`` (``eval_path`` replaces the split); or
one of the shipped synthetic tasks, whose prompt lists k = 4 words (``reverse: w1 w2 w3
w4 =``) and whose rejected completion copies them in order (what a language model
trained on text prefers: copying is what induction heads do), while the chosen one
follows a rule the base model does not know:

- ``synthetic:reverse``: the words in reverse order (relational: the policy must learn
  to read the prompt backwards);
- ``synthetic:upper``: the words in capitals, in order (a surface rule a small model
  learns in tens of steps: the tests' and the notebook's task).

Pairs are drawn from ``np.random.default_rng([seed, stream, index])`` (stream 0 train,
1 held out) over a fixed list of words from the shipped corpus, like the MQAR task.

Each completion is tokenized on its own after its prompt (``[bos] prompt completion
eos``); a row holds one sequence, right-padded with the tokenizer's pad id. ``weights``
is 1 exactly on the targets that are completion tokens (the end of sequence included)
and 0 on the prompt and padding, so DPO's sums of log-probabilities see the completion
only. Rows ``2i`` and ``2i + 1`` of a batch are pair ``i``'s chosen and rejected
sequences. A sequence longer than ``seq_len + 1`` loses prompt tokens from the left,
then completion tokens from the right.

Train pairs are visited in a random order per epoch (``data.shuffle_seed`` and the
experiment seed), a pure function of the step like every Kestrel stream.
"""
import re

import numpy as np

from core.errors import ConfigError
from lm.data import sources as sources_lib

SYNTHETIC = ("synthetic:reverse", "synthetic:upper")
FIELDS = ("prompt", "chosen", "rejected")
TASK_WORDS = 4
_VOCAB_WORDS = 64


def check(data_cfg) -> None:
  """What a preference config can get wrong before a file is read."""
  b, path = data_cfg.batch_size, data_cfg.path
  if b % 2:
    raise ConfigError("data.batch_size", b, "must be even with data.source='preference' "
                      "(rows 2i, 2i+1 are a pair)", f"use {b + 1}")
  if not path:
    raise ConfigError("data.path", path, "is empty (data.source='preference')",
                      "give a JSONL file of prompt/chosen/rejected rows, or a shipped "
                      f"task: {', '.join(SYNTHETIC)}")
  if path.startswith("synthetic:") and path not in SYNTHETIC:
    raise ConfigError("data.path", path, "is not a synthetic preference task",
                      f"use one of {', '.join(SYNTHETIC)}")


def read_pairs(path: str, field: str = "data.path") -> list[tuple[str, str, str]]:
  """(prompt, chosen, rejected) of every line of the JSONL file(s) at ``path``."""
  pairs = []
  for f, n, row in sources_lib.jsonl_rows(path, field):
    missing = [k for k in FIELDS if not isinstance(row, dict) or k not in row]
    if missing:
      raise ConfigError(field, f"{f}:{n}", f"the row has no {missing[0]!r} field",
                        "give every row prompt, chosen and rejected (text)")
    bad = [k for k in FIELDS if not isinstance(row[k], str)]
    if bad:
      raise ConfigError(field, f"{f}:{n}", f"{bad[0]!r} holds a "
                        f"{type(row[bad[0]]).__name__}, not text",
                        "give prompt, chosen and rejected as strings")
    pairs.append((row["prompt"], row["chosen"], row["rejected"]))
  if not pairs:
    raise ConfigError(field, path, "holds no preference rows", "give at least two rows")
  return pairs


def task_words() -> list[str]:
  """The synthetic task's words: the first distinct lower-case words of 3-7 letters of
  the shipped ``python_docs`` corpus."""
  words, seen = [], set()
  for doc in sources_lib.embedded_documents("python_docs"):
    for w in re.findall(r"\b[a-z]{3,7}\b", doc):
      if w not in seen:
        seen.add(w)
        words.append(w)
        if len(words) == _VOCAB_WORDS:
          return words
  return words


def synthetic_pair(task: str, words: list[str], seed: int, stream: int,
                   index: int) -> tuple[str, str, str]:
  """(prompt, chosen, rejected) of pair ``index`` of a synthetic task's stream."""
  rng = np.random.default_rng([seed, stream, index])
  pick = [words[i] for i in rng.choice(len(words), TASK_WORDS, replace=False)]
  chosen = pick[::-1] if task == "synthetic:reverse" else [w.upper() for w in pick]
  return (f"{task.split(':')[1]}: " + " ".join(pick) + " =", " " + " ".join(chosen),
          " " + " ".join(pick))


def encode(tokenizer, prompt: str, completion: str, seq_len: int, bos: bool):
  """(inputs, targets, weights) of one sequence (module docstring)."""
  head = ([tokenizer.bos_id] if bos else []) + list(tokenizer.encode(prompt))
  tail = list(tokenizer.encode(completion)) + [tokenizer.eos_id]
  n = seq_len + 1
  tail = tail[:n - 1] if len(tail) > n - 1 else tail  # keep at least one prompt token
  head = head[max(0, len(head) - (n - len(tail))):]
  ids = np.full(n, tokenizer.pad_id, np.int32)
  ids[:len(head) + len(tail)] = head + tail
  completion_BS = np.zeros(n, bool)
  completion_BS[len(head):len(head) + len(tail)] = True
  return ids[:-1], ids[1:], completion_BS[1:].astype(np.float32)


class Pairs:
  """The train and held-out pairs of a preference source, by index."""

  def __init__(self, data_cfg, seed: int):
    self.path, self.seed = data_cfg.path, seed
    if self.path in SYNTHETIC:
      self.words = task_words()
      self.train = self.held = None
      return
    pairs = read_pairs(self.path)
    if data_cfg.eval_path:
      self.train, self.held = pairs, read_pairs(data_cfg.eval_path, "data.eval_path")
    else:
      self.train, self.held = sources_lib.split_documents(
          pairs, data_cfg.val_fraction, data_cfg.shuffle_seed, "data.path")
    mix = np.random.SeedSequence([seed, data_cfg.shuffle_seed]).generate_state(1)[0]
    self.order_seed = int(mix)

  def train_pair(self, index: int):
    if self.train is None:
      return synthetic_pair(self.path, self.words, self.seed, 0, index)
    n = len(self.train)
    epoch, i = divmod(index, n)
    order = np.random.default_rng([self.order_seed, epoch]).permutation(n)
    return self.train[order[i]]

  def held_pair(self, index: int):
    if self.held is None:
      return synthetic_pair(self.path, self.words, self.seed, 1, index)
    return self.held[index % len(self.held)]


def batches(data_cfg, tokenizer, seed: int, rows: int, first_row: int):
  """(train batch at step, held-out batch b): this process's ``rows`` rows (pairs
  ``first_row // 2 ...``) of each global batch."""
  if rows % 2:
    raise ConfigError("data.batch_size", data_cfg.batch_size, f"gives each process {rows} "
                      "rows, an odd number (pairs would be split)",
                      "use a batch size divisible by 2 x the process count")
  pairs = Pairs(data_cfg, seed)
  global_pairs, first_pair = data_cfg.batch_size // 2, first_row // 2

  def build(pair_at, b: int):
    seqs = []
    for j in range(rows // 2):
      prompt, chosen, rejected = pair_at(b * global_pairs + first_pair + j)
      seqs.append(encode(tokenizer, prompt, chosen, data_cfg.seq_len, data_cfg.bos))
      seqs.append(encode(tokenizer, prompt, rejected, data_cfg.seq_len, data_cfg.bos))
    return {k: np.stack([s[i] for s in seqs]) for i, k in
            enumerate(("inputs", "targets", "weights"))}

  return (lambda step: build(pairs.train_pair, step)), (lambda b: build(pairs.held_pair, b))
