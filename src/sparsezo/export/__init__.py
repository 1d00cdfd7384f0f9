"""base + delta for other tools: plain Hugging Face folders (:mod:`.hf`), and the formats of
``sparsezo export`` (:mod:`.registry`: GGUF for llama.cpp, PEFT SHiRA adapters)."""

from .gguf import export_gguf
from .hf import merged_tensors, save_merged
from .peft import export_peft
from .registry import EXPORTERS

__all__ = ["EXPORTERS", "export_gguf", "export_peft", "merged_tensors", "save_merged"]
