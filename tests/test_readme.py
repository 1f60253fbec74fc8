"""The README's "Using it with the Hugging Face stack" snippets, executed in order, with the Hub upload intercepted."""

import re
from pathlib import Path

from .test_hub import intercepted_hub  # noqa: F401  (fixture)

README = Path(__file__).resolve().parents[1] / "README.md"


def section_snippets(title: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_hugging_face_stack_snippets_run(tmp_path, monkeypatch, intercepted_hub):  # noqa: F811
    uploads, calls = intercepted_hub
    monkeypatch.chdir(tmp_path)
    snippets = section_snippets("Using it with the Hugging Face stack")
    assert len(snippets) == 7
    namespace = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)
    assert calls["create_repo"] == "your-name/my-llama-mem"
    assert {"README.md", "model.safetensors", "modeling_llama_mem.py"} <= {p.name for p in uploads.iterdir()}
