"""The formats ``sparsezo export`` writes, one module each: a registry, so a new format is one entry.

``merge`` stays the command for plain Hugging Face folders; every other consumer's format
(llama.cpp's GGUF, PEFT adapters) goes through ``export --format NAME``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Exporter:
    """One output format: what it is for and the function that writes it."""

    help: str
    write: Callable[..., dict[str, Any]]  # (model, tokenizer, delta, out, options) -> report
    describe: Callable[[dict[str, Any]], str]


def _gguf(model, tokenizer, delta, out, options: dict[str, Any]) -> dict[str, Any]:
    from .export_gguf import export_gguf

    return export_gguf(model, tokenizer, out, delta, options.get("type") or "f16")


def _gguf_text(info: dict[str, Any]) -> str:
    types = ", ".join(f"{n} {k}" for k, n in sorted(info["tensor_types"].items()))
    return (f"GGUF ({info['type']}): {info['tensors']} tensors ({types}), {info['bytes']} bytes, tokenizer "
            f"{info['tokenizer']} -> {info['out']}")


def _peft(model, tokenizer, delta, out, options: dict[str, Any]) -> dict[str, Any]:
    from .export_peft import export_peft

    return export_peft(model, delta, out, base_name=str(model.name_or_path))


def _peft_text(info: dict[str, Any]) -> str:
    from .export_peft import describe

    return describe(info)


EXPORTERS: dict[str, Exporter] = {
    "gguf": Exporter("one GGUF file with base + delta for llama.cpp, Ollama, LM Studio (--type sets the weights' "
                     "storage type)", _gguf, _gguf_text),
    "peft": Exporter("a PEFT SHiRA adapter folder (PeftModel.from_pretrained(base, folder))", _peft, _peft_text),
}
