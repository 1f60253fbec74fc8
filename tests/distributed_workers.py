"""What each process of the multi-process tests runs (tests/test_distributed.py starts them with torchrun).

    torchrun --standalone --nproc_per_node 2 tests/distributed_workers.py tensor_parallel FOLDER

Each rank writes FOLDER/result_rank{RANK}.json; the test compares those with the single-process reference saved in
FOLDER/reference.pt.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_llama_mem  # noqa: F401  (registers the Auto classes)
from hf_llama_mem.modeling_llama_mem import CACHE_FIELD


def tensor_parallel(folder: Path) -> dict:
    """Load the saved model with tp_plan="auto" and run what the reference ran: a forward longer than the window,
    a prefill then token-by-token decoding with the cache, greedy generate(), and a training step's gradients."""
    reference = torch.load(folder / "reference.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.24: tp_plan= is to move into DistributedConfig
        model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto").eval()
    ids, prefill = reference["ids"], reference["prefill"]
    with torch.no_grad():
        logits = model(ids).logits
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps = getattr(out, CACHE_FIELD), [out.logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], use_cache=True, **{CACHE_FIELD: cache}).logits)
        generated = model.generate(
            ids[:, : reference["prompt"]], max_new_tokens=reference["new_tokens"], do_sample=False
        )
    model.train()  # a training step: the loss and every parameter's gradient, gathered where sharded
    loss = model(ids, labels=ids).loss
    loss.backward()
    grad_diff = 0.0
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if type(param.grad).__name__ == "DTensor" else param.grad
        expected = reference["grads"][name]
        grad_diff = max(grad_diff, ((grad - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item())
    sharded = sorted(name for name, p in model.named_parameters() if type(p).__name__ == "DTensor")
    return {
        "plan": dict(model.tp_plan),
        "sharded": sharded,
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        # named_parameters() lists a tied weight once: read the placements of both
        "head_placements": str(getattr(model.lm_head.weight, "placements", None)),
        "embedding_placements": str(getattr(model.model.embed_tokens.weight, "placements", None)),
        "forward_max_abs_diff": (logits - reference["logits"]).abs().max().item(),
        "decode_max_abs_diff": (torch.cat(steps, 1) - reference["logits"]).abs().max().item(),
        "generated": generated.tolist(),
        "loss_diff": abs(loss.item() - reference["loss"]),
        "grad_max_rel_diff": grad_diff,
    }


WORKERS = {"tensor_parallel": tensor_parallel}


if __name__ == "__main__":
    name, folder = sys.argv[1], Path(sys.argv[2])
    result = WORKERS[name](folder)
    rank = int(os.environ.get("RANK", 0))
    (folder / f"result_rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
