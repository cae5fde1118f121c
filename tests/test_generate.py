"""experiments.generate and drafts that are other runs, on small trained runs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, tiny

from core.errors import ConfigError
from lm import decode, loop, runs
from lm.decode import drafts, speculative


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny byte-level run, and two copies of it whose config.json names the BPE
  tokenizer or a 512-token vocabulary (drafts are checked before weights are read)."""
  root = tmp_path_factory.mktemp("runs")
  made = {"byte": str(root / "byte")}
  loop.run(tiny(train__steps=12), made["byte"])
  for name, field, value in (("bpe", "tokenizer", "bpe"), ("vocab512", "vocab_size", 512)):
    made[name] = str(root / name)
    shutil.copytree(made["byte"], made[name])
    with open(os.path.join(made[name], "config.json")) as f:
      config = json.load(f)
    config["data" if field == "tokenizer" else "model"][field] = value
    with open(os.path.join(made[name], "config.json"), "w") as f:
      json.dump(config, f)
  return made


def test_drafts_from_other_runs(trained):
  w = runs.load_weights(trained["byte"])
  target = decode.Model.from_weights(w.config.model, w.params, w.model_state)
  ctx = {"tokenizer": w.tokenizer}
  with pytest.raises(ConfigError,
                     match=r"its tokenizer \(bpe-4k.json\) is not the target.s \(byte\)"):
    drafts.make(trained["bpe"], target, ctx)
  with pytest.raises(ConfigError, match=r"its vocabulary \(512\) is not the target's \(384\)"):
    drafts.make(trained["vocab512"], target, ctx)
  same = drafts.make(trained["byte"], target, ctx)  # itself: every proposal accepted
  prompt = [w.tokenizer.encode("def f(x):").tolist()]
  plain = decode.Decoder(target, max_len=64).generate(decode.Request(prompt, 20))
  spec = speculative.Speculative(target, same, gamma=3, max_len=64).generate(
      decode.Request(prompt, 20))
  assert spec["tokens"] == plain["tokens"] and spec["acceptance_rate"] == 1.0


def test_generate_cli_json(trained, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("def f(x):\nimport os\n")
  run = lambda *a: subprocess.run([sys.executable, "-m", "experiments.generate",
                                   f"--workdir={trained['byte']}", "--max_new_tokens=12",
                                   "--json", *a], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=600)
  plain, spec = run(f"--prompt_file={prompts}"), run(f"--prompt_file={prompts}",
                                                     "--draft=layers:1", "--dtr")
  for p in (plain, spec):
    assert p.returncode == 0, p.stderr
  a, b = json.loads(plain.stdout), json.loads(spec.stdout)
  assert len(a["text"]) == 2 and a["text"] == b["text"] and a["tokens"] == b["tokens"]
  assert a["tokens_per_sec"] > 0 and 0 <= b["acceptance_rate"] <= 1
  assert b["tokens_per_target_call"] >= 1
  assert [len(d["settling_depth"]) for d in b["dtr"]] == [len(t) for t in b["tokens"]]
  assert all(0 <= d["dtr"] <= 1 and d["threshold_layer"] == 2 for d in b["dtr"])
