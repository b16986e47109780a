"""The quickstart's training stage: a few steps of tiny training, a LoRA fine-tune, the eval gate
and registration, all on the local Ray cluster the quickstart runs on.

>>> from runtime.training.quickstart import stage_train_finetune
>>> stage_train_finetune(ctx)      # ctx: runtime.quickstart.QuickstartContext  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from runtime.log import logger
from runtime.specs import parse_spec
from runtime.training import run_finetune, run_training

_log = logger("quickstart")


def stage_train_finetune(ctx) -> dict:
    from runtime.training.data import write_demo_data

    data = Path(ctx.workdir) / "data" / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    write_demo_data(data)
    common = {
        "storage": {"root": str(ctx.workdir)},
        "data": {"path": str(data), "max_seq_len": 64},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }
    _log("training a tiny Llama from scratch (20 steps, Ray Train) ...")
    t = run_training(parse_spec({**common, "kind": "Training", "name": "quickstart-train",
                                 "train": {"steps": 20, "batch_size": 4, "learning_rate": 3e-3,
                                           "checkpoint_every_n_steps": 10}}))
    _log(f"trained: loss {t.loss_history[0]:.3f} -> {t.loss_history[-1]:.3f}, eval_loss {t.eval.get('eval_loss', 0):.3f}; "
         f"registered {t.registry['name']} v{t.registry['version']} as {t.registry['alias']}")
    base = str(ctx.model_dir) if ctx.model_dir else "tiny"
    _log(f"LoRA fine-tune of {base} (30 steps) ...")
    f = run_finetune(parse_spec({**common, "kind": "FineTune", "name": "quickstart-lora", "base_model": base,
                                 "lora": {"rank": 8, "alpha": 32, "dropout": 0.0,
                                          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                                 "train": {"steps": 30, "batch_size": 4, "learning_rate": 3e-3,
                                           "checkpoint_every_n_steps": 10}}))
    ctx.adapter_dir = Path(f.model_dir)
    _log(f"fine-tuned: loss {f.loss_history[0]:.3f} -> {f.loss_history[-1]:.3f}; eval gate: {f.gate['reason']}; "
         f"{f.registry['name']} v{f.registry['version']} is {f.registry['alias']}")
    return {
        "training": {"final_step": t.final_step, "first_loss": t.loss_history[0], "last_loss": t.loss_history[-1],
                     "eval": t.eval, "registry": t.registry},
        "finetune": {"final_step": f.final_step, "first_loss": f.loss_history[0], "last_loss": f.loss_history[-1],
                     "eval": f.eval, "gate": f.gate, "registry": f.registry, "adapter": f.model_dir},
    }
