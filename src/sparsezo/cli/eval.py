"""``sparsezo eval``: accuracy (or F1) of the base model or of base + each --delta, on one loaded base."""

from __future__ import annotations

import argparse
import logging

from ..eval.evaluate import evaluate
from ..eval.truncation import DEFAULT_SIDE, set_truncation_side
from ..model.load import build_model
from ..model.resolve import check_model_path
from ..tasks.icl import with_demonstrations
from ..training.checkpoint import load_delta
from ..training.recipe import TRAIN
from .common import check_common, check_readable, emit, splits_of, task_of, task_options
from .options import add_command, add_model_args, add_task_args

log = logging.getLogger("sparsezo")


def register(sub) -> None:
    p = add_command(sub, "eval", "accuracy (or F1) of the base model, or of base + --delta; with --delta the base "
                                 "model, task and data default to the run's")
    add_model_args(p, from_run=True), add_task_args(p, kind="eval")
    p.add_argument("--delta", action="append", default=[],
                   help="run directory or delta.safetensors (repeatable; default: none, the base model alone)")
    p.add_argument("--no-base", action="store_true",
                   help="with --delta, skip the base model's row (by default the base is scored first, for comparison)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="examples per forward")
    p.set_defaults(func=run)


def fill_from_run(args: argparse.Namespace, deltas: list) -> None:
    """Fill eval's options left unset from the first --delta's run, as merge and replay do: base model,
    dtype, quantization and truncation side, and — unless --task names another task — the task, its data, split sizes
    and seed, so ``eval --delta RUN`` scores the fine-tune on what it was trained for. Without a delta
    (or for what the run did not record) the train defaults apply."""
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
        if not task_options(args):  # the run's user-task files and template, unless the flags give others
            for k, v in (run.get("task_options") or {}).items():
                setattr(args, k, v)
    recorded = {"model": run.get("model"), "dtype": run.get("dtype"), "quant": run.get("quant"),
                "truncation_side": run.get("truncation_side")}
    if same_task:
        recorded.update(num_train=run.get("num_train"), num_dev=run.get("num_dev"), num_test=run.get("num_test"),
                        seed=(run.get("zo") or {}).get("seed"))
    defaults = {"task": TRAIN.task, "model": None, "dtype": "bfloat16", "quant": None, "num_train": TRAIN.num_train,
                "num_dev": TRAIN.num_dev, "num_test": TRAIN.num_test, "seed": TRAIN.seed,
                "truncation_side": DEFAULT_SIDE}
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, recorded.get(key) if recorded.get(key) is not None else default)
    if args.model is not None:
        where = f"base model (recorded in {args.delta[0]}; pass --model DIR to override)" if deltas else "--model"
        check_model_path(args.model, where)


def run(args: argparse.Namespace) -> None:
    """Score the base model or each --delta on one loaded base, each pass with its own progress bar."""
    check_common(args)
    for d in args.delta:
        check_readable(d, "evaluate")
    deltas = [load_delta(d) for d in args.delta]
    fill_from_run(args, deltas)
    task = task_of(args)
    splits = splits_of(args, train=args.split == "dev" or args.icl > 0, task=task)
    examples = with_demonstrations(splits[args.split], splits["train"], args.icl, args.seed)
    # with --quant: 4-bit around the deltas' mask (or with no exact entries)
    model, tok, _ = build_model(args.model, args.dtype, args.device, args.quant, deltas[0].mask if deltas else None)
    set_truncation_side(tok, args.truncation_side)
    split = args.split + (f"/{args.icl}-shot" if args.icl else "")
    rows = []
    scored = [] if deltas and args.no_base else [(None, None)]
    for name, delta in scored + list(zip(args.delta, deltas)):
        applied = delta.apply(model) if delta is not None else None
        res = evaluate(model, tok, task, examples, args.eval_batch_size, args.max_new_tokens,
                       desc=f"{args.task} {split} " + (name or "base"))
        rows.append({"task": args.task, "split": args.split, "icl": args.icl, **res, "delta": name})
        if applied is not None:
            applied.remove()  # the next delta starts from the base again
    if args.json:  # the top-level fields are the first delta's (or the base's without one)
        first = rows[1] if deltas and not args.no_base else rows[0]
        emit(args, first if len(rows) == 1 else {"results": rows, **first}, "")
        return
    w = max(6, len(split))
    lines = [f"{'task':8} {'split':{w}} {'n':>5} {'metric':9} {'value':>7}  model"]
    lines += [f"{r['task']:8} {split:{w}} {r['n']:>5} {m:9} {r[m]:7.4f}  {r['delta'] or 'base'}"
              for r in rows for m in ("accuracy", "f1", "em") if m in r]
    emit(args, {}, "\n".join(lines))
