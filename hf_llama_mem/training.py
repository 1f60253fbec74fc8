"""An optimizer for LlamaMem that gives the memory parameters their own learning rate and no weight decay.

Why: the memory parameters (per-head gates, decay and write-strength projections, key convolution, read norm) are
few and, in a model converted from Llama, new and starting from a closed gate, while everything else is pretrained.
A learning rate suited to fine-tuning the pretrained weights moves the memory too slowly to open, so it gets a larger
one. And weight decay pulls a gate towards zero, which closes the memory, and pulls the decay bias towards a fixed
forgetting rate: the memory parameters get none.

With the Trainer:

    optimizer = create_optimizer(model, training_args, memory_learning_rate=1e-3)
    Trainer(model=model, args=training_args, optimizers=(optimizer, None), ...)  # Trainer adds its LR schedule
"""

import torch
from torch import nn

__all__ = ["create_optimizer", "memory_parameter_groups"]


def is_memory_parameter(name: str) -> bool:
    return ".memory." in name


def memory_parameter_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, memory_learning_rate: float
) -> list[dict]:
    """Three AdamW groups over the trainable parameters: memory parameters (memory_learning_rate, no decay), other
    matrices (learning_rate, weight_decay), other vectors such as norms and biases (learning_rate, no decay)."""
    groups = {"memory": [], "decayed": [], "not_decayed": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_memory_parameter(name):
            groups["memory"].append(param)
        else:
            groups["decayed" if param.ndim >= 2 else "not_decayed"].append(param)
    settings = {
        "memory": {"lr": memory_learning_rate, "weight_decay": 0.0},
        "decayed": {"lr": learning_rate, "weight_decay": weight_decay},
        "not_decayed": {"lr": learning_rate, "weight_decay": 0.0},
    }
    return [{"params": params, "name": key, **settings[key]} for key, params in groups.items() if params]


def create_optimizer(model: nn.Module, args, memory_learning_rate: float) -> torch.optim.AdamW:
    """AdamW with the TrainingArguments' learning rate, weight decay, betas and epsilon, and the memory group."""
    groups = memory_parameter_groups(model, args.learning_rate, args.weight_decay, memory_learning_rate)
    return torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
