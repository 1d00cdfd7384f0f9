"""``sparsezo`` command line: thin wrappers over the API.

Progress bars and logs go to stderr; ``--json`` makes a reporting command print exactly one
JSON object on stdout. :func:`main` is the one error boundary: any failure caused by the
user's input, files, disk or environment (a :class:`SparseZOError`, an :class:`OSError`, out of
memory) becomes one ``sparsezo: error: <what>, <where>, <how to fix>`` line and exit code 2,
with nothing half-written; anything else is a bug in sparsezo and keeps its traceback.
SIGTERM and SIGHUP unwind like Ctrl-C, so a run stopped by a scheduler keeps its checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .errors import Interrupted, SparseZOError, from_os_error, os_errno_in, os_hint

log = logging.getLogger("sparsezo")


# ----------------------------------------------------------------------------- shared pieces
DESCRIPTION = ("Fine-tune language models with zeroth-order (forward-pass-only) optimisation on a sparse set of "
               "sensitive weights. Start with 'sparsezo demo'; 'sparsezo COMMAND --help' lists a command's options "
               "with their defaults.")
DTYPES = ["bfloat16", "float16", "float32"]
DTYPE_CHOICES = [*DTYPES, "auto"]  # auto: sparsezo.dtypes.default_dtype, resolved in main before a command runs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help. An option without a value to show (``None``, an
    off flag) either says in its help what happens when it is left out, or reads "default: none"/"off"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == []:
            if "default" in text or action.required or not action.option_strings:
                return text
            return f"{text} (default: {'off' if action.default is False else 'none'})"
        return super()._get_help_string(action)


class _DeprecatedAlias(argparse.Action):
    """A renamed option's old spelling: still works, warns on stderr, hidden from --help."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sys.stderr.write(f"sparsezo: warning: {option_string} is deprecated, use {self.new} (same meaning)\n")
        setattr(namespace, self.dest, values)


def _add_model_args(p: argparse.ArgumentParser, quant: bool = True, from_run: bool = False) -> None:
    """--model/--dtype/--device[/--quant]/--json; ``from_run``: eval, whose defaults come from --delta's run."""
    run = "the base recorded in the --delta run, else " if from_run else ""
    p.add_argument("--model", default=None,
                   help=f"local Hugging Face model folder, or a .gguf file (or a folder holding one), converted once into "
                        f"$SPARSEZO_HOME/gguf (default: {run}the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None if from_run else "bfloat16", choices=DTYPE_CHOICES,
                   help="compute dtype of the frozen weights; bfloat16 is ~3x faster than float32 on CPUs with "
                        "avx512_bf16, ~5x slower without it (auto: bfloat16 on CUDA and such CPUs, else float32)"
                        + (" (default: the --delta run's, else bfloat16)" if from_run else ""))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    if quant:
        p.add_argument("--quant", default=None, choices=["nf4", "int4"],
                       help="4-bit frozen base: nf4 (bitsandbytes NF4) or int4 (group-wise int4 on PyTorch's int4 "
                            "kernels, fast on CPU); the trainable entries stay exact in --dtype "
                            f"(default: {'the --delta run' + chr(39) + 's, else ' if from_run else ''}no quantization)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object on stdout (progress and logs stay on stderr)")


