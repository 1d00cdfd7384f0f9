"""Issue 22: do the SensZOQ / Sparse MeZO / MeZO claims hold on SmolLM2-135M when every method gets the
same, stated budget of forwards and its own lr search per task? One grid, one report, plots.

    python benchmarks/reproduce.py [--workers 2] [--out results/reproduction] [--plan] [--report-only]
    python benchmarks/reproduce.py --model qwen2.5-0.5b ...   # issue 37: the same protocol on Qwen2.5 (GRIDS)

Protocol (every number below is a constant of this file and part of each cell's recorded spec):

- a *training cell* = (method, task, seed, lr): ``budget`` forwards of ZO training on the task
  (steps = budget / forwards per step, so methods with other forwards per step get the same
  forwards), dev accuracy every ``steps / EVALS`` steps, then the test accuracy of the best-dev θ.
- lr per (method, task): on seed 0, every lr of the method's own 3-point grid is a training cell;
  the lr with the best mean dev accuracy over the evaluations after step 0 (ties: the smaller) is
  the method's lr on that task, and seeds 1-2 run with it. The seed-0 result is the search cell at
  that lr (chosen on dev only, so its test accuracy is unselected). A best lr on the edge of the
  grid adds its neighbour on that side, at most twice (the same rule for every method); a choice
  still on the edge is flagged in the report.
  ``lr_from`` methods (same mask, other base or calibration) reuse another method's lr;
  ``sensitive-auto`` and ``sensitive-nf4-auto`` run ``--lr auto`` (the default recipe's probe; its
  forwards are reported) over the bf16 and the NF4 base.
- prompts are cut to their last ``MAX_PROMPT_TOKENS`` tokens (the question and the answer cue end
  every template); this truncates RTE and BoolQ passages.
- every cell is a JSON file under OUT_cells/, written (atomically) the moment it is done, so the
  grid runs across sessions: a re-run only fills the missing cells (a cell whose recorded settings
  differ counts as missing). ``--workers N`` runs N single-threaded processes that claim cells with
  lock files; ``--plan`` measures a forward per task and prints the projected cost of what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from convergence import model_source
from sparsezo.errors import SparseZOError
from sparsezo.io import atomic_path, read_json, write_json, write_text
from sparsezo.training.lock import RunLock
from stats import paired

# ----------------------------------------------------------------------------- the grid
SEEDS = (0, 1, 2)
SEARCH_SEED = 0
BATCH, EPS, ICL_SHOTS, EVALS, MAX_PROMPT_TOKENS, DENSITY = 8, 1e-2, 4, 6, 64, 1e-3


@dataclass(frozen=True)
class TaskSpec:
    budget: int  # training forwards per cell
    num_train: int
    num_dev: int
    num_test: int


# Budgets are what 8 h of the 2-core CPU buys for the 34 training cells a task (--plan prints the
# projection): a batch-8 forward takes ~0.25 s on SST-2/COPA and ~0.45 s on 64-token RTE/BoolQ on one
# thread, and a full-ZO step 3 s more. BoolQ, whose 32 training rows make it the least informative
# task, got 400 instead of 500 when the first full-ZO cells showed that cost. Test = each task's official evaluation set (SST-2: GLUE dev), a seeded sample of up to 300:
# COPA has 100, RTE 277. BoolQ has 64 labelled rows here (FewGLUE train + dev32): 32 train / 32 dev.
TASKS = {
    "sst2": TaskSpec(1000, 1000, 100, 300),
    "copa": TaskSpec(1000, 300, 100, 100),
    "rte": TaskSpec(500, 1000, 64, 277),
    "boolq": TaskSpec(400, 32, 32, 300),
}


@dataclass(frozen=True)
class Method:
    rule: str
    lrs: tuple[float, ...] = ()  # the searched grid (empty: lr_from, or --lr auto)
    optimizer: str = "sgd"
    q: int = 1
    calib_tokens: int = 32768  # WikiText-2 tokens of the Fisher estimate (sensitive rule only)
    quant: str | None = None
    lr_from: str | None = None  # reuse another method's searched lr on the same task
    lr_auto: bool = False
    density: float = DENSITY
    # where it runs, as (task, seeds) pairs (empty: every task and seed). Not part of a cell's spec: a
    # narrower scope keeps the cells it still holds
    scope: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def runs(self, task: str, seed: int) -> bool:
        """Whether the grid holds this method's cell for (task, seed)."""
        return not self.scope or seed in dict(self.scope).get(task, ())


