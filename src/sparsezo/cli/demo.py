"""``sparsezo demo``: the DEMO recipe end to end (zero-shot, sensitive sparse ZO fine-tune, test) on SST-2."""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import replace

from tqdm import tqdm

from ..eval.scoring import accuracy
from ..io import atomic_dir
from ..masks import compute_mask
from ..masks.sensitive import read_texts
from ..dtypes import AUTO
from ..model.load import build_model
from ..tasks.embedded import demo_calibration_file, demo_task
from ..training.loop import fine_tune
from ..training.recipe import DEMO
from ..training.rundir import learned, record_outcome, run_meta, save_run
from ..zo import TrainableParams
from .common import absolute_paths, emit, recorded_path, refuse_existing
from .options import LR_HELP, add_command, add_model_args, lr_value

log = logging.getLogger("sparsezo")


def register(sub) -> None:
    """demo: the recipe of :data:`sparsezo.DEMO` (train's, shortened to minutes), a few knobs open."""
    p = add_command(sub, "demo", "zero-shot -> sensitive sparse ZO fine-tune -> test, on SST-2 and the default model "
                                 "(the recipe of sparsezo.DEMO: train's, with 400 steps, 200 dev "
                                 "examples, 8192 calibration tokens and the fixed lr 1e-4 for --lr auto)")
    model, recipe, output = (p.add_argument_group(t) for t in ("model", "recipe (a few of sparsezo.DEMO's knobs)",
                                                                 "output"))
    add_model_args(model, dtype=AUTO, output=output)
    recipe.add_argument("--steps", type=int, default=DEMO.steps, help="ZO steps (train's default: 1000)")
    recipe.add_argument("--lr", type=lr_value, default=DEMO.lr, help=LR_HELP)
    recipe.add_argument("--eps", type=float, default=DEMO.eps, help="perturbation scale")
    recipe.add_argument("--density", type=float, default=DEMO.density, help="fraction of eligible weights trained")
    recipe.add_argument("--eval-every", type=int, default=DEMO.eval_every, help="steps between dev evaluations")
    recipe.add_argument("--num-dev", type=int, default=DEMO.num_dev,
                        help="dev examples for model selection (train's default: 500)")
    recipe.add_argument("--calib-tokens", type=int, default=DEMO.calib_tokens,
                        help="WikiText-2 tokens for the Fisher scores (train's default: 32768)")
    recipe.add_argument("--seed", type=int, default=DEMO.seed, help="seeds data sampling and the ZO noise")
    output.add_argument("--out", default=None,
                        help="also save the run (mask, trajectory, delta, config, metrics) in this folder "
                             "(default: none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """The DEMO recipe end to end; with --out a run directory like train's (config, metrics, mask, ...)."""
    refuse_existing(args.out)
    absolute_paths(args)
    t0 = time.perf_counter()
    recipe = replace(DEMO, steps=args.steps, lr=args.lr, eps=args.eps, density=args.density,
                     eval_every=args.eval_every, num_dev=args.num_dev, calib_tokens=args.calib_tokens, seed=args.seed)
    splits = demo_task().splits(recipe.seed, recipe.num_train, recipe.num_dev, recipe.num_test)
    calib = demo_calibration_file(recipe.calib_tokens).resolve()

    def sensitive_mask(model, tok):
        return compute_mask(model, recipe.mask, recipe.density, tokenizer=tok, texts=read_texts(calib),
                            source=str(calib), seed=recipe.seed, calib_tokens=recipe.calib_tokens,
                            seq_len=recipe.calib_seq_len)

    model, tok, mask = build_model(args.model, args.dtype, args.device, args.quant, sensitive_mask)

    def test_accuracy(what: str) -> float:
        with tqdm(total=len(splits["test"]), desc=f"test ({what})", unit="ex", leave=False, dynamic_ncols=True) as bar:
            return accuracy(model, tok, splits["test"], recipe.eval_batch_size, progress=bar)

    zero = test_accuracy("zero-shot")
    log.info("zero-shot test accuracy %.4f", zero)
    params = TrainableParams(model, mask)
    cfg = recipe.train_config()
    meta = run_meta(cfg, model=recorded_path(model.name_or_path), dtype=args.dtype, quant=args.quant,
                    task=recipe.task, task_options={}, data_dir=None, recipe="demo", mask_rule=mask.rule,
                    density=args.density, calib=str(calib), calib_tokens=args.calib_tokens,
                    calib_seq_len=recipe.calib_seq_len, num_train=recipe.num_train, num_dev=args.num_dev,
                    num_test=recipe.num_test, split_sizes={k: len(v) for k, v in splits.items()})
    # with --out everything is written into a temporary directory that becomes --out only on success
    with atomic_dir(args.out) if args.out else contextlib.nullcontext() as tmp:
        res = fine_tune(model, tok, params, splits["train"], splits["dev"], cfg,
                        metrics_path=tmp / "metrics.jsonl" if tmp else None)
        tuned = test_accuracy("fine-tuned")
        seconds = time.perf_counter() - t0
        record_outcome(meta, res)
        if tmp:  # a run directory like train's: mask, trajectory, delta, config, metrics
            meta["results"] = {"task": recipe.task, "metric": "accuracy", "test_accuracy": tuned,
                               "zero_shot_accuracy": zero, "best_step": res.best_step, "steps": args.steps,
                               **learned(res, "accuracy")}
            mask.save(tmp / "mask.safetensors")
            save_run(tmp, params, res.trajectory, res.zo, meta, dict(meta, results=dict(meta["results"],
                                                                                         seconds=round(seconds, 1))))
    obj = {"task": recipe.task, "model": meta["model"], "zero_shot_accuracy": zero, "finetuned_accuracy": tuned,
           "steps": args.steps, "best_step": res.best_step, "lr": res.lr, **learned(res, "accuracy"),
           "eps": args.eps, "density": args.density,
           "num_trainable": mask.num_trainable, "n_test": len(splits["test"]), "quant": args.quant,
           "seconds": round(seconds, 1)}
    if args.out:
        obj["out"] = args.out
    emit(args, obj, f"SST-2 test accuracy: zero-shot {zero:.1%} -> fine-tuned {tuned:.1%} "
                    f"({mask.num_trainable} sensitive weights, {args.steps} ZO steps, {seconds:.0f}s)")
