"""Bad inputs as a new user types them: each stops with one line ``error: <field>=<value>:
<problem>. Fix: <fix>``, exit status 2, no traceback, and leaves an existing
workdir's checkpoints and config.json as they were."""
import hashlib
import os
import subprocess
import sys

import pytest
from conftest import ROOT, tiny

from lm import loop

BASE = "--config=experiments/configs/base.py:tiny"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A workdir with a finished 2-step run (checkpoint, config.json, metrics)."""
  workdir = tmp_path_factory.mktemp("finished")
  loop.run(tiny(train__steps=2), str(workdir))
  return workdir


def _fingerprint(workdir) -> dict:
  """Every file under the workdir's checkpoints/ and its config.json, hashed."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if "checkpoints" in path or name == "config.json":
        with open(path, "rb") as f:
          out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _cli(module: str, *args) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# (case, CLI module, arguments, text the one error line must contain); each runs against
# the finished workdir unless it names its own.
CASES = [
    ("unknown config argument", "experiments.train",
     ["--config=experiments/configs/base.py:gigantic"],
     "--config='base.py:gigantic': unknown base.py argument. Fix: use one of tiny"),
    ("unknown moe.py argument", "experiments.train",
     ["--config=experiments/configs/moe.py:gigantic"],
     "--config='moe.py:gigantic': unknown moe.py argument"),
    ("missing config file", "experiments.train", ["--config=experiments/configs/nope.py"],
     "--config='experiments/configs/nope.py': no such config file"),
    ("unwritable workdir", "experiments.train", [BASE, "--workdir=/proc/x"],
     "--workdir='/proc/x': cannot be created or written"),
    ("text for an int", "experiments.train", [BASE, "--config.train.steps=abc"],
     "--config.train.steps='abc': must be an integer"),
    ("float for an int", "experiments.train", [BASE, "--config.model.d_model=64.5"],
     "--config.model.d_model='64.5': must be an integer"),
    ("unknown attention implementation", "experiments.train",
     [BASE, "--config.model.attention_impl=flash3"],
     "model.attention_impl='flash3': unknown choice. Fix: use one of xla, blocked"),
    ("implementation that refuses the shapes", "experiments.train",
     [BASE, "--config.model.attention_impl=splash"],
     "model.attention_impl='splash': no attention implementation could run: splash: sequence "
     "lengths must be multiples of 128"),
    ("unknown field", "experiments.train", [BASE, "--config.model.n_hedas=4"],
     "unknown config field 'n_hedas' under model. Fix: use one of"),
    ("field of a value", "experiments.train", [BASE, "--config.seed.x=1"],
     "seed is a value, not a group"),
    ("bad flag value", "experiments.train", [BASE, "--stop_at=soon"], "--stop_at"),
    ("bad moe field", "experiments.train", [BASE, "--config.model.moe.num_experts=4",
                                            "--config.model.moe.top_k=9"],
     "model.moe.top_k=9: exceeds num_experts=4"),
    ("bad optimizer field", "experiments.train", [BASE, "--config.optimizer.b1=1.5"],
     "optimizer.b1=1.5: must lie in [0.0, 1.0)"),
    ("compile: unknown topology", "experiments.compile", [BASE, "--topology=v9z:2x2"],
     "--topology='v9z:2x2': expected <generation>:<AxB[xC]>"),
    ("ablate: unknown sweep field", "experiments.ablate", [BASE, "--sweep=optimizer.nme=adamw"],
     "--sweep.optimizer.nme='adamw': unknown config field 'nme' under optimizer"),
    # data ({data} is the folder written by the bad_data fixture)
    ("missing tokenizer file", "experiments.train", [BASE, "--config.data.tokenizer=/no/tok.json"],
     "data.tokenizer='/no/tok.json': is not 'byte', 'bpe' or an existing tokenizer file"),
    ("tokenizer not the checkpoint's", "experiments.train", [BASE, "--config.data.tokenizer=bpe"],
     "data.tokenizer='bpe': is not the tokenizer the checkpoint (step 2) was trained with (byte"),
    ("vocab larger than the model's", "experiments.train",
     [BASE, "--config.data.tokenizer=bpe", "--config.model.vocab_size=512"],
     "model.vocab_size=512: smaller than the tokenizer's vocabulary (4096)"),
    ("missing JSONL field", "experiments.train",
     [BASE, "--config.data.source=jsonl", "--config.data.path={data}/jsonl"],
     "data.field='text': is not a field of"),
    ("missing Parquet column", "experiments.train",
     [BASE, "--config.data.source=parquet", "--config.data.path={data}/t.parquet",
      "--config.data.column=body"], "data.column='body': is not a column of"),
    ("empty shard list", "experiments.train",
     [BASE, "--config.data.source=arrayrecord", "--config.data.path={data}/pre"],
     "lists an empty shard list"),
    ("non-positive mixture weight", "experiments.train",
     ["--config=experiments/configs/mixture.py:mix", "--config.data.mixture.code.weight=0"],
     "data.mixture.code.weight=0.0: must be > 0"),
    ("stages out of order", "experiments.train",
     ["--config=experiments/configs/mixture.py:mix",
      "--config.data.stages=((5, {'docs': 1.0}), (3, {'code': 1.0}))"],
     "stage steps must increase from 0 (stage 1 starts at 3, after 5)"),
    ("pretokenize: not a text source", "experiments.pretokenize",
     [BASE, "--config.data.source=synthetic", "--out={data}/x"],
     "data.source='synthetic': is not a text source"),
    ("tokenizer: bad suffix", "experiments.tokenizer", [BASE, "--out={data}/tok.txt"],
     "--out='{data}/tok.txt': must end in .json"),
    # generation from a trained run ({finished}); max_len defaults to data.seq_len = 64
    ("generate: empty prompt", "experiments.generate", ["--workdir={finished}", "--prompt="],
     "--prompt='': empty"),
    ("generate: prompt + new tokens beyond max_len", "experiments.generate",
     ["--workdir={finished}", "--prompt=hello", "--max_new_tokens=60"],
     "--max_new_tokens=60: prompt 0 has 5 tokens: 5 + 60 exceeds max_len=64"),
    ("generate: layers:N out of range", "experiments.generate",
     ["--workdir={finished}", "--prompt=hi", "--draft=layers:3"],
     "--draft='layers:3': the target has 2 layers"),
    ("generate: workdir without checkpoint", "experiments.generate",
     ["--workdir={data}/nockpt", "--prompt=hi"], "has no checkpoints/ folder"),
    ("generate: not a run", "experiments.generate", ["--workdir={data}", "--prompt=hi"],
     "has no config.json (not a Kestrel run)"),
    # compression (lm/quant.py, lm/prune.py, distillation between architectures; the
    # unknown weight type and the sparsity range: tests/test_quant.py, test_prune.py)
    ("evaluate: group not dividing the inputs", "experiments.evaluate",
     ["--workdir={finished}", "--config.quant.weight=int4", "--config.quant.group_size=48"],
     "quant.group_size=48: does not divide the input dimension 64 of block_0/attn/k"),
    ("quantize: out exists", "experiments.quantize", ["--workdir={finished}", "--out={finished}"],
     "exists and is not an empty folder"),
    ("prune: n > m", "experiments.prune",
     ["--workdir={finished}", "--out={data}/pruned", "--config.prune.method=nm",
      "--config.prune.n=5"], "prune.n=5: exceeds m=4"),
    ("train: teacher with another vocabulary", "experiments.train",
     [BASE, "--workdir={data}/student", "--config.distill.teacher={finished}",
      "--config.model.vocab_size=512"], "the teacher's vocabulary is 384 tokens, the student's 512"),
    ("train: init_from a folder without checkpoints", "experiments.train",
     [BASE, "--workdir={data}/ft", "--config.train.init_from={data}"],
     "has no checkpoints/ folder (not a trained run)"),
    ("train: LoRA rank 0", "experiments.train",
     [BASE, "--workdir={data}/ft", "--config.lora.init_from={finished}", "--config.lora.rank=0"],
     "lora.rank=0: must be an integer >= 1"),
    ("train: DPO pair without a rejected completion", "experiments.train",
     [BASE, "--workdir={data}/ft", "--config.train.init_from={finished}",
      "--config.data.source=preference", "--config.data.path={data}/prefs.jsonl",
      "--config.dpo.loss=sigmoid"], "the row has no 'rejected' field"),
]


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
  """A JSONL shard without a 'text' field, a Parquet file and a pretokenized folder whose
  index lists no shards."""
  import json as json_lib
  import pyarrow as pa
  import pyarrow.parquet as pq
  folder = tmp_path_factory.mktemp("bad_data")
  (folder / "jsonl").mkdir()
  (folder / "jsonl" / "a.jsonl").write_text('{"body": "no text field"}\n')
  pq.write_table(pa.table({"text": ["a", "b"]}), folder / "t.parquet")
  (folder / "pre").mkdir()
  (folder / "pre" / "index.json").write_text(json_lib.dumps(
      {"format": "kestrel-pretokenized-1", "splits": {"train": {"shards": []}}}))
  (folder / "prefs.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
  (folder / "nockpt").mkdir()
  (folder / "nockpt" / "config.json").write_text("{}")
  return folder


# The training command's config errors are raised by experiments.configs (parsing) and
# lm.loop.run (everything else) and printed by experiments.cli like any other: these
# four run as commands (the config file, the workdir, absl's flags); the rest of its
# cases run in process (``test_training_config_errors_in_process``), which is the same
# code without a Python start-up each.
TRAIN_AS_COMMAND = ("unknown config argument", "missing config file", "unwritable workdir",
                    "bad flag value")


def _in_process(case: str, module: str) -> bool:
  return module == "experiments.train" and case not in TRAIN_AS_COMMAND


def _fill(args, finished, bad_data):
  return [a.replace("{data}", str(bad_data)).replace("{finished}", str(finished)) for a in args]


def test_training_config_errors_in_process(finished, bad_data):
  from core.errors import ConfigError
  from experiments.configs import from_argv
  before = _fingerprint(finished)
  for case, module, args, expected in CASES:
    if not _in_process(case, module):
      continue
    args = _fill(args, finished, bad_data)
    expected = expected.replace("{data}", str(bad_data))
    with pytest.raises(ConfigError) as e:
      config, _, rest = from_argv(args)
      workdir = next((a.split("=", 1)[1] for a in rest if a.startswith("--workdir=")),
                     str(finished))
      loop.run(config, workdir)
    line = str(e.value)
    assert expected in line and "Fix:" in line and "\n" not in line, (case, line)
  assert _fingerprint(finished) == before
  assert not any((bad_data / d).exists() for d in ("student", "ft"))


def test_every_bad_input_is_one_line_exit_2_and_touches_nothing(finished, bad_data, tmp_path):
  before = _fingerprint(finished)
  procs = []
  for case, module, args, expected in CASES:
    if _in_process(case, module):
      continue
    args = _fill(args, finished, bad_data)
    expected = expected.replace("{data}", str(bad_data))
    extra = []
    if module == "experiments.train" and not any(a.startswith("--workdir") for a in args):
      extra = [f"--workdir={finished}"]
    if module == "experiments.ablate":
      extra = [f"--out={tmp_path / 'ablation'}"]
    procs.append((case, expected, _cli(module, *args, *extra)))
  for case, expected, p in procs:
    out, err = p.communicate(timeout=600)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert p.returncode == 2, (case, out, err)
    assert "Traceback" not in out + err, (case, err)
    assert len(errors) == 1 and expected in errors[0], (case, err)
    assert "Fix:" in errors[0], (case, errors[0])
  assert _fingerprint(finished) == before
  assert not any((bad_data / d).exists() for d in ("pruned", "student", "ft"))
  assert not (tmp_path / "ablation" / "runs").exists()


def test_a_bad_value_in_python_is_the_same_one_line_error(finished):
  from core.errors import ConfigError
  before = _fingerprint(finished)
  with pytest.raises(ConfigError, match=r"^model.attention_impl='flash3': unknown choice\. Fix: "):
    loop.run(tiny(model__attention_impl="flash3"), str(finished))
  with pytest.raises(ConfigError, match=r"^model.sparse.block_q=48: does not divide "
                     r"data.seq_len=64\. Fix: "):
    loop.run(tiny(model__sparse__enabled=True, model__sparse__block_q=48), str(finished))
  with pytest.raises(ConfigError, match=r"^distill.teacher='/nonexistent': no such directory"):
    loop.run(tiny(distill__teacher="/nonexistent"), str(finished))
  assert _fingerprint(finished) == before
