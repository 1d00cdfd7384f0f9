"""What every command does before and after its own work: validate cheap arguments, make paths
absolute, build the task, its splits and the mask source, build the model, print the result."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..assets import default_calibration_file
from ..errors import SparseZOError
from ..masks import RULES, Mask, compute_mask
from ..masks.sensitive import read_texts
from ..model.load import MaskSource, build_model
from ..model.resolve import check_model_path
from ..resources import parse_bytes
from ..tasks import Task, get_task
from ..training.lock import RunLock
from ..zo.spsa import MAX_SEED

log = logging.getLogger("sparsezo")

_POSITIVE = ("num_train", "num_dev", "num_test", "steps", "calib_tokens", "calib_seq_len", "seq_len", "batch",
             "batch_size", "eval_every", "eval_batch_size", "max_new_tokens", "q", "keep_checkpoints")
_NON_NEGATIVE = ("icl", "warmup", "checkpoint_every", "weight_decay")


def check_common(args: argparse.Namespace) -> None:
    """Validate cheap arguments before loading anything: a bad value must cost a second, not a model load."""
    for name in _POSITIVE:
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise SparseZOError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    for name in _NON_NEGATIVE:
        v = getattr(args, name, None)
        if v is not None and not v >= 0:
            raise SparseZOError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    for name in ("lr", "eps", "density", "weight_decay", "dist_timeout"):
        v = getattr(args, name, None)
        if v is not None and not math.isfinite(v):
            raise SparseZOError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    if getattr(args, "dist_timeout", None) is not None and args.dist_timeout <= 0:
        raise SparseZOError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise SparseZOError(f"--seed must be in 0 .. {MAX_SEED}, got {seed}")
    density = getattr(args, "density", None)
    if density is not None and not 0 < density <= 1:
        raise SparseZOError(f"--density {density} is outside (0, 1]; e.g. --density 0.001 for 0.1%")
    for name in ("include", "exclude"):
        pattern = getattr(args, name, None)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise SparseZOError(f"--{name} {pattern!r} is not a valid regular expression ({e}); "
                                    "escape special characters like ( [ . with a backslash") from e
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    if getattr(args, "model", None) is not None:
        check_model_path(args.model)  # a Hugging Face folder or a .gguf file (converted once, cached)


def check_device(device: str) -> None:
    """``device`` names a device this machine has (else torch fails deep inside the model load)."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise SparseZOError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from e
    if d.type == "cpu":
        return
    if d.type != "cuda":
        raise SparseZOError(f"--device {device}: sparsezo runs on cpu or cuda[:N], not {d.type}")
    if not torch.cuda.is_available():
        raise SparseZOError(f"--device {device}: no CUDA GPU is usable here (torch "
                            f"{torch.__version__}{'' if torch.version.cuda else ', built without CUDA'}); "
                            "use --device cpu")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise SparseZOError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def check_readable(path: str | Path | None, action: str) -> None:
    """Refuse to read a run directory while a training process writes it (one line naming the holder)."""
    if path is not None and Path(path).is_dir():
        RunLock(path).check_readable(action)


def refuse_existing(out: str | None) -> None:
    """Commands never overwrite: --out must not exist yet."""
    if out and Path(out).exists():
        raise SparseZOError(f"--out {out} already exists; choose another path or remove it")


