"""Where documents come from: text sources and pretokenized ArrayRecord shards.

A *source* is one small config group (``data`` itself, or one entry of
``data.mixture``): ``source`` (``embedded``, ``files``, ``jsonl``, ``parquet``,
``arrayrecord``), ``path`` (``embedded``: which shipped corpus) (a file, a folder or a glob; many shards are fine), ``field``
(JSONL), ``column`` (Parquet) and ``eval_path`` (held-out data of the same kind; empty:
split by document with ``data.val_fraction``).

Text sources give a list of documents in a deterministic order (sorted files, then
their order inside each file). ``arrayrecord`` reads the folder
``experiments.pretokenize`` writes: ``index.json`` (tokenizer hash, counts, shard names),
``<split>-<i>-of-<n>.array_record`` shards with one record per document (its token ids,
without special tokens, as little-endian ``uint16`` or ``uint32``), and
``<split>-lengths.npy`` (tokens per document), so a process can plan its rows without
reading any document it does not need.
"""
import dataclasses
import glob
import gzip
import importlib.resources
import json
import os
import pathlib
import re

import numpy as np

from core.errors import ConfigError

DOC_SEPARATOR = "\n\x1e\n"  # between documents in the corpus/*.txt.gz files
EMBEDDED = ("python_docs", "python_code")  # source=embedded: path picks one ("" = the first)
TEXT = ("embedded", "files", "jsonl", "parquet")
PRETOKENIZED = ("arrayrecord",)
SUFFIXES = {"files": (".txt", ".md"), "jsonl": (".jsonl", ".json", ".jsonl.gz"),
            "parquet": (".parquet",), "arrayrecord": ()}
