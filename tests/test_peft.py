"""PEFT: default LoRA targets for "llama_mem", training the memory fully with modules_to_save, merge_and_unload."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from .helpers import assert_close, tiny_model


def train_steps(model, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_needs_no_target_modules_and_reduces_the_loss_with_few_trainable_parameters():
    model = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM"))
    targeted = {name.split(".")[-1] for name, _ in model.named_modules() if name.endswith(("q_proj", "v_proj"))}
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"} and targeted == {"q_proj", "v_proj"}
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable / total < 0.2
    ids = torch.randint(1, 256, (4, 48), generator=torch.Generator().manual_seed(0))
    losses = train_steps(model, ids, steps=30)
    assert losses[-1] < 0.9 * losses[0], losses


def test_merge_and_unload_gives_the_adapter_models_logits():
    model = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False)).eval()
    ids = torch.randint(1, 256, (2, 40))
    with torch.no_grad():
        adapted = model(ids).logits
        base_only = model.get_base_model()(ids).logits  # LoRA still active inside: same as adapted
        assert torch.equal(base_only, adapted)
        with model.disable_adapter():
            assert (model(ids).logits - adapted).abs().max() > 1e-3  # the adapter changes something
        merged = model.merge_and_unload()
        assert_close(merged(ids).logits, adapted, 1e-5, "merged vs adapter")


@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
def test_modules_to_save_trains_the_memory_fully_and_round_trips(tmp_path, rule):
    model = get_peft_model(tiny_model(memory_rule=rule), LoraConfig(task_type="CAUSAL_LM", modules_to_save=["memory"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".memory.modules_to_save." in n}
    assert before and all(model.get_parameter(n).requires_grad for n in before)
    ids = torch.randint(1, 256, (2, 40))
    train_steps(model, ids, steps=2)
    changed = [n for n in before if not torch.equal(before[n], model.get_parameter(n))]
    assert len(changed) == len(before), sorted(set(before) - set(changed))
    model.eval().save_pretrained(tmp_path)
    # A different random base: the trained memory must come from the adapter file alone.
    reloaded = PeftModel.from_pretrained(tiny_model(memory_rule=rule), tmp_path).eval()
    with torch.no_grad():
        base_memory = [n for n, _ in reloaded.named_parameters() if ".memory.modules_to_save." in n]
        assert sorted(base_memory) == sorted(before)
        for name in before:
            assert torch.equal(reloaded.get_parameter(name), model.get_parameter(name)), name