# Grids: ZO-SGD's best lr tracks 1 / E[g²], the mean squared projected gradient on the mask (sparsezo's
# SGD.lr_grid; on SST-2 at θ₀ E[g²] ≈ 190 for the Fisher mask, ≈ 500 for all weights, 0.4-2 for the random and
# magnitude masks). The first grids (full 1e-6…1e-5, magnitude and random 1e-4…1e-3) were centred on issue 8's
# search and sat 1-3 decades too low for full, magnitude and random; their SST-2 cells outside these grids
# stay on disk, listed in benchmarks/README.md.
#
# The secondary arms (calibration size, 4-bit base, large-magnitude mask) run every seed on SST-2, where the
# methods move, and keep the COPA seed-0 cells they have; RTE and BoolQ run the five arms the main claims
# compare. The full grid projected to ≈ 17 h of wall against the issue's 8 h (--plan); this cut saves 21,000 s of
# single-thread cell time (≈ 2.9 h of wall with 2 workers).
SECONDARY = (("sst2", SEEDS), ("copa", (SEARCH_SEED,)))
METHODS = {
    "full": Method("full", (3e-5, 1e-4, 3e-4), density=1.0),
    "sensitive": Method("sensitive", (3e-5, 1e-4, 3e-4)),
    "sensitive-262k": Method("sensitive", calib_tokens=262144, lr_from="sensitive", scope=SECONDARY),
    "sensitive-nf4": Method("sensitive", quant="nf4", lr_from="sensitive", scope=SECONDARY),
    "sensitive-auto": Method("sensitive", lr_auto=True),
    "sensitive-nf4-auto": Method("sensitive", quant="nf4", lr_auto=True, scope=SECONDARY),
    "magnitude-small": Method("magnitude-small", (3e-3, 1e-2, 3e-2)),
    "magnitude-large": Method("magnitude-large", (3e-3, 1e-2, 3e-2), scope=SECONDARY),
    "random": Method("random", (3e-3, 1e-2, 3e-2)),
}
CLAIMS = [("sensitive", "full", "SensZOQ: the sensitive 0.1% matches or beats full-parameter ZO"),
          ("sensitive", "random", "SensZOQ: the sensitive 0.1% beats a random 0.1%"),
          ("sensitive-262k", "sensitive", "SensZOQ: more calibration text (262k vs 32k tokens) gives a better mask"),
          ("sensitive-nf4", "sensitive", "SensZOQ: a 4-bit base costs little accuracy (a − b ≈ 0)"),
          ("magnitude-small", "full", "Sparse MeZO: small-magnitude weights beat full ZO"),
          ("magnitude-small", "magnitude-large", "Sparse MeZO: small-magnitude beat large-magnitude weights"),
          ("full", "zero-shot", "MeZO: full ZO improves on zero-shot"),
          ("sensitive", "zero-shot", "sparse ZO (sensitive 0.1%) improves on zero-shot"),
          ("sensitive-auto", "sensitive", "--lr auto (no search) matches the searched lr"),
          ("sensitive-nf4-auto", "sensitive-nf4", "--lr auto matches the searched lr on a 4-bit base")]
# the methods whose ``-auto`` twin is checked against them: bf16 and the 4-bit base (issue 19 asks for both
# dtypes; sensitive-nf4 runs at the lr searched on bf16, which is the grid's best lr a 4-bit user would get)
AUTO_BASES = ("sensitive", "sensitive-nf4")
EVAL_ONLY = ("zero-shot", f"icl-{ICL_SHOTS}")
# full ZO's extra cost a step on one thread, next to a second worker: 3.1 s in the first SST-2 cells
# (1,866 s for 500 steps; perturbing, rounding and updating 134.5 M entries is memory-bound, and two workers
# share the bus), × 2.89/5.47 since the −ε phase keeps the applied direction (benchmarks/README.md)
FULL_STEP_SECONDS = 1.65

# Issue 37: the fidelity check on the second family, Qwen2.5-Coder-0.5B (qwen2; fetched by benchmarks/qwen.py),
# where RTE starts above chance. Every method runs the default --lr auto (a search per method and task would
# triple a grid the 2-core CPU already cannot finish in a session); the sensitive masks score 8,192 WikiText-2
# tokens (a Fisher pass over 32,768 takes ~17 min on one thread for this model).
# Budgets: 400 forwards a cell. A batch-8 forward takes 1.07 s on SST-2, 0.93 s on COPA, 3.1 s on RTE and 3.0 s on
# BoolQ (64-token prompts) on one thread of the AVX-512 CPU, so the 60 cells project to 75,000 s of single-thread
# time (≈ 10.5 h of wall with 2 workers; --plan): a grid that runs across sessions.
QWEN_TASKS = {
    "sst2": TaskSpec(400, 1000, 100, 300),
    "rte": TaskSpec(400, 1000, 64, 277),
    "copa": TaskSpec(400, 300, 100, 100),
    "boolq": TaskSpec(400, 32, 32, 300),
}
QWEN_METHODS = {
    "sensitive": Method("sensitive", calib_tokens=8192, lr_auto=True),
    "full": Method("full", density=1.0, lr_auto=True),
    "random": Method("random", lr_auto=True),
    "sensitive-nf4": Method("sensitive", calib_tokens=8192, quant="nf4", lr_auto=True),
}
QWEN_CLAIMS = [("sensitive", "zero-shot", "sparse ZO (sensitive 0.1%) improves on zero-shot"),
               ("sensitive", "full", "SensZOQ: the sensitive 0.1% matches or beats full-parameter ZO"),
               ("sensitive", "random", "SensZOQ: the sensitive 0.1% beats a random 0.1%"),
               ("sensitive-nf4", "sensitive", "SensZOQ: a 4-bit base costs little accuracy (a − b ≈ 0)"),
               ("full", "zero-shot", "MeZO: full ZO improves on zero-shot")]


@dataclass(frozen=True)
class Grid:
    """One model's grid: what its cells train and test, the claims its report checks, where it lives.

    Cells and masks of one grid never mix with another's (own cell folder and mask cache), and the
    default model's grid keeps the cell specs it had before other grids existed."""

    model: str  # a benchmarks/convergence.py MODELS name: the embedded default, or the fetched Qwen2.5 file
    title: str  # the report's heading
    about: str  # the report's description of the model and the methods
    tasks: dict[str, TaskSpec]
    methods: dict[str, Method]
    claims: list[tuple[str, str, str]]
    auto_bases: tuple[str, ...]  # methods whose ``-auto`` twin the report checks against them
    eval_only: tuple[str, ...]  # cells that only evaluate the base
    first_task: str  # its seeds run first: the task whose result the grid needs soonest
    out: str  # the default --out
    full_step_seconds: float  # full ZO's extra cost a step on one thread (the --plan projection)

    @property
    def cache(self) -> Path:
        """Where the grid's masks are cached: big, recomputable, never committed."""
        return Path("runs/reproduce" if self.model == "smollm2" else f"runs/reproduce-{self.model}")


