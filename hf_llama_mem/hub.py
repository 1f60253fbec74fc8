"""What the installed package adds to the exported model classes: the model card on save and push, and from_llama.

The code files saved next to the weights (for trust_remote_code) carry neither the card template nor the converter,
so these live here and `import hf_llama_mem` installs them (`install_package_methods`). A class loaded with
trust_remote_code alone saves and pushes as any transformers model does, and its `from_llama` says to install
hf-llama-mem.
"""

import os
import tempfile

from huggingface_hub import HfApi

from .convert_llama import convert_from_llama
from .model_card import write_model_card
from .modeling_llama_mem import LlamaMemForCausalLM, LlamaMemPreTrainedModel

__all__ = ["install_package_methods"]

# The exported classes' own save (auto_map for all three Auto classes), which the card-writing save wraps.
save_without_card = LlamaMemPreTrainedModel.save_pretrained


def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
    """Save as the exported class does (weights, config with `auto_map`, code files), plus a model card rendered
    from model_cards/llama_mem.md with the evaluation results recorded next to the weights."""
    save_without_card(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        write_model_card(self.config, save_directory, results_from=self.name_or_path)


def push_to_hub(
    self,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
):
    """Upload weights, code files, config and model card, as transformers does, except that the card is this
    model's own (transformers would replace it with a generic one)."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        self.save_pretrained(folder, max_shard_size=max_shard_size)
        write_model_card(self.config, folder, results_from=self.name_or_path, model_name=repo_id, tags=tags or [])
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def from_llama(cls, source, **config_overrides) -> LlamaMemForCausalLM:
    """Convert a Llama-family causal LM (an instance, a local folder, a hub id or a GGUF file) into LlamaMem.

    Every source tensor is copied exactly once; the memory gates start closed, so the result equals the source
    up to W tokens and the source with a W-token sliding window beyond, until it is trained. `config_overrides`
    set LlamaMemConfig fields (sliding_window, memory_rule, memory_layers, ...).
    """
    return convert_from_llama(cls, source, **config_overrides)


def install_package_methods() -> None:
    """Install the methods above on the exported classes (idempotent: each is a plain assignment)."""
    LlamaMemPreTrainedModel.save_pretrained = save_pretrained
    LlamaMemPreTrainedModel.push_to_hub = push_to_hub
    LlamaMemForCausalLM.from_llama = classmethod(from_llama)
