"""Train a byte-level BPE tokenizer on a config's training split, offline:

  python -m experiments.tokenizer --config=experiments/configs/base.py:default \\
      --vocab_size=8192 --out=runs/tok/bpe-8k.json [--config.data.source=jsonl ...]

``--out`` ending in ``.json`` trains with Hugging Face ``tokenizers``, ``.model`` with
sentencepiece (byte fallback). Only the training documents are read (the held-out split of
``data.val_fraction`` is left out), every text source of a mixture included. Round trips
are exact. Use the file with ``--config.data.tokenizer=<out>``.
"""
import time

from absl import flags

from experiments import cli

_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Tokens, including 3 specials and 256 bytes.")
_OUT = flags.DEFINE_string("out", None, "Where to write the tokenizer (.json or .model).")


def main(config, spec):
  del spec
  from lm import config as config_lib
  from lm.data import pipeline, tokenizers
  typed = config_lib.resolve(config)
  t0 = time.perf_counter()
  texts = pipeline.train_texts(typed.data)
  tokenizers.train(texts, _VOCAB.value, _OUT.value)
  tok = tokenizers.load(_OUT.value, "--out")
  n_bytes = sum(len(t.encode()) for t in texts)
  n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
  print(f"wrote {_OUT.value}: {tok.vocab_size} tokens, trained on {len(texts)} documents "
        f"({n_bytes / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s; "
        f"{n_bytes / n_tokens:.2f} bytes per token on them")


if __name__ == "__main__":
  flags.mark_flags_as_required(["out"])
  cli.run(main)
