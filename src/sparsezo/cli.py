"""``sparsezo`` command line: thin wrappers over the API.

Progress bars and logs go to stderr; ``--json`` makes a reporting command print exactly one
JSON object on stdout. Any :class:`SparseZOError` becomes one ``sparsezo: error:`` line and
exit code 2, before any output is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .errors import SparseZOError

log = logging.getLogger("sparsezo")


# ----------------------------------------------------------------------------- shared pieces
def _add_model_args(p: argparse.ArgumentParser, quant: bool = True) -> None:
    p.add_argument("--model", default=None, help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="compute dtype of the frozen weights (bf16 is ~3x faster than fp32 on CPUs with avx512_bf16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    if quant:
        p.add_argument("--quant", default=None, choices=["nf4"],
                       help="4-bit NF4 frozen base (bitsandbytes); the trainable entries stay exact in --dtype")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def _add_run_base_args(p: argparse.ArgumentParser) -> None:
    """replay/merge: the base model defaults to the one the run recorded, in the run's dtype."""
    p.add_argument("--model", default=None, help="base model folder (default: the one the run recorded)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: the run's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")


def _add_task_args(p: argparse.ArgumentParser, train: bool = True) -> None:
    """Task and split options; ``train=False`` adds the eval command's --split/--icl/--max-new-tokens.

    eval takes --num-train/--num-dev too: with the training run's values and seed it sees the
    same dev split and draws ICL demonstrations from the same training split.
    """
    from .tasks import TASKS

    p.add_argument("--task", default="sst2", help=f"task name: {', '.join(TASKS)}")
    p.add_argument("--data-dir", default=None, help="folder with the task's official files (default: shared assets)")
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-dev", type=int, default=500)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seeds data sampling, masks and ZO noise")
    g = p.add_argument_group("user task (--task custom)")
    g.add_argument("--data", default=None, help="labelled examples: .jsonl, .csv or .tsv")
    g.add_argument("--template", default=None, help='prompt with {field} placeholders, e.g. "{text} It was"')
    g.add_argument("--labels", default=None,
                   help='JSON label -> words map, e.g. \'{"pos": " great", "neg": " terrible"}\'')
    g.add_argument("--label-field", default=None, help="column/key holding the label (default: label)")
    g.add_argument("--test-data", default=None, help="test file (default: a fixed 20%% holdout of --data)")
    g.add_argument("--task-file", default=None, help="JSON (or YAML) file with keys data, template, labels, "
                                                      "label_field, test_data; flags override it")
    if not train:
        p.add_argument("--split", default="test", choices=["dev", "test"])
        p.add_argument("--icl", type=int, default=0, metavar="K",
                       help="prepend K seeded demonstrations from the training split (0: zero-shot)")
        p.add_argument("--max-new-tokens", type=int, default=50, help="answer length limit of generation tasks")


def _add_mask_args(p: argparse.ArgumentParser, default_rule: str = "sensitive") -> None:
    p.add_argument("--mask", default=default_rule,
                   help="a mask file (mask.safetensors) or a rule: sensitive, sensitive-task, magnitude-small, "
                        "magnitude-large, random, full")
    p.add_argument("--density", type=float, default=1e-3, help="fraction of eligible weights to train (0, 1]")
    p.add_argument("--scope", default="global", choices=["global", "per-tensor"])
    p.add_argument("--calib", default=None, help="calibration text/JSONL for sensitive (default: WikiText-2 from the assets)")
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--seq-len", dest="calib_seq_len", type=int, default=256, help="calibration sequence length")
    p.add_argument("--include", default=None, help="regex of parameter names that may be trained")
    p.add_argument("--exclude", default=None, help="regex of parameter names never trained")


