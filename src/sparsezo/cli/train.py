"""``sparsezo train``: a ZO fine-tune in this process, as one rank of a torchrun group, or re-launched
as ``--nproc`` ranks; ``--resume`` continues a run directory from its newest checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from ..errors import SparseZOError
from ..eval.evaluate import evaluate
from ..eval.truncation import set_truncation_side
from ..io import atomic_dir, check_writable, read_json, write_json
from ..masks import RULES
from ..model.memory import model_numel
from ..plot import plot_metrics, require_matplotlib
from ..resources import memory_report
from ..tensorboard import require_tensorboard
from ..training.checkpoint import checkpoint_dirs, load_checkpoint, remove_checkpoints
from ..training.config import TrainConfig
from ..training.distributed import DistContext, check_one_process, check_split, init_from_env, launch
from ..training.loop import fine_tune
from ..training.recipe import TRAIN
from ..training.lock import RunLock
from ..training.rundir import (entries_bound, learned, record_outcome, resume_settings, run_bytes, run_meta,
                               save_run)
from ..zo import TrainableParams
from .common import (absolute_paths, check_common, emit, memory_text, model_and_mask, recorded_path, splits_of,
                     task_of, task_options)
from .options import add_command, add_mask_args, add_model_args, add_task_args, add_zo_args

log = logging.getLogger("sparsezo")

# how a run is executed, not what it computes: never saved as run settings, free on --resume
LAUNCH_ARGS = ("nproc", "parallel", "dist_timeout")
REPORT_ARGS = ("plot", "tensorboard")  # what is written about a run, not what it computes: also free on --resume
NOT_RUN_SETTINGS = ("func", "json", "verbose", "resume", *LAUNCH_ARGS, *REPORT_ARGS)  # never saved in config.json


# train's --help, by where a user looks for an option (the two sub-groups keep their own headings)
GROUPS = ("model", "data", "user task (--task custom)", "mask", "optimisation", "output", "advanced",
          "several processes (torchrun)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    model, data, custom, mask, optimisation, output, advanced, procs = (p.add_argument_group(t) for t in GROUPS)
    add_model_args(model, output=output), add_task_args(data, custom=custom), add_mask_args(mask)
    add_zo_args(optimisation, advanced=advanced)
    output.add_argument("--out", default=None, help="run directory (default: runs/TASK-MASK-seedN); must not exist")
    output.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue an interrupted run from its newest intact checkpoint (all settings from RUN_DIR)")
    output.add_argument("--checkpoint-every", type=int, default=100,
                        help="steps between crash-safe checkpoints (0: none)")
    output.add_argument("--keep-checkpoints", type=int, default=1, help="checkpoints kept while training")
    output.add_argument("--plot", action="store_true",
                        help="also write RUN/curves.png: loss and dev curves from metrics.jsonl (needs matplotlib)")
    output.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="also log loss, projected gradient, lr and dev metrics to TensorBoard event files in "
                             "DIR (needs the tensorboard package: the [tensorboard] extra)")
    procs.add_argument("--nproc", type=int, default=1,
                       help="run as N processes on this machine (re-launched through torchrun); under torchrun leave "
                            "it out")
    procs.add_argument("--parallel", default="data", choices=["data", "query"],
                       help="data: each process scores its share of the batch; query: each process measures its "
                            "share of the --q queries (bit-identical to one process)")
    procs.add_argument("--dist-timeout", type=float, default=1800,
                       help="seconds a process waits for the others before failing (must cover rank 0's mask "
                            "computation)")


def register(sub) -> None:
    p = add_command(sub, "train", "ZO fine-tune on a task; writes delta.safetensors, config.json, metrics.jsonl")
    p.description += (". Defaults are the recipe sparsezo.TRAIN; sparsezo demo runs the same recipe "
                      "shortened (400 steps, 200 dev examples, 8192 calibration tokens)")
    p.usage = "%(prog)s [-h] [OPTION ...]  (all optional, listed by heading below)"  # not 27 lines of flags
    add_train_args(p)
    p.set_defaults(func=run)


def defaults() -> dict:
    """Every setting of ``sparsezo train`` at its default, as the top-level parser gives them."""
    p = argparse.ArgumentParser()
    add_train_args(p)
    return dict(vars(p.parse_args([])), verbose=False, command="train", func=run)


def train_argv(args: argparse.Namespace) -> list[str]:
    """``args`` as a ``train`` command line again, for re-launching it under torchrun."""
    p = argparse.ArgumentParser()
    add_train_args(p)
    argv = ["-v"] * bool(args.verbose) + ["train"]
    for a in p._actions:
        v = getattr(args, a.dest, None)
        if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS and v != a.default:
            argv += [a.option_strings[0]] if a.nargs == 0 else [a.option_strings[0], str(v)]
    return argv


def resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """The settings of the run in ``args.resume`` (its config.json); other flags are refused."""
    given = {k: v for k, v in vars(args).items() if k not in NOT_RUN_SETTINGS}
    default = defaults()
    changed = sorted(k for k, v in given.items() if default.get(k) != v)
    if changed:
        raise SparseZOError(f"--resume takes every setting from {args.resume}/config.json; drop "
                            + ", ".join("--" + k.replace("_", "-") for k in changed))
    run = Path(args.resume)
    resumed = argparse.Namespace(**dict(default, **resume_settings(run, default)))
    resumed.mask, resumed.out = str(run / "mask.safetensors"), str(run)  # never recompute the mask
    resumed.resume, resumed.json, resumed.func = args.resume, args.json, args.func
    for k in (*LAUNCH_ARGS, *REPORT_ARGS):  # any number of processes may continue a run
        setattr(resumed, k, getattr(args, k))
    return resumed


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The recipe TRAIN with the command line's settings (``--lr auto`` is ``args.lr = None``)."""
    recipe = replace(TRAIN, steps=args.steps, lr=args.lr, eps=args.eps, batch_size=args.batch_size,
                     eval_every=args.eval_every, eval_batch_size=args.eval_batch_size, seed=args.seed)
    return recipe.train_config(
        zo={"q": args.q, "dist": args.dist, "direction": args.direction, "optimizer": args.optimizer,
            "weight_decay": args.weight_decay, "schedule": args.schedule, "warmup": args.warmup},
        loss=args.loss, keep_best=not args.keep_last, fused_pm=args.fused_pm, cuda_graphs=args.cuda_graphs)