def _add_run_base_args(p: argparse.ArgumentParser) -> None:
    """replay/merge: the base model defaults to the one the run recorded, in the run's dtype."""
    p.add_argument("--model", default=None, help="base model folder (default: the one the run recorded)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="compute dtype (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def _add_task_args(p: argparse.ArgumentParser, kind: str = "train") -> None:
    """Task and split options of a command ``kind``: train, eval (from_run defaults, --split/--icl/
    --max-new-tokens) or mask (the task matters only to --mask sensitive-task, which scores its
    training split: no test options).

    eval takes --num-train/--num-dev too: with the training run's values and seed it sees the
    same dev split and draws ICL demonstrations from the same training split.
    """
    from .recipe import TRAIN
    from .tasks import TASKS

    run = kind == "eval"  # None = take the value recorded in the --delta run (else the train default)
    of_run = " (default: the --delta run's, else {})".format
    t = p.add_argument_group("task (only for --mask sensitive-task: the Fisher score of its training split)") \
        if kind == "mask" else p
    t.add_argument("--task", default=None if run else TRAIN.task,
                   help=f"task name: {', '.join(TASKS)}" + (of_run(TRAIN.task) if run else ""))
    t.add_argument("--data-dir", default=None,
                   help="folder with the task's official files (default: the shared assets)")
    t.add_argument("--num-train", type=int, default=None if run else TRAIN.num_train,
                   help="training examples sampled from the task's training pool"
                        + (of_run(TRAIN.num_train) if run else ""))
    t.add_argument("--num-dev", type=int, default=None if run else TRAIN.num_dev,
                   help="dev examples (disjoint from train) for model selection"
                        + (of_run(TRAIN.num_dev) if run else "; as in the train run, so the training split is the same"
                           if kind == "mask" else ""))
    if kind != "mask":
        t.add_argument("--num-test", type=int, default=None if run else TRAIN.num_test,
                       help="test examples (capped by the task's validation file)"
                            + (of_run(TRAIN.num_test) if run else ""))
    else:
        p.set_defaults(num_test=TRAIN.num_test)
    seeds = {"eval": "data sampling and ICL demonstrations" + of_run(TRAIN.seed), "mask": "data sampling and "
             "random masks", "train": "data sampling, random masks and the ZO noise"}[kind]
    p.add_argument("--seed", type=int, default=None if run else TRAIN.seed, help=f"seeds {seeds}")
    g = p.add_argument_group("user task (--task custom)") if kind != "mask" else t
    g.add_argument("--data", default=None, help="labelled examples: .jsonl, .csv or .tsv")
    g.add_argument("--template", default=None,
                   help='prompt with {field} placeholders, e.g. "{text} It was"; \\n and \\t are a newline and '
                        "a tab, \\\\ a backslash")
    g.add_argument("--labels", default=None,
                   help='JSON label -> words map, e.g. \'{"pos": " great", "neg": " terrible"}\'')
    g.add_argument("--label-field", default=None, help="column/key holding the label (default: label)")
    g.add_argument("--test-data", default=None, help="test file (default: a fixed 20%% holdout of --data)")
    g.add_argument("--task-file", default=None, help="JSON (or YAML) file with keys data, template, labels, "
                                                      "label_field, test_data; flags override it")
    if run:
        p.add_argument("--split", default="test", choices=["dev", "test"], help="which split to score")
        p.add_argument("--icl", type=int, default=0, metavar="K",
                       help="prepend K seeded demonstrations from the training split (0: zero-shot)")
        p.add_argument("--max-new-tokens", type=int, default=50, help="answer length limit of generation tasks")


def _add_mask_args(p: argparse.ArgumentParser, selection: bool = True) -> None:
    """Mask rule/file and calibration options; ``selection=False`` (mask mass) drops --density/--scope."""
    from .recipe import TRAIN

    p.add_argument("--mask", default=TRAIN.mask,
                   help="a mask file (mask.safetensors) or a rule: sensitive (Fisher on calibration text), "
                        "sensitive-task (Fisher on the task's training split), magnitude-small, magnitude-large, "
                        "random, full (every eligible weight: MeZO)")
    if selection:
        p.add_argument("--density", type=float, default=TRAIN.density,
                       help="fraction of eligible weights to train, in (0, 1]")
        p.add_argument("--scope", default="global", choices=["global", "per-tensor"],
                       help="top-k over all eligible tensors at once, or the same fraction of each tensor")
    p.add_argument("--calib", default=None,
                   help="calibration text or JSONL for --mask sensitive (default: WikiText-2 from the assets)")
    p.add_argument("--calib-tokens", type=int, default=TRAIN.calib_tokens,
                   help="calibration tokens the Fisher score is estimated on")
    p.add_argument("--calib-seq-len", type=int, default=TRAIN.calib_seq_len,
                   help="tokens per calibration row of the Fisher score (not the task's prompt length)")
    p.add_argument("--seq-len", dest="calib_seq_len", type=int, action=_DeprecatedAlias, new="--calib-seq-len")
    p.add_argument("--include", default=None,
                   help="regex of parameter names that may be trained (default: the attention and MLP linear "
                        "weights of the decoder layers)")
    p.add_argument("--exclude", default=None, help="regex of parameter names never trained (default: none)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the Fisher score may use, e.g. 4.5G (default: what the machine or its cgroup has "
                        "left); below what all score buffers need, the calibration data is run once per group of "
                        "tensors")


def _lr_value(text: str) -> float | None:
    """``--lr``: a number, or ``auto`` (held as None, which also travels through --resume's type check)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


LR_HELP = ("learning rate of the ZO update, or 'auto': before training, probe a half-decade grid of lrs (the "
           "optimizer's own) for a few dozen steps each on 32 dev examples and train with the lowest dev loss's lr "
           "divided by 10 (short probes favour too-large lrs; at most 10%% of the run's forwards; the choice and "
           "its cost are recorded in config.json); the grid's centre when no candidate lowered the dev loss or "
           "the run is too short to try them")


def _add_zo_args(p: argparse.ArgumentParser) -> None:
    from .recipe import TRAIN
    from .train import FUSED_AUTO_TOKENS, FUSED_PM
    from .zo.optim import OPTIMIZERS

    p.add_argument("--steps", type=int, default=TRAIN.steps, help="ZO steps (each: two forward passes per query)")
    p.add_argument("--lr", type=_lr_value, default=TRAIN.lr, help=LR_HELP)
    p.add_argument("--eps", type=float, default=TRAIN.eps,
                   help="perturbation scale (>= 1e-2 survives bf16 rounding)")
    p.add_argument("--batch-size", type=int, default=TRAIN.batch_size, help="training examples per step")
    p.add_argument("--q", type=int, default=1, help="SPSA queries per step (n-SPSA)")
    p.add_argument("--dist", default="gaussian", choices=["gaussian", "rademacher"],
                   help="distribution of the perturbation z (rademacher: device-independent integer hash)")
    p.add_argument("--direction", default="applied", choices=["applied", "sampled"],
                   help="update along the perturbation the rounded weights received (applied) or along z (sampled)")
    p.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS),
                   help="how the projected gradient moves θ: plain ZO-SGD, heavy-ball momentum, Adam, sign-SGD, or "
                        "hizoo (HiZOO-style: one more forward a step for L(θ), update divided by an EMA of the "
                        "measured curvature, so lr is a fraction of a line-search step, ~0.01-1), or fzoo "
                        "(FZOO-style: q one-sided queries sharing L(θ), q+1 forwards a step, each slope divided by "
                        "their spread so the step ignores the loss scale; needs --q >= 2, e.g. 8)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay: adds this times θ to the update")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"],
                   help="learning-rate schedule over the steps after warm-up")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up from 0")
    p.add_argument("--eval-every", type=int, default=TRAIN.eval_every,
                   help="steps between dev evaluations (also at step 0 and the last step)")
    p.add_argument("--eval-batch-size", type=int, default=TRAIN.eval_batch_size,
                   help="examples per forward when evaluating")
    p.add_argument("--keep-last", action="store_true",
                   help="keep the final θ (default: the θ of the best dev evaluation, as MeZO)")
    p.add_argument("--fused-pm", nargs="?", const="on", default="auto", choices=FUSED_PM,
                   help="score θ+εz and θ−εz in one forward over the batch stacked on itself (base matmuls and "
                        "4-bit dequantization once a step; L± equal to float rounding, replay unchanged): on "
                        "(also plain --fused-pm), off, or auto = on for batches of at most "
                        f"{FUSED_AUTO_TOKENS} tokens on a 4-bit base, where it measured faster (see sparsezo "
                        "bench --compare)")
    p.add_argument("--loss", default="ce", choices=["ce", "lm", "acc"],
                   help="ce: cross-entropy over candidates; lm: NLL of the gold candidate (generation tasks); "
                        "acc: 1 - batch accuracy (non-differentiable, ZO optimises it directly)")


_POSITIVE = ("num_train", "num_dev", "num_test", "steps", "calib_tokens", "calib_seq_len", "seq_len", "batch",
             "batch_size", "eval_every", "eval_batch_size", "max_new_tokens", "q", "keep_checkpoints")
_NON_NEGATIVE = ("icl", "warmup", "checkpoint_every", "weight_decay")


def _check_common(args: argparse.Namespace) -> None:
    """Validate cheap arguments before loading anything: a bad value must cost a second, not a model load."""
    from .zo.spsa import MAX_SEED

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
        _check_device(args.device)
    if getattr(args, "model", None) is not None:
        from .models import check_model_path

        check_model_path(args.model)  # a Hugging Face folder or a .gguf file (converted once, cached)


def _check_device(device: str) -> None:
    """``device`` names a device this machine has (else torch fails deep inside the model load)."""
    import torch

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


def _model_numel(model: str | None) -> int | None:
    """Weights of a model folder, from its safetensors headers (nothing loaded); None if unknown here."""
    from safetensors import safe_open

    from .models import DEFAULT_MODEL, sparsezo_home

    folder = Path(model) if model else sparsezo_home() / "models" / DEFAULT_MODEL
    total = 0
    try:
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    total += math.prod(st.get_slice(k).get_shape())
    except Exception:  # an unreadable model is reported by the model load itself, with its own message
        return None
    return total or None


def _run_bytes(args: argparse.Namespace, cfg) -> int:
    """An upper bound of the bytes a training run writes (mask, delta, checkpoints, trajectory, metrics).

    Counted against the free space before the model loads. Trainable entries are bounded by
    density × all weights (a mask file: its index bytes); each costs 4 bytes in the mask, 8 in the
    delta, and 4 per θ-sized vector (θ, best θ, optimiser state) in each checkpoint kept, plus
    the one being written.
    """
    from .masks import RULES

    if args.mask not in RULES and Path(args.mask).is_file():
        entries = Path(args.mask).stat().st_size // 4
    else:
        total = _model_numel(args.model) or 0
        entries = math.ceil(total * (1.0 if args.mask == "full" else args.density))
    vectors = 2 + {"sgd": 0, "sign": 0, "momentum": 1, "adam": 2}.get(cfg.zo.optimizer, 2)
    checkpoints = (args.keep_checkpoints + 1) if args.checkpoint_every else 0
    per_step = 24 * cfg.zo.q * (checkpoints + 1) + 160 + 60 * cfg.zo.q  # trajectory rows + a metrics.jsonl line
    return entries * (4 + 8 + 4 * vectors * checkpoints) + per_step * cfg.steps + (256 << 10)


def _absolute_paths(args: argparse.Namespace) -> None:
    """Make the path options absolute and resolved (in place): a run's config.json and delta header
    must name files that are still found when eval --delta, merge, replay or --resume run elsewhere."""
    from .masks import RULES

    for key in ("model", "data_dir", "data", "test_data", "task_file", "calib"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(args, key, str(Path(value).expanduser().resolve()))
    if getattr(args, "mask", None) not in (None, *RULES):
        args.mask = str(Path(args.mask).expanduser().resolve())


def _recorded_path(path: str) -> str:
    """A model's path as a run records it: absolute and resolved when it is a local folder."""
    return str(Path(path).resolve()) if Path(path).is_dir() else str(path)


def _load(args: argparse.Namespace):
    from .models import load_model

    return load_model(args.model, args.dtype, args.device)


def _task(args: argparse.Namespace):
    """The --task, configured by the user-task flags when they are given."""
    from .tasks import get_task

    return get_task(args.task, args.data_dir, **_task_options(args))


def _task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The user-task flags that were given (recorded in a run's config.json too)."""
    keys = ("data", "template", "labels", "label_field", "test_data", "task_file")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _splits(args: argparse.Namespace, train: bool = True, task=None):
    """train/dev/test examples of ``task`` (default: ``_task(args)``); ``train=False`` samples only the
    test split (cheaper, no small-pool warning)."""
    task = task or _task(args)
    if train:
        return task.splits(args.seed, args.num_train, args.num_dev, args.num_test)
    return task.splits(args.seed, 0, 0, args.num_test)


def _calibration(args: argparse.Namespace, train_split=None) -> tuple[list[str] | None, str | None]:
    """Texts the Fisher score is computed on: --calib/WikiText-2, or the task's training split."""
    if args.mask == "sensitive-task":
        if not train_split:
            raise SparseZOError("--mask sensitive-task needs the task's training split")
        return [ex.prompt + ex.candidates[ex.gold] for ex in train_split], f"task:{args.task}:train"
    if args.mask == "sensitive":
        from .assets import default_calibration_file
        from .masks.sensitive import read_texts

        path = Path(args.calib) if args.calib else default_calibration_file()
        return read_texts(path), str(path)
    return None, None


def _mask(args: argparse.Namespace, model, tok, train_split=None):
    """A mask from a file, or computed on the fly from a rule."""
    from .masks import RULES, Mask, compute_mask

    if args.mask not in RULES:
        if not Path(args.mask).is_file():
            raise SparseZOError(f"--mask {args.mask!r} is neither a mask file nor a rule ({', '.join(RULES)})")
        mask = Mask.load(args.mask)
        mask.check_model(model)
        return mask
    texts, source = _calibration(args, train_split)
    return compute_mask(model, args.mask, args.density, scope=args.scope, seed=args.seed, tokenizer=tok, texts=texts,
                        source=source, include=args.include, exclude=args.exclude,
                        calib_tokens=args.calib_tokens, seq_len=args.calib_seq_len,
                        memory_limit=_max_memory(args))


def _max_memory(args: argparse.Namespace) -> int | None:
    from .resources import parse_bytes

    value = getattr(args, "max_memory", None)
    return None if value is None else parse_bytes(value, "--max-memory")


def _model_and_mask(args: argparse.Namespace, train_split=None):
    """Model, tokenizer and mask for training, honouring --quant.

    A mask file with --quant is applied while streaming the checkpoint (the full-precision model
    never exists whole); a rule is computed on the full-precision model, which is then quantized
    in place; a quantized folder brings its own mask.
    """
    from .masks import RULES, Mask
    from .models import load_model
    from .quant import quantize_model, quantized_mask

    mask_file = args.mask not in RULES
    if mask_file and not Path(args.mask).is_file():
        raise SparseZOError(f"--mask {args.mask!r} is neither a mask file nor a rule ({', '.join(RULES)})")
    streamed = Mask.load(args.mask) if mask_file and args.quant else None
    model, tok = load_model(args.model, args.dtype, args.device, quant=args.quant, mask=streamed)
    built_with = quantized_mask(model)
    if built_with is None:  # full-precision model: load or compute the mask, then quantize if asked
        mask = _mask(args, model, tok, train_split)
        if args.quant:
            quantize_model(model, mask, quant=args.quant)
        return model, tok, mask
    if mask_file:  # the file must be the mask the 4-bit layers keep exact (checked here)
        mask = streamed or Mask.load(args.mask)
        mask.check_model(model)
        return model, tok, mask
    log.info("using the mask the quantized model was built with (%s)", built_with.rule)
    return model, tok, built_with


def _eval_model(args: argparse.Namespace, deltas: list):
    """The base model for ``eval``; with --quant, 4-bit around the deltas' mask (or with no exact entries)."""
    from .models import load_model
    from .quant import quantize_model

    if not args.quant:
        return _load(args)
    if deltas:
        return load_model(args.model, args.dtype, args.device, quant=args.quant, mask=deltas[0].mask)
    model, tok = _load(args)
    return quantize_model(model, quant=args.quant), tok


def _zo_config(args: argparse.Namespace):
    from .recipe import TRAIN
    from .train import TrainConfig
    from .zo import ZOConfig

    # --lr auto: a placeholder until fine_tune's probe sets the chosen lr
    zo = ZOConfig(lr=TRAIN.lr if args.lr is None else args.lr, eps=args.eps, q=args.q, dist=args.dist,
                  direction=args.direction, optimizer=args.optimizer,
                  weight_decay=args.weight_decay, schedule=args.schedule, warmup=args.warmup, seed=args.seed)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                      eval_batch_size=args.eval_batch_size, loss=args.loss, keep_best=not args.keep_last,
                      fused_pm=args.fused_pm, zo=zo, lr_auto=args.lr is None)
    cfg.validate()
    return cfg


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if args.json:
        sys.stdout.write(json.dumps(obj) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


# ----------------------------------------------------------------------------- commands
# how a run is executed, not what it computes: never saved as run settings, free on --resume
_LAUNCH_ARGS = ("nproc", "parallel", "dist_timeout")
_REPORT_ARGS = ("plot", "tensorboard")  # what is written about a run, not what it computes: also free on --resume
_NOT_RUN_SETTINGS = ("func", "json", "verbose", "resume", *_LAUNCH_ARGS, *_REPORT_ARGS)  # never saved in config.json


def _resume_args(args: argparse.Namespace) -> argparse.Namespace:
    """The settings of the run in ``args.resume`` (its config.json); other flags are refused."""
    given = {k: v for k, v in vars(args).items() if k not in _NOT_RUN_SETTINGS}
    defaults = vars(build_parser().parse_args(["train"]))
    changed = sorted(k for k, v in given.items() if defaults.get(k) != v)
    if changed:
        raise SparseZOError(f"--resume takes every setting from {args.resume}/config.json; drop "
                            + ", ".join("--" + k.replace("_", "-") for k in changed))
    from .io import read_json

    run = Path(args.resume)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise SparseZOError(f"--resume {run}: no config.json there; is it a sparsezo run directory?")
    if (run / "delta.safetensors").exists():
        raise SparseZOError(f"--resume {run}: the run is already complete (delta.safetensors exists)")
    if not (run / "mask.safetensors").is_file():
        raise SparseZOError(f"--resume {run}: its mask.safetensors is missing; the run can only continue on the "
                            "mask it was trained with: restore the file, or start a new run")
    saved = read_json(cfg_path, "run config").get("args")
    if not saved:
        raise SparseZOError(f"--resume {run}: config.json has no recorded arguments; the run cannot be resumed")
    if not isinstance(saved, dict):
        raise SparseZOError(f"--resume {run}: config.json field 'args' is a {type(saved).__name__}, not an object; "
                            "restore the file")
    if isinstance(saved.get("fused_pm"), bool):  # written before --fused-pm took on/off/auto
        saved["fused_pm"] = "on" if saved["fused_pm"] else "off"
    for key, value in saved.items():  # each recorded setting must be one this version knows, of its type
        if key not in defaults:
            raise SparseZOError(f"--resume {run}: config.json records an unknown setting {key!r}; it was written by "
                                "another sparsezo version or edited")
        want = type(defaults[key])
        ok = (defaults[key] is None or value is None or isinstance(value, want)
              or (want is float and isinstance(value, int))) and not (isinstance(value, bool) and want is not bool)
        if not ok:
            raise SparseZOError(f"--resume {run}: config.json records {key} = {value!r:.40}, expected "
                                f"{want.__name__}; restore the file")
    resumed = argparse.Namespace(**dict(defaults, **saved))
    resumed.mask, resumed.out = str(run / "mask.safetensors"), str(run)  # never recompute the mask
    resumed.resume, resumed.json, resumed.func = args.resume, args.json, args.func
    for k in (*_LAUNCH_ARGS, *_REPORT_ARGS):  # any number of processes may continue a run
        setattr(resumed, k, getattr(args, k))
    return resumed


def _train_argv(args: argparse.Namespace) -> list[str]:
    """``args`` as a ``train`` command line again, for re-launching it under torchrun."""
    p = argparse.ArgumentParser()
    _add_train_args(p)
    argv = ["-v"] * bool(args.verbose) + ["train"]
    for a in p._actions:
        v = getattr(args, a.dest, None)
        if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS and v != a.default:
            argv += [a.option_strings[0]] if a.nargs == 0 else [a.option_strings[0], str(v)]
    return argv


def cmd_train(args: argparse.Namespace) -> None:
    """Train in this process, as one rank of a torchrun group, or re-launched as ``--nproc`` ranks."""
    from .distributed import check_split, init_from_env, launch

    if args.nproc < 1:
        raise SparseZOError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        run = _resume_args(args) if args.resume else args
        check_split(args.parallel, args.nproc, run.q, run.batch_size)  # before starting any process
        if run.lr is None:
            raise SparseZOError("--lr auto runs in one process; probe without --nproc, then pass the chosen --lr")
        launch(args.nproc, _train_argv(args))
        return
    dist = init_from_env(args.parallel, args.dist_timeout, args.device)
    try:
        if dist and args.nproc > 1 and dist.world != args.nproc:
            raise SparseZOError(f"--nproc {args.nproc} but torchrun started {dist.world} processes; "
                                "under torchrun leave --nproc out")
        _train(args, dist)
    finally:
        if dist:
            dist.close()


def _train(args: argparse.Namespace, dist) -> None:
    """One process's part of ``train`` (``dist``: its DistContext, or None when it runs alone).

    Rank 0 holds the run directory's lock from before the existence check to the last file,
    released however the run ends.
    """
    with contextlib.ExitStack() as held:
        _train_locked(args, dist, held)


def _train_locked(args: argparse.Namespace, dist, held: contextlib.ExitStack) -> None:
    """The body of :func:`_train`; the run lock it takes is released by ``held`` on any exit."""
    import shutil

    from .checkpoint import checkpoint_dirs, load_checkpoint, remove_checkpoints
    from .distributed import check_split
    from .evaluate import evaluate
    from .io import RunLock, atomic_dir, check_writable, read_json, write_json
    from .train import fine_tune, run_meta, save_run
    from .zo import TrainableParams

    is_main = dist is None or dist.is_main
    if args.resume:
        if is_main:  # before reading anything: a live run's files are moving under us
            held.callback(RunLock(args.resume).acquire("resume").release)
        args = _resume_args(args)
    _check_common(args)
    _absolute_paths(args)
    if args.plot:
        from .plot import require_matplotlib

        require_matplotlib()  # before training, not after it
    if getattr(args, "tensorboard", None):
        from .tensorboard import require_tensorboard

        require_tensorboard()
    cfg = _zo_config(args)
    if dist:
        check_split(dist.parallel, dist.world, cfg.zo.q, cfg.batch_size)
        args.device = str(dist.device) if args.device.startswith("cuda") else args.device
        if not is_main:
            log.setLevel(logging.WARNING)  # rank 0 reports for all
    out = Path(args.out or f"runs/{args.task}-{Path(args.mask).stem}-seed{args.seed}")
    if is_main and not args.resume:
        if out.exists():
            raise SparseZOError(f"output directory {out} already exists; choose another --out, remove it, "
                                f"or continue it with --resume {out}")
        check_writable(out, _run_bytes(args, cfg))  # now, not after the model has loaded
        held.callback(RunLock(out).acquire("write").release)
        if out.exists():  # another process created it while we were checking
            raise SparseZOError(f"output directory {out} was just created by another process; choose another --out")
    elif is_main:
        check_writable(out / "delta.safetensors", _run_bytes(args, cfg))
    task = _task(args)
    splits = _splits(args, task=task)
    if is_main or args.resume:  # other ranks wait for the mask rank 0 computes (e.g. Fisher scores: minutes)
        model, tok, mask = _model_and_mask(args, splits["train"])
    if is_main:
        meta = run_meta(cfg, model=_recorded_path(model.name_or_path), dtype=args.dtype, quant=args.quant,
                        task=args.task, task_options=_task_options(args), data_dir=args.data_dir, mask_rule=mask.rule,
                        density=mask.meta.get("density"), num_train=args.num_train, num_dev=args.num_dev,
                        num_test=args.num_test, split_sizes={k: len(v) for k, v in splits.items()})
        if dist:
            log.info("%d processes, %s-parallel", dist.world, dist.parallel)
    if is_main and not args.resume:  # the run directory exists from here on: config + mask first, then checkpoints
        saved_args = {k: v for k, v in vars(args).items() if k not in _NOT_RUN_SETTINGS}
        with atomic_dir(out) as tmp:
            mask.save(tmp / "mask.safetensors")
            write_json(tmp / "config.json", dict(meta, args=saved_args))
    if dist and not args.resume:
        dist.barrier("start-up (rank 0 computing the mask and creating the run directory)")
        if not is_main:  # the mask file rank 0 just wrote (the run directory must be shared by all nodes)
            args.mask = str(out / "mask.safetensors")
            model, tok, mask = _model_and_mask(args, splits["train"])
    params = TrainableParams(model, mask)
    log.info("training %d of %d eligible weights (%s)", mask.num_trainable, mask.num_eligible, mask.rule)
    state = None
    if args.resume:
        state = load_checkpoint(out)
        log.info("resuming %s from step %d", out, state.step) if state else log.warning(
            "no intact checkpoint in %s; starting it over", out)
    try:
        result = fine_tune(model, tok, params, splits["train"], splits["dev"], cfg, out / "metrics.jsonl", task=task,
                           run_dir=out, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                           resume=state, dist=dist, tensorboard=getattr(args, "tensorboard", None))
    except BaseException:
        if is_main and not args.resume and not checkpoint_dirs(out):
            shutil.rmtree(out, ignore_errors=True)  # nothing worth resuming: leave nothing behind
        elif is_main:
            log.error("run directory %s kept; continue it with: sparsezo train --resume %s", out, out)
        raise
    if not is_main:
        return  # rank 0 tests, saves and reports
    test = evaluate(model, tok, task, splits["test"], cfg.eval_batch_size, desc="test (best dev θ)")
    metric = test["metric"]  # accuracy, or f1 (+ em) for generation tasks
    results = {"task": args.task, "metric": metric,
               **{f"test_{k}": v for k, v in test.items() if k not in ("metric", "value", "n")},
               f"best_dev_{metric}": result.best_dev, "best_step": result.best_step,
               "steps": result.steps, "num_trainable": mask.num_trainable, "n_test": len(splits["test"]),
               "lr": cfg.zo.lr, **_learned(result, metric)}
    meta["zo"]["lr"] = cfg.zo.lr  # the probed one with --lr auto
    if result.lr_probe is not None:
        meta["lr_auto"] = result.lr_probe
    config = read_json(out / "config.json", "run config")
    config["results"] = dict(results, seconds=round(result.seconds, 2))
    config["zo"] = meta["zo"]
    if result.lr_probe is not None:
        config["lr_auto"] = result.lr_probe
    if args.resume:
        config["resumed"] = config.get("resumed", 0) + 1
    config["processes"] = {"world_size": dist.world, "parallel": dist.parallel} if dist else {"world_size": 1}
    save_run(out, params, result.trajectory, cfg.zo, dict(meta, results=results), config)
    remove_checkpoints(out)
    if args.plot:
        from .plot import plot_metrics

        log.info("curves -> %s", plot_metrics(out / "metrics.jsonl", out / "curves.png", title=str(out)))
    from .resources import memory_report

    mem = memory_report(args.device)
    _emit(args, dict(results, seconds=round(result.seconds, 2), out=str(out), **mem),
          f"{args.task}: test {metric} {test['value']:.4f} (best dev {result.best_dev:.4f} at step "
          f"{result.best_step}/{result.steps}, {result.seconds:.0f}s) -> {out}; {_memory_text(mem)}"
          + ("" if result.improved else "\nnothing was learned (see the warning above)"))


def _learned(result, metric: str) -> dict[str, Any]:
    """The fields that say whether a fine-tune learned anything (see :func:`sparsezo.train.improvement`)."""
    out = {"improved": result.improved, f"start_dev_{metric}": result.start_dev, "dev_noise": result.dev_noise}
    if result.lr_probe:
        out["lr_auto_forwards"] = result.lr_probe["forwards"]
    return out


def _eval_settings(args: argparse.Namespace, deltas: list) -> None:
    """Fill eval's options left unset from the first --delta's run, as merge and replay do: base model,
    dtype and quantization, and — unless --task names another task — the task, its data, split sizes
    and seed, so ``eval --delta RUN`` scores the fine-tune on what it was trained for. Without a delta
    (or for what the run did not record) the train defaults apply."""
    from .recipe import TRAIN

    run = deltas[0].meta if deltas else {}
    for name, other in zip(args.delta[1:], deltas[1:]):
        if other.meta.get("task") != run.get("task"):
            log.warning("--delta %s was trained on %s, --delta %s on %s; all are scored on one task", args.delta[0],
                        run.get("task"), name, other.meta.get("task"))
    same_task = args.task is None or args.task == run.get("task")
    if run.get("task") and not same_task:
        log.warning("evaluating a %s fine-tune (--delta %s) on --task %s; leave --task out to use the run's",
                    run["task"], args.delta[0], args.task)
    if run.get("task") and same_task:
        args.task = run["task"]
        if args.data_dir is None:
            args.data_dir = run.get("data_dir")
        if not _task_options(args):  # the run's user-task files and template, unless the flags give others
            for k, v in (run.get("task_options") or {}).items():
                setattr(args, k, v)
    recorded = {"model": run.get("model"), "dtype": run.get("dtype"), "quant": run.get("quant")}
    if same_task:
        recorded.update(num_train=run.get("num_train"), num_dev=run.get("num_dev"), num_test=run.get("num_test"),
                        seed=(run.get("zo") or {}).get("seed"))
    defaults = {"task": TRAIN.task, "model": None, "dtype": "bfloat16", "quant": None, "num_train": TRAIN.num_train,
                "num_dev": TRAIN.num_dev, "num_test": TRAIN.num_test, "seed": TRAIN.seed}
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, recorded.get(key) if recorded.get(key) is not None else default)
    if args.model is not None:
        from .models import check_model_path

        where = f"base model (recorded in {args.delta[0]}; pass --model DIR to override)" if deltas else "--model"
        check_model_path(args.model, where)


def cmd_eval(args: argparse.Namespace) -> None:
    """Score the base model or each --delta on one loaded base, each pass with its own progress bar."""
    from .checkpoint import load_delta
    from .evaluate import evaluate
    from .tasks.icl import with_demonstrations

    _check_common(args)
    deltas = [load_delta(d) for d in args.delta]
    _eval_settings(args, deltas)
    task = _task(args)
    splits = _splits(args, train=args.split == "dev" or args.icl > 0, task=task)
    examples = with_demonstrations(splits[args.split], splits["train"], args.icl, args.seed)
    model, tok = _eval_model(args, deltas)
    split = args.split + (f"/{args.icl}-shot" if args.icl else "")
    rows = []
    for name, delta in [(None, None)] if not deltas else zip(args.delta, deltas):
        applied = delta.apply(model) if delta is not None else None
        res = evaluate(model, tok, task, examples, args.eval_batch_size, args.max_new_tokens,
                       desc=f"{args.task} {split}" + (f" {name}" if name else ""))
        rows.append({"task": args.task, "split": args.split, "icl": args.icl, **res, "delta": name})
        if applied is not None:
            applied.remove()  # the next delta starts from the base again
    if args.json:
        _emit(args, rows[0] if len(rows) == 1 else {"results": rows, **rows[0]}, "")
        return
    w = max(6, len(split))
    lines = [f"{'task':8} {'split':{w}} {'n':>5} {'metric':9} {'value':>7}  delta"]
    lines += [f"{r['task']:8} {split:{w}} {r['n']:>5} {m:9} {r[m]:7.4f}  {r['delta'] or '-'}"
              for r in rows for m in ("accuracy", "f1", "em") if m in r]
    _emit(args, {}, "\n".join(lines))


def cmd_demo(args: argparse.Namespace) -> None:
    """The DEMO recipe end to end; with --out a run directory like train's (config, metrics, mask, ...)."""
    import contextlib

    from tqdm import tqdm

    from .io import atomic_dir
    from .masks import compute_mask
    from .masks.sensitive import read_texts
    from .models import load_model
    from .quant import quantize_model
    from .recipe import DEMO
    from .scoring import accuracy
    from .tasks.embedded import demo_calibration_file, demo_task
    from .train import TrainConfig, fine_tune, run_meta, save_run
    from .zo import TrainableParams, ZOConfig

    if args.out and Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    _absolute_paths(args)
    t0 = time.perf_counter()
    splits = demo_task().splits(args.seed, DEMO.num_train, args.num_dev, DEMO.num_test)
    calib = demo_calibration_file(args.calib_tokens).resolve()
    model, tok = load_model(args.model, args.dtype, args.device)
    mask = compute_mask(model, DEMO.mask, args.density, tokenizer=tok, texts=read_texts(calib), source=str(calib),
                        seed=args.seed, calib_tokens=args.calib_tokens, seq_len=DEMO.calib_seq_len)
    if args.quant:
        quantize_model(model, mask, quant=args.quant)

    def test_accuracy(what: str) -> float:
        with tqdm(total=len(splits["test"]), desc=f"test ({what})", unit="ex", leave=False, dynamic_ncols=True) as bar:
            return accuracy(model, tok, splits["test"], DEMO.eval_batch_size, progress=bar)

    zero = test_accuracy("zero-shot")
    log.info("zero-shot test accuracy %.4f", zero)
    params = TrainableParams(model, mask)
    cfg = TrainConfig(steps=args.steps, batch_size=DEMO.batch_size, eval_every=args.eval_every,
                      eval_batch_size=DEMO.eval_batch_size, lr_auto=args.lr is None,
                      zo=ZOConfig(lr=DEMO.lr if args.lr is None else args.lr, eps=args.eps, seed=args.seed))
    meta = run_meta(cfg, model=_recorded_path(model.name_or_path), dtype=args.dtype, quant=args.quant,
                    task=DEMO.task, task_options={}, data_dir=None, recipe="demo", mask_rule=mask.rule,
                    density=args.density, calib=str(calib), calib_tokens=args.calib_tokens,
                    calib_seq_len=DEMO.calib_seq_len, num_train=DEMO.num_train, num_dev=args.num_dev,
                    num_test=DEMO.num_test, split_sizes={k: len(v) for k, v in splits.items()})
    # with --out everything is written into a temporary directory that becomes --out only on success
    with atomic_dir(args.out) if args.out else contextlib.nullcontext() as tmp:
        res = fine_tune(model, tok, params, splits["train"], splits["dev"], cfg,
                        metrics_path=tmp / "metrics.jsonl" if tmp else None)
        tuned = test_accuracy("fine-tuned")
        seconds = time.perf_counter() - t0
        meta["zo"]["lr"] = cfg.zo.lr  # the probed one with --lr auto
        if res.lr_probe is not None:
            meta["lr_auto"] = res.lr_probe
        if tmp:  # a run directory like train's: mask, trajectory, delta, config, metrics
            meta["results"] = {"task": DEMO.task, "metric": "accuracy", "test_accuracy": tuned,
                               "zero_shot_accuracy": zero, "best_step": res.best_step, "steps": args.steps,
                               **_learned(res, "accuracy")}
            mask.save(tmp / "mask.safetensors")
            save_run(tmp, params, res.trajectory, cfg.zo, meta, dict(meta, results=dict(meta["results"],
                                                                                          seconds=round(seconds, 1))))
    obj = {"task": DEMO.task, "model": meta["model"], "zero_shot_accuracy": zero, "finetuned_accuracy": tuned,
           "steps": args.steps, "best_step": res.best_step, "lr": cfg.zo.lr, **_learned(res, "accuracy"),
           "eps": args.eps, "density": args.density,
           "num_trainable": mask.num_trainable, "n_test": len(splits["test"]), "quant": args.quant,
           "seconds": round(seconds, 1)}
    if args.out:
        obj["out"] = args.out
    _emit(args, obj, f"SST-2 test accuracy: zero-shot {zero:.1%} -> fine-tuned {tuned:.1%} "
                     f"({mask.num_trainable} sensitive weights, {args.steps} ZO steps, {seconds:.0f}s)")


def cmd_plot(args: argparse.Namespace) -> None:
    """Curves of any run with a metrics.jsonl: finished, interrupted or still training."""
    from .plot import plot_metrics

    run = Path(args.run_dir)
    out = plot_metrics(run / "metrics.jsonl", Path(args.out) if args.out else run / "curves.png", title=str(run))
    _emit(args, {"out": str(out)}, f"loss and dev curves of {run} -> {out}")


def _delta_base(args: argparse.Namespace, delta):
    """The base model a delta was trained on (its recorded path, dtype and quantization unless overridden)."""
    from .models import load_model

    dtype = args.dtype or delta.meta.get("dtype", "bfloat16")
    model = args.model or delta.meta.get("model")
    if model is not None:
        from .models import check_model_path

        check_model_path(model, "base model (pass --model DIR or FILE.gguf to override)")
    quant = delta.meta.get("quant")
    return load_model(model, dtype, args.device, quant=quant, mask=delta.mask if quant else None)


def cmd_replay(args: argparse.Namespace) -> None:
    from .checkpoint import Delta
    from .masks import Mask
    from .replay import replayed_delta, run_files
    from .zo import Trajectory

    from .io import check_writable

    if Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    mask_path, traj_path = run_files(args.run_dir, args.mask, args.trajectory)
    mask, traj = Mask.load(mask_path), Trajectory.load(traj_path)
    if "zo" not in traj.meta:
        raise SparseZOError(f"trajectory {traj_path} records no ZO settings ('zo' in its header): it is not a "
                            "finished run's trajectory; replay the run's trajectory.safetensors")
    out = Path(args.out)
    out = out / "delta.safetensors" if out.suffix != ".safetensors" else out
    check_writable(out, 8 * mask.num_trainable + (64 << 10))
    info = Delta(mask, {}, traj.meta.get("delta_meta", {}))
    if args.dtype is None:
        args.dtype = traj.meta.get("dtype")
    model, _ = _delta_base(args, info)
    t0 = time.perf_counter()
    delta = replayed_delta(model, mask, traj)
    seconds = time.perf_counter() - t0
    delta.save(out)
    steps = traj.meta.get("best_step", len(traj))
    _emit(args, {"out": str(out), "steps": steps, "seconds": round(seconds, 3), "trajectory_bytes": traj_path.stat().st_size},
          f"replayed {steps} steps of {traj_path} in {seconds:.2f}s -> {out}")


def _delta_is_base(model, delta) -> bool:
    """True when every trained value equals the base's (the run kept step 0: nothing was learned).

    Then merge/export write the base model under a new name; say so rather than "merged N weights".
    One tensor at a time over the k trained entries (no θ-sized copy); the model is not modified.
    """
    import torch

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


def cmd_merge(args: argparse.Namespace) -> None:
    from .checkpoint import load_delta
    from .export import save_merged

    if Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    from .io import check_writable
    from .models import checkpoint_bytes
    from .resources import memory_report

    delta = load_delta(args.delta)
    base = args.model or delta.meta.get("model")
    check_writable(args.out, checkpoint_bytes(base, args.dtype or delta.meta.get("dtype", "bfloat16")) if base and
                   Path(base).is_dir() else 0)  # the merged weights, before the base is loaded
    model, tok = _delta_base(args, delta)
    t0 = time.perf_counter()
    unchanged = _delta_is_base(model, delta)
    nbytes = save_merged(model, tok, args.out, delta=delta)  # streamed: the base is never modified
    mem = memory_report(args.device)
    _emit(args, {"out": args.out, "num_trained": delta.mask.num_trainable, "quant_base": delta.meta.get("quant"),
                 "delta_is_base": unchanged,
                 "weight_bytes": nbytes, "seconds": round(time.perf_counter() - t0, 2), **mem},
          f"merged {delta.mask.num_trainable} trained weights into {model.name_or_path}"
          f"{' (dequantized 4-bit base)' if delta.meta.get('quant') else ''} -> {args.out}; {_memory_text(mem)}")


def cmd_export(args: argparse.Namespace) -> None:
    """base + delta in another tool's format (see :mod:`sparsezo.exporters`); the base is never modified."""
    from .checkpoint import load_delta
    from .exporters import EXPORTERS
    from .io import check_writable

    if Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    if args.type is not None and args.format != "gguf":
        raise SparseZOError(f"--type {args.type} applies to --format gguf only; drop it for --format {args.format}")
    check_writable(args.out)
    delta = load_delta(args.delta)
    model, tok = _delta_base(args, delta)
    t0 = time.perf_counter()
    exporter = EXPORTERS[args.format]
    unchanged = _delta_is_base(model, delta)
    info = exporter.write(model, tok, delta, args.out, {"type": args.type})
    info.update(num_trained=delta.mask.num_trainable, quant_base=delta.meta.get("quant"), delta_is_base=unchanged,
                seconds=round(time.perf_counter() - t0, 2))
    _emit(args, info, exporter.describe(info))


def cmd_info(args: argparse.Namespace) -> None:
    from .models import checkpoint_bytes

    from .io import json_field, read_json
    from .models import DTYPES

    run = Path(args.run_dir)
    if not (run / "config.json").is_file():
        raise SparseZOError(f"{run} is not a sparsezo run directory (no config.json)")
    where = f"run config {run / 'config.json'}"
    config = read_json(run / "config.json", "run config")
    for key in ("task", "mask_rule", "model", "dtype"):
        json_field(config, key, str, where, optional=True)
    train_cfg = json_field(config, "train", dict, where, optional=True) or {}
    json_field(train_cfg, "steps", int, f"{where}: train", optional=True)
    json_field(config, "results", dict, where, optional=True)
    files = {name: run / f"{name}.safetensors" for name in ("trajectory", "delta", "mask")}
    sizes = {f"{k}_bytes": p.stat().st_size for k, p in files.items() if p.is_file()}
    dtype = config.get("dtype") or "bfloat16"
    if dtype not in DTYPES:
        raise SparseZOError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}; restore the file")
    try:
        sizes["full_model_bytes"] = checkpoint_bytes(config.get("model"), dtype)
    except (SparseZOError, OSError) as e:
        log.warning("full model size unknown: %s", e)
    except Exception as e:  # safetensors' own error type: a damaged model file is not info's failure
        log.warning("full model size unknown: the model's weights are unreadable (%s)", e)
    obj = {"run_dir": str(run), "task": config.get("task"), "mask_rule": config.get("mask_rule"), "dtype": dtype,
           "steps": train_cfg.get("steps"), "results": config.get("results"), **sizes,
           "complete": (run / "delta.safetensors").is_file()}
    lines = [f"{run}: {obj['task']}, {obj['mask_rule']} mask, {obj['steps']} steps"
             f"{'' if obj['complete'] else ' (incomplete: resume with sparsezo train --resume ' + str(run) + ')'}"]
    lines += [f"  {k[:-6]:>11}: {_human(v):>10}  ({v} bytes)" for k, v in sizes.items()]
    _emit(args, obj, "\n".join(lines))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def cmd_quantize(args: argparse.Namespace) -> None:
    """With a mask file, quantize straight from the checkpoint (the model is never loaded); with a
    rule, the mask needs the full-precision model, which is then quantized in place and saved."""
    from .io import check_writable
    from .masks import RULES, Mask
    from .models import DTYPES, checkpoint_bytes, checkpoint_fingerprint, resolve_model_path
    from .quant import is_quantized_folder, quantize_folder, save_quantized, weight_bytes
    from .resources import memory_report

    _check_common(args)
    if Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    args.quant = args.quant or "nf4"
    t0 = time.perf_counter()
    folder = resolve_model_path(args.model)
    check_writable(args.out, checkpoint_bytes(folder, args.dtype) // 3)  # 4-bit linears + 16-bit rest, roughly
    if args.mask not in RULES and Path(args.mask).is_file() and not is_quantized_folder(folder):
        mask = Mask.load(args.mask)
        if "fingerprint" in mask.meta:  # the mask must be this model's: checked on a header-only skeleton
            checkpoint_fingerprint(folder, args.dtype, check=mask.meta["fingerprint"], what="mask")
        wb = quantize_folder(folder, mask, args.out, DTYPES[args.dtype], quant=args.quant)
    else:
        splits = _splits(args) if args.mask == "sensitive-task" else None
        model, tok, mask = _model_and_mask(args, splits["train"] if splits else None)
        save_quantized(model, tok, args.out, mask)
        wb = weight_bytes(model)
    mem = memory_report(args.device)
    _emit(args, dict(wb, out=args.out, num_trainable=mask.num_trainable, quant=args.quant,
                     seconds=round(time.perf_counter() - t0, 2), **mem),
          f"{args.quant} model with {mask.num_trainable} exact trainable entries ({mask.rule}): "
          f"{wb['total'] / 2**20:.1f} MiB of weights ({wb['quantized'] / 2**20:.1f} MiB 4-bit layers) -> {args.out}; "
          f"{_memory_text(mem)}")


def _bench_compare(args: argparse.Namespace) -> None:
    """``bench --compare``: unfused vs fused step for each base in turn, one model loaded at a time."""
    import gc

    from .bench import bench_fused

    bases = [b.strip() for b in args.compare.split(",") if b.strip()]
    bad = [b for b in bases if b not in ("bf16", "nf4", "int4")]
    if not bases or bad:
        raise SparseZOError(f"--compare takes a comma-separated list of bf16, nf4, int4; got {args.compare!r}")
    results: dict[str, dict] = {}
    for base in bases:
        args.quant = None if base == "bf16" else base
        model, _, mask = _model_and_mask(args)
        results[base] = bench_fused(model, mask, args.batch, args.seq_len, args.steps, args.eps, args.dist)
        del model, mask
        gc.collect()
    res = {"compare": results, "batch": args.batch, "seq_len": args.seq_len, "mask": args.mask, "dtype": args.dtype,
           "model": str(args.model or "default")}
    first = results[bases[0]]["forward_ms"]
    lines = [f"batch {args.batch} x {args.seq_len} tokens, {args.dtype}, mask {args.mask}; ratios from interleaved medians",
             f"{'base':5} {'forward ms':>10} {'vs ' + bases[0]:>8} {'step ms':>9} {'step/2fwd':>9} {'fused ms':>9} "
             f"{'fused/2fwd':>10} {'fused/step':>10}"]
    lines += [f"{b:5} {r['forward_ms']:10.1f} {r['forward_ms'] / first:8.2f} {r['step_ms']:9.1f} "
              f"{r['step_over_two_forwards']:9.3f} {r['fused_step_ms']:9.1f} {r['fused_over_two_forwards']:10.3f} "
              f"{r['fused_over_step']:10.3f}" for b, r in results.items()]
    _emit(args, res, "\n".join(lines))


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import bench

    _check_common(args)
    if args.compare:
        _bench_compare(args)
        return
    model, _, mask = _model_and_mask(args)
    res = bench(model, mask, args.batch, args.seq_len, args.steps, args.eps, args.dist, args.baseline)
    res.update(model=str(model.name_or_path), mask=mask.rule, quant=args.quant)
    rows = [("sparsezo", res)] + ([("mezo", res["baseline"])] if "baseline" in res else [])
    lines = [f"{mask.rule} mask, {res['trainable']} trainable, batch {args.batch} x {args.seq_len} tokens, {res['device']}, "
             f"{res['dtype']}{', ' + args.quant if args.quant else ''}",
             f"{'':9} {'forward ms':>10} {'step ms':>9} {'step/2fwd':>9} {'perturb ms':>10} {'peak MiB':>9} {'tokens/s':>9}"]
    lines += [f"{n:9} {r['forward_ms']:10.1f} {r['step_ms']:9.1f} {r['step_over_two_forwards']:9.3f} "
              f"{r['perturb_ms']:10.2f} {r['peak_memory_bytes'] / 2**20:9.0f} {r['tokens_per_s']:9.0f}" for n, r in rows]
    lines.append(_memory_text(res) + " — the anonymous figure is what must fit; mapped checkpoint pages are evictable")
    _emit(args, res, "\n".join(lines))


def cmd_mask_compute(args: argparse.Namespace) -> None:
    from .resources import memory_report

    from .io import check_writable

    _check_common(args)
    if Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    check_writable(args.out)  # before the model loads and the scores take minutes
    splits = _splits(args) if args.mask == "sensitive-task" else None
    model, tok = _load(args)
    mask = _mask(args, model, tok, splits["train"] if splits else None)
    mask.save(args.out)
    info = {k: mask.meta.get(k) for k in ("rule", "density", "scope", "num_trainable", "num_eligible", "source")}
    info.update(mask.stats, **memory_report(args.device), out=args.out)
    text = (f"{mask.rule}: {mask.num_trainable} of {mask.num_eligible} weights in {mask.stats['seconds']:.1f}s, "
            f"{_memory_text(info)} -> {args.out}")
    if "fisher_mass" in mask.stats:
        text += "\nFisher mass held by the top d: " + ", ".join(f"{d}: {m:.3f}" for d, m in mask.stats["fisher_mass"].items())
    _emit(args, info, text)


def _memory_text(report: dict[str, Any]) -> str:
    """'peak memory 1.23 GiB (anonymous; RSS with mapped files 4.56 GiB)' from a memory_report."""
    kind = {"anon": "anonymous", "rss": "RSS", "cuda_max_allocated": "CUDA max allocated"}[report["peak_memory_kind"]]
    rss = "" if report["peak_memory_kind"] == "rss" else f"; RSS with mapped files {report['peak_rss_bytes'] / 2**30:.2f} GiB"
    return f"peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB ({kind}{rss})"


def _by_layer(rows: dict[str, Any]) -> list[tuple[str, Any]]:
    """Per-layer rows in model order (0, 1, 2, ..., 10, not 0, 1, 10 as strings sort); rows of tensors
    outside the decoder layers (key "None") last."""
    return sorted(rows.items(), key=lambda kv: (0, int(kv[0]), "") if kv[0].isdigit() else (1, 0, kv[0]))


def cmd_mask_info(args: argparse.Namespace) -> None:
    from .masks import Mask
    from .masks.analysis import density_table, plot_layer_density

    mask = Mask.load(args.file)
    table = density_table(mask)
    if args.plot:
        plot_layer_density(mask, args.plot)
    obj = {"rule": mask.rule, "density": mask.meta.get("density"), "scope": mask.meta.get("scope"),
           "source": mask.meta.get("source"), "num_trainable": mask.num_trainable, "num_eligible": mask.num_eligible,
           **table}
    lines = [f"{'group':>14} {'trainable':>10} {'numel':>11} {'density':>9}"]
    for kind in ("layers", "modules"):
        rows = _by_layer(table[kind]) if kind == "layers" else table[kind].items()
        lines += [f"{kind[:-1] + ' ' + k:>14} {r['trainable']:>10} {r['numel']:>11} {r['density']:9.5f}"
                  for k, r in rows]
    lines.append(f"{'total':>14} {mask.num_trainable:>10} {mask.num_eligible:>11} "
                 f"{mask.num_trainable / mask.num_eligible:9.5f}   rule {mask.rule}, scope {mask.meta.get('scope')}")
    _emit(args, obj, "\n".join(lines))


def cmd_mask_compare(args: argparse.Namespace) -> None:
    from .masks import Mask
    from .masks.analysis import compare

    res = compare(Mask.load(args.a), Mask.load(args.b))
    lines = [f"Jaccard overlap {res['jaccard']:.4f} ({res['intersection']} shared of {res['a']} and {res['b']})"]
    lines += [f"  layer {k:>3}: {v:.4f}" for k, v in _by_layer(res["layers"])]
    lines += [f"  {k:>9}: {v:.4f}" for k, v in res["modules"].items()]
    _emit(args, res, "\n".join(lines))


def cmd_mask_mass(args: argparse.Namespace) -> None:
    from .masks import sensitivity_scores
    from .masks.analysis import fisher_mass

    _check_common(args)
    if args.mask not in ("sensitive", "sensitive-task"):
        raise SparseZOError("mask mass needs --mask sensitive (calibration text) or sensitive-task")
    splits = _splits(args) if args.mask == "sensitive-task" else None
    model, tok = _load(args)
    texts, source = _calibration(args, splits["train"] if splits else None)
    scores = sensitivity_scores(model, tok, texts, include=args.include, exclude=args.exclude,
                                calib_tokens=args.calib_tokens, seq_len=args.calib_seq_len)
    mass = fisher_mass(scores)
    _emit(args, {"source": source, "mass": mass},
          "\n".join([f"{'density':>8} {'Fisher mass':>11}"] + [f"{d:>8} {m:11.4f}" for d, m in mass.items()]))


# ----------------------------------------------------------------------------- parser
def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p), _add_task_args(p), _add_mask_args(p), _add_zo_args(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/TASK-MASK-seedN); must not exist")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between crash-safe checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="checkpoints kept while training")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its newest intact checkpoint (all settings from RUN_DIR)")
    p.add_argument("--plot", action="store_true",
                   help="also write RUN/curves.png: loss and dev curves from metrics.jsonl (needs matplotlib)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also log loss, projected gradient, lr and dev metrics to TensorBoard event files in DIR "
                        "(needs the tensorboard package: the [tensorboard] extra)")
    g = p.add_argument_group("several processes (torchrun)")
    g.add_argument("--nproc", type=int, default=1,
                   help="run as N processes on this machine (re-launched through torchrun); under torchrun leave it out")
    g.add_argument("--parallel", default="data", choices=["data", "query"],
                   help="data: each process scores its share of the batch; query: each process measures its "
                        "share of the --q queries (bit-identical to one process)")
    g.add_argument("--dist-timeout", type=float, default=1800,
                   help="seconds a process waits for the others before failing (must cover rank 0's mask computation)")


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    """demo: the recipe of :data:`sparsezo.recipe.DEMO` (train's, shortened to minutes), a few knobs open."""
    from .recipe import DEMO

    _add_model_args(p)
    p.add_argument("--steps", type=int, default=DEMO.steps, help="ZO steps (train's default: 1000)")
    p.add_argument("--lr", type=_lr_value, default=DEMO.lr, help=LR_HELP)
    p.add_argument("--eps", type=float, default=DEMO.eps, help="perturbation scale")
    p.add_argument("--density", type=float, default=DEMO.density, help="fraction of eligible weights trained")
    p.add_argument("--eval-every", type=int, default=DEMO.eval_every, help="steps between dev evaluations")
    p.add_argument("--num-dev", type=int, default=DEMO.num_dev,
                   help="dev examples for model selection (train's default: 500)")
    p.add_argument("--calib-tokens", type=int, default=DEMO.calib_tokens,
                   help="WikiText-2 tokens for the Fisher scores (train's default: 32768)")
    p.add_argument("--seed", type=int, default=DEMO.seed, help="seeds data sampling and the ZO noise")
    p.add_argument("--out", default=None,
                   help="also save the run (mask, trajectory, delta, config, metrics) in this folder (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsezo", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logs on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, about: str, parent=sub) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=about, description=about, formatter_class=_HelpFormatter)

    p = command("train", "ZO fine-tune on a task; writes delta.safetensors, config.json, metrics.jsonl")
    p.description += (". Defaults are the recipe sparsezo.recipe.TRAIN; sparsezo demo runs the same recipe "
                      "shortened (400 steps, 200 dev examples, 8192 calibration tokens)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = command("eval", "accuracy (or F1) of the base model, or of base + --delta; with --delta the base model, "
                        "task and data default to the run's")
    _add_model_args(p, from_run=True), _add_task_args(p, kind="eval")
    p.add_argument("--delta", action="append", default=[],
                   help="run directory or delta.safetensors (repeatable; default: none, the base model alone)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="examples per forward")
    p.set_defaults(func=cmd_eval)

    p = command("demo", "zero-shot -> sensitive sparse ZO fine-tune -> test, on SST-2 and the default model "
                        "(the recipe of sparsezo.recipe.DEMO: train's, with 400 steps, 200 dev examples and "
                        "8192 calibration tokens)")
    _add_demo_args(p)
    p.set_defaults(func=cmd_demo)

    p = command("quantize", "save a 4-bit (NF4 or int4) base whose mask entries stay exact (reload with --model DIR)")
    _add_model_args(p, quant=False), _add_mask_args(p), _add_task_args(p, kind="mask")
    p.add_argument("--quant", default="nf4", choices=["nf4", "int4"],
                   help="4-bit format: nf4 (bitsandbytes) or int4 (PyTorch's int4 kernels, fast on CPU) (default: nf4)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_quantize)

    p = command("replay", "rebuild a run's delta from its seed trajectory (no data, no forwards)")
    p.add_argument("run_dir", nargs="?", default=None, help="run directory with mask.safetensors and trajectory.safetensors")
    p.add_argument("--out", required=True, help="output delta.safetensors (or a folder for it)")
    p.add_argument("--mask", default=None, help="mask file (default: RUN_DIR/mask.safetensors)")
    p.add_argument("--trajectory", default=None, help="trajectory file (default: RUN_DIR/trajectory.safetensors)")
    _add_run_base_args(p)
    p.set_defaults(func=cmd_replay)

    p = command("merge", "write base + delta as a plain Hugging Face model folder")
    p.add_argument("--delta", required=True, help="run directory or delta.safetensors")
    p.add_argument("--out", required=True, help="output model folder")
    _add_run_base_args(p)
    p.set_defaults(func=cmd_merge)

    from .export_gguf import TYPES as GGUF_TYPES
    from .exporters import EXPORTERS

    p = command("export", "write base + delta for another tool: a GGUF file for llama.cpp (--format gguf) or a "
                          "PEFT adapter (--format peft); plain Hugging Face folders: sparsezo merge")
    p.add_argument("--format", required=True, choices=list(EXPORTERS),
                   help="; ".join(f"{k}: {e.help}" for k, e in EXPORTERS.items()))
    p.add_argument("--delta", required=True, help="run directory or delta.safetensors")
    p.add_argument("--out", required=True, help="output file (gguf) or folder (peft)")
    p.add_argument("--type", default=None, choices=list(GGUF_TYPES),
                   help="GGUF storage type of the 2-D weights (norms stay f32); q8_0 halves the file and kept a "
                        "0.1%% SST-2 fine-tune's accuracy in llama.cpp (README) (default: f16)")
    _add_run_base_args(p)
    p.set_defaults(func=cmd_export)

    p = command("info", "sizes of a run's files: trajectory, delta, mask, full model")
    p.add_argument("run_dir", help="run directory written by train or demo --out")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=cmd_info)

    p = command("plot", "loss and dev curves of a run as a PNG, from its metrics.jsonl (needs matplotlib)")
    p.add_argument("run_dir", help="run directory written by train or demo --out")
    p.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=cmd_plot)

    p = command("bench", "time a ZO step against two forward passes (JSON with --json)")
    _add_model_args(p)
    p.add_argument("--mask", default="random", help="a mask file or a rule that needs no data (random, magnitude-*, full)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random mask, the batch and the noise")
    p.add_argument("--density", type=float, default=1e-3, help="fraction of eligible weights in the mask")
    p.add_argument("--scope", default="global", choices=["global", "per-tensor"],
                   help="top-k over all eligible tensors at once, or the same fraction of each tensor")
    p.set_defaults(task=None, calib=None, calib_tokens=32768, calib_seq_len=256, include=None, exclude=None)
    p.add_argument("--batch", type=int, default=16, help="rows of the synthetic batch")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row of the synthetic batch")
    p.add_argument("--steps", type=int, default=10, help="measured steps (medians are reported)")
    p.add_argument("--eps", type=float, default=1e-2, help="perturbation scale")
    p.add_argument("--dist", default="gaussian", choices=["gaussian", "rademacher"], help="distribution of z")
    p.add_argument("--baseline", default=None, choices=["mezo"],
                   help="also time MeZO's per-tensor loop, side by side (default: none)")
    p.add_argument("--compare", default=None, metavar="BASES",
                   help="comma-separated bases among bf16,int4,nf4: for each in turn (one loaded at a time), the "
                        "forward, the unfused step and the fused ±ε step (--fused-pm), interleaved; --quant is ignored "
                        "(default: a single sparsezo step vs two forwards)")
    p.set_defaults(func=cmd_bench)

    pm = command("mask", "compute and inspect masks").add_subparsers(dest="mask_command", required=True,
                                                                      metavar="SUBCOMMAND")
    p = command("compute", "compute a mask file (prints time, peak memory, Fisher mass)", pm)
    _add_model_args(p, quant=False), _add_mask_args(p), _add_task_args(p, kind="mask")
    p.add_argument("--out", required=True, help="output mask.safetensors")
    p.set_defaults(func=cmd_mask_compute)
    p = command("info", "per-layer and per-module density of a mask file", pm)
    p.add_argument("file", help="mask.safetensors")
    p.add_argument("--plot", default=None, help="also write a per-layer density chart (PNG) here (default: none)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=cmd_mask_info)
    p = command("compare", "Jaccard overlap of two mask files, overall and per layer/module", pm)
    p.add_argument("a", help="first mask.safetensors")
    p.add_argument("b", help="second mask.safetensors")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=cmd_mask_compare)
    p = command("mass", "share of the total Fisher score held by the top d of weights", pm)
    _add_model_args(p, quant=False), _add_mask_args(p, selection=False), _add_task_args(p, kind="mask")
    p.set_defaults(func=cmd_mask_mass)
    return parser