def _add_zo_args(p: argparse.ArgumentParser, steps: int = 1000) -> None:
    from .zo.optim import OPTIMIZERS

    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eps", type=float, default=1e-2, help="perturbation scale (>= 1e-2 survives bf16 rounding)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--q", type=int, default=1, help="SPSA queries per step (n-SPSA)")
    p.add_argument("--dist", default="gaussian", choices=["gaussian", "rademacher"])
    p.add_argument("--direction", default="applied", choices=["applied", "sampled"],
                   help="update along the perturbation the rounded weights received (applied) or along z (sampled)")
    p.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS))
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--keep-last", action="store_true", help="keep the final θ instead of the best-dev one")
    p.add_argument("--loss", default="ce", choices=["ce", "lm", "acc"],
                   help="ce: cross-entropy over candidates; lm: NLL of the gold candidate (generation tasks); "
                        "acc: 1 - batch accuracy (non-differentiable, ZO optimises it directly)")


def _check_common(args: argparse.Namespace) -> None:
    """Validate cheap arguments before loading anything."""
    for name in ("num_train", "num_dev", "num_test", "steps", "calib_tokens", "calib_seq_len", "seq_len", "batch"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise SparseZOError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    density = getattr(args, "density", None)
    if density is not None and not 0 < density <= 1:
        raise SparseZOError(f"--density {density} is outside (0, 1]; e.g. --density 0.001 for 0.1%")
    if getattr(args, "model", None) is not None and not (Path(args.model) / "config.json").is_file():
        raise SparseZOError(f"--model {args.model} is not a Hugging Face model folder (no config.json); check the path")


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
                        calib_tokens=args.calib_tokens, seq_len=args.calib_seq_len)


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
            quantize_model(model, mask)
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
    return quantize_model(model), tok


def _zo_config(args: argparse.Namespace):
    from .train import TrainConfig
    from .zo import ZOConfig

    zo = ZOConfig(lr=args.lr, eps=args.eps, q=args.q, dist=args.dist, direction=args.direction, optimizer=args.optimizer,
                  weight_decay=args.weight_decay, schedule=args.schedule, warmup=args.warmup, seed=args.seed)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                      eval_batch_size=args.eval_batch_size, loss=args.loss, keep_best=not args.keep_last, zo=zo)
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
_NOT_RUN_SETTINGS = ("func", "json", "verbose", "resume", *_LAUNCH_ARGS)  # never saved in config.json args


def _resume_args(args: argparse.Namespace) -> argparse.Namespace:
    """The settings of the run in ``args.resume`` (its config.json); other flags are refused."""
    given = {k: v for k, v in vars(args).items() if k not in _NOT_RUN_SETTINGS}
    defaults = vars(build_parser().parse_args(["train"]))
    changed = sorted(k for k, v in given.items() if defaults.get(k) != v)
    if changed:
        raise SparseZOError(f"--resume takes every setting from {args.resume}/config.json; drop "
                            + ", ".join("--" + k.replace("_", "-") for k in changed))
    run = Path(args.resume)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise SparseZOError(f"--resume {run}: no config.json there; is it a sparsezo run directory?")
    if (run / "delta.safetensors").exists():
        raise SparseZOError(f"--resume {run}: the run is already complete (delta.safetensors exists)")
    saved = json.loads(cfg_path.read_text()).get("args")
    if not saved:
        raise SparseZOError(f"--resume {run}: config.json has no recorded arguments; the run cannot be resumed")
    resumed = argparse.Namespace(**dict(defaults, **saved))
    resumed.mask, resumed.out = str(run / "mask.safetensors"), str(run)  # never recompute the mask
    resumed.resume, resumed.json, resumed.func = args.resume, args.json, args.func
    for k in _LAUNCH_ARGS:  # any number of processes may continue a run
        setattr(resumed, k, getattr(args, k))
    return resumed