GRIDS = {
    "smollm2": Grid(
        "smollm2", "SensZOQ, Sparse MeZO and MeZO claims on SmolLM2-135M, equal forwards, lr searched per task",
        "SmolLM2-135M-Instruct (embedded), bfloat16. Masks at density 1e-3 (full ZO: all 134.5 M weights); "
        "`sensitive` = Fisher on 32,768 WikiText-2 tokens (the default), `sensitive-262k` on 262,144 (most of "
        "WikiText-2's test split: the largest calibration set on this machine), same lr; `sensitive-nf4` = the "
        "sensitive mask over a 4-bit NF4 base, same lr; `sensitive-auto` = ZO-SGD with `--lr auto` "
        "(the recommended default: no search; its probe's forwards come on top of the budget), `sensitive-nf4-auto` "
        "the same over the NF4 base. lr per method and task: searched on seed 0 over the method's own 3-point grid, "
        "by mean dev accuracy.",
        TASKS, METHODS, CLAIMS, AUTO_BASES, EVAL_ONLY,
        "sst2",  # the task where methods move gives every claim its interval soonest
        "results/reproduction", FULL_STEP_SECONDS),
    "qwen2.5-0.5b": Grid(
        "qwen2.5-0.5b", "sensitive, full and random ZO on Qwen2.5-Coder-0.5B, equal forwards, the default --lr auto",
        "Qwen2.5-Coder-0.5B-Instruct (qwen2, from the GGUF file benchmarks/qwen.py fetches: 630 M weights, its "
        "151,936-token head untied), bfloat16. Masks at density 1e-3 (full ZO: every weight); `sensitive` = "
        "Fisher on 8,192 WikiText-2 tokens, `sensitive-nf4` = the same mask over a 4-bit NF4 base, `random` = a "
        "seeded random 0.1%. Every "
        "method runs ZO-SGD with `--lr auto` (the CLI default: no search; its probe's forwards come on top of the "
        "budget).",
        QWEN_TASKS, QWEN_METHODS, QWEN_CLAIMS, (), ("zero-shot",),
        # SST-2 first, where the methods move: RTE (above chance zero-shot here) went first until its first two
        # sensitive cells showed no movement at this budget (dev 0.61 → 0.63 and 0.52 → 0.56 on 64 examples)
        "sst2",
        "results/reproduction_qwen",
        FULL_STEP_SECONDS * 630 / 134.5),  # the per-entry work of a step scales with the weights
}
GRID = GRIDS["smollm2"]  # the grid this process runs: main() sets it from --model (workers get the same flag)


MAX_EXTEND = 2  # a best lr on the edge of a method's grid adds its neighbour on that side, at most this often


def best_lr(scores: dict[float, float]) -> float:
    """The best-scoring lr; ties go to the smaller lr."""
    return max(scores, key=lambda lr: (scores[lr], -lr))


def neighbour(lr: float, up: bool) -> float:
    """The next value of the 1-3-10 ladder the grids are on."""
    m, e = (int(x) for x in f"{lr:.0e}".split("e"))
    if up:
        return float(f"3e{e}") if m == 1 else float(f"1e{e + 1}")
    return float(f"3e{e - 1}") if m == 1 else float(f"1e{e}")


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    kind: str  # eval | train
    method: str
    task: str
    seed: int
    lr: float | None = None  # train cells; None with --lr auto

    @property
    def name(self) -> str:
        lr = "" if self.kind == "eval" else "-lrauto" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.task}-{self.method}{lr}-seed{self.seed}"

    def spec(self) -> dict:
        """Everything the result depends on: a stored cell with another spec is stale."""
        t = GRID.tasks[self.task]
        s = {**asdict(self), "num_train": t.num_train, "num_dev": t.num_dev, "num_test": t.num_test,
             "max_prompt_tokens": MAX_PROMPT_TOKENS}
        if self.kind == "eval":
            s["shots"] = ICL_SHOTS if self.method.startswith("icl") else 0
        else:
            # the grid decides which cells run, not what one computes: a new grid keeps the cells it shares
            method = {k: v for k, v in asdict(GRID.methods[self.method]).items() if k not in ("lrs", "scope")}
            s.update(method, budget=t.budget, batch=BATCH, eps=EPS, evals=EVALS)
            if method["lr_auto"]:  # the probe's rule: a cell probed under another one is stale
                from sparsezo.training.lr_probe import probe_rule

                s["probe"] = probe_rule()
        if GRID.model != "smollm2":  # the default model's cells predate the other grids: their specs stay as stored
            s["model"] = GRID.model
        return json.loads(json.dumps(s))  # as stored: tuples become lists


