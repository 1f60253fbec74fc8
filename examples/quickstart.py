"""Quickstart: build a small LlamaMem model, save it, load it through AutoModelForCausalLM and generate far past
its attention window with the memory carried by the cache. Runs on a CPU in seconds; downloads nothing."""

import tempfile

import torch
from small_models import small_config
from transformers import AutoModelForCausalLM, ByT5Tokenizer

import hf_llama_mem  # noqa: F401  (registers model_type "llama_mem" with the Auto classes)


def main() -> None:
    torch.manual_seed(0)
    tokenizer = ByT5Tokenizer()
    config = small_config(tokenizer, sliding_window=32)
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer("The memory keeps what leaves the window. " * 4, return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=64, do_sample=False)
    print(
        f"{type(model).__name__}: window {config.sliding_window}, prompt {prompt.input_ids.shape[1]} tokens, "
        f"generated {output.shape[1] - prompt.input_ids.shape[1]} more (untrained, so the text is noise)"
    )
    print(repr(tokenizer.decode(output[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