def _train_argv(args: argparse.Namespace) -> list[str]:
    """``args`` as a ``train`` command line again, for re-launching it under torchrun."""
    p = argparse.ArgumentParser()
    _add_train_args(p)
    argv = ["-v"] * bool(args.verbose) + ["train"]
    for a in p._actions:
        v = getattr(args, a.dest, None)
        if a.option_strings and a.dest != "help" and v != a.default:
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
    """One process's part of ``train`` (``dist``: its DistContext, or None when it runs alone)."""
    import shutil

    from .checkpoint import load_checkpoint, remove_checkpoints
    from .distributed import check_split
    from .evaluate import evaluate
    from .io import atomic_dir, write_json
    from .train import fine_tune, run_meta, save_run
    from .zo import TrainableParams

    if args.resume:
        args = _resume_args(args)
    _check_common(args)
    if args.checkpoint_every < 0 or args.keep_checkpoints < 1:
        raise SparseZOError("--checkpoint-every must be >= 0 and --keep-checkpoints >= 1")
    cfg = _zo_config(args)
    is_main = dist is None or dist.is_main
    if dist:
        check_split(dist.parallel, dist.world, cfg.zo.q, cfg.batch_size)
        args.device = str(dist.device) if args.device.startswith("cuda") else args.device
        if not is_main:
            log.setLevel(logging.WARNING)  # rank 0 reports for all
    out = Path(args.out or f"runs/{args.task}-{Path(args.mask).stem}-seed{args.seed}")
    if is_main and out.exists() and not args.resume:
        raise SparseZOError(f"output directory {out} already exists; choose another --out, remove it, "
                            f"or continue it with --resume {out}")
    task = _task(args)
    splits = _splits(args, task=task)
    if is_main or args.resume:  # other ranks wait for the mask rank 0 computes (e.g. Fisher scores: minutes)
        model, tok, mask = _model_and_mask(args, splits["train"])
    if is_main:
        meta = run_meta(cfg, model=str(model.name_or_path), dtype=args.dtype, quant=args.quant, task=args.task,
                        task_options=_task_options(args), data_dir=args.data_dir, mask_rule=mask.rule,
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
                           resume=state, dist=dist)
    except BaseException:
        if is_main and not args.resume and load_checkpoint(out) is None:
            shutil.rmtree(out, ignore_errors=True)  # nothing worth resuming: leave nothing behind
        elif is_main:
            log.error("run directory %s kept; continue it with: sparsezo train --resume %s", out, out)
        raise
    if not is_main:
        return  # rank 0 tests, saves and reports
    test = evaluate(model, tok, task, splits["test"], cfg.eval_batch_size)
    metric = test["metric"]  # accuracy, or f1 (+ em) for generation tasks
    results = {"task": args.task, "metric": metric,
               **{f"test_{k}": v for k, v in test.items() if k not in ("metric", "value", "n")},
               f"best_dev_{metric}": result.best_dev, "best_step": result.best_step,
               "steps": result.steps, "num_trainable": mask.num_trainable, "n_test": len(splits["test"])}
    config = json.loads((out / "config.json").read_text())
    config["results"] = dict(results, seconds=round(result.seconds, 2))
    if args.resume:
        config["resumed"] = config.get("resumed", 0) + 1
    config["processes"] = {"world_size": dist.world, "parallel": dist.parallel} if dist else {"world_size": 1}
    save_run(out, params, result.trajectory, cfg.zo, dict(meta, results=results), config)
    remove_checkpoints(out)
    _emit(args, dict(results, seconds=round(result.seconds, 2), out=str(out)),
          f"{args.task}: test {metric} {test['value']:.4f} (best dev {result.best_dev:.4f} at step "
          f"{result.best_step}/{result.steps}, {result.seconds:.0f}s) -> {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .checkpoint import load_delta
    from .evaluate import evaluate
    from .tasks.icl import with_demonstrations

    _check_common(args)
    if args.max_new_tokens <= 0:
        raise SparseZOError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    deltas = [load_delta(d) for d in args.delta]
    task = _task(args)
    splits = _splits(args, train=args.split == "dev" or args.icl > 0, task=task)
    examples = with_demonstrations(splits[args.split], splits["train"], args.icl, args.seed)
    model, tok = _eval_model(args, deltas)
    rows = []
    for name, delta in [(None, None)] if not deltas else zip(args.delta, deltas):
        applied = delta.apply(model) if delta is not None else None
        res = evaluate(model, tok, task, examples, args.eval_batch_size, args.max_new_tokens)
        rows.append({"task": args.task, "split": args.split, "icl": args.icl, **res, "delta": name})
        if applied is not None:
            applied.remove()  # the next delta starts from the base again
    if args.json:
        _emit(args, rows[0] if len(rows) == 1 else {"results": rows, **rows[0]}, "")
        return
    split = args.split + (f"/{args.icl}-shot" if args.icl else "")
    w = max(6, len(split))
    lines = [f"{'task':8} {'split':{w}} {'n':>5} {'metric':9} {'value':>7}  delta"]
    lines += [f"{r['task']:8} {split:{w}} {r['n']:>5} {m:9} {r[m]:7.4f}  {r['delta'] or '-'}"
              for r in rows for m in ("accuracy", "f1", "em") if m in r]
    _emit(args, {}, "\n".join(lines))


def cmd_demo(args: argparse.Namespace) -> None:
    from .masks import compute_mask
    from .assets import default_calibration_file
    from .masks.sensitive import read_texts
    from .models import load_model
    from .quant import quantize_model
    from .scoring import accuracy
    from .tasks import get_task
    from .io import atomic_dir
    from .train import TrainConfig, fine_tune, run_meta, save_run
    from .zo import TrainableParams, ZOConfig

    if args.out and Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    t0 = time.perf_counter()
    splits = get_task("sst2").splits(args.seed, 1000, args.num_dev, 1000)
    model, tok = load_model(args.model, args.dtype, args.device)
    calib = default_calibration_file()
    mask = compute_mask(model, "sensitive", args.density, tokenizer=tok, texts=read_texts(calib), source=str(calib),
                        seed=args.seed, calib_tokens=args.calib_tokens)
    if args.quant:
        quantize_model(model, mask)
    zero = accuracy(model, tok, splits["test"])
    log.info("zero-shot test accuracy %.4f", zero)
    params = TrainableParams(model, mask)
    cfg = TrainConfig(steps=args.steps, eval_every=args.eval_every,
                      zo=ZOConfig(lr=args.lr, eps=args.eps, seed=args.seed))
    res = fine_tune(model, tok, params, splits["train"], splits["dev"], cfg)
    tuned = accuracy(model, tok, splits["test"])
    seconds = time.perf_counter() - t0
    obj = {"task": "sst2", "model": str(model.name_or_path), "zero_shot_accuracy": zero, "finetuned_accuracy": tuned,
           "steps": args.steps, "best_step": res.best_step, "lr": args.lr, "eps": args.eps, "density": args.density,
           "num_trainable": mask.num_trainable, "n_test": len(splits["test"]), "quant": args.quant,
           "seconds": round(seconds, 1)}
    if args.out:  # a run directory like train's: mask, trajectory, delta, config
        meta = run_meta(cfg, model=str(model.name_or_path), dtype=args.dtype, quant=args.quant, task="sst2",
                        mask_rule=mask.rule, density=args.density,
                        results={"task": "sst2", "metric": "accuracy", "test_accuracy": tuned,
                                 "zero_shot_accuracy": zero, "best_step": res.best_step, "steps": args.steps})
        with atomic_dir(args.out) as tmp:
            mask.save(tmp / "mask.safetensors")
            save_run(tmp, params, res.trajectory, cfg.zo, meta, dict(meta, results=dict(meta["results"], seconds=obj["seconds"])))
        obj["out"] = args.out
    _emit(args, obj, f"SST-2 test accuracy: zero-shot {zero:.1%} -> fine-tuned {tuned:.1%} "
                     f"({mask.num_trainable} sensitive weights, {args.steps} ZO steps, {seconds:.0f}s)")


def _delta_base(args: argparse.Namespace, delta):
    """The base model a delta was trained on (its recorded path, dtype and quantization unless overridden)."""
    from .models import load_model

    dtype = args.dtype or delta.meta.get("dtype", "bfloat16")
    model = args.model or delta.meta.get("model")
    if model is not None and not (Path(model) / "config.json").is_file():
        raise SparseZOError(f"base model {model} is not a Hugging Face model folder (no config.json); pass --model DIR")
    quant = delta.meta.get("quant")
    return load_model(model, dtype, args.device, quant=quant, mask=delta.mask if quant else None)


def cmd_replay(args: argparse.Namespace) -> None:
    from .checkpoint import Delta
    from .masks import Mask
    from .replay import replayed_delta, run_files
    from .zo import Trajectory

    if Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    mask_path, traj_path = run_files(args.run_dir, args.mask, args.trajectory)
    mask, traj = Mask.load(mask_path), Trajectory.load(traj_path)
    info = Delta(mask, {}, traj.meta.get("delta_meta", {}))
    if args.dtype is None:
        args.dtype = traj.meta.get("dtype")
    model, _ = _delta_base(args, info)
    t0 = time.perf_counter()
    delta = replayed_delta(model, mask, traj)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out = out / "delta.safetensors" if out.suffix != ".safetensors" else out
    delta.save(out)
    steps = traj.meta.get("best_step", len(traj))
    _emit(args, {"out": str(out), "steps": steps, "seconds": round(seconds, 3), "trajectory_bytes": traj_path.stat().st_size},
          f"replayed {steps} steps of {traj_path} in {seconds:.2f}s -> {out}")


def cmd_merge(args: argparse.Namespace) -> None:
    from .checkpoint import load_delta
    from .export import save_merged

    if Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    delta = load_delta(args.delta)
    model, tok = _delta_base(args, delta)
    delta.apply(model)
    save_merged(model, tok, args.out)
    _emit(args, {"out": args.out, "num_trained": delta.mask.num_trainable, "quant_base": delta.meta.get("quant")},
          f"merged {delta.mask.num_trainable} trained weights into {model.name_or_path}"
          f"{' (dequantized 4-bit base)' if delta.meta.get('quant') else ''} -> {args.out}")


def cmd_info(args: argparse.Namespace) -> None:
    from .models import checkpoint_bytes

    run = Path(args.run_dir)
    if not (run / "config.json").is_file():
        raise SparseZOError(f"{run} is not a sparsezo run directory (no config.json)")
    config = json.loads((run / "config.json").read_text())
    files = {name: run / f"{name}.safetensors" for name in ("trajectory", "delta", "mask")}
    sizes = {f"{k}_bytes": p.stat().st_size for k, p in files.items() if p.is_file()}
    dtype = config.get("dtype", "bfloat16")
    try:
        sizes["full_model_bytes"] = checkpoint_bytes(config.get("model"), dtype)
    except SparseZOError as e:
        log.warning("full model size unknown: %s", e)
    obj = {"run_dir": str(run), "task": config.get("task"), "mask_rule": config.get("mask_rule"), "dtype": dtype,
           "steps": config.get("train", {}).get("steps"), "results": config.get("results"), **sizes,
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
    from .quant import save_quantized, weight_bytes

    _check_common(args)
    if Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    args.quant = args.quant or "nf4"
    splits = _splits(args) if args.mask == "sensitive-task" else None
    model, tok, mask = _model_and_mask(args, splits["train"] if splits else None)
    save_quantized(model, tok, args.out, mask)
    wb = weight_bytes(model)
    _emit(args, dict(wb, out=args.out, num_trainable=mask.num_trainable, quant=args.quant),
          f"{args.quant} model with {mask.num_trainable} exact trainable entries ({mask.rule}): "
          f"{wb['total'] / 2**20:.1f} MiB of weights ({wb['quantized'] / 2**20:.1f} MiB 4-bit layers) -> {args.out}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import bench

    _check_common(args)
    model, _, mask = _model_and_mask(args)
    res = bench(model, mask, args.batch, args.seq_len, args.steps, args.eps, args.dist, args.baseline)
    res.update(model=str(model.name_or_path), mask=mask.rule, quant=args.quant)
    rows = [("sparsezo", res)] + ([("mezo", res["baseline"])] if "baseline" in res else [])
    lines = [f"{mask.rule} mask, {res['trainable']} trainable, batch {args.batch} x {args.seq_len} tokens, {res['device']}, "
             f"{res['dtype']}{', ' + args.quant if args.quant else ''}",
             f"{'':9} {'forward ms':>10} {'step ms':>9} {'step/2fwd':>9} {'perturb ms':>10} {'peak MiB':>9} {'tokens/s':>9}"]
    lines += [f"{n:9} {r['forward_ms']:10.1f} {r['step_ms']:9.1f} {r['step_over_two_forwards']:9.3f} "
              f"{r['perturb_ms']:10.2f} {r['peak_memory_bytes'] / 2**20:9.0f} {r['tokens_per_s']:9.0f}" for n, r in rows]
    _emit(args, res, "\n".join(lines))


def cmd_mask_compute(args: argparse.Namespace) -> None:
    from .resources import peak_memory_bytes

    _check_common(args)
    if Path(args.out).exists():
        raise SparseZOError(f"--out {args.out} already exists; choose another path or remove it")
    splits = _splits(args) if args.mask == "sensitive-task" else None
    model, tok = _load(args)
    mask = _mask(args, model, tok, splits["train"] if splits else None)
    mask.save(args.out)
    info = {k: mask.meta.get(k) for k in ("rule", "density", "scope", "num_trainable", "num_eligible", "source")}
    info.update(mask.stats, peak_memory_bytes=peak_memory_bytes(args.device), out=args.out)
    text = (f"{mask.rule}: {mask.num_trainable} of {mask.num_eligible} weights in {mask.stats['seconds']:.1f}s, "
            f"peak memory {info['peak_memory_bytes'] / 2**30:.2f} GiB -> {args.out}")
    if "fisher_mass" in mask.stats:
        text += "\nFisher mass held by the top d: " + ", ".join(f"{d}: {m:.3f}" for d, m in mask.stats["fisher_mass"].items())
    _emit(args, info, text)


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
        lines += [f"{kind[:-1] + ' ' + k:>14} {r['trainable']:>10} {r['numel']:>11} {r['density']:9.5f}"
                  for k, r in table[kind].items()]
    lines.append(f"{'total':>14} {mask.num_trainable:>10} {mask.num_eligible:>11} "
                 f"{mask.num_trainable / mask.num_eligible:9.5f}   rule {mask.rule}, scope {mask.meta.get('scope')}")
    _emit(args, obj, "\n".join(lines))


def cmd_mask_compare(args: argparse.Namespace) -> None:
    from .masks import Mask
    from .masks.analysis import compare

    res = compare(Mask.load(args.a), Mask.load(args.b))
    lines = [f"Jaccard overlap {res['jaccard']:.4f} ({res['intersection']} shared of {res['a']} and {res['b']})"]
    lines += [f"  layer {k:>3}: {v:.4f}" for k, v in res["layers"].items()]
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
    p.add_argument("--out", default=None, help="run directory (default runs/TASK-MASK-seedN); must not exist")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between crash-safe checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="checkpoints kept while training")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its newest intact checkpoint (all settings from RUN_DIR)")
    g = p.add_argument_group("several processes (torchrun)")
    g.add_argument("--nproc", type=int, default=1,
                   help="run as N processes on this machine (re-launched through torchrun); under torchrun leave it out")
    g.add_argument("--parallel", default="data", choices=["data", "query"],
                   help="data: each process scores its share of the batch; query: each process measures its "
                        "share of the --q queries (bit-identical to one process)")
    g.add_argument("--dist-timeout", type=float, default=1800,
                   help="seconds a process waits for the others before failing (must cover rank 0's mask computation)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsezo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="ZO fine-tune on a task; writes delta.safetensors, config.json, metrics.jsonl")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of the base model, or base + --delta")
    _add_model_args(p), _add_task_args(p, train=False)
    p.add_argument("--delta", action="append", default=[], help="run dir or delta.safetensors (repeatable)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="zero-shot -> sensitive sparse ZO fine-tune -> test, on SST-2 and the default model")
    _add_model_args(p)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--density", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--num-dev", type=int, default=200)
    p.add_argument("--calib-tokens", type=int, default=8192, help="WikiText-2 tokens for the Fisher scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also save the run (mask, trajectory, delta, config) in this folder")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("quantize", help="save a 4-bit base whose mask entries stay exact (reload with --model DIR)")
    _add_model_args(p), _add_task_args(p), _add_mask_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("replay", help="rebuild a run's delta from its seed trajectory (no data, no forwards)")
    p.add_argument("run_dir", nargs="?", default=None, help="run directory with mask.safetensors and trajectory.safetensors")
    p.add_argument("--out", required=True, help="output delta.safetensors (or a folder for it)")
    p.add_argument("--mask", default=None, help="mask file (default: RUN_DIR/mask.safetensors)")
    p.add_argument("--trajectory", default=None, help="trajectory file (default: RUN_DIR/trajectory.safetensors)")
    _add_run_base_args(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("merge", help="write base + delta as a plain Hugging Face model folder")
    p.add_argument("--delta", required=True, help="run directory or delta.safetensors")
    p.add_argument("--out", required=True, help="output model folder")
    _add_run_base_args(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("info", help="sizes of a run's files: trajectory, delta, mask, full model")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="time a ZO step against two forward passes (JSON with --json)")
    _add_model_args(p)
    p.add_argument("--mask", default="random", help="a mask file or a rule that needs no data (random, magnitude-*, full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--density", type=float, default=1e-3)
    p.add_argument("--scope", default="global", choices=["global", "per-tensor"])
    p.set_defaults(task=None, calib=None, calib_tokens=32768, calib_seq_len=256, include=None, exclude=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row of the synthetic batch")
    p.add_argument("--steps", type=int, default=10, help="measured steps (medians are reported)")
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--dist", default="gaussian", choices=["gaussian", "rademacher"])
    p.add_argument("--baseline", default=None, choices=["mezo"], help="also time MeZO's per-tensor loop, side by side")
    p.set_defaults(func=cmd_bench)

    pm = sub.add_parser("mask", help="compute and inspect masks").add_subparsers(dest="mask_command", required=True)
    p = pm.add_parser("compute", help="compute a mask file")
    _add_model_args(p, quant=False), _add_task_args(p), _add_mask_args(p)
    p.add_argument("--out", required=True, help="output mask.safetensors")
    p.set_defaults(func=cmd_mask_compute)
    p = pm.add_parser("info", help="per-layer and per-module density of a mask file")
    p.add_argument("file")
    p.add_argument("--plot", default=None, help="write a per-layer density chart (PNG) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mask_info)
    p = pm.add_parser("compare", help="Jaccard overlap of two mask files, overall and per layer/module")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mask_compare)
    p = pm.add_parser("mass", help="share of the total Fisher score held by the top d of weights")
    _add_model_args(p, quant=False), _add_task_args(p), _add_mask_args(p)
    p.set_defaults(func=cmd_mask_mass)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # sub-second loads; keeps stderr to our own bars and one-line errors
    try:
        args.func(args)
    except SparseZOError as e:
        sys.stderr.write(f"sparsezo: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("sparsezo: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
