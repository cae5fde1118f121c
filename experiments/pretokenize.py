"""Tokenize a config's text source once into ArrayRecord shards (the fast path):

  python -m experiments.pretokenize --config=experiments/configs/base.py:default \\
      --config.data.source=jsonl --config.data.path='shards/*.jsonl' \\
      --config.data.tokenizer=runs/tok/bpe-8k.json --out=data/pretok [--shards=8]

Writes ``train`` and ``val`` splits (the same split by document that training on the
text would use, or ``eval_path``'s documents as ``val``), one record per document,
``<split>-lengths.npy`` and ``index.json`` (tokenizer name and sha256, counts). Train on
it with ``--config.data.source=arrayrecord --config.data.path=<out>`` and the same
tokenizer: the token stream is the one the text source gives.
"""
import time

from absl import flags

from experiments import cli

_OUT = flags.DEFINE_string("out", None, "Folder to write the shards and index.json into.")
_SHARDS = flags.DEFINE_integer("shards", 1, "ArrayRecord shards per split.")


def main(config, spec):
  del spec
  from core.errors import ConfigError
  from lm import config as config_lib
  from lm.data import pipeline, sources, tokenizers
  typed = config_lib.resolve(config)
  data = typed.data
  if data.source not in sources.TEXT:
    raise ConfigError("data.source", data.source, "is not a text source",
                      f"pretokenize one text source at a time ({', '.join(sources.TEXT)})")
  if _SHARDS.value < 1:
    raise ConfigError("--shards", _SHARDS.value, "must be >= 1", "use e.g. 8")
  t0 = time.perf_counter()
  tok = tokenizers.load(data.tokenizer)
  src = pipeline.named_sources(data)[""]
  train, val = pipeline.text_split(src, "data", data)
  index = sources.write_pretokenized(
      _OUT.value, {"train": tok.encode_batch(train), "val": tok.encode_batch(val)},
      {"train": sum(len(d.encode()) for d in train), "val": sum(len(d.encode()) for d in val)},
      tok, shards=_SHARDS.value, extra={"source": data.source, "path": data.path})
  s = index["splits"]
  print(f"wrote {_OUT.value}: train {s['train']['documents']} documents / "
        f"{s['train']['tokens']} tokens, val {s['val']['documents']} / {s['val']['tokens']}, "
        f"tokenizer {tok.name} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  flags.mark_flags_as_required(["out"])
  cli.run(main)
