"""Tensor parallelism (issue 18, item 15) and FSDP 2 on 2 CPU processes (gloo), against the single-process model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_llama_mem import LlamaMemForCausalLM

from .helpers import tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).with_name("distributed_workers.py")


def run_workers(name: str, folder: Path, processes: int = 2, **env_vars: str) -> list[dict]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env_vars}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    result = subprocess.run(
        [*command, str(WORKERS), name, str(folder)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((folder / f"result_rank{rank}.json").read_text()) for rank in range(processes)]


def test_the_tensor_parallel_plan_keeps_attention_and_memory_whole_and_shards_the_tied_head_with_the_embedding():
    """In a memory layer the memory reads every kv head of the layer's q, k and v (its key convolution mixes all
    channels of a kv head, and its per-head projections take the whole hidden state), so the attention projections
    stay whole on each rank while the MLP is sharded as in Llama; the LM head is sharded on the vocabulary, as the
    input embedding is, so tied weights are sharded together (transformers' test_tied_weights_are_sharded_together)."""
    for overrides in ({}, {"memory_layers": [1]}, {"tie_word_embeddings": True}):
        model = LlamaMemForCausalLM(tiny_config(**overrides))
        plan = model.tp_plan
        assert not [name for name in plan if "self_attn" in name], plan
        assert plan["model.layers.*.mlp.gate_proj"] == plan["model.layers.*.mlp.up_proj"] == "colwise", plan
        assert plan["model.layers.*.mlp.down_proj"] == "rowwise", plan
        # both shard dim 0 of the [vocab, hidden] weight: the embedding's vocabulary rows, the head's output rows
        assert plan["model.embed_tokens"] == "embedding_rowwise" and plan["lm_head"] == "colwise_gather_output", plan


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [{"tie_word_embeddings": True}, {"memory_layers": [1]}],
    ids=["memory-everywhere-tied", "one-memory-layer-untied"],
)
def test_tensor_parallel_on_two_processes_gives_the_single_process_logits(tmp_path, overrides):
    """tp_plan="auto" on 2 processes: a forward over 5 windows, prefill + decode, greedy generate() and a training
    step's loss and gradients equal the single process's; the MLP and the (tied) head are sharded, attention not."""
    model = tiny_model(**overrides)
    model.save_pretrained(tmp_path)
    ids = torch.randint(1, 256, (2, 40))  # 5 windows
    prefill, prompt, new_tokens = 27, 12, 20
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids[:, :prompt], max_new_tokens=new_tokens, do_sample=False)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    reference = dict(ids=ids, logits=logits, prefill=prefill, prompt=prompt, new_tokens=new_tokens)
    reference.update(loss=loss.item(), grads=grads)
    torch.save(reference, tmp_path / "reference.pt")

    for rank, result in enumerate(run_workers("tensor_parallel", tmp_path)):
        assert result["forward_max_abs_diff"] <= 1e-5, (rank, result["forward_max_abs_diff"])
        assert result["decode_max_abs_diff"] <= 1e-5, (rank, result["decode_max_abs_diff"])
        assert result["generated"] == generated.tolist(), rank
        assert result["loss_diff"] <= 1e-5 and result["grad_max_rel_diff"] <= 1e-4, (rank, result)
        assert result["tied"] == model.config.tie_word_embeddings
        sharded = set(result["sharded"])
        assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= sharded, sharded
        assert result["head_placements"] == result["embedding_placements"] == "(Shard(dim=0),)", result
        assert not [name for name in sharded if ".self_attn." in name], sharded


@pytest.mark.slow
def test_fsdp2_with_the_example_configs_units_trains_as_one_process(tmp_path):
    """examples/accelerate/fsdp.yaml's sharding (a unit per LlamaMemDecoderLayer, resharded after forward, then the
    root, which holds the tied embedding and head) on 2 processes: 3 AdamW steps on half a batch each give the
    parameters of one process's 3 steps on the mean of the two halves' losses."""
    model = tiny_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    ids, steps, lr = torch.randint(1, 256, (4, 40)), 3, 1e-3
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        halves = ids.chunk(2)
        loss = sum(model(half, labels=half).loss for half in halves) / len(halves)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save(dict(ids=ids, steps=steps, lr=lr, params=params), tmp_path / "reference.pt")

    config = ROOT / "examples" / "accelerate" / "fsdp.yaml"
    for rank, result in enumerate(run_workers("fully_sharded", tmp_path, FSDP_CONFIG=str(config))):
        assert result["units"] == model.config.num_hidden_layers, result
        assert result["sharded"] == result["parameters"], result  # every parameter a shard on each rank
        assert result["losses"][-1] < result["losses"][0], result
        assert result["param_max_abs_diff"] <= 1e-5, (rank, result)
