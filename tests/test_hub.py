"""Model cards and push_to_hub: every uploaded file checked, with the upload intercepted (no network)."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM

from hf_llama_mem.model_card import record_eval_results

from .helpers import tiny_model


def load_card(folder) -> ModelCard:
    # ignore_metadata_errors=False is the client side of the Hub's validation: a bad model-index or metadata raises.
    return ModelCard.load(os.path.join(folder, "README.md"), ignore_metadata_errors=False)


def test_save_pretrained_writes_a_valid_card_with_the_memory_settings(tmp_path):
    tiny_model(sliding_window=8, memory_layers=[1]).save_pretrained(tmp_path / "tiny")
    card = load_card(tmp_path / "tiny")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert "llama_mem" in card.data.tags
    assert "# tiny" in card.text
    assert "| sliding window W | 8 |" in card.text
    assert "| layers with memory | 1 |" in card.text
    assert "## Intended use" in card.text and "## Limits" in card.text
    assert "No evaluation recorded yet" in card.text


def test_a_card_written_by_someone_else_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("# my own card\n")
    tiny_model().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"


@pytest.fixture
def intercepted_hub(monkeypatch, tmp_path):
    """Replaces the Hub calls push_to_hub makes; what would be uploaded is copied into `uploads`."""
    uploads = tmp_path / "uploads"
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = {"repo_id": repo_id, **kwargs}
        shutil.copytree(folder_path, uploads)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads, calls


def test_push_to_hub_uploads_weights_code_config_and_card_with_results(tmp_path, intercepted_hub):
    uploads, calls = intercepted_hub
    folder = tmp_path / "trained"
    tiny_model().save_pretrained(folder)
    record_eval_results(folder, "passkey", [{"setting": "length 512", "metric": "accuracy", "value": 0.75}])
    model = AutoModelForCausalLM.from_pretrained(folder).eval()

    model.push_to_hub("someone/llama-mem-tiny", tags=["my-experiment"])

    assert calls["create_repo"] == "someone/llama-mem-tiny"
    assert calls["upload_folder"]["repo_id"] == "someone/llama-mem-tiny"
    assert sorted(os.listdir(uploads)) == sorted(
        [
            "README.md",
            "causal_lm_loss.py",
            "config.json",
            "configuration_llama_mem.py",
            "eval_results.json",
            "fixed_cache.py",
            "generation_config.json",
            "memory_layer.py",
            "memory_ops.py",
            "model.safetensors",
            "modeling_llama_mem.py",
            "surprisal_writes.py",
            "windowed_attention.py",
        ]
    )
    config = json.loads((uploads / "config.json").read_text())
    assert config["model_type"] == "llama_mem"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    for code in ("configuration_llama_mem.py", "modeling_llama_mem.py", "memory_ops.py", "causal_lm_loss.py"):
        assert (uploads / code).read_text() == (tmp_path / "trained" / code).read_text()
    card = load_card(uploads)
    assert "# someone/llama-mem-tiny" in card.text
    assert "| passkey | length 512 | accuracy | 0.75 |" in card.text
    assert "my-experiment" in card.data.tags and "llama_mem" in card.data.tags
    ids = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        uploaded = AutoModelForCausalLM.from_pretrained(uploads)
        assert torch.equal(uploaded(ids).logits, model(ids).logits)
