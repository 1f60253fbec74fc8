import ast
import json
import os
import subprocess
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_llama_mem import LlamaMemForCausalLM

from .helpers import TINY_DIMS, tiny_model

# Runs in a separate Python environment that has torch and transformers but not hf_llama_mem.
REMOTE_LOAD = textwrap.dedent(
    """
    import importlib.util, sys
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    assert importlib.util.find_spec("hf_llama_mem") is None, "hf_llama_mem is importable in this environment"
    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    ids = torch.load(folder + "/ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, folder + "/remote_logits.pt")
    print(sys.prefix, type(model).__name__, type(base).__name__)
    """
)


def environment_without_package(root) -> str:
    """A new virtual environment whose site-packages links every installed distribution except hf_llama_mem
    (and its editable-install hooks): the dependencies of a user who downloads a model, without our package."""
    venv.create(root, with_pip=False)
    target = Path(sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)}))
    for source_dir in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}:
        for entry in Path(source_dir).iterdir():
            if (
                not entry.name.startswith(("hf_llama_mem", "__editable__", "_hf_llama_mem"))
                and not (target / entry.name).exists()
            ):
                (target / entry.name).symlink_to(entry)
    return str(Path(root) / "bin" / "python")


# The code a saved model carries: the model and what it imports, nothing of the package around it (conversion,
# model cards, evals, the CLI).
EXPORTED_CODE = {
    "causal_lm_loss.py",
    "configuration_llama_mem.py",
    "fixed_cache.py",
    "memory_layer.py",
    "memory_ops.py",
    "modeling_llama_mem.py",
    "surprisal_writes.py",
    "windowed_attention.py",
}


def test_saved_folder_is_flat_holds_exactly_the_model_code_and_names_all_auto_classes(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {name for name in files if name.endswith(".py")} == EXPORTED_CODE
    assert "model.safetensors" in files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}


def test_saved_code_loads_as_its_own_class_with_identical_logits_and_refuses_from_llama(tmp_path):
    """The class transformers builds from the saved code files (in this process; the slow test below does it where
    the package is not installed) computes the same logits, imports only its siblings, and has no converter
    (convert_llama.py is not exported): from_llama says to install the package, whose class converts."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    for code in EXPORTED_CODE:
        for node in ast.walk(ast.parse((tmp_path / code).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: a sibling file, saved with it
                assert node.level == 1 and f"{node.module}.py" in EXPORTED_CODE, (code, node.module)
            elif isinstance(node, ast.ImportFrom):
                assert not node.module.startswith("hf_llama_mem"), (code, node.module)
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("hf_llama_mem") for alias in node.names), code
    remote_class = get_class_from_dynamic_module("modeling_llama_mem.LlamaMemForCausalLM", str(tmp_path))
    assert remote_class is not LlamaMemForCausalLM
    remote = remote_class.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(remote(ids).logits, model(ids).logits)
    llama = LlamaForCausalLM(LlamaConfig(**TINY_DIMS)).eval()
    with pytest.raises(ImportError, match="pip install hf-llama-mem"):
        remote_class.from_llama(llama)
    assert isinstance(LlamaMemForCausalLM.from_llama(llama, sliding_window=8), LlamaMemForCausalLM)


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package_with_identical_logits(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    ids = torch.randint(1, 256, (2, 40))
    torch.save(ids, tmp_path / "ids.pt")
    python = environment_without_package(tmp_path / "env")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [python, "-c", REMOTE_LOAD, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(tmp_path / "env"), "LlamaMemForCausalLM", "LlamaMemModel"]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "remote_logits.pt"), model(ids).logits)
