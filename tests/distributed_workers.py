"""What each process of the multi-process tests runs (tests/test_distributed.py starts them with torchrun).

    torchrun --standalone --nproc_per_node 2 tests/distributed_workers.py {tensor_parallel, fully_sharded} FOLDER

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


def fully_sharded(folder: Path) -> dict:
    """FSDP 2 as examples/accelerate/fsdp.yaml asks accelerate for it (each layer of the class it names one unit,
    resharded after forward, then the root): a few AdamW steps, each rank on its half of the batch. accelerate itself
    turns FSDP on only on accelerators, so on CPUs the units are made here, with torch's fully_shard, as accelerate's
    fsdp2_prepare_model makes them."""
    import yaml
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    settings = yaml.safe_load(Path(os.environ["FSDP_CONFIG"]).read_text())["fsdp_config"]
    reference = torch.load(folder / "reference.pt")
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(folder)
    mesh = init_device_mesh("cpu", (world,))
    reshard = settings["fsdp_reshard_after_forward"]
    units = [m for m in model.modules() if type(m).__name__ == settings["fsdp_transformer_layer_cls_to_wrap"]]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=reference["lr"])
    ids = reference["ids"].chunk(world)[rank]
    losses = []
    for _ in range(reference["steps"]):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    parameters = {name: p.full_tensor() for name, p in model.named_parameters()}  # every rank gathers
    diff = max((parameters[name] - expected).abs().max().item() for name, expected in reference["params"].items())
    return {
        "units": len(units),
        "sharded": sum(type(p).__name__ == "DTensor" for p in model.parameters()),
        "parameters": sum(1 for _ in model.parameters()),
        "losses": losses,
        "param_max_abs_diff": diff,
    }


WORKERS = {"tensor_parallel": tensor_parallel, "fully_sharded": fully_sharded}


if __name__ == "__main__":
    name, folder = sys.argv[1], Path(sys.argv[2])
    result = WORKERS[name](folder)
    rank = int(os.environ.get("RANK", 0))
    (folder / f"result_rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
