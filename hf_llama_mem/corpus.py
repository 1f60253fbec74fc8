"""A real text corpus that every machine has offline: the Python standard library's own source files.

Files are taken in sorted order; every `EVAL_EVERY`-th file is held out for evaluation, so training and evaluation
never share a file. `lm_blocks` is the usual causal-LM pipeline with `datasets`: load text files, tokenize with
`map`, concatenate and cut into blocks (much longer than the attention window, so the memory has work to do).
"""

import sysconfig
from pathlib import Path

from datasets import Dataset, load_dataset

__all__ = ["lm_blocks", "stdlib_source_files"]

EVAL_EVERY = 10


def stdlib_source_files(split: str = "train", max_bytes: int | None = None) -> list[str]:
    """Paths of the standard library's top-level .py files for `split` ("train" or "eval"), up to `max_bytes`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen = [f for i, f in enumerate(files) if (i % EVAL_EVERY == EVAL_EVERY - 1) == (split == "eval")]
    selected, total = [], 0
    for path in chosen:
        size = path.stat().st_size
        if max_bytes is not None and selected and total + size > max_bytes:
            break
        selected.append(str(path))
        total += size
    return selected


def lm_blocks(files: list[str], tokenizer, block_size: int, num_proc: int | None = None) -> Dataset:
    """Text files -> a Dataset of `block_size`-token blocks with input_ids and labels (one document per file)."""
    if not files:
        raise ValueError("lm_blocks needs at least one text file, got none.")
    documents = load_dataset("text", data_files=files, sample_by="document", split="train")
    tokenized = documents.map(
        lambda batch: tokenizer(batch["text"]),
        batched=True,
        remove_columns=documents.column_names,
        num_proc=num_proc,
        desc="tokenizing",
    )

    def group(batch: dict) -> dict:
        ids = [token for document in batch["input_ids"] for token in document]
        usable = len(ids) // block_size * block_size
        blocks = [ids[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    blocks = tokenized.map(
        group, batched=True, batch_size=1000, remove_columns=tokenized.column_names, desc=f"grouping into {block_size}"
    )
    if len(blocks) == 0:
        raise ValueError(f"The files hold fewer than block_size={block_size} tokens: no block could be made.")
    return blocks
