import json
import os
import subprocess
import sys
import textwrap

import torch

from .helpers import tiny_model

# Runs in a fresh interpreter where importing hf_llama_mem fails, as on a machine without the package.
REMOTE_LOAD = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_llama_mem":
                raise ImportError("hf_llama_mem is not installed here")

    sys.meta_path.insert(0, NoPackage())
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "hf_llama_mem" not in sys.modules
    ids = torch.load(folder + "/ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, folder + "/remote_logits.pt")
    print(type(model).__name__, type(base).__name__)
    """
)


def test_saved_folder_is_flat_and_names_all_auto_classes(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"configuration_llama_mem.py", "modeling_llama_mem.py", "memory_ops.py", "model.safetensors"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}


def test_trust_remote_code_loads_without_the_package_with_identical_logits(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    ids = torch.randint(1, 256, (2, 40))
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LlamaMemForCausalLM LlamaMemModel" in result.stdout
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "remote_logits.pt"), model(ids).logits)
