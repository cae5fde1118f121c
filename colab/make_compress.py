"""Writes colab/compress.ipynb (run: python colab/make_compress.py). The notebook is
executed top to bottom by tests/test_colab.py."""
from cells import write

CELLS = [
    ("markdown", """# Kestrel compression: quantization, pruning, distillation

Train a small model (seconds on a CPU), then compress it:
1. evaluate it quantized after training (PTQ: int8, w8a8, int4 per channel and group-wise)
   and write a quantized checkpoint (int4 packed two per byte) that evaluates the same;
2. fine-tune it with quantization-aware training (QAT);
3. prune it 2:4 (two of every four consecutive inputs kept) and fine-tune under the mask;
4. distil a smaller student of another shape from it.

Every step is a config group (`quant`, `prune`, `distill`) or a command on a trained
run (`experiments.quantize`, `experiments.prune`, `experiments.evaluate`)."""),
    ("code", None),
    ("code", """from experiments.configs import load, override
from lm import loop

work = os.environ.get("KESTREL_NOTEBOOK_WORKDIR", "runs/colab-compress")
def run(name, steps, **fields):
    config = override(load("experiments/configs/base.py:tiny"), {
        "data.tokenizer": "bpe", "data.seq_len": 128, "train.steps": steps,
        "train.eval_every": steps, "train.log_every": steps, "train.progress": "log",
        "train.plot": False, "train.tensorboard": False, **fields})
    return loop.run(config, os.path.join(work, name))

summary = run("base", 30)
print("trained to step", summary["step"], "eval loss", round(summary["eval_loss"], 3))"""),
    ("code", """from experiments import evaluate, quantize

base = os.path.join(work, "base")
ptq = {"bf16": {}, "int4 g32": {"quant.weight": "int4", "quant.group_size": 32}}
losses = {}
for name, over in ptq.items():   # also: int8, w8a8 (quant.act=int8), int4 per channel, fp8
    r = evaluate.evaluate(base, over, eval_batches=1)
    losses[name] = r["eval_loss"]
    print(f"{name:9s} eval loss {r['eval_loss']:.4f}  bits/byte {r['eval_bpb']:.4f}  "
          f"weights {r['weight_bytes'] / 1e6:.3f} MB")

q = quantize.quantize(base, os.path.join(work, "int4"), {"quant.weight": "int4",
                                                          "quant.group_size": 32})
print(f"quantized checkpoint: {q['bytes_before'] / 1e6:.3f} MB -> {q['bytes_after'] / 1e6:.3f} MB")
same = evaluate.evaluate(q["out"], eval_batches=1)["eval_loss"] == losses["int4 g32"]
print("stored int4 evaluates like PTQ int4:", same)"""),
    ("code", """qat = run("qat", 5, **{"train.init_from": base, "quant.weight": "int4",
                          "quant.group_size": 32, "quant.mode": "qat",
                          "optimizer.learning_rate": 1e-3})
print("after 5 QAT steps, int4 g32 eval loss", round(qat["eval_loss"], 4))"""),
    ("code", """from experiments import prune
import numpy as np
from lm import runs

p = prune.prune(base, os.path.join(work, "pruned"), {"prune.method": "nm"})
print("2:4 sparsity of the pruned matrices", p["sparsity"]["all"])
print("pruned, no fine-tuning: eval loss", round(evaluate.evaluate(p["out"], eval_batches=1)["eval_loss"], 4))
ft = run("pruned_ft", 5, **{"train.init_from": p["out"], "prune.method": "nm",
                             "optimizer.learning_rate": 1e-3})
w = np.asarray(runs.load_weights(os.path.join(work, "pruned_ft")).params["block_0"]["mlp"]["up"])
print("after 5 steps under the mask: eval loss", round(ft["eval_loss"], 4),
      "| still 2 of every 4:", bool(np.all((w.reshape(-1, 4, w.shape[1]) != 0).sum(1) == 2)))"""),
    ("code", """student = run("student", 5, **{"distill.teacher": base, "distill.loss": "kl+ce",
                                  "model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 1,
                                  "model.d_ff": 96})
print("distilled student (d_model 32) eval loss", round(student["eval_loss"], 4))"""),
    ("markdown", """From a shell: `python -m experiments.evaluate --workdir=W --config.quant.weight=int4
--config.quant.group_size=128`, `python -m experiments.quantize --workdir=W --out=Q`,
`python -m experiments.prune --workdir=W --out=P --config.prune.method=nm`, and train with
`--config.quant.mode=qat`, `--config.prune.*`, `--config.distill.teacher=W`,
`--config.train.init_from=W`. Records: `records/2026-11-29-quantization`, `-pruning`,
`-distillation`."""),
]


if __name__ == "__main__":
  write("compress.ipynb", CELLS)
