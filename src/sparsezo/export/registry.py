"""The formats ``sparsezo export`` writes, by ``--format`` name.

Each format is one module with ``HELP`` (its --format help), ``write(model, tokenizer, delta, out,
options) -> report`` and ``describe(report) -> str``; adding a format is that module plus one entry
here. ``merge`` stays the command for plain Hugging Face folders (:mod:`sparsezo.export.hf`).
"""

from __future__ import annotations

from types import ModuleType

from . import gguf, peft

EXPORTERS: dict[str, ModuleType] = {"gguf": gguf, "peft": peft}