_SIGNALS = ("SIGTERM", "SIGHUP")  # what schedulers, `timeout` and a closed terminal send: unwind like Ctrl-C


@contextlib.contextmanager
def _signals_unwind() -> Any:
    """While a command runs, SIGTERM/SIGHUP raise :class:`Interrupted` (clean-up and checkpoints as for Ctrl-C)."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum, signal.Signals(signum).name)

    previous = {}
    if _in_main_thread():
        for name in _SIGNALS:
            if hasattr(signal, name):
                previous[name] = signal.signal(getattr(signal, name), handler)
    try:
        yield
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)


def _in_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread (main() may be called from others)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _user_failure(e: BaseException) -> str | None:
    """The one-line message for a failure caused by the environment rather than by sparsezo, else None."""
    import torch

    if isinstance(e, SparseZOError):
        return " ".join(str(e).split("\n"))
    if isinstance(e, OSError):
        return str(from_os_error(e))
    if isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", MemoryError)):
        return ("out of memory (" + (" ".join(str(e).split())[:120] or type(e).__name__) + "); lower --batch-size or "
                "--eval-batch-size, use --dtype bfloat16 or --quant nf4, or a machine with more memory")
    code = os_errno_in(str(e)) if type(e).__name__ == "SafetensorError" else None
    if code is not None:  # safetensors reports I/O failures in its own exception type
        return f"cannot read or write a safetensors file ({os.strerror(code)}); {os_hint(code)}"
    return None


def _parse_args(argv: list[str] | None) -> argparse.Namespace | None:
    """Parsed arguments, or None after argparse's error has been shown as the one ``sparsezo: error:`` line.

    argparse prints the whole usage block and its own ``sparsezo CMD: error:`` prefix; a bad flag
    is bad input like any other, so it gets the same one line (naming --help for the usage).
    ``--help`` and warnings printed while parsing pass through unchanged.
    """
    import io

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = build_parser().parse_args(argv)
    except SystemExit as e:
        errors = [line for line in captured.getvalue().splitlines() if ": error: " in line]
        if e.code != 2 or not errors:
            sys.stderr.write(captured.getvalue())
            raise
        prog, message = errors[-1].split(": error: ", 1)
        sys.stderr.write(f"sparsezo: error: {message}; see `{prog} --help`\n")
        return None
    sys.stderr.write(captured.getvalue())
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 on success, 2 on a user-caused failure (one line), 130/143/129 when interrupted,
    1 on an internal bug (with its traceback)."""
    args = _parse_args(argv)
    if args is None:
        return 2
    if getattr(args, "dtype", None) == "auto":
        from .dtypes import resolve_dtype

        args.dtype = resolve_dtype(args.dtype, args.device)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # sub-second loads; keeps stderr to our own bars and one-line errors
    from .resources import start_memory_tracking

    start_memory_tracking()  # peak anonymous memory, for the reports of mask compute, bench, quantize, merge
    try:
        with _signals_unwind():
            args.func(args)
    except (KeyboardInterrupt, Interrupted) as e:
        name = e.name if isinstance(e, Interrupted) else "SIGINT"
        sys.stderr.write(f"sparsezo: interrupted ({name})\n")
        return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
    except Exception as e:
        message = _user_failure(e)
        if message is None:
            traceback.print_exc()
            sys.stderr.write("sparsezo: internal error: this is a bug in sparsezo, not a problem with your input; "
                             "please report it with the traceback above\n")
            return 1
        sys.stderr.write(f"sparsezo: error: {message}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
