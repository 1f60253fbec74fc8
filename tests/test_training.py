"""The memory parameter group: its own learning rate and no weight decay, through the stock Trainer."""

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_llama_mem import create_optimizer, memory_parameter_groups

from .helpers import tiny_model


def test_groups_split_memory_matrices_and_vectors():
    model = tiny_model()
    groups = {g["name"]: g for g in memory_parameter_groups(model, 1e-4, 0.1, 1e-2)}
    names = {id(p): n for n, p in model.named_parameters()}
    memory = {names[id(p)] for p in groups["memory"]["params"]}
    assert memory == {n for n, _ in model.named_parameters() if ".memory." in n}
    assert (groups["memory"]["lr"], groups["memory"]["weight_decay"]) == (1e-2, 0.0)
    assert (groups["decayed"]["lr"], groups["decayed"]["weight_decay"]) == (1e-4, 0.1)
    assert all(p.ndim >= 2 for p in groups["decayed"]["params"])
    assert all(p.ndim == 1 for p in groups["not_decayed"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_trainer_uses_the_groups_and_keeps_their_ratio_under_its_schedule(tmp_path):
    model = tiny_model()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        lr_scheduler_type="linear",
        warmup_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    ids = torch.randint(1, 256, (8, 32))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    optimizer = create_optimizer(model, args, memory_learning_rate=1e-2)
    gate = model.model.layers[0].self_attn.memory.gate
    before = gate.detach().clone()
    seen = LearningRates()
    Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None), callbacks=[seen]).train()
    assert [lrs["memory"] for lrs in seen.steps] == [10 * lrs["decayed"] for lrs in seen.steps]
    assert seen.steps[1]["decayed"] == 1e-3  # the end of warmup: the TrainingArguments' learning rate
    assert not torch.equal(gate, before)


class LearningRates(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append({group["name"]: group["lr"] for group in optimizer.param_groups})
