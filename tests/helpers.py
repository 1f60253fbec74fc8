"""Small shared helpers for the tests: a tiny config and a tolerance check that reports its error."""

import torch

from hf_llama_mem import LlamaMemConfig, LlamaMemForCausalLM

# The dimensions every test model shares, Llama or LlamaMem.
TINY_DIMS = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def tiny_config(**overrides) -> LlamaMemConfig:
    """hidden 64, 2 layers, vocab 256, W = 8: every memory path is exercised in milliseconds."""
    settings = dict(
        **TINY_DIMS,
        sliding_window=8,
        memory_chunk_size=16,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    settings.update(overrides)
    return LlamaMemConfig(**settings)


def tiny_model(**overrides) -> LlamaMemForCausalLM:
    return LlamaMemForCausalLM(tiny_config(**overrides)).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4, what: str = "") -> None:
    """Max-abs check that reports the relative RMS error too, so a failure says how far off it is."""
    diff = (actual.double() - expected.double()).abs()
    rel_rms = (diff.pow(2).mean().sqrt() / expected.double().pow(2).mean().sqrt().clamp_min(1e-12)).item()
    assert diff.max().item() <= atol, f"{what}: max abs err {diff.max().item():.3e} (rel rms {rel_rms:.3e})"
