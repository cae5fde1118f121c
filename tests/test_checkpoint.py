"""lm/checkpoint.py: a damaged newest checkpoint never strands a run.

The run falls back to the newest checkpoint that restores, says in one line which one
it skipped and why, moves the damaged one into ``checkpoints/damaged/`` (never deletes
it) and continues, saving that step again when it gets there; when none restores it
stops naming the folder.
"""
import os
import subprocess
import sys

import pytest
from conftest import ROOT, records, tiny

from core.errors import ConfigError
from lm import loop


def _largest_file(folder) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_file(os.path.join(step_dir, "state"))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _remove(step_dir):
  os.remove(_largest_file(os.path.join(step_dir, "state")))


def _corrupt_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
    f.write("{ not json")


def _corrupt_config(step_dir):
  (config,) = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "config"))
               for f in fs if f == "metadata"]
  with open(config, "w") as f:
    f.write("not json either")


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4, and its metrics."""
  workdir = tmp_path_factory.mktemp("run4")
  loop.run(tiny(train__steps=4, train__checkpoint_every=2, train__log_every=1), str(workdir))
  return workdir


@pytest.mark.parametrize("damage", [_truncate, _remove, _corrupt_metadata, _corrupt_config],
                         ids=["truncated", "missing", "metadata", "config"])
def test_falls_back_past_a_damaged_newest_checkpoint(run4, tmp_path, capsys, damage):
  import shutil
  workdir = tmp_path / "w"
  shutil.copytree(run4, workdir)
  damage(str(workdir / "checkpoints" / "4"))
  summary = loop.run(tiny(train__steps=4, train__checkpoint_every=2, train__log_every=1),
                     str(workdir))
  out = capsys.readouterr().out
  lines = [l for l in out.splitlines() if "cannot be restored" in l]
  assert len(lines) == 1 and "checkpoint step 4" in lines[0], out
  assert "moved to" in lines[0] and "resumed from step 2" in out
  # The damaged step is kept aside, and step 4 was trained and saved again.
  assert os.path.isdir(workdir / "checkpoints" / "damaged" / "4")
  assert summary["step"] == 4 and os.path.isdir(workdir / "checkpoints" / "4")
  # Same losses as the undamaged run: the fallback resumed exactly.
  strip = lambda rs: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rs]
  assert strip(records(workdir)) == strip(records(run4))
  # And the re-saved step 4 restores.
  assert loop.run(tiny(train__steps=5, train__checkpoint_every=2), str(workdir))["step"] == 5


def test_none_restores_stops_naming_the_folder(run4, tmp_path):
  import shutil
  workdir = tmp_path / "w"
  shutil.copytree(run4, workdir)
  for step in ("2", "4"):
    _truncate(str(workdir / "checkpoints" / step))
  config_json = (workdir / "config.json").read_text()
  with pytest.raises(ConfigError, match=r"--workdir=.*none of its checkpoints \(4, 2\) restores; "
                     r"they were moved to .*checkpoints/damaged\. Fix: "):
    loop.run(tiny(train__steps=4), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints" / "damaged")) == ["2", "4"]
  assert (workdir / "config.json").read_text() == config_json
  # Again, from the command line: the run does not silently start over; one line, exit 2.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "experiments.train",
                      "--config=experiments/configs/base.py:tiny", f"--workdir={workdir}",
                      "--config.train.steps=4"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
  assert "it has only damaged checkpoints" in errors[0]
  assert (workdir / "config.json").read_text() == config_json
