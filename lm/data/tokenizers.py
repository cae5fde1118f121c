"""Tokenizers: bytes, or a BPE file (Hugging Face ``tokenizer.json`` or sentencepiece ``.model``).

``load(spec)`` takes the config field ``data.tokenizer``: ``byte`` (UTF-8 bytes, EOS 256),
``bpe`` (the byte-level BPE with 4096 tokens trained on the embedded corpus, shipped in
``lm/data/corpus/bpe-4k.json``), or a path to a ``.json`` or ``.model`` file.

Every tokenizer has the same small surface: ``encode(text) -> int32 [L]`` (no special
tokens), ``decode(ids) -> str`` (special tokens dropped), ``vocab_size``, ``eos_id``,
``bos_id``, ``pad_id``, ``token_bytes`` (int64 [vocab]: the UTF-8 bytes each token stands
for, 0 for special tokens; bits per byte are counted with it) and ``sha256`` (of the file;
``"byte"`` for bytes), which checkpoints keep so that a run never resumes with another
tokenizer. Round trips are exact: no Unicode normalisation, whitespace kept, and bytes
no merge covers stay single-byte tokens.

``train(texts, vocab_size, out)`` trains a byte-level BPE; the suffix of ``out`` picks the
library (``.json``: Hugging Face ``tokenizers``; ``.model``: sentencepiece with byte
fallback). Both reserve ``pad``, ``bos`` and ``eos`` as ids 0, 1 and 2.
"""
import hashlib
import importlib.resources
import io
import json
import os
import pathlib
import re

import numpy as np

from core.errors import ConfigError

