"""Packing tokenized documents into rows, as a pure function of the row index.

The train stream of a source is the concatenation, epoch after epoch, of its documents
(each with BOS/EOS as configured) in a new seeded order every epoch; row ``r`` is tokens
``[r * S, (r + 1) * S)`` of that stream (``S = seq_len + 1``), so rows cross document and
epoch boundaries and no token is dropped or padded. Because a row is computed from its
index alone, from the documents' lengths and only the documents it overlaps, a process
reads only what its rows need, and resuming needs no more state than a row counter.
"""
import numpy as np


class PackedStream:
  """Rows of ``S`` tokens of an endless shuffled stream of one tokenized corpus."""

  def __init__(self, corpus, *, row_len: int, seed: int, bos: int | None, eos: int | None,
               shuffle_window: int = 0):
    """``corpus``: ``.lengths`` int64 [N] and ``.get(indices) -> list of int32 arrays``;
    ``shuffle_window`` <= 1 hands rows out in stream order."""
    self.corpus, self.row_len, self.seed = corpus, row_len, seed
    self.window = max(int(shuffle_window), 1)
    self._windows: dict[int, np.ndarray] = {}
    self._bos = np.array([] if bos is None else [bos], np.int32)
    self._eos = np.array([] if eos is None else [eos], np.int32)
    self.doc_lengths = corpus.lengths + len(self._bos) + len(self._eos)
    self.epoch_tokens = int(self.doc_lengths.sum())
    self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(document order, start offset of each in the epoch) of epoch ``e``, cached."""
    if e not in self._epochs:
      if len(self._epochs) > 4:
        self._epochs.pop(min(self._epochs))
      order = np.random.default_rng([self.seed, e]).permutation(len(self.doc_lengths))
      starts = np.concatenate([[0], np.cumsum(self.doc_lengths[order])[:-1]])
      self._epochs[e] = (order, starts)
    return self._epochs[e]

  def _pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(document, from, to) token slices (with specials) covering stream ``[lo, hi)``."""
    out = []
    while lo < hi:
      e, off = divmod(lo, self.epoch_tokens)
      order, starts = self._epoch(e)
      k = int(np.searchsorted(starts, off, side="right")) - 1
      doc = int(order[k])
      a = off - int(starts[k])
      b = min(int(self.doc_lengths[doc]), a + hi - lo)
      out.append((doc, a, b))
      lo += b - a
    return out

  def stream_row(self, index: int) -> int:
    """The stream row handed out as row ``index`` (a permutation within each window)."""
    if self.window == 1:
      return int(index)
    w, pos = divmod(int(index), self.window)
    if w not in self._windows:
      if len(self._windows) > 4:
        self._windows.pop(min(self._windows))
      rng = np.random.default_rng([self.seed, 1 << 40, w])
      self._windows[w] = rng.permutation(self.window)
    return w * self.window + int(self._windows[w][pos])

  def rows(self, indices) -> np.ndarray:
    """Rows ``indices`` as int32 [len(indices), S]; reads each needed document once."""
    S = self.row_len
    plans = [self._pieces(self.stream_row(r) * S, (self.stream_row(r) + 1) * S)
             for r in indices]
    needed = sorted({d for plan in plans for d, _, _ in plan})
    docs = dict(zip(needed, self.corpus.get(needed)))
    out = np.empty((len(plans), S), np.int32)
    for i, plan in enumerate(plans):
      out[i] = np.concatenate([
          np.concatenate([self._bos, docs[d], self._eos])[a:b] for d, a, b in plan])
    return out

  def documents_for(self, indices) -> set[int]:
    """The documents rows ``indices`` read (what a process touches)."""
    S = self.row_len
    return {d for r in indices
            for d, _, _ in self._pieces(self.stream_row(r) * S, (self.stream_row(r) + 1) * S)}


class HeldOut:
  """Held-out rows: the documents in order (no shuffle, one pass), concatenated and cut
  into rows of ``S``; the last row is padded with ``pad`` (weight 0). Like
  ``PackedStream``, a row is built from the lengths and the documents it overlaps only,
  so a large pretokenized held-out split is never read whole."""

  def __init__(self, corpus, *, row_len: int, bos: int | None, eos: int | None, pad: int):
    self.corpus, self.row_len, self.pad = corpus, row_len, pad
    self._bos = np.array([] if bos is None else [bos], np.int32)
    self._eos = np.array([] if eos is None else [eos], np.int32)
    self.doc_lengths = corpus.lengths + len(self._bos) + len(self._eos)
    self.tokens = int(self.doc_lengths.sum())
    self.n_rows = -(-self.tokens // row_len)
    self._starts = np.concatenate([[0], np.cumsum(self.doc_lengths)[:-1]]).astype(np.int64)

  def rows(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [len(indices), S], valid bool [len(indices), S]) of rows ``indices``."""
    S = self.row_len
    plans = []
    for r in indices:
      lo, hi = int(r) * S, min((int(r) + 1) * S, self.tokens)
      plan = []
      while lo < hi:
        k = int(np.searchsorted(self._starts, lo, side="right")) - 1
        a = lo - int(self._starts[k])
        b = min(int(self.doc_lengths[k]), a + hi - lo)
        plan.append((k, a, b))
        lo += b - a
      plans.append(plan)
    needed = sorted({d for plan in plans for d, _, _ in plan})
    docs = dict(zip(needed, self.corpus.get(needed)))
    tokens = np.full((len(plans), S), self.pad, np.int32)
    valid = np.zeros((len(plans), S), bool)
    for i, plan in enumerate(plans):
      row = [np.concatenate([self._bos, docs[d], self._eos])[a:b] for d, a, b in plan]
      n = sum(len(x) for x in row)
      if n:
        tokens[i, :n] = np.concatenate(row)
      valid[i, :n] = True
    return tokens, valid


def pack_eval(docs_tokens: list[np.ndarray], *, row_len: int, bos: int | None,
              eos: int | None, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """All held-out rows of in-memory documents at once (the slow, obvious twin of
  ``HeldOut``): tokens int32 [R, S] and valid bool [R, S]."""
  pre = [] if bos is None else [np.array([bos], np.int32)]
  post = [] if eos is None else [np.array([eos], np.int32)]
  stream_N = np.concatenate([x for d in docs_tokens for x in (*pre, d, *post)])
  n_rows = -(-len(stream_N) // row_len)
  tokens = np.full(n_rows * row_len, pad, np.int32)
  tokens[:len(stream_N)] = stream_N
  valid = np.arange(tokens.size) < len(stream_N)
  return tokens.reshape(n_rows, row_len), valid.reshape(n_rows, row_len)