def run_size(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """Bytes the run may write, counted against the free space before the model loads: a mask file's
    entries from its size, a rule's from density × all weights."""
    if args.mask not in RULES and Path(args.mask).is_file():
        entries = Path(args.mask).stat().st_size // 4
    else:
        entries = entries_bound(model_numel(args.model), args.density, args.mask == "full")
    checkpoints = (args.keep_checkpoints + 1) if args.checkpoint_every else 0
    return run_bytes(entries, cfg.zo.optimizer, cfg.zo.q, cfg.steps, checkpoints)


def run(args: argparse.Namespace) -> None:
    """Train in this process, as one rank of a torchrun group, or re-launched as ``--nproc`` ranks."""
    if args.nproc < 1:
        raise SparseZOError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        settings = resumed_args(args) if args.resume else args
        check_split(args.parallel, args.nproc, settings.q, settings.batch_size)  # before starting any process
        check_one_process(settings.lr is None, settings.optimizer)
        launch(args.nproc, train_argv(args))
        return
    dist = init_from_env(args.parallel, args.dist_timeout, args.device)
    try:
        if dist and args.nproc > 1 and dist.world != args.nproc:
            raise SparseZOError(f"--nproc {args.nproc} but torchrun started {dist.world} processes; "
                                "under torchrun leave --nproc out")
        with contextlib.ExitStack() as held:  # rank 0's run lock, released however the run ends
            train(args, dist, held)
    finally:
        if dist:
            dist.close()


def run_dir(args: argparse.Namespace) -> Path:
    """--out, or runs/TASK-MASK-seedN."""
    return Path(args.out or f"runs/{args.task}-{Path(args.mask).stem}-seed{args.seed}")


def prepare_out(args: argparse.Namespace, cfg: TrainConfig, held: contextlib.ExitStack) -> Path:
    """The run directory, checked for space and locked by rank 0 (a new run's must not exist yet)."""
    out = run_dir(args)
    if not args.resume:
        if out.exists():
            raise SparseZOError(taken_out(out))
        check_writable(out, run_size(args, cfg))  # now, not after the model has loaded
        held.callback(RunLock(out).acquire("write").release)
        if out.exists():  # another process created it while we were checking
            raise SparseZOError(f"output directory {out} was just created by another process; choose another --out")
    else:
        check_writable(out / "delta.safetensors", run_size(args, cfg))
    return out


def taken_out(out: Path) -> str:
    """Why an existing --out is refused, with what to do with what it holds: only an unfinished run can be
    continued (--resume on a finished one answers that it is complete; on other folders, that it is no run)."""
    if (out / "delta.safetensors").is_file():
        return (f"output directory {out} holds a finished run; use it (sparsezo eval --delta {out}, merge, export) "
                "or choose another --out for a new run")
    if checkpoint_dirs(out) or ((out / "config.json").is_file() and (out / "mask.safetensors").is_file()):
        return (f"output directory {out} holds an unfinished run; continue it with sparsezo train --resume {out}, "
                "or choose another --out")
    return f"output directory {out} already exists; choose another --out or remove it"


def train(args: argparse.Namespace, dist: DistContext | None, held: contextlib.ExitStack) -> None:
    """One process's part of ``train`` (``dist``: its DistContext, or None when it runs alone)."""
    is_main = dist is None or dist.is_main
    if args.resume:
        if is_main:  # before reading anything: a live run's files are moving under us
            held.callback(RunLock(args.resume).acquire("resume").release)
        args = resumed_args(args)
    check_common(args)
    absolute_paths(args)
    if args.plot:
        require_matplotlib()  # before training, not after it
    if getattr(args, "tensorboard", None):
        require_tensorboard()
    cfg = train_config(args)
    if dist:
        check_split(dist.parallel, dist.world, cfg.zo.q, cfg.batch_size)
        args.device = str(dist.device) if args.device.startswith("cuda") else args.device
        if not is_main:
            log.setLevel(logging.WARNING)  # rank 0 reports for all
    out = prepare_out(args, cfg, held) if is_main else run_dir(args)
    task = task_of(args)
    splits = splits_of(args, task=task)
    if is_main or args.resume:  # other ranks wait for the mask rank 0 computes (e.g. Fisher scores: minutes)
        model, tok, mask = model_and_mask(args, splits["train"], args.quant)
    if is_main:
        meta = run_meta(cfg, model=recorded_path(model.name_or_path), dtype=args.dtype, quant=args.quant,
                        task=args.task, task_options=task_options(args), data_dir=args.data_dir, mask_rule=mask.rule,
                        density=mask.meta.get("density"), num_train=args.num_train, num_dev=args.num_dev,
                        num_test=args.num_test, split_sizes={k: len(v) for k, v in splits.items()},
                        truncation_side=args.truncation_side)
        if dist:
            log.info("%d processes, %s-parallel", dist.world, dist.parallel)
    if is_main and not args.resume:  # the run directory exists from here on: config + mask first, then checkpoints
        saved_args = {k: v for k, v in vars(args).items() if k not in NOT_RUN_SETTINGS}
        with atomic_dir(out) as tmp:
            mask.save(tmp / "mask.safetensors")
            write_json(tmp / "config.json", dict(meta, args=saved_args))
    if dist and not args.resume:
        dist.barrier("start-up (rank 0 computing the mask and creating the run directory)")
        if not is_main:  # the mask file rank 0 just wrote (the run directory must be shared by all nodes)
            args.mask = str(out / "mask.safetensors")
            model, tok, mask = model_and_mask(args, splits["train"], args.quant)
    set_truncation_side(tok, args.truncation_side)  # training batches, dev, test and the lr probe alike
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
    if is_main:  # rank 0 tests, saves and reports
        finish(args, dist, out, cfg, meta, model, tok, task, splits, params, result)


def finish(args: argparse.Namespace, dist: DistContext | None, out: Path, cfg: TrainConfig, meta: dict, model, tok,
           task, splits: dict, params: TrainableParams, result) -> None:
    """Test the selected θ, write the run's final files and report."""
    mask = params.mask
    test = evaluate(model, tok, task, splits["test"], cfg.eval_batch_size, desc="test (best dev θ)")
    metric = test["metric"]  # accuracy, or f1 (+ em) for generation tasks
    results = {"task": args.task, "metric": metric,
               **{f"test_{k}": v for k, v in test.items() if k not in ("metric", "value", "n")},
               f"best_dev_{metric}": result.best_dev, "best_step": result.best_step,
               "steps": result.steps, "num_trainable": mask.num_trainable, "n_test": len(splits["test"]),
               "lr": result.lr, **learned(result, metric)}
    record_outcome(meta, result)
    config = read_json(out / "config.json", "run config")
    config["results"] = dict(results, seconds=round(result.seconds, 2))
    config["zo"] = meta["zo"]
    if result.lr_probe is not None:
        config["lr_auto"] = result.lr_probe
    if args.resume:
        config["resumed"] = config.get("resumed", 0) + 1
    config["processes"] = {"world_size": dist.world, "parallel": dist.parallel} if dist else {"world_size": 1}
    save_run(out, params, result.trajectory, result.zo, dict(meta, results=results), config)
    remove_checkpoints(out)
    if args.plot:
        log.info("curves -> %s", plot_metrics(out / "metrics.jsonl", out / "curves.png", title=str(out)))
    mem = memory_report(args.device)
    emit(args, dict(results, seconds=round(result.seconds, 2), out=str(out), **mem),
         f"{args.task}: test {metric} {test['value']:.4f} (best dev {result.best_dev:.4f} at step "
         f"{result.best_step}/{result.steps}, {result.seconds:.0f}s) -> {out}; {memory_text(mem)}"
         + ("" if result.improved else "\nnothing was learned (see the warning above)"))