def absolute_paths(args: argparse.Namespace) -> None:
    """Make the path options absolute and resolved (in place): a run's config.json and delta header
    must name files that are still found when eval --delta, merge, replay or --resume run elsewhere."""
    for key in ("model", "data_dir", "data", "test_data", "task_file", "calib"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(args, key, str(Path(value).expanduser().resolve()))
    if getattr(args, "mask", None) not in (None, *RULES):
        args.mask = str(Path(args.mask).expanduser().resolve())


def recorded_path(path: str) -> str:
    """A model's path as a run records it: absolute and resolved when it is a local folder."""
    return str(Path(path).resolve()) if Path(path).is_dir() else str(path)


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The user-task flags that were given (recorded in a run's config.json too)."""
    keys = ("data", "template", "labels", "label_field", "test_data", "task_file")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def task_of(args: argparse.Namespace) -> Task:
    """The --task, configured by the user-task flags when they are given."""
    return get_task(args.task, args.data_dir, **task_options(args))


def splits_of(args: argparse.Namespace, train: bool = True, task: Task | None = None) -> dict[str, list]:
    """train/dev/test examples of ``task`` (default: the --task); ``train=False`` samples only the
    test split (cheaper, no small-pool warning)."""
    task = task or task_of(args)
    if train:
        return task.splits(args.seed, args.num_train, args.num_dev, args.num_test)
    return task.splits(args.seed, 0, 0, args.num_test)


def train_split(args: argparse.Namespace) -> list | None:
    """The training split, when the mask rule scores it (sensitive-task), else None (no task data read)."""
    return splits_of(args)["train"] if args.mask == "sensitive-task" else None


def calibration(args: argparse.Namespace, train: list | None = None) -> tuple[list[str] | None, str | None]:
    """Texts the Fisher score is computed on: --calib/WikiText-2, or the task's training split."""
    if args.mask == "sensitive-task":
        if not train:
            raise SparseZOError("--mask sensitive-task needs the task's training split")
        return [ex.prompt + ex.candidates[ex.gold] for ex in train], f"task:{args.task}:train"
    if args.mask == "sensitive":
        path = Path(args.calib) if args.calib else default_calibration_file()
        return read_texts(path), str(path)
    return None, None


def max_memory(args: argparse.Namespace) -> int | None:
    value = getattr(args, "max_memory", None)
    return None if value is None else parse_bytes(value, "--max-memory")


def mask_source(args: argparse.Namespace, train: list | None = None) -> MaskSource:
    """--mask as :func:`build_model` takes it: the loaded file, or the rule as a function of the model."""
    if args.mask not in RULES:
        if not Path(args.mask).is_file():
            raise SparseZOError(f"--mask {args.mask!r} is neither a mask file nor a rule ({', '.join(RULES)})")
        return Mask.load(args.mask)

    def compute(model, tok) -> Mask:
        texts, source = calibration(args, train)
        return compute_mask(model, args.mask, args.density, scope=args.scope, seed=args.seed, tokenizer=tok,
                            texts=texts, source=source, include=args.include, exclude=args.exclude,
                            calib_tokens=args.calib_tokens, seq_len=args.calib_seq_len, memory_limit=max_memory(args))
    return compute


def model_and_mask(args: argparse.Namespace, train: list | None = None, quant: str | None = None):
    """Model, tokenizer and mask of --model/--mask/``quant`` (a mask file is checked against the model)."""
    source = mask_source(args, train)
    model, tok, mask = build_model(args.model, args.dtype, args.device, quant, source)
    if isinstance(source, Mask):
        mask.check_model(model)
    return model, tok, mask


def emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    """The command's result: one JSON object with --json, else ``text``."""
    if args.json:
        sys.stdout.write(json.dumps(obj) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def memory_text(report: dict[str, Any]) -> str:
    """'peak memory 1.23 GiB (anonymous; RSS with mapped files 4.56 GiB)' from a memory_report."""
    kind = {"anon": "anonymous", "rss": "RSS", "cuda_max_allocated": "CUDA max allocated"}[report["peak_memory_kind"]]
    rss = "" if report["peak_memory_kind"] == "rss" else f"; RSS with mapped files {report['peak_rss_bytes'] / 2**30:.2f} GiB"
    return f"peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB ({kind}{rss})"


def delta_base(args: argparse.Namespace, delta):
    """The base model a delta was trained on: its recorded path, dtype and quantization unless
    --model/--dtype override them (replay, merge, export)."""
    dtype = args.dtype or delta.meta.get("dtype", "bfloat16")
    model = args.model or delta.meta.get("model")
    if model is not None:
        check_model_path(model, "base model (pass --model DIR or FILE.gguf to override)")
    quant = delta.meta.get("quant")
    model, tok, _ = build_model(model, dtype, args.device, quant, delta.mask)
    return model, tok


def delta_is_base(model, delta) -> bool:
    """True when every trained value equals the base's (the run kept step 0: nothing was learned).

    Then merge/export write the base model under a new name; say so rather than "merged N weights".
    One tensor at a time over the k trained entries (no θ-sized copy); the model is not modified.
    """
    def equal(t: torch.Tensor, idx, values: torch.Tensor) -> bool:
        flat = t.detach().reshape(-1)
        trained = flat if idx is None else flat[idx.to(flat.device)]
        return torch.equal(trained.float(), values.reshape(-1).float().to(flat.device))

    same = all(equal(t, idx, delta.values[n]) for n, (t, idx) in delta.mask.check_model(model).items())
    if same:
        log.warning("note: the delta equals the base model (every trained value is the base's; best step %s): the "
                    "output is the unchanged base. Retrain with another --lr (or --lr auto) or more --steps",
                    delta.meta.get("results", {}).get("best_step", "?"))
    return same
