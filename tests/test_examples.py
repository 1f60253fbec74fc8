"""The examples, run for real: in-process when they take seconds, as subprocesses (slow suite) when they train."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import tiny_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # examples import their sibling small_models.py, as scripts do
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(script: str, *args: str, cwd, launcher: tuple[str, ...] = (sys.executable,)) -> str:
    path = os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [*launcher, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_chat_reaches_the_first_turn_through_the_memory_and_resumes_from_disk(tmp_path, capsys, monkeypatch):
    chat = load_example("chat_with_memory", monkeypatch)
    memory = str(tmp_path / "chat.safetensors")
    report = chat.main(["--memory", memory, "--max-new-tokens", "8"])
    assert report["tokens"] > 4 * report["window"]
    assert report["cached_vs_one_forward"] < 1e-4
    assert report["effect_of_first_turn"] > 1e-3
    seen = int(capsys.readouterr().out.split("the memory has read ")[-1].split()[0])
    chat.main(["--memory", memory, "--turn", "Still there?", "--max-new-tokens", "8"])
    assert f"resumed a conversation of {seen} tokens" in capsys.readouterr().out


def test_without_memory_the_first_turn_is_out_of_reach(tmp_path, monkeypatch):
    from hf_llama_mem import save_memory

    chat = load_example("chat_with_memory", monkeypatch)
    model = tiny_model(memory_layers=[])
    conversation = [torch.randint(1, 256, (1, 20)) for _ in range(4)]
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.cat(conversation, 1), cache=cache, use_cache=True)
    save_memory(cache, tmp_path / "m.safetensors", model)
    report = chat.reach_of_first_turn(model, conversation, tmp_path / "m.safetensors", torch.tensor([[5, 6]]))
    assert report["effect_of_first_turn"] == 0.0 and report["cached_vs_one_forward"] < 1e-4


def test_quickstart_generates_past_the_window(monkeypatch, capsys):
    load_example("quickstart", monkeypatch).main()
    assert "window 32" in capsys.readouterr().out


@pytest.mark.slow
def test_train_clm_reduces_the_loss_on_real_text(tmp_path):
    run_example(
        "train_clm.py",
        *("--output-dir", "out", "--steps", "40", "--block-size", "512", "--corpus-bytes", "400000"),
        *("--gradient-checkpointing", "--eval-blocks", "8"),
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert results["eval_loss_after"] < 0.8 * results["eval_loss_before"], results
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "README.md").exists()


@pytest.mark.slow
def test_train_clm_under_accelerate_launch_runs_two_processes(tmp_path):
    run_example(
        "train_clm.py",
        *("--output-dir", "out", "--steps", "4", "--block-size", "256", "--corpus-bytes", "100000"),
        *("--batch-size", "2", "--gradient-accumulation", "1", "--eval-blocks", "4"),
        cwd=tmp_path,
        launcher=(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
    )
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert results["world_size"] == 2, results


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp", "deepspeed_zero2"])
def test_train_clm_under_the_accelerate_example_config_trains_on_two_processes(tmp_path, config):
    """`accelerate launch --config_file examples/accelerate/{config}.yaml` for real, on 2 processes (CPUs here: the
    configs' 8 processes and bf16 overridden). DeepSpeed ZeRO-2 runs as configured (when deepspeed is installed:
    0.19.8 ran on CPUs, gloo). FSDP: accelerate (1.15) turns FSDP on only on accelerators (AcceleratorState sets
    DistributedType.FSDP for MULTI_GPU, MULTI_XPU, ... only), so on CPUs the same launch trains data-parallel
    (MULTI_CPU), unsharded; tests/test_distributed.py checks the config's FSDP 2 units on CPUs with torch's own
    fully_shard."""
    if config == "deepspeed_zero2":
        pytest.importorskip("deepspeed")
    gpus = torch.cuda.device_count()
    run_example(
        "train_clm.py",
        *("--output-dir", str(tmp_path / "out"), "--steps", "4", "--block-size", "128", "--corpus-bytes", "50000"),
        *("--batch-size", "2", "--gradient-accumulation", "1", "--eval-blocks", "2", "--hidden-size", "64"),
        *("--layers", "2", "--window", "16"),
        cwd=EXAMPLES.parent,  # the DeepSpeed config names its JSON file relative to the repository
        launcher=(
            *(sys.executable, "-m", "accelerate.commands.launch", "--config_file"),
            str(EXAMPLES / "accelerate" / f"{config}.yaml"),
            *("--num_processes", "2", "--mixed_precision", "bf16" if gpus >= 2 else "no"),
        ),
    )
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert results["world_size"] == 2, results
    assert results["eval_loss_after"] < results["eval_loss_before"], results
    if config == "deepspeed_zero2":
        assert results["distributed_type"] == "DEEPSPEED", results
    elif gpus >= 2:
        assert results["distributed_type"] == "FSDP" and results["sharded_parameters"] > 0, results
    else:
        assert results["distributed_type"] == "MULTI_CPU" and results["sharded_parameters"] == 0, results
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_lora_finetune_reduces_the_loss_with_few_trainable_parameters(tmp_path):
    run_example("lora_finetune.py", "--output-dir", "out", "--steps", "30", cwd=tmp_path)
    results = json.loads((tmp_path / "out" / "lora_results.json").read_text())
    assert results["trainable_fraction"] < 0.2
    assert results["eval_loss_after"] < results["eval_loss_before"], results


@pytest.mark.slow
def test_convert_and_finetune_opens_the_gates_and_reduces_the_loss(tmp_path):
    run_example("convert_and_finetune.py", "--output-dir", "out", "--steps", "30", cwd=tmp_path)
    results = json.loads((tmp_path / "out" / "convert_finetune_results.json").read_text())
    assert results["conversion_check"]["max_abs_logit_diff"] == 0.0
    assert results["eval_loss_after"] < results["eval_loss_before"], results
    assert all(gate > 0 for gate in results["memory_gates_after"])
