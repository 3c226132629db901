"""Run by tests/test_distributed_ops_engines.py under torchrun (2 CPU ranks): the ops on a model sharded by
DeepSpeed ZeRO-2/3 (engine built by a real HF Trainer) or by torch FSDP2 (`fully_shard`, gloo).

    engine_ops_run.py OUT ENGINE N_ROWS

ENGINE: zero2 / zero3 (DeepSpeed engine built by a real HF Trainer, `deepspeed=examples/deepspeed/ds_z*_config.json`),
fsdp (torch `fully_shard` per decoder layer and root, gloo on CPU) or fsdp_trainer (the Trainer's `fsdp=` args;
GPU only). The Trainer takes one optimizer step with learning rate 0, so the engine, its optimizer and, under
ZeRO-3, the parameter partitioning are real while the weights stay those of `tiny_llama(seed=0)`. Then
`per_sample_losses` and `gradient_features` (fast) run with `accelerator=trainer.accelerator` on
`trainer.model_wrapped`. Each rank saves its results to OUT/rank{r}.pt. DATASTEER_TEST_DEVICE=cuda runs on GPUs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from ops_fixtures import collate, tiny_llama, tiny_pool
from transformers import Trainer, TrainingArguments

from datasteer.ops import gradient_features, per_sample_losses

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "deepspeed"
DEVICE = os.environ.get("DATASTEER_TEST_DEVICE", "cpu")  # "cuda" on a GPU machine (bench/gpu_check.sh)
ENGINES = {
    "zero2": {"deepspeed": str(EXAMPLES / "ds_z2_config.json")},
    "zero3": {"deepspeed": str(EXAMPLES / "ds_z3_config.json")},
    "fsdp_trainer": {  # GPU only: accelerate applies FSDP on GPUs, on CPU the Trainer falls back to DDP
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "version": 2},
    },
}
PROJ_DIM = 256


def train_collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    batch = collate(rows)
    batch.pop("sample_id")
    return batch


def trainer_engine(out: Path, engine: str, pool) -> tuple[torch.nn.Module, object]:
    """DeepSpeed (or, on GPUs, FSDP) through a real HF Trainer: (trainer.model_wrapped, trainer.accelerator)."""
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=0.0,
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
        **ENGINES[engine],
    )
    trainer = Trainer(model=tiny_llama(seed=0), args=args, train_dataset=pool, data_collator=train_collate)
    trainer.train()
    wrapped = trainer.model_wrapped
    if engine == "fsdp_trainer":
        assert all(type(p).__name__ == "DTensor" for p in trainer.model.parameters()), "FSDP did not shard"
        return trainer.model, trainer.accelerator
    assert type(wrapped).__name__ == "DeepSpeedEngine", type(wrapped)
    if engine == "zero3":  # the Linear weights really are partitioned (tiny norms may stay persistent)
        linears = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear)]
        assert all(m.weight.numel() == 0 for m in linears), "ZeRO-3 did not partition"
    return wrapped, trainer.accelerator


def fsdp_engine() -> tuple[torch.nn.Module, object]:
    """torch FSDP2 (`fully_shard`, per decoder layer and the root) on gloo: accelerate only applies FSDP on GPUs
    (on CPU the Trainer's `fsdp=` silently falls back to DDP), so the CPU test shards the model itself."""
    from accelerate import Accelerator
    from torch.distributed.fsdp import fully_shard

    acc = Accelerator(cpu=DEVICE == "cpu")
    model = tiny_llama(seed=0).to(acc.device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters()), "FSDP did not shard"
    return model, acc


def main(out: Path, engine: str, n_rows: int) -> None:
    pool = tiny_pool(n=n_rows, seed=1)
    wrapped, acc = fsdp_engine() if engine == "fsdp" else trainer_engine(out, engine, pool)
    assert acc.num_processes == 2, acc.num_processes
    wrapped.train()
    kw = {"collate_fn": collate, "accelerator": acc, "batch_size": 3, "progress": False}
    losses = per_sample_losses(wrapped, pool, **kw)
    sums = per_sample_losses(wrapped, pool, reduction="sum", **kw)
    fast = gradient_features(wrapped, pool, proj_dim=PROJ_DIM, **kw)
    fast_sum = gradient_features(wrapped, pool, proj_dim=PROJ_DIM, loss_reduction="sum", **kw)
    assert wrapped.training, "train mode must be restored"
    result = {
        "engine": type(wrapped).__name__,
        "losses": (losses.ids, losses.values),
        "sums": (sums.ids, sums.values),
        "fast": (fast.ids, fast.values),
        "fast_sum": (fast_sum.ids, fast_sum.values),
    }
    torch.save(result, out / f"rank{acc.process_index}.pt")


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(main, Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
