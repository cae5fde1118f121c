"""Writes colab/finetune.ipynb (run: python colab/make_finetune.py). The notebook is
executed top to bottom by tests/test_colab.py."""
from cells import write

CELLS = [
    ("markdown", """# Kestrel fine-tuning: LoRA, QLoRA, merge, DPO

Train a small model on the Python docs corpus (seconds on a CPU), then:
1. fine-tune low-rank adapters on a held-out domain (the Python code corpus) with the
   base frozen (`lora` group; `lora.base_quant=nf4` is QLoRA);
2. merge the adapters into a plain run (`experiments.export`) and generate from it;
3. preference-tune with DPO on the shipped synthetic task (`dpo` group, `data.source=
   preference`), the reference being the base with the adapters off.

`experiments/configs/finetune.py:<base workdir>[,lora|full|dpo|dpo-full]` sets all of
this up from a trained run's own config."""),
    ("code", None),
    ("code", """from experiments.configs import load, override
from lm import loop

work = os.environ.get("KESTREL_NOTEBOOK_WORKDIR", "runs/colab-finetune")
base = os.path.join(work, "base")
quiet = {"train.progress": "log", "train.plot": False, "train.tensorboard": False}
config = override(load("experiments/configs/base.py:tiny"), {
    "data.tokenizer": "bpe", "data.seq_len": 128, "train.steps": 30,
    "train.eval_every": 30, "train.log_every": 30, **quiet})
summary = loop.run(config, base)
print("base trained to step", summary["step"], "eval loss", round(summary["eval_loss"], 3))"""),
    ("code", """from experiments import evaluate

def finetune(name, mode, steps, **fields):
    config = override(load(f"experiments/configs/finetune.py:{base},{mode}"), {
        "train.steps": steps, "train.eval_every": steps, "train.log_every": steps,
        "train.eval_batches": 2, **quiet, **fields})
    return loop.run(config, os.path.join(work, name))

code = {"data.path": "python_code"}   # the held-out domain
before = evaluate.evaluate(base, code, eval_batches=2)["eval_loss"]
# QLoRA: the same with "lora.base_quant": "nf4" (the frozen base in 4 bits, 64 per scale)
lora = finetune("lora", "lora", 6, **{"lora.rank": 8})
print(f"eval loss on code: base {before:.3f}, after 6 LoRA r=8 steps {lora['eval_loss']:.3f}")
print(f"trainable: {lora['trained_params'] / 1e3:.1f}k adapter parameters "
      f"(the base: {lora['params'] / 1e3:.1f}k, frozen)")"""),
    ("code", """from experiments import export
from lm import decode, runs

merged = export.export(os.path.join(work, "lora"), os.path.join(work, "merged"))
same = (evaluate.evaluate(merged["out"], eval_batches=2)["eval_loss"]
        == evaluate.evaluate(os.path.join(work, "lora"), eval_batches=2)["eval_loss"])
print("merged run evaluates like the adapters:", same)
w = runs.load_weights(merged["out"])
tok = w.tokenizer
dec = decode.Decoder(decode.Model.from_weights(w.config.model, w.params, w.model_state),
                     max_len=128)
out = dec.generate(decode.Request([tok.encode("def ").tolist()], 24, eos_id=tok.eos_id))
print(repr("def " + tok.decode(out["tokens"][0])))"""),
    ("code", """dpo = finetune("dpo", "dpo", 10, **{"data.path": "synthetic:upper",
                                     "data.batch_size": 8, "optimizer.learning_rate": 1e-2})
import json
with open(os.path.join(work, "dpo", "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
first = next(r for r in recs if "dpo/reward_accuracy" in r)
last = [r for r in recs if "eval_dpo/reward_accuracy" in r][-1]
print(f"DPO step 1: reward accuracy {first['dpo/reward_accuracy']:.2f} (policy = reference)")
print(f"after 10 steps, held-out pairs: reward accuracy {last['eval_dpo/reward_accuracy']:.2f}, "
      f"margin {last['eval_dpo/margin']:.2f}, KL to the reference {last['eval_dpo/kl']:.3f}")"""),
    ("markdown", """From a shell: `python -m experiments.train
--config=experiments/configs/finetune.py:W` (LoRA; `,full`, `,dpo`, `,dpo-full`),
`--config.lora.base_quant=nf4` (QLoRA), `python -m experiments.export --workdir=L --out=M`
(merge), `--config.data.path=prefs.jsonl` (your own prompt / chosen / rejected rows).
Records: `records/2026-11-29-lora`, `records/2026-11-29-dpo`."""),
]


if __name__ == "__main__":
  write("finetune.ipynb", CELLS)
