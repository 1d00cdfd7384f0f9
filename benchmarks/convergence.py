"""Issue 19: forwards (not steps) to reach a target dev accuracy, per optimiser, on four tasks.

    python benchmarks/convergence.py [--optimizers sgd hizoo] [--tasks sst2 rte copa boolq] [--seeds 0 1 2]
                                     [--budget 2000] [--dry-run] [--report-only]

What a ZO user pays for is forward passes, and optimisers differ in forwards per step (ZO-SGD 2,
hizoo 3), so every curve here is dev accuracy against *forwards*: ZO forwards over a training
batch, plus the ``--lr auto`` probe's when a cell uses it (dev evaluations are not counted: every
optimiser pays the same for them). Protocol, on the default model (SmolLM2-135M-Instruct, bf16),
sensitive 0.1% mask (WikiText-2, computed once and cached):

- one *cell* = (optimiser, task, seed, lr): ``budget`` forwards of training (steps = budget /
  forwards per step), dev evaluated every ``budget / EVALS`` forwards; saved as
  ``results/convergence_cells/<opt>-<task>-seed<s>-lr<lr>.json`` (atomic) the moment it is done,
  so the grid runs across sessions: a re-run only fills missing cells (or cells whose recorded
  settings differ). ``lr`` may be ``auto`` (the probe's forwards then count).
- target per task = the best mean-over-seeds final best-dev accuracy of ZO-SGD over its lr grid
  at the full budget (ZO-SGD with its best lr at a fixed budget);
- forwards to target per (optimiser, lr) = first evaluation whose dev accuracy ≥ target, mean
  over seeds (a seed that never reaches it counts as unreached, and the mean is then "—").

Prompts are truncated (from the left: the question stays at the end) to ``max_prompt_tokens``
per task so long-passage tasks (BoolQ, RTE) fit the CPU budget.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sparsezo.io import read_json, write_json, write_text

CELLS = Path("results/convergence_cells")
REPORT = Path("results/convergence.md")
BATCH, EPS, DENSITY, CALIB_TOKENS, EVALS = 16, 1e-2, 1e-3, 8192, 10
SEC_PER_FORWARD = 0.24  # batch-16 bf16 forward of a ~25-token SST-2 prompt on the 2-core CPU (DESIGN §8)
SST2_TOKENS = 25


@dataclass(frozen=True)
class TaskSpec:
    num_train: int
    num_dev: int
    max_prompt_tokens: int


# BoolQ has 64 labelled rows here (FewGLUE train + dev32): 32 train / 32 dev; COPA 300/100 of its 400.
TASKS = {"sst2": TaskSpec(1000, 200, 64), "rte": TaskSpec(1000, 100, 128), "copa": TaskSpec(300, 100, 64),
         "boolq": TaskSpec(32, 32, 128)}
# lr grids: ZO-SGD around the measured 1e-4 (DESIGN §8); hizoo's lr is a fraction of a line-search step
LRS = {"sgd": ("3e-05", "0.0001", "0.0003", "auto"), "hizoo": ("0.03", "0.1", "0.3", "auto"),
       "adam": ("1e-05", "3e-05", "0.0001", "auto"), "sign": ("1e-06", "3e-06", "1e-05", "auto"),
       "momentum": ("3e-06", "1e-05", "3e-05", "auto")}


@dataclass(frozen=True)
class Cell:
    optimizer: str
    task: str
    seed: int
    lr: str  # a number as text, or "auto"
    budget: int

    @property
    def path(self) -> Path:
        return CELLS / f"{self.optimizer}-{self.task}-seed{self.seed}-lr{self.lr}.json"

    def spec(self) -> dict:
        t = TASKS[self.task]
        return {"optimizer": self.optimizer, "task": self.task, "seed": self.seed, "lr": self.lr,
                "budget": self.budget, "batch": BATCH, "eps": EPS, "density": DENSITY, "calib_tokens": CALIB_TOKENS,
                "evals": EVALS, "num_train": t.num_train, "num_dev": t.num_dev,
                "max_prompt_tokens": t.max_prompt_tokens}

    def done(self) -> bool:
        return self.path.is_file() and read_json(self.path, "cell").get("spec") == self.spec()


def steps_for(cell: Cell) -> int:
    from sparsezo.zo.optim import forwards_per_step

    return max(1, cell.budget // forwards_per_step(cell.optimizer, 1))


def truncated(examples: list, tok, max_tokens: int) -> list:
    """Prompts cut to their last ``max_tokens`` tokens (the question/cue is at the end of every template)."""
    out = []
    for e in examples:
        ids = tok(e.prompt, add_special_tokens=False).input_ids
        out.append(e if len(ids) <= max_tokens else replace(e, prompt=tok.decode(ids[-max_tokens:])))
    return out


def load_splits(task_name: str, seed: int, tok) -> dict:
    from sparsezo.tasks import get_task

    spec = TASKS[task_name]
    splits = get_task(task_name).splits(seed, spec.num_train, spec.num_dev, 1)  # test is not used here
    return {k: truncated(v, tok, spec.max_prompt_tokens) for k, v in splits.items() if k != "test"}


def mean_tokens(splits: dict, tok) -> float:
    ex = splits["train"][:100]
    return statistics.mean(len(tok(e.prompt + e.candidates[e.gold]).input_ids) for e in ex)


def sensitive_mask(model, tok):
    """The 0.1% sensitive mask of the default model, computed once (a minute) and cached with the cells."""
    from sparsezo.assets import default_calibration_file
    from sparsezo.masks import Mask, compute_mask
    from sparsezo.masks.sensitive import read_texts

    path = CELLS / "masks" / f"sensitive-d{DENSITY:g}-c{CALIB_TOKENS}.safetensors"
    if path.is_file():
        return Mask.load(path)
    calib = default_calibration_file()
    mask = compute_mask(model, "sensitive", DENSITY, tokenizer=tok, texts=read_texts(calib), source=str(calib),
                        calib_tokens=CALIB_TOKENS)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(path)
    return mask


def run_cell(cell: Cell, model, tok, mask) -> dict:
    from sparsezo.train import TrainConfig, fine_tune
    from sparsezo.zo import TrainableParams, ZOConfig
    from sparsezo.zo.optim import forwards_per_step

    splits = load_splits(cell.task, cell.seed, tok)
    steps, fps = steps_for(cell), forwards_per_step(cell.optimizer, 1)
    auto = cell.lr == "auto"
    cfg = TrainConfig(steps=steps, batch_size=BATCH, eval_every=max(1, steps // EVALS), lr_auto=auto,
                      zo=ZOConfig(lr=1e-4 if auto else float(cell.lr), eps=EPS, optimizer=cell.optimizer,
                                  seed=cell.seed))
    params = TrainableParams(model, mask)
    base = params.theta.clone()
    t0 = time.perf_counter()
    try:
        res = fine_tune(model, tok, params, splits["train"], splits["dev"], cfg, progress=sys.stderr.isatty())
    finally:  # fine_tune leaves the best θ in the model: the next cell must start from the base
        params.theta.copy_(base)
        params.restore()
    seconds = time.perf_counter() - t0
    extra = res.lr_probe["forwards"] if res.lr_probe else 0
    curve = [{"step": r["step"], "forwards": extra + r["step"] * fps, "dev": r["dev_accuracy"]}
             for r in res.history if "dev_accuracy" in r]
    return {"spec": cell.spec(), "lr_used": cfg.zo.lr, "probe_forwards": extra, "steps": steps,
            "forwards_per_step": fps, "best_dev": res.best_dev, "best_step": res.best_step,
            "start_dev": res.start_dev, "improved": res.improved, "curve": curve, "seconds": round(seconds, 1),
            "sec_per_step": round(seconds / steps, 3), "lr_probe": res.lr_probe}


def cells(args) -> list[Cell]:
    return [Cell(o, t, s, lr, args.budget) for t in args.tasks for s in args.seeds for o in args.optimizers
            for lr in (args.lrs or LRS[o])]


def projected_seconds(cell: Cell, tokens: float) -> float:
    """Training forwards × a forward's cost scaled by prompt length, + dev passes (~1 forward / 16 examples)."""
    per_forward = SEC_PER_FORWARD * max(1.0, tokens / SST2_TOKENS)
    dev = (EVALS + 1) * math.ceil(TASKS[cell.task].num_dev * 2 / BATCH)  # candidates double the rows
    return per_forward * (cell.budget * (1.1 if cell.lr == "auto" else 1.0) + dev)


