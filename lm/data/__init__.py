"""Data: tokenizers, sources, packing, mixtures and the grain pipelines (``make_data``).

Modules: ``tokenizers`` (byte, BPE files, training), ``sources`` (text formats and
pretokenized ArrayRecord shards), ``packing`` (rows as a pure function of their index),
``mixture`` (which source fills each row, by weight and curriculum stage) and
``pipeline`` (``make_data``, synthetic tasks).
"""
from lm.data.pipeline import (SOURCES, SYNTHETIC_TASKS, Batch, Data, check, make_data, text_split, train_texts,
                              named_sources, synthetic_example, mqar_example, copy_example)
from lm.data.sources import SourceConfig, embedded_documents, read_documents, split_documents
from lm.data.tokenizers import ByteTokenizer, load as load_tokenizer
