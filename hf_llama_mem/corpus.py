"""Real text corpora that are available offline.

- The Python standard library's own source files (every machine): files are taken in sorted order; every
  `EVAL_EVERY`-th file is held out for evaluation, so training and evaluation never share a file.
- The Python documentation in natural language (English prose), from the Debian package python3.11-doc: the reST
  sources under /usr/share/doc/python3.11/html/_sources (or, where only the HTML was installed, the HTML pages).
  `python_docs_files(split)` lists them with a fixed held-out split (see `python_docs_files`).

`lm_blocks` is the usual causal-LM pipeline with `datasets`: load text files, tokenize with `map`, concatenate and
cut into blocks (much longer than the attention window, so the memory has work to do).
"""

import sys
import sysconfig
from pathlib import Path

from datasets import Dataset, load_dataset

__all__ = ["lm_blocks", "python_docs_files", "python_docs_root", "stdlib_source_files"]

EVAL_EVERY = 10
# The Python documentation's held-out part: this whole folder (release notes: long prose documents, 20K-130K
# characters each, for perplexity by position far into a document) ...
DOCS_HELD_OUT_FOLDER = "whatsnew"
# ... and, of the files under library/ in sorted order, those at positions 9, 19, 29, ... (every 10th).
DOCS_HELD_OUT_LIBRARY_EVERY = 10


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


def python_docs_root() -> Path | None:
    """Where the Python documentation's sources are installed (the running Python's version first), or None."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path("/usr/share/doc") / version / "html"]
    candidates += sorted(Path("/usr/share/doc").glob("python3*/html"), reverse=True)
    for html in candidates:
        if (html / "_sources").is_dir() and any((html / "_sources").rglob("*.txt")):
            return html / "_sources"
        if html.is_dir() and any(html.rglob("*.html")):
            return html
    return None


def python_docs_files(split: str = "train", root: str | Path | None = None) -> list[str]:
    """Paths of the Python documentation's pages for `split`: "train", "eval" (held out) or "all".

    The held-out split, fixed so that evaluation text is never trained on: every page under `whatsnew/` (the release
    notes) and, of the pages under `library/` in sorted order of their relative path, every 10th (positions 9, 19,
    29, ...). Everything else is "train". Pages are the reST sources (`*.txt`) where installed, else the HTML pages
    (`*.html`, read with their tags stripped by the caller). Raises FileNotFoundError when the documentation is not
    installed (Debian/Ubuntu: `apt-get install python3.11-doc`).
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}.")
    root = Path(root) if root is not None else python_docs_root()
    if root is None or not root.is_dir():
        raise FileNotFoundError(
            "The Python documentation is not installed (looked for /usr/share/doc/python3*/html/_sources); "
            "install it with `apt-get install python3.11-doc`."
        )
    suffix = ".txt" if root.name == "_sources" else ".html"
    pages = sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{suffix}") if p.is_file())
    pages = [p for p in pages if not p.startswith("_")]  # Sphinx's own static files, not documentation
    library = [p for p in pages if p.startswith("library/")]
    held_out = {p for p in pages if p.startswith(f"{DOCS_HELD_OUT_FOLDER}/")}
    every = DOCS_HELD_OUT_LIBRARY_EVERY
    held_out |= {p for i, p in enumerate(library) if i % every == every - 1}
    if split == "all":
        chosen = pages
    else:
        chosen = [p for p in pages if (p in held_out) == (split == "eval")]
    return [str(root / p) for p in chosen]


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
