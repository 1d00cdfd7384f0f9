"""Tiny models, tokenizers and data files for tests: no network, no shared assets needed."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from sparsezo.testing import tiny_llama

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "weak"]
FILLER = ["the", "a", "movie", "film", "plot", "cast", "was", "is", "very", "quite", "story", "and"]
SPECIAL = ["<pad>", "<unk>", "<s>"]
WORDS = SPECIAL + POSITIVE + NEGATIVE + FILLER + ["It", "terrible"]


def tiny_tokenizer():
    """A word-level fast tokenizer over a fixed vocabulary (spaces are separators)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>")


def tiny_model(seed: int = 0, dtype=torch.float32):
    return tiny_llama(seed=seed, vocab_size=len(WORDS), hidden=32, layers=2, dtype=dtype)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """A loadable HF folder (model + tokenizer) for CLI tests."""
    model = tiny_model(seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def sentences(n: int, seed: int = 0) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        words = rng.sample(FILLER, 3) + [word] + rng.sample(FILLER, 2)
        out.append((label, " ".join(words)))
    return out


def write_sst2(path: Path, n_train: int = 200, n_test: int = 60) -> Path:
    """SST-2-shaped TSVs: train.tsv (label, sentence) and dev.tsv (label, content)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "train.tsv", "w") as f:
        f.write("label\tsentence\n" + "".join(f"{y}\t{s}\n" for y, s in sentences(n_train, 1)))
    with open(path / "dev.tsv", "w") as f:
        f.write("label\tcontent\n" + "".join(f"{y}\t{s}\n" for y, s in sentences(n_test, 2)))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """A JSON-lines file (one object per line), creating its folder."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module, importable the way the script imports its neighbours.

    benchmarks/ goes on sys.path (the scripts import their shared ``stats`` module as a script run
    would), and the module is registered under its name before it runs (dataclasses look it up).
    """
    import importlib.util
    import sys

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
