"""LLaMA 1/2/3 decoder with native LoRA/DoRA adapters and an explicit injection argument."""
from .lora import (LoRALinear, adapter_state_dict, load_adapter, merge_adapters, save_adapter,
                   unmerge_adapters)
from .model import (MODULE_ALIASES, PRESETS, KVCache, ModelArgs, Transformer,
                    canonical_module)
from .load import build_model, load_model
