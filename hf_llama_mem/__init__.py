"""hf_llama_mem: a Llama-family decoder with a learned memory matrix in every layer, for Hugging Face Transformers.

Importing the package registers model_type "llama_mem" with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_llama_mem import LlamaMemConfig
from .hub import install_package_methods
from .memory_state import generate_with_memory, load_memory, save_memory
from .modeling_llama_mem import LlamaMemForCausalLM, LlamaMemModel, LlamaMemPreTrainedModel
from .peft_defaults import register_peft_defaults
from .training import create_optimizer, memory_parameter_groups

__all__ = [
    "LlamaMemConfig",
    "LlamaMemForCausalLM",
    "LlamaMemModel",
    "LlamaMemPreTrainedModel",
    "create_optimizer",
    "generate_with_memory",
    "load_memory",
    "memory_parameter_groups",
    "save_memory",
]

AutoConfig.register("llama_mem", LlamaMemConfig, exist_ok=True)
AutoModel.register(LlamaMemConfig, LlamaMemModel, exist_ok=True)
AutoModelForCausalLM.register(LlamaMemConfig, LlamaMemForCausalLM, exist_ok=True)
# save_pretrained copies the code files next to the weights (for trust_remote_code) for classes marked so.
LlamaMemConfig.register_for_auto_class()
LlamaMemModel.register_for_auto_class("AutoModel")
LlamaMemForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# Saved folders and Hub uploads get a model card rendered from model_cards/llama_mem.md, and from_llama converts:
# both need files the exported code does not carry.
install_package_methods()
register_peft_defaults()