class Store:
    """Cell results as JSON files; lock files say which worker is computing what."""

    def __init__(self, out: Path):
        self.root = Path(f"{out}_cells")
        self.cache = GRID.cache
        self._locks: dict[Path, RunLock] = {}

    def path(self, cell: Cell) -> Path:
        return self.root / cell.kind / f"{cell.name}.json"

    def get(self, cell: Cell) -> dict | None:
        p = self.path(cell)
        if not p.is_file():
            return None
        obj = json.loads(p.read_text())
        return obj if obj.get("spec") == cell.spec() else None

    def claim(self, path: Path) -> bool:
        """Take ``path``'s lock; False while another worker holds it. The lock is sparsezo's run lock
        (flock on ``.NAME.lock``): the kernel drops it when its worker exits however it exits, so a
        killed run leaves nothing to clear and a second launcher beside a live one takes none of its cells."""
        lock = RunLock(path)
        if not lock.try_acquire():
            return False
        self._locks[path] = lock
        return True

    def release(self, path: Path) -> None:
        if (lock := self._locks.pop(path, None)) is not None:
            lock.release()

    def search_lrs(self, method: str, task: str) -> list[float]:
        """The lrs a method's search on a task runs: its grid, grown by one neighbour while the best
        of the finished grid sits on an edge (at most MAX_EXTEND times; the same rule for every method)."""
        lrs = list(GRID.methods[method].lrs)
        while lrs and len(lrs) - len(GRID.methods[method].lrs) < MAX_EXTEND:
            got = [self.get(Cell("train", method, task, SEARCH_SEED, lr)) for lr in lrs]
            if any(g is None for g in got):
                break
            best = best_lr({lr: g["dev_auc"] for lr, g in zip(lrs, got)})
            if best == lrs[-1]:
                lrs.append(neighbour(best, up=True))
            elif best == lrs[0]:
                lrs.insert(0, neighbour(best, up=False))
            else:
                break
        return lrs

    def search(self, method: str, task: str) -> dict[float, float] | None:
        """Dev score of every lr of the method's search on the task, or None until all are done."""
        got = {lr: self.get(Cell("train", method, task, SEARCH_SEED, lr)) for lr in self.search_lrs(method, task)}
        return None if not got or any(v is None for v in got.values()) else {lr: v["dev_auc"] for lr, v in got.items()}

    def lr(self, method: str, task: str) -> float | None:
        """The lr a method's runs on a task use (None: its search is not finished, or it runs --lr auto)."""
        m = GRID.methods[method]
        if m.lr_auto:
            return None
        scores = self.search(m.lr_from or method, task)
        return None if scores is None else best_lr(scores)

    def result(self, method: str, task: str, seed: int) -> dict | None:
        """The (method, task, seed) cell the report counts: at the chosen lr."""
        if method in GRID.eval_only:
            return self.get(Cell("eval", method, task, seed))
        if GRID.methods[method].lr_auto:
            return self.get(Cell("train", method, task, seed))
        lr = self.lr(method, task)
        return None if lr is None else self.get(Cell("train", method, task, seed, lr))


def method_cells(store: Store, name: str, task: str) -> list[Cell]:
    """A method's train cells on a task as far as the grid knows them: its search on SEARCH_SEED
    (grown as far as is known yet), then its other seeds in scope, at the chosen lr (None for
    --lr auto, and also while the search runs: such a cell cannot run yet)."""
    m = GRID.methods[name]
    search = bool(m.lrs) and m.runs(task, SEARCH_SEED)
    cells = [Cell("train", name, task, SEARCH_SEED, lr) for lr in store.search_lrs(name, task)] if search else []
    lr = store.lr(name, task)
    return cells + [Cell("train", name, task, s, lr) for s in SEEDS
                    if m.runs(task, s) and not (search and s == SEARCH_SEED)]


def all_cells(store: Store) -> list[Cell]:
    """Every cell that exists or can be run now, in priority order: the grid's first task, then seed 0
    of the other tasks (searches included), then their later seeds; each block has its eval cells
    first, then method by method in the grid's order, so the first method's interval over seeds comes
    before the next method starts. The cells waiting on a search appear once it is done."""
    cells = [Cell("eval", m, t, s) for s in SEEDS for t in GRID.tasks for m in GRID.eval_only]
    cells += [c for t in GRID.tasks for name, m in GRID.methods.items() for c in method_cells(store, name, t)
              if c.lr is not None or m.lr_auto]
    block = lambda c: 0 if c.task == GRID.first_task else 1 if c.seed == SEARCH_SEED else 2  # noqa: E731
    rank = {m: i for i, m in enumerate(GRID.methods)}
    return sorted(cells, key=lambda c: (block(c), -1 if c.kind == "eval" else rank[c.method], c.seed))


def expected_cells(store: Store) -> int:
    """How many cells the finished grid holds (a search's winner is one of its own cells), with the
    searches grown as far as is known yet."""
    return len(GRID.tasks) * len(SEEDS) * len(GRID.eval_only) + sum(
        len(method_cells(store, name, t)) for name in GRID.methods for t in GRID.tasks)


# ----------------------------------------------------------------------------- running one cell
def load_splits(task: str, seed: int, tok) -> dict:
    from convergence import truncated
    from sparsezo.tasks import get_task

    t = GRID.tasks[task]
    splits = get_task(task).splits(seed, t.num_train, t.num_dev, t.num_test)
    return {k: truncated(v, tok, MAX_PROMPT_TOKENS) for k, v in splits.items()}


def mask_for(store: Store, method: Method, seed: int, model, tok):
    """The cell's mask, computed once and cached as a file (other workers wait for it)."""
    from sparsezo.assets import default_calibration_file
    from sparsezo.masks import Mask, compute_mask
    from sparsezo.masks.sensitive import read_texts

    if method.rule == "full":
        return compute_mask(model, "full")
    name = {"random": f"random-seed{seed}", "sensitive": f"sensitive-c{method.calib_tokens}"}.get(method.rule,
                                                                                              method.rule)
    path = store.cache / "masks" / f"{name}-d{method.density:g}.safetensors"
    while not path.is_file():
        if store.claim(path):
            try:
                texts = source = None
                if method.rule == "sensitive":
                    calib = default_calibration_file()
                    texts, source = read_texts(calib), str(calib)
                mask = compute_mask(model, method.rule, method.density, tokenizer=tok, texts=texts, source=source,
                                    seed=seed if method.rule == "random" else 0, calib_tokens=method.calib_tokens)
                mask.save(path)
            finally:
                store.release(path)
        else:
            time.sleep(2)
    return Mask.load(path)