# ----------------------------------------------------------------------------- report
def forwards_to(curve: list[dict], target: float) -> float:
    return next((c["forwards"] for c in curve if c["dev"] >= target), math.inf)


def report(all_cells: list[Cell]) -> str:
    done = {c: read_json(c.path, "cell") for c in all_cells if c.done()}
    lines = ["# Convergence: forwards to reach ZO-SGD's best fixed-budget dev accuracy", "",
             "Generated by `python benchmarks/convergence.py --report-only` from results/convergence_cells/ "
             "(see the script's docstring for the protocol). Forwards = training forwards over a batch of "
             f"{BATCH} (+ the --lr auto probe's). Missing cells: {len(all_cells) - len(done)} of {len(all_cells)}.", ""]
    for task in dict.fromkeys(c.task for c in all_cells):
        here = {c: r for c, r in done.items() if c.task == task}
        seeds = sorted({c.seed for c in all_cells if c.task == task})
        by = {}
        for c, r in here.items():
            by.setdefault((c.optimizer, c.lr), {})[c.seed] = r
        sgd = {k: v for k, v in by.items() if k[0] == "sgd" and k[1] != "auto" and len(v) == len(seeds)}
        lines += [f"## {task}", ""]
        if not sgd:
            lines += ["target: — (ZO-SGD cells missing)", ""]
            target = None
        else:
            best = max(sgd, key=lambda k: statistics.mean(r["best_dev"] for r in sgd[k].values()))
            target = statistics.mean(r["best_dev"] for r in sgd[best].values())
            lines += [f"target: {target:.4f} (ZO-SGD lr {best[1]}, mean best dev over seeds {seeds})", ""]
        lines += ["| optimizer | lr | seeds | start dev | best dev (mean) | forwards to target (mean) | "
                  "fwd/step | s/step |", "|---|---|---|---|---|---|---|---|"]
        for (opt, lr), rs in sorted(by.items()):
            ftt = [forwards_to(r["curve"], target) for r in rs.values()] if target is not None else []
            ftt_text = "—" if not ftt or any(math.isinf(f) for f in ftt) else f"{statistics.mean(ftt):.0f}"
            lr_text = lr if lr != "auto" else "auto (" + ", ".join(f"{r['lr_used']:g}" for r in rs.values()) + ")"
            lines.append(f"| {opt} | {lr_text} | {len(rs)}/{len(seeds)} | "
                         f"{statistics.mean(r['start_dev'] for r in rs.values()):.4f} | "
                         f"{statistics.mean(r['best_dev'] for r in rs.values()):.4f} | {ftt_text} | "
                         f"{next(iter(rs.values()))['forwards_per_step']} | "
                         f"{statistics.mean(r['sec_per_step'] for r in rs.values()):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", nargs="+", default=["sgd", "hizoo"], choices=list(LRS))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", default=None, help="override every optimiser's lr grid (numbers or auto)")
    p.add_argument("--budget", type=int, default=2000, help="training forwards per cell")
    p.add_argument("--dry-run", action="store_true", help="print the projected cost and stop")
    p.add_argument("--report-only", action="store_true", help="rebuild results/convergence.md from the cells")
    args = p.parse_args()
    grid = cells(args)
    if args.report_only:
        write_text(REPORT, report(grid) + "\n")
        print(f"wrote {REPORT}")
        return
    from sparsezo.models import load_model

    model, tok = load_model(None, "bfloat16")
    tokens = {t: mean_tokens(load_splits(t, 0, tok), tok) for t in args.tasks}
    todo = [c for c in grid if not c.done()]
    cost = sum(projected_seconds(c, tokens[c.task]) for c in todo)
    print(f"{len(todo)} of {len(grid)} cells to run; projected {cost / 3600:.2f} h ({cost / 60:.0f} min) on the "
          "2-core CPU (mean tokens per example: " + ", ".join(f"{t} {v:.0f}" for t, v in tokens.items()) + ")", flush=True)
    if args.dry_run:
        return
    mask = sensitive_mask(model, tok)
    for c in todo:
        print(f"cell {c.path.name} ({steps_for(c)} steps) ...", flush=True)
        result = run_cell(c, model, tok, mask)
        write_json(c.path, result)
        print(f"  best dev {result['best_dev']:.4f} (start {result['start_dev']:.4f}, improved {result['improved']}) "
              f"in {result['seconds']:.0f}s", flush=True)
    write_text(REPORT, report(grid) + "\n")
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