INDEX = "index.json"
FORMAT = "kestrel-pretokenized-1"


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One source of documents (``data.mixture.<name>``; ``weight`` is its share)."""
  source: str
  path: str = ""
  field: str = "text"
  column: str = "text"
  eval_path: str = ""
  weight: float = 1.0


def _suffix_ok(f: pathlib.Path, suffixes) -> bool:
  name = f.name.lower()
  return any(name.endswith(s) for s in suffixes)


def match_files(path: str, suffixes, field: str) -> list[pathlib.Path]:
  """The files named by a folder (searched recursively for ``suffixes``), a file or a glob,
  sorted; ConfigError naming ``field`` when the path is empty or matches nothing."""
  kinds = "/".join(suffixes)
  fix = (f"set --config.{field} to a folder of {kinds} files, one file or a quoted glob "
         f"such as 'shards/*{suffixes[0]}'")
  if not path:
    raise ConfigError(field, path, "is empty", fix)
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    found = (f for f in p.rglob("*") if _suffix_ok(f, suffixes))
  elif p.is_file():
    found = [p]
  else:
    found = map(pathlib.Path, glob.glob(os.path.expanduser(path), recursive=True))
  files = sorted((f for f in found if f.is_file()), key=lambda f: f.as_posix())
  if not files:
    raise ConfigError(field, path, f"matches no file (a folder is searched recursively for "
                      f"{kinds} files)", fix)
  return files


def embedded_documents(name: str = "", field: str = "data.path") -> list[str]:
  """A corpus shipped in ``corpus/``: ``python_docs`` (the default: the docstrings of
  CPython's standard library, 1.4 MB) or ``python_code`` (its code without docstrings,
  1.5 MB)."""
  name = name or EMBEDDED[0]
  if name not in EMBEDDED:
    raise ConfigError(field, name, "is not an embedded corpus (source='embedded')",
                      f"use '' or one of {', '.join(EMBEDDED)}")
  resource = importlib.resources.files("lm.data").joinpath("corpus", f"{name}.txt.gz")
  text = gzip.decompress(resource.read_bytes()).decode("utf-8")
  return [d for d in (d.strip() for d in text.split(DOC_SEPARATOR)) if d]


def _text_files(path: str, field: str) -> list[str]:
  files = match_files(path, SUFFIXES["files"], field)
  texts = [f.read_bytes().decode("utf-8", errors="replace").strip() for f in files]
  docs = [t for t in texts if t]
  if not docs:
    raise ConfigError(field, path, f"all {len(files)} matched files are empty",
                      "point it at files that contain text")
  if len(docs) == 1:  # one file: its blank-line separated chunks are the documents
    docs = [c.strip() for c in re.split(r"\n\s*\n", docs[0]) if c.strip()]
  return docs


def _open_text(f: pathlib.Path):
  return gzip.open(f, "rt", encoding="utf-8") if f.name.endswith(".gz") else open(
      f, encoding="utf-8")


def jsonl_rows(path: str, field: str):
  """(file, line number, parsed row) of every non-blank line of the JSONL file(s) at
  ``path``; ConfigError naming ``field`` for a line that is not JSON."""
  for f in match_files(path, SUFFIXES["jsonl"], field):
    with _open_text(f) as lines:
      for n, line in enumerate(lines, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ConfigError(field, f"{f}:{n}", f"is not JSON ({e.msg})",
                            "give one JSON object per line") from None
        yield f, n, row


def _jsonl(path: str, key: str, field: str, prefix: str) -> list[str]:
  docs = []
  for f, n, row in jsonl_rows(path, field):
    if not isinstance(row, dict) or key not in row:
      have = sorted(row) if isinstance(row, dict) else type(row).__name__
      raise ConfigError(f"{prefix}.field", key, f"is not a field of {f}:{n} (it has "
                        f"{have})", f"set --config.{prefix}.field to the text's field")
    if not isinstance(row[key], str):
      raise ConfigError(f"{prefix}.field", key, f"{f}:{n} holds a "
                        f"{type(row[key]).__name__} there, not text",
                        "name a field that holds strings")
    if row[key].strip():
      docs.append(row[key])
  return docs


def _parquet(path: str, column: str, field: str, prefix: str) -> list[str]:
  import pyarrow.parquet as pq
  docs = []
  for f in match_files(path, SUFFIXES["parquet"], field):
    names = pq.read_schema(f).names
    if column not in names:
      raise ConfigError(f"{prefix}.column", column, f"is not a column of {f} (it has "
                        f"{names})", f"set --config.{prefix}.column to the text column")
    values = pq.read_table(f, columns=[column]).column(column).to_pylist()
    if any(v is not None and not isinstance(v, str) for v in values):
      raise ConfigError(f"{prefix}.column", column, f"of {f} does not hold text",
                        "name a string column")
    docs.extend(v for v in values if v and v.strip())
  return docs


def read_documents(src: SourceConfig, prefix: str = "data", *, held_out: bool = False
                   ) -> list[str]:
  """The documents of a text source (its ``eval_path``'s with ``held_out``).

  Raises:
    ConfigError: naming ``<prefix>.path`` (or ``eval_path``), ``field`` or ``column``.
  """
  path_field = f"{prefix}.{'eval_path' if held_out else 'path'}"
  path = src.eval_path if held_out else src.path
  if src.source == "embedded":
    docs = embedded_documents(path, path_field)
  elif src.source == "files":
    docs = _text_files(path, path_field)
  elif src.source == "jsonl":
    docs = _jsonl(path, src.field, path_field, prefix)
  elif src.source == "parquet":
    docs = _parquet(path, src.column, path_field, prefix)
  else:
    raise ConfigError(f"{prefix}.source", src.source, "is not a text source",
                      f"use one of {', '.join(TEXT)}")
  if not docs:
    raise ConfigError(path_field, path, f"holds no non-empty document ({src.source})",
                      "point it at data that contains text")
  return docs


def split_documents(docs: list, val_fraction: float, seed: int,
                    field: str = "data.path") -> tuple[list, list]:
  """(train, val) by document with a seeded permutation; val gets
  ``round(n * val_fraction)`` documents, at least one, train at least one; both keep the
  original order."""
  n = len(docs)
  if n < 2:
    raise ConfigError(field, f"<{n} document>", "a split by document needs at least 2 "
                      "documents",
                      "use more documents (or blank-line separated paragraphs), or give "
                      "eval_path")
  n_val = min(n - 1, max(1, round(n * val_fraction)))
  order = np.random.default_rng(seed).permutation(n)
  val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
  return [docs[i] for i in train_idx], [docs[i] for i in val_idx]


# ----------------------------------------------------------------------------- tokenized


class InMemory:
  """Tokenized documents held in memory (text sources)."""

  def __init__(self, docs_tokens: list[np.ndarray]):
    self._docs = docs_tokens
    self.lengths = np.array([len(d) for d in docs_tokens], np.int64)

  def __len__(self):
    return len(self._docs)

  def get(self, indices) -> list[np.ndarray]:
    return [self._docs[i] for i in indices]


class Pretokenized:
  """Splits of a pretokenized folder, one after another; documents read on demand."""

  def __init__(self, folder: str, splits: list[str], index: dict):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    infos = [index["splits"][s] for s in splits]
    self.lengths = np.concatenate([np.load(os.path.join(folder, i["lengths"]))
                                   for i in infos]).astype(np.int64)
    self._dtype = np.dtype(index["dtype"])
    shards = [os.path.join(folder, s) for i in infos for s in i["shards"]]
    self._source = ArrayRecordDataSource(shards)
    if len(self._source) != len(self.lengths):
      raise ConfigError("data.path", folder, f"holds {len(self._source)} records in "
                        f"{'+'.join(splits)} but its lengths files list {len(self.lengths)}",
                        "pretokenize it again")

  def __len__(self):
    return len(self.lengths)

  def get(self, indices) -> list[np.ndarray]:
    indices = [int(i) for i in indices]
    records = self._source.__getitems__(indices) if indices else []
    return [np.frombuffer(r, self._dtype).astype(np.int32) for r in records]


def read_index(folder: str, field: str) -> dict:
  """The ``index.json`` of a pretokenized folder; ConfigError naming ``field``."""
  fix = "pass a folder written by 'python -m experiments.pretokenize --config=... --out=DIR'"
  if not folder:
    raise ConfigError(field, folder, "is empty", fix)
  shown, folder = folder, os.path.expanduser(folder)
  path = os.path.join(folder, INDEX)
  try:
    with open(path) as f:
      index = json.load(f)
  except FileNotFoundError:
    raise ConfigError(field, shown, f"has no {INDEX}", fix) from None
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(field, shown, f"{INDEX} cannot be read ({e})", fix) from None
  if index.get("format") != FORMAT:
    raise ConfigError(field, shown, f"{INDEX} is not a {FORMAT} index", fix)
  for split in index["splits"].values():
    if not split["shards"]:
      raise ConfigError(field, shown, "lists an empty shard list", fix)
    for s in split["shards"]:
      if not os.path.isfile(os.path.join(folder, s)):
        raise ConfigError(field, shown, f"is missing shard {s}", fix)
  return index


def write_pretokenized(folder: str, splits: dict[str, list[np.ndarray]],
                       split_bytes: dict[str, int], tokenizer, *, shards: int = 1,
                       extra: dict | None = None) -> dict:
  """Writes ``splits`` ({name: tokenized documents}) as ArrayRecord shards plus
  ``<split>-lengths.npy`` and ``index.json`` (last: a folder without it is incomplete)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  os.makedirs(folder, exist_ok=True)
  if os.path.exists(os.path.join(folder, INDEX)):  # until the new index: incomplete
    os.remove(os.path.join(folder, INDEX))
  dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")
  index = {"format": FORMAT, "tokenizer": tokenizer.name, "tokenizer_sha256": tokenizer.sha256,
           "vocab_size": int(tokenizer.vocab_size), "dtype": dtype.str, "splits": {},
           **(extra or {})}
  for split, docs in splits.items():
    n = max(1, min(shards, len(docs)))
    names = [f"{split}-{i:05d}-of-{n:05d}.array_record" for i in range(n)]
    bounds = np.linspace(0, len(docs), n + 1).astype(int)
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
      writer = ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
      for d in docs[lo:hi]:
        writer.write(np.asarray(d).astype(dtype).tobytes())
      writer.close()
    lengths = f"{split}-lengths.npy"
    np.save(os.path.join(folder, lengths), np.array([len(d) for d in docs], np.int64))
    index["splits"][split] = {"shards": names, "lengths": lengths, "documents": len(docs),
                              "tokens": int(sum(len(d) for d in docs)),
                              "bytes": int(split_bytes[split])}
  tmp = os.path.join(folder, f"{INDEX}.tmp")
  with open(tmp, "w") as f:
    json.dump(index, f, indent=1)
  os.replace(tmp, os.path.join(folder, INDEX))
  return index