def run_cell(store: Store, cell: Cell) -> dict:
    import torch

    from sparsezo.eval.evaluate import evaluate
    from sparsezo.model.load import load_model
    from sparsezo.quant.convert import quantize_model
    from sparsezo.tasks import get_task
    from sparsezo.tasks.icl import with_demonstrations
    from sparsezo.training.config import TrainConfig
    from sparsezo.training.loop import fine_tune
    from sparsezo.zo import TrainableParams, ZOConfig
    from sparsezo.zo.registry import forwards_per_step

    task = get_task(cell.task)
    model, tok = load_model(model_source(GRID.model), "bfloat16")
    splits = load_splits(cell.task, cell.seed, tok)
    t0 = time.perf_counter()
    if cell.kind == "eval":
        shots = cell.spec()["shots"]
        examples = with_demonstrations(splits["test"], splits["train"], shots, cell.seed) if shots else splits["test"]
        acc = evaluate(model, tok, task, examples)["value"]
        return {"test_accuracy": acc, "n_test": len(examples), "seconds": round(time.perf_counter() - t0, 1)}
    m = GRID.methods[cell.method]
    mask = mask_for(store, m, cell.seed, model, tok)
    if m.quant:
        quantize_model(model, mask, quant=m.quant)
    fps = forwards_per_step(m.optimizer, m.q)
    steps = GRID.tasks[cell.task].budget // fps
    cfg = TrainConfig(steps=steps, batch_size=BATCH, eval_every=max(1, steps // EVALS), lr_auto=m.lr_auto,
                      zo=ZOConfig(lr=cell.lr or 1e-4, eps=EPS, optimizer=m.optimizer, q=m.q, seed=cell.seed))
    t_train = time.perf_counter()
    res = fine_tune(model, tok, TrainableParams(model, mask), splits["train"], splits["dev"], cfg, progress=False,
                    task=task)
    train_seconds = time.perf_counter() - t_train
    test = evaluate(model, tok, task, splits["test"])["value"]  # the best-dev θ fine_tune left in the model
    probe = res.lr_probe["forwards"] if res.lr_probe else 0
    curve = [{"step": r["step"], "forwards": probe + r["step"] * fps, "dev": r["dev_accuracy"]}
             for r in res.history if "dev_accuracy" in r]
    return {"lr_used": res.lr, "probe_forwards": probe, "steps": steps, "forwards_per_step": fps,
            "num_trainable": mask.num_trainable, "best_step": res.best_step, "best_dev": res.best_dev,
            "start_dev": res.start_dev, "improved": res.improved,
            "dev_auc": float(np.mean([c["dev"] for c in curve[1:]])), "curve": curve, "test_accuracy": test,
            "train_seconds": round(train_seconds, 1), "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1), "lr_probe": res.lr_probe}


def work(store: Store) -> int:
    """Claim and run cells until none is left; returns the number that failed."""
    import logging

    logging.getLogger("sparsezo").setLevel(logging.ERROR)
    failed: set[Cell] = set()
    while True:
        todo = [c for c in all_cells(store) if c not in failed and store.get(c) is None]
        if not todo:  # a failed search leaves its method's later seeds unlisted: they count as failed with it
            return len(failed)
        path = next((store.path(c) for c in todo if store.claim(store.path(c))), None)
        if path is None:  # every missing cell is being computed by another worker
            time.sleep(5)
            continue
        cell = next(c for c in todo if store.path(c) == path)
        try:
            if store.get(cell) is None:  # another worker may have finished it meanwhile
                started = time.strftime("%Y-%m-%d %H:%M:%S")
                result = run_cell(store, cell)
                write_json(path, {"spec": cell.spec(), "started": started, **result})
                print(f"[{os.getpid()}] {cell.name}: test {result['test_accuracy']:.4f} ({result['seconds']} s)",
                      file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - one broken cell must not stop the grid
            failed.add(cell)
            print(f"[{os.getpid()}] {cell.name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            store.release(path)


# ----------------------------------------------------------------------------- cost projection
def plan(store: Store) -> dict:
    """Projected single-thread seconds of the missing cells (seeds waiting on a search included).

    A (method, task) with finished cells is projected at their mean measured cost; the others from
    one timed forward per task (taken now, so slower while workers run) × the budget, plus full
    ZO's per-step overhead and the dev/test rows."""
    import torch

    from sparsezo.model.load import load_model
    from sparsezo.training.lr_probe import PROBE_SHARE
    from sparsezo.zo.registry import forwards_per_step

    torch.set_num_threads(1)
    model, tok = load_model(model_source(GRID.model), "bfloat16")
    model.eval()  # as the ZO forwards run it
    per_forward, per_eval_row = {}, {}
    for t in GRID.tasks:
        ex = load_splits(t, 0, tok)["train"][:BATCH]
        batch = tok([e.prompt + e.candidates[e.gold] for e in ex], return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**batch)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(**batch)
                times.append(time.perf_counter() - t0)
        per_forward[t] = float(np.median(times))
        per_eval_row[t] = per_forward[t] / BATCH * len(ex[0].candidates)
    total, cells, measured = 0.0, 0, 0
    by_cell: dict[str, float] = {}  # "task/method" -> projected seconds of its missing cells
    for t, spec in GRID.tasks.items():
        evals = (EVALS + 1) * spec.num_dev + spec.num_test  # rows scored: dev at every evaluation, test once
        for name, m in GRID.methods.items():
            need = method_cells(store, name, t)  # while the search runs, the later seeds are all missing
            got = [g["seconds"] for c in need if (c.lr is not None or m.lr_auto) and (g := store.get(c))]
            missing = len(need) - len(got)
            if got:
                one, measured = float(np.mean(got)), measured + 1
            else:
                steps = spec.budget // forwards_per_step(m.optimizer, m.q)
                one = spec.budget * per_forward[t] * (1 + PROBE_SHARE * m.lr_auto) + evals * per_eval_row[t]
                one += steps * GRID.full_step_seconds if m.rule == "full" else 0.0
            total, cells = total + one * missing, cells + missing
            if missing:
                by_cell[f"{t}/{name}"] = round(one * missing)
        for mname in GRID.eval_only:
            missing = [s for s in SEEDS if store.get(Cell("eval", mname, t, s)) is None]
            rows = spec.num_test * (1 + ICL_SHOTS if mname.startswith("icl") else 1)
            total, cells = total + len(missing) * rows * per_eval_row[t], cells + len(missing)
    done = [g["seconds"] for c in all_cells(store) if (g := store.get(c))]
    return {"cells_missing": cells, "cells_total": expected_cells(store), "projected_single_thread_s": round(total),
            "done_single_thread_s": round(sum(done)), "method_tasks_from_measured_cells": measured,
            "sec_per_forward_1_thread": {t: round(v, 3) for t, v in per_forward.items()},
            "missing_s_by_task_method": dict(sorted(by_cell.items(), key=lambda kv: -kv[1]))}


# ----------------------------------------------------------------------------- report
def _claims(acc) -> list[dict]:
    """Paired differences a − b over every (task, seed) where both cells exist, and per task."""
    out = []
    for a, b, text in GRID.claims:
        by_task = {t: [x - y for s in SEEDS if (x := acc(a, t, s)) is not None and (y := acc(b, t, s)) is not None]
                   for t in GRID.tasks}
        out.append({"claim": text, "a": a, "b": b, **paired([x for d in by_task.values() for x in d]),
                    "per_task": {t: paired(d) for t, d in by_task.items()}})
    return out


def still_rising(cell: dict, n_dev: int) -> bool:
    """Whether the dev curve was still going up at the end of the budget: the best dev of the last
    half of the evaluations beats the best of the first half (step 0 included) by more than one
    standard error of a dev accuracy (√(p(1−p)/n))."""
    devs = [c["dev"] for c in cell["curve"]]
    half = len(devs) // 2 + 1
    early, late = max(devs[:half]), max(devs[half:], default=-1.0)
    return late > early + math.sqrt(max(early * (1 - early), 1e-4) / n_dev)


def auto_share(acc, task: str, method: str = "sensitive") -> dict:
    """Issue 19's check of the default: the gain over zero-shot of ``--lr auto`` as a share of the
    searched lr's gain (mean over the seeds where both cells exist; the share only when the
    searched lr gained)."""
    pairs = [(a, b, z) for s in SEEDS if (a := acc(f"{method}-auto", task, s)) is not None
             and (b := acc(method, task, s)) is not None and (z := acc("zero-shot", task, s)) is not None]
    if not pairs:
        return {"n": 0}
    auto, searched = (float(np.mean([p[i] - p[2] for p in pairs])) for i in (0, 1))
    return {"n": len(pairs), "gain_auto": auto, "gain_searched": searched,
            "share": auto / searched if searched > 0 else None}


def report(store: Store, out: Path, command: str) -> dict:
    grid_methods = [*GRID.eval_only, *GRID.methods]

    def acc(method: str, task: str, seed: int) -> float | None:
        got = store.result(method, task, seed)
        return None if got is None else got["test_accuracy"]

    table = {t: {m: [a for s in SEEDS if (a := acc(m, t, s)) is not None] for m in grid_methods} for t in GRID.tasks}
    runs = {t: {m: [r for s in SEEDS if (r := store.result(m, t, s))] for m in GRID.methods} for t in GRID.tasks}
    status = {t: {m: {"seeds": len(rs), "improved": sum(r["improved"] for r in rs),
                      "rising": sum(still_rising(r, GRID.tasks[t].num_dev) for r in rs),
                      "forwards": GRID.tasks[t].budget + (max(r["probe_forwards"] for r in rs) if rs else 0),
                      "lr": [r["lr_used"] for r in rs]}
                  for m, rs in by_m.items()} for t, by_m in runs.items()}
    search = {t: {m: {f"{lr:g}": g["dev_auc"] if (g := store.get(Cell("train", m, t, SEARCH_SEED, lr))) else None
                      for lr in store.search_lrs(m, t)} if mm.runs(t, SEARCH_SEED) else {}
                  for m, mm in GRID.methods.items() if mm.lrs} for t in GRID.tasks}
    got = {store.path(c): g for c in all_cells(store) if (g := store.get(c)) is not None}
    done = list(got.values())
    # cells a moved grid or a changed rule left behind (benchmarks/README.md): their cost is part of the actual cost
    unused = [read_json(p, "cell") for p in sorted(store.root.glob("*/*.json")) if p not in got]
    auto = {t: {base: auto_share(acc, t, base) for base in GRID.auto_bases} for t in GRID.tasks}
    result = {"command": command, "model": GRID.model, "seeds": list(SEEDS),
              "batch": BATCH, "eps": EPS, "evals": EVALS, "max_prompt_tokens": MAX_PROMPT_TOKENS,
              "icl_shots": ICL_SHOTS, "tasks": {t: asdict(s) for t, s in GRID.tasks.items()},
              "methods": {m: asdict(v) for m, v in GRID.methods.items()}, "lr_search": search, "status": status, "auto_share": auto,
              "test_accuracy": table, "claims": _claims(acc), "cells_done": len(done),
              "cells_total": expected_cells(store), "cell_seconds": round(sum(g["seconds"] for g in done)),
              "unused_cells": len(unused), "unused_seconds": round(sum(g.get("seconds", 0.0) for g in unused))}
    write_json(f"{out}.json", result)
    _plots(out, runs, table)
    write_text(f"{out}.md", _markdown(result, grid_methods, Path(out).name))
    return result


def _plots(out: Path, runs: dict, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for t, by_method in runs.items():
        if not any(by_method.values()):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m, rs in by_method.items():
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            xs = [rs[0]["curve"][i]["forwards"] for i in range(n)]
            ys = np.array([[r["curve"][i]["dev"] for i in range(n)] for r in rs])
            ax.plot(xs, ys.mean(0), marker=".", label=f"{m} (n={len(rs)})")
        zero = table[t]["zero-shot"]
        if zero:
            ax.axhline(np.mean(zero), ls=":", c="gray", lw=1, label="zero-shot (test)")
        ax.set(xlabel="training forwards", ylabel="dev accuracy (mean over seeds)",
               title=f"{t}: dev accuracy vs forwards")
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(f"{out}_{t}.png") as tmp:  # a killed report leaves the old plot, not half a new one
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)


def _narrowed(methods: dict) -> list[str]:
    """The report's line on the arms whose scope is narrower than the grid (none: no line)."""
    where = {m: ", ".join(f"{t} seed{'s' * (len(ss) > 1)} {','.join(map(str, ss))}" for t, ss in v["scope"])
             for m, v in methods.items() if v["scope"]}
    if not where:
        return []
    return ["Narrowed arms (to fit the budget; every other arm runs every task and seed): "
            + "; ".join(f"`{m}` on {w}" for m, w in where.items()) + ".", ""]


def _markdown(r: dict, methods: list[str], name: str) -> str:
    fmt = lambda xs: "-" if not xs else (f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1  # noqa: E731
                                         else f"{xs[0]:.3f} (1 seed)")
    lines = [
        f"# Reproduction: {GRID.title}",
        "",
        f"Regenerate (or finish): `{r['command']}` — cells done: {r['cells_done']}/{r['cells_total']}, "
        f"{r['cell_seconds']} s of single-thread cell time (≈ {r['cell_seconds'] / 2 / 3600:.1f} h of wall time "
        f"with 2 workers on the 2-core CPU), plus {r['unused_seconds']} s in {r['unused_cells']} cells outside the "
        f"current lr grids or stale (≈ {r['unused_seconds'] / 2 / 3600:.1f} h; benchmarks/README.md says why).",
        "",
        f"Model {GRID.about} Batch {r['batch']}, ε {r['eps']}, constant lr; prompts cut to their last "
        f"{r['max_prompt_tokens']} tokens. Every method gets the task's budget of training forwards; dev accuracy "
        f"{r['evals']} times per run, the best-dev θ is tested. Test = each task's official evaluation set "
        "(SST-2: GLUE dev), a seeded sample of up to 300; the same examples for every method of a seed.",
        "",
        *_narrowed(r["methods"]),
        "| task | forwards | train/dev/test | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for t, row in r["test_accuracy"].items():
        s = r["tasks"][t]
        lines.append(f"| {t} | {s['budget']} | {s['num_train']}/{s['num_dev']}/{s['num_test']} | "
                     + " | ".join(fmt(row[m]) for m in methods) + " |")
    lines += ["", "Test accuracy, mean ± std over seeds " + ", ".join(map(str, r["seeds"])) + ".", "",
              "## Claims (paired a − b over every task × seed; 95% Student-t interval)", "",
              "| claim | a − b | n | mean diff | 95% CI | verdict |", "|---|---|---|---|---|---|"]
    for c in r["claims"]:
        cells = (f"{c['n']} | {c['mean_diff']:+.3f} | ±{c['ci95']:.3f} | {c['verdict']}" if c["n"]
                 else "0 | - | - | cells missing")
        lines.append(f"| {c['claim']} | {c['a']} − {c['b']} | {cells} |")
    mark = {"a better": " ✓", "a worse": " ✗", "no significant difference": ""}
    lines += ["", "Per task (mean diff ± 95% CI over seeds; ✓ = a significantly better, ✗ = significantly worse):",
              "", "| a − b | " + " | ".join(GRID.tasks) + " |", "|---|" + "---|" * len(GRID.tasks)]
    for c in r["claims"]:
        lines.append(f"| {c['a']} − {c['b']} | " + " | ".join(
            "-" if not p["n"] else f"{p['mean_diff']:+.3f} (1 seed)" if p["n"] == 1
            else f"{p['mean_diff']:+.3f} ± {p['ci95']:.3f}{mark[p['verdict']]}"
            for p in c["per_task"].values()) + " |")
    if GRID.auto_bases:
        lines += _auto_section(r)
    lines += _moved_section(r)
    if any(v["lrs"] for v in r["methods"].values()):
        lines += _search_section(r)
    lines += ["", "## Plots", ""] + [f"- `{name}_{t}.png`: {t} dev accuracy vs forwards, one line per method"
                                     for t in GRID.tasks] + [""]
    return "\n".join(lines)


def _auto_section(r: dict) -> list[str]:
    lines = ["", "## `--lr auto` against the searched lr (issue 19: the default's gain ≥ 80% of the best lr's)", "",
              "Test gain over zero-shot, mean over the seeds where both cells exist; share = auto / searched "
              "(only where the searched lr gained).", "",
              "| task | base | seeds | gain, --lr auto | gain, searched lr | share |", "|---|---|---|---|---|---|"]
    for t, by_base in r["auto_share"].items():
        for base, a in by_base.items():
            lines.append(f"| {t} | {base} | - | - | - | - |" if not a["n"] else
                         f"| {t} | {base} | {a['n']} | {a['gain_auto']:+.3f} | {a['gain_searched']:+.3f} | "
                         + ("-" if a["share"] is None else f"{a['share']:.2f}") + " |")
    return lines


def _moved_section(r: dict) -> list[str]:
    lines = ["", "## Did each method move, and had it flattened?", "",
              "Per task: seeds whose best dev beat the step-0 dev by > 2 standard errors (`improved`) / seeds whose "
              "dev curve was still rising in the second half of the budget (best of the last half > best of the "
              "first half + 1 SE) / seeds done; forwards = the budget (+ the --lr auto probe's).", "",
              "| method | " + " | ".join(f"{t} ({r['tasks'][t]['budget']} fwd)" for t in GRID.tasks) + " |",
              "|---|" + "---|" * len(GRID.tasks)]
    for m in GRID.methods:
        lines.append(f"| {m} | " + " | ".join(
            "-" if not (st := r["status"][t][m])["seeds"] else
            f"improved {st['improved']}/{st['seeds']}, rising {st['rising']}/{st['seeds']}"
            + (f" ({st['forwards']} fwd)" if st["forwards"] != r["tasks"][t]["budget"] else "")
            for t in GRID.tasks) + " |")
    auto = [m for m, v in r["methods"].items() if v["lr_auto"]]
    if auto:
        lines += ["", "The lr `--lr auto` chose, seed by seed:", "",
                  "| method | " + " | ".join(GRID.tasks) + " |", "|---|" + "---|" * len(GRID.tasks)]
        lines += [f"| {m} | " + " | ".join(", ".join(f"{lr:.1e}" for lr in r["status"][t][m]["lr"]) or "-"
                                         for t in GRID.tasks) + " |" for m in auto]
    return lines


def _search_section(r: dict) -> list[str]:
    lines = ["", "## Learning-rate search (seed 0, dev only; score = mean dev accuracy after step 0)", "",
              f"A best lr on the edge of a method's grid adds the next value on that side (at most {MAX_EXTEND} times, "
              "the same rule for every method); **bold** = the choice, once every lr is done (… = still running or "
              "to run); ⚠ = the choice is still on the edge (a wider grid might do better).", "",
              "| task | " + " | ".join(m for m, v in r["methods"].items() if v["lrs"]) + " |",
              "|---|" + "---|" * sum(bool(v["lrs"]) for v in r["methods"].values())]
    for t, by_m in r["lr_search"].items():
        row = []
        for scores in by_m.values():  # every lr of the search so far; the choice once all are done
            if not scores:
                row.append("not run")
                continue
            done = None not in scores.values()
            chosen = best_lr({float(k): v for k, v in scores.items()}) if done else None
            edge = " ⚠" if done and chosen in (min(map(float, scores)), max(map(float, scores))) else ""
            row.append(", ".join(f"{k}: …" if v is None else f"**{k}: {v:.3f}**" if float(k) == chosen else f"{k}: {v:.3f}"
                                 for k, v in scores.items()) + edge)
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    return lines


# ----------------------------------------------------------------------------- entry point
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=GRIDS, default="smollm2",
                    help="whose grid: the default model's (issue 22) or Qwen2.5's (issue 37; fetch it with qwen.py)")
    ap.add_argument("--out", help="cells in OUT_cells/, report OUT.md/.json (default: the grid's own)")
    ap.add_argument("--workers", type=int, default=2, help="single-threaded worker processes")
    ap.add_argument("--plan", action="store_true", help="print the projected cost of the missing cells and stop")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the cells that exist")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global GRID
    GRID = GRIDS[args.model]
    out = Path(args.out or GRID.out)
    if not args.report_only:
        try:
            model_source(GRID.model)  # a missing model is one line now, not a traceback in every worker
        except SparseZOError as e:
            sys.exit(f"error: {e}")
    store = Store(out)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        sys.exit(1 if work(store) else 0)
    if args.plan:
        p = plan(store)
        p["projected_wall_h"] = round(p["projected_single_thread_s"] / max(1, args.workers) / 3600, 2)
        p["total_wall_h"] = round((p["projected_single_thread_s"] + p["done_single_thread_s"]) / 2 / 3600, 2)
        print(json.dumps(p))
        return
    command = "python benchmarks/reproduce.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:] if a not in ("--report-only", "--plan"))
    failed = 0
    if not args.report_only:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--model", args.model, "--out", str(out)], env=env)
                 for _ in range(args.workers)]
        failed = sum(p.wait() != 0 for p in procs)
    result = report(store, out, command.strip())
    pooled = [{k: v for k, v in c.items() if k != "per_task"} for c in result["claims"]]
    print(json.dumps({**{k: result[k] for k in ("cells_done", "cells_total", "cell_seconds")}, "claims": pooled}))
    if failed or result["cells_done"] < result["cells_total"]:
        sys.exit(f"{result['cells_total'] - result['cells_done']} cells missing; re-run to fill them")


if __name__ == "__main__":
    main()
