"""The benchmark's plumbing on a toy size (its figures come from real runs, not from tests)."""

import json

import pytest
import torch
from transformers import DynamicCache

from hf_llama_mem.bench import PeakMemory, decode_ms, run_benchmark, write_results
from hf_llama_mem.modeling_llama_mem import CACHE_FIELD

from .helpers import TINY_DIMS, tiny_model


def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory() as memory:
        block = torch.ones(256 * 2**20 // 4)  # 256 MB, touched: more than earlier tests leave free in the heap
        del block
    assert memory.peak_extra > 128 * 2**20, memory.peak_extra


def test_benchmark_reports_every_measure_with_ratios(tmp_path):
    settings = dict(
        train=[64], train_repeats=2, prefill=[128], prefill_repeats=2, decode=[64, 128], window=16, dims=TINY_DIMS
    )
    lines = []
    results = run_benchmark(settings, lines.append)
    metrics = [row["metric"] for row in results["rows"]]
    assert metrics[-1].startswith("training MFU % @ 64 (model FLOPs over a measured")
    assert metrics[:-1] == [
        "train tokens/s @ 64",
        "train tokens/s @ 64, Llama with LlamaMem's loss",
        "decode ms/token @ 64",
        "cache MB @ 64",
        "prefill tokens/s @ 128",
        "prefill peak extra memory MB @ 128",
        "decode ms/token @ 128",
        "cache MB @ 128",
    ]
    for row in results["rows"]:
        assert row["ratio"] == row["llama_mem"] / row["llama"]
    cache_128 = next(r for r in results["rows"] if r["metric"] == "cache MB @ 128")
    assert cache_128["llama_mem"] < cache_128["llama"]  # a 16-token window plus memory vs 128 tokens of keys/values
    assert results["own_decode_ratio"] > 0 and results["train_mfu"] > 0
    assert isinstance(results["malloc_environment"], dict)
    write_results(results, str(tmp_path / "bench.json"), lines)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == results["rows"]
    assert (tmp_path / "bench.md").read_text().splitlines() == lines


@pytest.mark.slow
def test_compiled_benchmark_adds_compiled_training_and_decode_rows():
    """`bench --compile`: both models compiled for training and decode (minutes of inductor on a CPU)."""
    settings = dict(
        train=[32], train_repeats=1, prefill=[], prefill_repeats=1, decode=[24, 40], window=8, dims=TINY_DIMS
    )
    results = run_benchmark(settings, compile=True)
    rows = {row["metric"]: row for row in results["rows"]}
    compiled_rows = [
        "train tokens/s @ 32, compiled",
        "train tokens/s @ 32, compiled, Llama with LlamaMem's loss",
        "decode ms/token @ 24, compiled",
        "decode ms/token @ 40, compiled",
    ]
    assert set(compiled_rows) <= set(rows) and results["compiled"]
    assert all(rows[name]["llama_mem"] > 0 and rows[name]["llama"] > 0 for name in compiled_rows)


def test_training_flops_count_the_output_layer_once_and_only_the_keys_attended():
    """Properties, not the formula again: the input embedding is a lookup (tied or not, the vocabulary matrix
    multiplies once, in the output layer); within the window the windowed model costs what Llama costs, and beyond it
    less, by more the longer the input."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_llama_mem.bench import train_flops_per_token

    untied, tied = (LlamaForCausalLM(LlamaConfig(**TINY_DIMS, tie_word_embeddings=tie)) for tie in (False, True))
    assert train_flops_per_token(untied, 32) == train_flops_per_token(tied, 32)
    windowed = tiny_model(memory_layers=[])  # W = 8, the same weights as Llama
    assert sum(p.numel() for p in windowed.parameters()) == sum(p.numel() for p in untied.parameters())
    assert train_flops_per_token(windowed, 8) == train_flops_per_token(untied, 8)
    savings = [train_flops_per_token(untied, n) - train_flops_per_token(windowed, n) for n in (9, 32, 128)]
    assert 0 < savings[0] < savings[1] < savings[2]


def test_decode_steps_every_entry_in_turns_and_reports_each_median():
    model = tiny_model()
    caches = {length: DynamicCache(config=model.config) for length in (5, 30)}
    for length, cache in caches.items():
        model(torch.randint(0, 256, (1, length)), use_cache=True, **{CACHE_FIELD: cache})
    times = decode_ms({length: (model, cache) for length, cache in caches.items()}, steps=3)
    assert set(times) == {5, 30} and all(ms > 0 for ms in times.values())
    assert [cache.get_seq_length() for cache in caches.values()] == [9, 34]  # a warm-up step and 3 timed ones each


def test_model_shape_from_a_folder_or_the_smollm2_preset(tmp_path):
    from hf_llama_mem.bench import FULL, SMOLLM2_DIMS, build, with_model_shape

    assert with_model_shape(FULL, None) is FULL
    assert with_model_shape(FULL, "smollm2")["dims"] == SMOLLM2_DIMS
    tiny_model(sliding_window=12).save_pretrained(tmp_path)
    settings = with_model_shape(FULL, str(tmp_path))
    assert settings["window"] == 12
    assert {k: settings["dims"][k] for k in TINY_DIMS} == TINY_DIMS
    models = build(settings)
    for model in models.values():
        assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert models["llama_mem"].config.sliding_window == 12


def test_bench_command_takes_a_model_shape(tmp_path, monkeypatch):
    import hf_llama_mem.bench as bench
    from hf_llama_mem.cli import main

    seen = {}

    def fake_run(settings, report, compile):
        seen.update(settings, compile=compile)
        return {"rows": []}

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    main(["bench", "--quick", "--model", "smollm2", "--json", str(tmp_path / "b.json")])
    assert seen["dims"] == bench.SMOLLM2_DIMS and seen["train"] == bench.QUICK["train"] and not seen["compile"]
    main(["bench", "--quick", "--compile", "--json", str(tmp_path / "b.json")])
    assert seen["compile"]
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", str(tmp_path / "missing")])
    assert exit_info.value.code == 2


def test_the_gated_benchmark_runs_gated_writes_and_takes_the_threshold_from_a_folder(tmp_path):
    """`bench --surprisal-threshold T` (or a --model folder with one) times LlamaMem with surprisal-gated writes,
    the shipped SmolLM2 delta's setting, against the same Llama."""
    import hf_llama_mem.surprisal_writes as surprisal_writes
    from hf_llama_mem.bench import QUICK, build, with_model_shape

    tiny_model(sliding_window=12, memory_write_surprisal_threshold=1.5).save_pretrained(tmp_path)
    settings = with_model_shape(QUICK, str(tmp_path))
    assert settings["surprisal_threshold"] == 1.5
    assert build(settings)["llama_mem"].config.memory_write_surprisal_threshold == 1.5
    assert with_model_shape(QUICK, "smollm2").get("surprisal_threshold") is None
    gated_calls = []
    original = surprisal_writes.gate_writes
    settings = dict(
        train=[32], train_repeats=1, prefill=[48], prefill_repeats=1, decode=[24], window=8, dims=TINY_DIMS
    )
    try:
        surprisal_writes.gate_writes = lambda *args: (gated_calls.append(1), original(*args))
        results = run_benchmark({**settings, "surprisal_threshold": 2.0})
    finally:
        surprisal_writes.gate_writes = original
    assert gated_calls, "the gated benchmark never gated a write"
    metrics = [row["metric"] for row in results["rows"]][:-1]  # the last names the matmul peak measured
    assert metrics == [row["metric"] for row in run_benchmark(settings)["rows"]][:-1]


def test_bench_command_takes_a_surprisal_threshold(tmp_path, monkeypatch):
    import hf_llama_mem.bench as bench
    from hf_llama_mem.cli import main

    seen = {}
    monkeypatch.setattr(
        bench, "run_benchmark", lambda settings, report, compile: seen.update(settings) or {"rows": []}
    )
    main(["bench", "--quick", "--surprisal-threshold", "2", "--json", str(tmp_path / "b.json")])
    assert seen["surprisal_threshold"] == 2.0
    assert "surprisal_threshold" not in bench.QUICK  # the preset itself stays ungated
    tiny_model(sliding_window=12, memory_write_surprisal_threshold=1.5).save_pretrained(tmp_path / "gated")
    main(
        [
            "bench",
            "--quick",
            "--model",
            str(tmp_path / "gated"),
            "--surprisal-threshold",
            "none",
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    assert seen["surprisal_threshold"] is None


def test_the_cache_size_counts_the_gate_state():
    """With surprisal-gated writes the cache also holds the windowed pass's cache and the kept prediction."""
    from hf_llama_mem.bench import cache_bytes
    from hf_llama_mem.surprisal_writes import gate_state_layer

    model = tiny_model(memory_write_surprisal_threshold=1.0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 30)), use_cache=True, **{CACHE_FIELD: cache})
    gate = gate_state_layer(cache)
    windowed = [t for layer in gate.windowed_cache.layers for t in (layer.keys, layer.values)]
    gate_bytes = sum(t.numel() * t.element_size() for t in [*windowed, gate.next_token_log_probs])
    total = cache_bytes(cache)
    gate.windowed_cache = gate.next_token_log_probs = None
    assert gate_bytes > 0 and cache_bytes(cache) == total - gate_bytes