BYTE, SHIPPED = "byte", "bpe"
SHIPPED_FILE = "bpe-4k.json"
SUFFIXES = (".json", ".model")
SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")  # ids 0, 1, 2 of the BPEs trained here
_EOS_NAMES = ("<|eos|>", "<|endoftext|>", "</s>", "<eos>")
_BOS_NAMES = ("<|bos|>", "<s>", "<bos>")
_PAD_NAMES = ("<|pad|>", "<pad>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255; ``eos_id`` = 256 (also BOS); pad 0 (always masked)."""

  name = BYTE
  sha256 = BYTE
  path = None
  eos_id = bos_id = 256
  pad_id = 0
  vocab_size = 257

  def __init__(self):
    self.token_bytes = np.r_[np.ones(256, np.int64), 0]

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    ids_L = np.asarray(ids).reshape(-1)
    return ids_L[(ids_L >= 0) & (ids_L < 256)].astype(np.uint8).tobytes().decode(
        "utf-8", errors="replace")


def _byte_level_decoder() -> dict[str, int]:
  """The inverse of the byte -> printable character map of byte-level BPE (GPT-2's)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _first_id(lookup, names) -> int | None:
  for n in names:
    i = lookup(n)
    if i is not None and i >= 0:
      return int(i)
  return None


class HuggingFaceTokenizer:
  """A Hugging Face ``tokenizer.json``."""

  def __init__(self, path: str, field: str = "data.tokenizer"):
    from tokenizers import Tokenizer
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the library's parse errors
      raise ConfigError(field, path, f"is not a Hugging Face tokenizer.json ({e})",
                        "pass a file written by tokenizers' Tokenizer.save or "
                        "experiments.tokenizer") from None
    self.name, self.path, self.sha256 = os.path.basename(path), path, file_sha256(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    lookup = self._tok.token_to_id
    self.eos_id = _first_id(lookup, _EOS_NAMES)
    if self.eos_id is None:
      raise ConfigError(field, path, f"has no end-of-document token (looked for "
                        f"{', '.join(_EOS_NAMES)})", "add one as a special token, or "
                        "train the tokenizer with experiments.tokenizer")
    self.bos_id = _first_id(lookup, _BOS_NAMES)
    self.bos_id = self.eos_id if self.bos_id is None else self.bos_id
    self.pad_id = _first_id(lookup, _PAD_NAMES)
    self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
    spec = json.loads(self._tok.to_str())
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    chars = _byte_level_decoder()
    sizes = np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      if i in special:
        continue
      piece = self._tok.id_to_token(i)
      if piece is None:
        continue
      if byte_level and all(c in chars for c in piece):
        sizes[i] = len(piece)  # one character per byte
      elif _BYTE_PIECE.fullmatch(piece):
        sizes[i] = 1  # a byte-fallback piece such as <0x0A>
      else:  # sentencepiece-style pieces mark spaces with U+2581
        sizes[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    self.token_bytes = sizes

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    ids_L = np.asarray(ids).reshape(-1)
    ids_L = ids_L[(ids_L >= 0) & (ids_L < self.vocab_size)]
    return self._tok.decode(ids_L.tolist(), skip_special_tokens=True)


class SentencePieceTokenizer:
  """A sentencepiece ``.model``."""

  def __init__(self, path: str, field: str = "data.tokenizer"):
    import sentencepiece as spm
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # noqa: BLE001 - the library's parse errors
      raise ConfigError(field, path, f"is not a sentencepiece model ({e})",
                        "pass a .model written by sentencepiece or experiments.tokenizer"
                        ) from None
    sp = self._sp
    self.name, self.path, self.sha256 = os.path.basename(path), path, file_sha256(path)
    self.vocab_size = sp.get_piece_size()
    if sp.eos_id() < 0:
      raise ConfigError(field, path, "has no end-of-document token (eos_id is -1)",
                        "train it with eos_id set, e.g. with experiments.tokenizer")
    self.eos_id = sp.eos_id()
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else self.eos_id
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
    sizes = np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        continue
      sizes[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
    self.token_bytes = sizes

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self._sp.encode(texts)]

  def decode(self, ids) -> str:
    ids_L = np.asarray(ids).reshape(-1)
    ids_L = ids_L[(ids_L >= 0) & (ids_L < self.vocab_size)]
    return self._sp.decode(ids_L.tolist())


def shipped_path() -> str:
  """The path of the shipped BPE (``data.tokenizer=bpe``)."""
  return str(importlib.resources.files("lm.data").joinpath("corpus", SHIPPED_FILE))


def load(spec: str, field: str = "data.tokenizer"):
  """The tokenizer named by ``spec`` (see the module doc); ConfigError naming ``field``."""
  if spec == BYTE:
    return ByteTokenizer()
  path = shipped_path() if spec == SHIPPED else os.path.expanduser(spec)
  if not spec or not os.path.isfile(path):
    raise ConfigError(field, spec, "is not 'byte', 'bpe' or an existing tokenizer file",
                      "train one with 'python -m experiments.tokenizer --config=... "
                      "--out=tok.json', or use byte or bpe")
  suffix = pathlib.Path(path).suffix
  if suffix == ".json":
    return HuggingFaceTokenizer(path, field)
  if suffix == ".model":
    return SentencePieceTokenizer(path, field)
  raise ConfigError(field, spec, f"has suffix {suffix!r}; a tokenizer file is a Hugging Face "
                    ".json or a sentencepiece .model", "pass a .json or .model file")


def train(texts: list[str], vocab_size: int, out: str, *, field: str = "--out") -> None:
  """Trains a byte-level BPE of ``vocab_size`` tokens (3 specials, the 256 bytes and
  merges) on ``texts`` and writes it to ``out`` (``.json`` or ``.model``)."""
  if vocab_size < 300:
    raise ConfigError("--vocab_size", vocab_size, "is too small for a byte-level BPE (3 "
                      "special tokens + 256 bytes + merges)", "use e.g. 4096")
  suffix = pathlib.Path(out).suffix
  if suffix not in SUFFIXES:
    raise ConfigError(field, out, "must end in .json (Hugging Face tokenizers) or .model "
                      "(sentencepiece)", "e.g. --out=runs/tok/bpe-8k.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f"{out}.tmp-{os.getpid()}"
  if suffix == ".json":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(tmp)
  else:
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=False, character_coverage=0.9995,
        max_sentence_length=1 << 24, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        minloglevel=2, num_threads=os.cpu_count() or 1)
    with open(tmp, "wb") as f:
      f.write(model.getvalue())
  os.replace(tmp, out)  # atomic: a reader never sees half a tokenizer
