"""Issue 8: do the SensZOQ / Sparse MeZO claims hold on SmolLM2-135M? One grid, one table, plots.

    python benchmarks/reproduce.py [--workers 2] [--out results/reproduction] [--report-only]

Every (method, task, seed) is one *cell*, saved as OUT_cells/<kind>/<name>.json the moment it
is done (and committed), so the grid runs across sessions and in the background: a re-run
only fills the missing cells (a cell whose recorded settings differ from the current ones
counts as missing). ``--workers N`` runs N single-threaded processes that claim cells with
lock files (on 2 cores, 2 x 1 thread beats 1 x 2 threads by ~1.3x on these small batches).

Order: the learning-rate search first (SST-2, seed 0, dev split only), then zero-shot/ICL,
then the grid by seed and task, then the density sweep; the report is rewritten at the end
from whatever cells exist, marking the missing ones. Nothing is selected on test: lr by dev
accuracy in the search, θ by dev accuracy during training (MeZO's protocol).
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

from sparsezo.io import atomic_path, write_json, write_text
from stats import paired

# ----------------------------------------------------------------------------- the grid
SEEDS = (0, 1, 2)
BATCH, EPS, CALIB_TOKENS, ICL_SHOTS = 8, 1e-2, 8192, 4


@dataclass(frozen=True)
class TaskSpec:
    steps: int
    num_train: int
    num_dev: int
    num_test: int


# Steps are set by the 3-hour CPU budget: long-prompt tasks (RTE ~90 tokens, BoolQ ~160) cost
# 5-12x more per step than SST-2. BoolQ and WiC have 64 labelled training rows here (FewGLUE
# train + dev32): 32 train / 32 dev. COPA: 300 / 100 of its 400.
TASKS = {
    "sst2": TaskSpec(160, 1000, 100, 200),
    "copa": TaskSpec(80, 300, 100, 100),
    "wic": TaskSpec(48, 32, 32, 200),
    "rte": TaskSpec(30, 1000, 64, 100),
    "boolq": TaskSpec(16, 32, 32, 100),
}
# Dev evaluations every steps/4, on RTE and BoolQ every steps/2 (their dev passes are long);
# test at steps/2 and at the end (step 0 = the zero-shot cell), and at the best-dev step.
EVALS_PER_RUN = {"sst2": 4, "copa": 4, "wic": 4, "rte": 2, "boolq": 2}


@dataclass(frozen=True)
class Method:
    rule: str
    density: float = 1e-3
    quant: str | None = None
    lr_from: str | None = None  # reuse another method's searched lr (same mask, other base)


METHODS = {
    "full": Method("full", 1.0),
    "sensitive": Method("sensitive"),
    "sensitive-task": Method("sensitive-task"),
    "magnitude-small": Method("magnitude-small"),
    "magnitude-large": Method("magnitude-large"),
    "random": Method("random"),
    "sensitive-nf4": Method("sensitive", quant="nf4", lr_from="sensitive"),
}
EVAL_ONLY = ("zero-shot", f"icl-{ICL_SHOTS}")
LR_GRID = {"full": (3e-8, 1e-7, 3e-7, 1e-6), "sparse": (3e-5, 1e-4, 3e-4, 1e-3)}
SEARCH_TASK, SEARCH_SEED, SEARCH_STEPS = "sst2", 0, 150
DENSITIES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DENSITY_RULES = ("sensitive", "random", "magnitude-small")


MAX_EXTEND = 2  # a best lr on the edge of the grid extends it, at most this many steps


def lr_grid(method: str) -> tuple[float, ...]:
    return LR_GRID["full" if METHODS[method].rule == "full" else "sparse"]


def _best_lr(scores: dict[float, float]) -> float:
    """The best-scoring lr; ties go to the smaller lr (the same rule for the search and its use)."""
    return max(scores, key=lambda lr: (scores[lr], -lr))


def _neighbour(lr: float, up: bool) -> float:
    """The next value of the 1-3-10 ladder the grids are on."""
    m, e = f"{lr:.0e}".split("e")
    m, e = int(m), int(e)
    if up:
        return float(f"3e{e}") if m == 1 else float(f"1e{e + 1}")
    return float(f"3e{e - 1}") if m == 1 else float(f"1e{e}")


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    kind: str  # search | eval | grid | density
    method: str
    task: str
    seed: int
    lr: float | None = None  # search cells only; others read the searched lr
    density: float | None = None  # density cells only

    @property
    def name(self) -> str:
        extra = f"-lr{self.lr:g}" if self.lr is not None else f"-d{self.density:g}" if self.density is not None else ""
        return f"{self.task}-{self.method}{extra}-seed{self.seed}"

    def spec(self) -> dict:
        """Everything the result depends on: a stored cell with another spec is stale."""
        t = TASKS[self.task]
        steps = SEARCH_STEPS if self.kind == "search" else t.steps
        s = {**asdict(self), **asdict(t), "steps": steps, "batch": BATCH, "eps": EPS, "calib_tokens": CALIB_TOKENS}
        if self.kind in ("grid", "density"):
            s["eval_every"] = t.steps // EVALS_PER_RUN[self.task]
        if self.kind == "eval":
            s.pop("steps")
            s["shots"] = ICL_SHOTS if self.method.startswith("icl") else 0
        return s


def all_cells(store: Store) -> list[Cell]:
    """Every cell, in priority order; the lr searches grow while their best lr sits on an edge."""
    cells = [Cell("search", m, SEARCH_TASK, SEARCH_SEED, lr=lr) for m in METHODS if not METHODS[m].lr_from
             for lr in store.search(m)[0]]
    cells += [Cell("eval", m, t, s) for s in SEEDS for t in TASKS for m in EVAL_ONLY]
    cells += [Cell("grid", m, t, s) for s in SEEDS for t in TASKS for m in METHODS]
    cells += [Cell("density", r, "sst2", 0, density=d) for d in DENSITIES if d != 1e-3 for r in DENSITY_RULES]
    return cells


class Store:
    """Cell results as JSON files; lock files say which worker is computing what."""

    def __init__(self, out: Path):
        self.root = Path(f"{out}_cells")
        self.cache = Path("runs/reproduce")  # masks: big, recomputable, never committed

    def path(self, cell: Cell) -> Path:
        return self.root / cell.kind / f"{cell.name}.json"

    def get(self, cell: Cell) -> dict | None:
        p = self.path(cell)
        if not p.is_file():
            return None
        obj = json.loads(p.read_text())
        return obj if obj.get("spec") == cell.spec() else None

    def claim(self, path: Path) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(f"{path}.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def release(self, path: Path) -> None:
        Path(f"{path}.lock").unlink(missing_ok=True)

    def clear_locks(self) -> None:
        for d in (self.root, self.cache):
            for p in d.rglob("*.lock") if d.exists() else []:
                p.unlink()

    def lr(self, method: str, density: float | None = None) -> float | None:
        """The searched lr of ``method`` (best mean dev accuracy over the search run's evaluations);
        at another density, scaled along the power law through it and full ZO's lr (None: not searched yet)."""
        if density is not None and density != METHODS[method].density:
            at, full = self.lr(method), self.lr("full")
            if at is None or full is None:
                return None
            a = math.log(full / at) / math.log(METHODS[method].density)  # lr(d) = at * (1e-3 / d) ** a
            return at * (METHODS[method].density / density) ** a
        _, scores = self.search(METHODS[method].lr_from or method)
        return _best_lr(scores) if scores else None

    def search(self, method: str) -> tuple[list[float], dict[float, float]]:
        """(lrs to search, their dev scores once all are done and the best is not on an edge, else {})."""
        lrs = list(lr_grid(method))
        while True:
            got = {lr: self.get(Cell("search", method, SEARCH_TASK, SEARCH_SEED, lr=lr)) for lr in lrs}
            if any(v is None for v in got.values()):
                return lrs, {}
            scores = {lr: v["dev_auc"] for lr, v in got.items()}
            best = _best_lr(scores)
            if len(lrs) - len(lr_grid(method)) < MAX_EXTEND and best in (lrs[0], lrs[-1]):
                lrs = [_neighbour(lrs[0], up=False), *lrs] if best == lrs[0] else [*lrs, _neighbour(lrs[-1], up=True)]
                continue
            return lrs, scores


# ----------------------------------------------------------------------------- running one cell
def mask_for(store: Store, method: Method, task: str, seed: int, density: float, model, tok, train):
    """The cell's mask, computed once and cached as a file (other workers wait for it)."""
    from sparsezo.assets import default_calibration_file
    from sparsezo.masks import Mask, compute_mask
    from sparsezo.masks.sensitive import read_texts

    if method.rule == "full":
        return compute_mask(model, "full")
    seeded = method.rule == "random"
    name = {"sensitive-task": f"sensitive-task-{task}-seed{seed}", "random": f"random-seed{seed}"}.get(
        method.rule, method.rule) + f"-d{density:g}"
    path = store.cache / "masks" / f"{name}.safetensors"
    while not path.is_file():
        if store.claim(path):
            try:
                texts, source = None, None
                if method.rule == "sensitive-task":  # this seed's training split: no dev/test text
                    texts, source = [e.prompt + e.candidates[e.gold] for e in train], f"task:{task}:train:seed{seed}"
                elif method.rule == "sensitive":
                    calib = default_calibration_file()
                    texts, source = read_texts(calib), str(calib)
                mask = compute_mask(model, method.rule, density, tokenizer=tok, texts=texts, source=source,
                                    seed=seed if seeded else 0, calib_tokens=CALIB_TOKENS)
                mask.save(path)
            finally:
                store.release(path)
        else:
            time.sleep(2)
    return Mask.load(path)


def run_cell(store: Store, cell: Cell) -> dict:
    import torch

    from sparsezo.evaluate import evaluate
    from sparsezo.models import load_model
    from sparsezo.quant import quantize_model
    from sparsezo.tasks import get_task
    from sparsezo.tasks.icl import with_demonstrations
    from sparsezo.train import TrainConfig, fine_tune
    from sparsezo.zo import TrainableParams, ZOConfig

    spec = cell.spec()
    task = get_task(cell.task)
    splits = task.splits(cell.seed, spec["num_train"], spec["num_dev"], spec["num_test"])
    model, tok = load_model(None, "bfloat16")
    t0 = time.perf_counter()
    test = lambda: evaluate(model, tok, task, splits["test"])["value"]  # noqa: E731
    if cell.kind == "eval":
        examples = with_demonstrations(splits["test"], splits["train"], spec["shots"], cell.seed)
        acc = evaluate(model, tok, task, examples)["value"]
        return {"test_accuracy": acc, "n_test": len(examples), "seconds": round(time.perf_counter() - t0, 1)}
    method = METHODS[cell.method]
    density = cell.density or method.density
    lr = cell.lr if cell.kind == "search" else store.lr(cell.method, density)
    mask = mask_for(store, method, cell.task, cell.seed, density, model, tok, splits["train"])
    if method.quant:
        quantize_model(model, mask)
    t_train = time.perf_counter()
    steps = spec["steps"]
    eval_every = spec.get("eval_every", steps // 4)
    test_at = set() if cell.kind == "search" else {steps // 2, steps} | ({0} if method.quant else set())
    on_eval = lambda step: {"test_accuracy": test()} if step in test_at else {}  # noqa: E731
    cfg = TrainConfig(steps=steps, batch_size=BATCH, eval_every=eval_every,
                      zo=ZOConfig(lr=lr, eps=EPS, seed=cell.seed))
    params = TrainableParams(model, mask)
    res = fine_tune(model, tok, params, splits["train"], splits["dev"], cfg, progress=False, task=task,
                    on_eval=on_eval)
    curve = [{"step": r["step"], "dev": r["dev_accuracy"], **({"test": r["test_accuracy"]} if "test_accuracy" in r
                                                              else {})} for r in res.history if "dev_accuracy" in r]
    out = {"lr": lr, "num_trainable": mask.num_trainable, "best_step": res.best_step, "best_dev": res.best_dev,
           "dev_auc": float(np.mean([c["dev"] for c in curve[1:]])), "curve": curve,
           "train_seconds": round(time.perf_counter() - t_train, 1), "threads": torch.get_num_threads()}
    if cell.kind != "search":  # params hold the best-dev θ; its test accuracy is the reported number
        at = {c["step"]: c.get("test") for c in curve}
        out["test_accuracy"] = at[res.best_step] if at.get(res.best_step) is not None else test()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def ready(store: Store, cell: Cell) -> bool:
    """Training cells wait for their method's lr search (density cells for full ZO's too)."""
    return cell.kind in ("search", "eval") or store.lr(cell.method, cell.density) is not None


def work(store: Store) -> int:
    """Claim and run cells until none is left; returns the number that failed."""
    import logging

    logging.getLogger("sparsezo").setLevel(logging.WARNING)
    failed: set[Cell] = set()
    while True:
        todo = [c for c in all_cells(store) if c not in failed and store.get(c) is None]
        if not todo:
            return len(failed)
        tried = False
        for cell in todo:
            path = store.path(cell)
            if not ready(store, cell) or not store.claim(path):
                continue
            try:
                if store.get(cell) is None:  # another worker may have finished it meanwhile
                    t0 = time.strftime("%Y-%m-%d %H:%M:%S")
                    result = run_cell(store, cell)
                    write_json(path, {"spec": cell.spec(), "started": t0, **result})
                    print(f"[{os.getpid()}] {cell.kind} {cell.name}: {result.get('test_accuracy', result.get('dev_auc')):.4f}"
                          f" ({result['seconds']}s)", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - one broken cell must not stop the grid
                failed.add(cell)
                print(f"[{os.getpid()}] {cell.kind} {cell.name} FAILED: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
            finally:
                store.release(path)
            tried = True
            break  # re-read the list: priorities first
        if not tried:
            if not any(store.path(c).with_name(store.path(c).name + ".lock").exists() for c in todo):
                return len(failed) + len(todo)  # nothing runnable and nobody computing: stuck (failed search)
            time.sleep(5)


# ----------------------------------------------------------------------------- report
def report(store: Store, out: Path, command: str) -> dict:
    """Table, claims, steps-to-target, lr search, plots; from whatever cells exist."""
    grid_methods = [*EVAL_ONLY, *METHODS]

    def acc(method: str, task: str, seed: int) -> float | None:
        kind = "eval" if method in EVAL_ONLY else "grid"
        got = store.get(Cell(kind, method, task, seed))
        return None if got is None else got["test_accuracy"]

    table = {t: {m: [a for s in SEEDS if (a := acc(m, t, s)) is not None] for m in grid_methods} for t in TASKS}
    lrs = {m: store.lr(m) for m in METHODS}
    search = {m: {f"{lr:g}": (g["dev_auc"] if (g := store.get(Cell("search", m, SEARCH_TASK, SEARCH_SEED, lr=lr)))
                              else None) for lr in store.search(m)[0]} for m in METHODS if not METHODS[m].lr_from}
    curves = {t: {m: [g["curve"] for s in SEEDS if (g := store.get(Cell("grid", m, t, s)))] for m in METHODS}
              for t in TASKS}
    claims = _claims(acc)
    reach = _steps_to_full(store)
    density = {r: {f"{d:g}": _density_acc(store, acc, r, d) for d in DENSITIES} for r in DENSITY_RULES}
    everything = all_cells(store)
    done = [(c.kind, got) for c in everything if (got := store.get(c)) is not None]
    by_kind = {k: round(sum(got["seconds"] for kind, got in done if kind == k)) for k in ("search", "eval", "grid",
                                                                                           "density")}
    result = {"command": command, "model": "SmolLM2-135M-Instruct (embedded), bfloat16", "seeds": list(SEEDS),
              "batch": BATCH, "eps": EPS, "calib_tokens": CALIB_TOKENS, "icl_shots": ICL_SHOTS,
              "tasks": {t: asdict(s) for t, s in TASKS.items()}, "lr": lrs, "lr_search": search,
              "test_accuracy": table, "claims": claims, "steps_to_full_zo_dev": reach, "density": density,
              "cells_done": len(done), "cells_total": len(everything), "cell_seconds": sum(by_kind.values()),
              "cell_seconds_by_kind": by_kind}
    write_json(f"{out}.json", result)
    _plots(out, table, curves, density, {m: acc(m, "sst2", 0) for m in ("full", "zero-shot")})
    write_text(f"{out}.md", _markdown(result, grid_methods, out))
    return result


CLAIMS = [("sensitive", "full", "SensZOQ: sensitive 0.1% matches or beats full-parameter ZO"),
          ("sensitive", "random", "SensZOQ: sensitive 0.1% beats a random 0.1%"),
          ("sensitive", "sensitive-task", "SensZOQ: the WikiText mask transfers (vs a mask from the task itself)"),
          ("sensitive-nf4", "sensitive", "SensZOQ: a 4-bit base costs little accuracy"),
          ("magnitude-small", "full", "Sparse MeZO: small-magnitude weights beat full ZO"),
          ("magnitude-small", "magnitude-large", "Sparse MeZO: small-magnitude beat large-magnitude weights"),
          ("full", "zero-shot", "MeZO: full ZO improves on zero-shot")]


def _claims(acc) -> list[dict]:
    """Paired differences a − b over every (task, seed) where both cells exist, and per task.

    Pooled is the papers' framing (a method wins across tasks); per task shows where it does,
    since tasks that do not move in the step budget dilute the pooled difference."""
    out = []
    for a, b, text in CLAIMS:
        by_task = {t: [x - y for s in SEEDS if (x := acc(a, t, s)) is not None and (y := acc(b, t, s)) is not None]
                   for t in TASKS}
        out.append({"claim": text, "a": a, "b": b, **paired([x for d in by_task.values() for x in d]),
                    "per_task": {t: paired(d) for t, d in by_task.items()}})
    return out


def _steps_to_full(store: Store) -> dict:
    """Per task and method: first evaluated step whose dev accuracy reaches full ZO's final dev accuracy
    (same seed), as the list over seeds (None: not reached within the budget)."""
    out: dict = {}
    for t in TASKS:
        for s in SEEDS:
            full = store.get(Cell("grid", "full", t, s))
            if full is None:
                continue
            target = full["curve"][-1]["dev"]
            for m in METHODS:
                got = store.get(Cell("grid", m, t, s))
                if got is not None:
                    hit = next((c["step"] for c in got["curve"] if c["step"] > 0 and c["dev"] >= target), None)
                    out.setdefault(t, {}).setdefault(m, []).append(hit)
    return out


def _density_acc(store: Store, acc, rule: str, d: float) -> float | None:
    if d == 1e-3:
        return acc(rule, "sst2", 0)
    got = store.get(Cell("density", rule, "sst2", 0, density=d))
    return None if got is None else got["test_accuracy"]


def _plots(out: Path, table: dict, curves: dict, density: dict, sst2_seed0: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for t, by_method in curves.items():
        if not any(by_method.values()):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        zero = table[t]["zero-shot"]
        for m, runs in by_method.items():
            if not runs:
                continue
            steps = sorted({c["step"] for r in runs for c in r if "test" in c} | ({0} if zero else set()))
            ys = []
            for st in steps:
                vals = [next((c["test"] for c in r if c["step"] == st and "test" in c), None) for r in runs]
                vals = [v for v in vals if v is not None] or (zero if st == 0 and not METHODS[m].quant else [])
                ys.append((np.mean(vals), np.std(vals)) if vals else (np.nan, 0.0))
            mu, sd = np.array(ys).T
            ax.plot(steps, mu, marker="o", label=f"{m} (n={len(runs)})")
            ax.fill_between(steps, mu - sd, mu + sd, alpha=0.12)
        icl = table[t][EVAL_ONLY[1]]
        if icl:
            ax.axhline(np.mean(icl), ls="--", c="gray", lw=1, label=f"{ICL_SHOTS}-shot ICL")
        ax.set(xlabel="ZO steps", ylabel="test accuracy of θ at that step",
               title=f"{t}: test accuracy vs steps (mean ± std over seeds)")
        _save(fig, ax, f"{out}_{t}.png")
    if any(v is not None for r in density.values() for v in r.values()):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for rule, by_d in density.items():
            ds = [float(d) for d, v in by_d.items() if v is not None]
            ax.plot(ds, [by_d[f"{d:g}"] for d in ds], marker="o", label=rule)
        for (m, value), style in zip(sst2_seed0.items(), ("-.", ":")):
            if value is not None:
                ax.axhline(value, ls=style, c="gray", lw=1, label=f"{m} (seed 0)")
        ax.set(xscale="log", xlabel="density (fraction of weights trained)", ylabel="SST-2 test accuracy",
               title="SST-2: accuracy vs density (seed 0)")
        _save(fig, ax, f"{out}_density.png")


def _save(fig, ax, path: str) -> None:
    """Legend, layout, and an atomic PNG write (a killed report leaves the old plot, not half a new one)."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _markdown(r: dict, methods: list[str], out: Path) -> str:
    fmt = lambda xs: "-" if not xs else (f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1  # noqa: E731
                                         else f"{xs[0]:.3f} (1 seed)")
    name = Path(out).name
    lines = [
        "# Reproduction: SensZOQ and Sparse MeZO claims on SmolLM2-135M",
        "",
        f"Regenerate (or finish): `{r['command']}` — cells done: {r['cells_done']}/{r['cells_total']}, "
        f"{r['cell_seconds']} s of cell time on single-thread workers ("
        + ", ".join(f"{k} {v} s" for k, v in r["cell_seconds_by_kind"].items())
        + f"), i.e. ≈ {r['cell_seconds'] / 2 / 3600:.1f} h of wall time with 2 workers on this 2-core CPU.",
        "",
        f"Model {r['model']}. ZO-SGD, batch {r['batch']}, eps {r['eps']}, constant lr, MeZO protocol "
        "(dev evaluated every steps/4, best-dev θ tested). Masks at density 1e-3 (full ZO: all 134.5 M weights); "
        f"`sensitive` = Fisher on {r['calib_tokens']} WikiText-2 tokens, `sensitive-task` = Fisher on the seed's "
        f"training split of the task; `sensitive-nf4` = the sensitive mask over a 4-bit NF4 base; ICL = "
        f"{r['icl_shots']} demonstrations from the training split. Test = a seeded sample of each task's official "
        "evaluation set (SST-2: GLUE dev; SuperGLUE: val); the same examples for every method of a seed.",
        "",
        "| task | steps | train/dev/test | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for t, row in r["test_accuracy"].items():
        s = r["tasks"][t]
        lines.append(f"| {t} | {s['steps']} | {s['num_train']}/{s['num_dev']}/{s['num_test']} | "
                     + " | ".join(fmt(row[m]) for m in methods) + " |")
    lines += ["", "Test accuracy, mean ± std over seeds " + ", ".join(map(str, r["seeds"])) + ".", "",
              "## Claims (paired a − b over every task × seed; 95% Student-t interval)", "",
              "| claim | a − b | n | mean diff | 95% CI | verdict |", "|---|---|---|---|---|---|"]
    for c in r["claims"]:
        if c["n"]:
            lines.append(f"| {c['claim']} | {c['a']} − {c['b']} | {c['n']} | {c['mean_diff']:+.3f} | "
                         f"±{c['ci95']:.3f} | {c['verdict']} |")
        else:
            lines.append(f"| {c['claim']} | {c['a']} − {c['b']} | 0 | - | - | cells missing |")
    mark = {"a better": " ✓", "a worse": " ✗", "no significant difference": ""}
    lines += ["", "Per task (mean diff ± 95% CI over seeds; ✓ = a significantly better, ✗ = significantly worse):",
              "", "| a − b | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for c in r["claims"]:
        lines.append(f"| {c['a']} − {c['b']} | " + " | ".join(
            "-" if not p["n"] else f"{p['mean_diff']:+.3f} (1 seed)" if p["n"] == 1
            else f"{p['mean_diff']:+.3f} ± {p['ci95']:.3f}{mark[p['verdict']]}"
            for p in c["per_task"].values()) + " |")
    lines += ["", "## Steps to reach full ZO's final dev accuracy (same seed; per seed, `-` = not reached)", "",
              "Where full ZO stays at its starting dev accuracy, any method that does not fall below it "
              "'reaches' it at the first evaluation: read this table next to the curves.", "",
              "| task | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for t, by_m in r["steps_to_full_zo_dev"].items():
        lines.append(f"| {t} | " + " | ".join(",".join("-" if x is None else str(x) for x in by_m.get(m, []))
                                             or "?" for m in METHODS) + " |")
    lines += ["", f"## Learning-rate search ({SEARCH_TASK}, seed {SEARCH_SEED}, {SEARCH_STEPS} steps, dev only)", "",
              "Score = mean dev accuracy over the evaluations after step 0. Every method starts from the same "
              "four candidates on its scale (full ZO trains 1266x more weights, so its grid is 1000x lower); when "
              f"the best is on an edge the grid grows one step that way (at most {MAX_EXTEND} times), the same rule "
              "for every method. `sensitive-nf4` uses `sensitive`'s lr (same mask; the question is what the 4-bit "
              "base costs).", "", "| method | lr: dev score | chosen |", "|---|---|---|"]
    for m, by_lr in r["lr_search"].items():
        lines.append(f"| {m} | " + ", ".join(f"{lr}: {v:.3f}" if v is not None else f"{lr}: -"
                                             for lr, v in by_lr.items()) + f" | {r['lr'][m]} |")
    lines += ["", "## Accuracy vs density (SST-2, seed 0)", "", "| rule | " + " | ".join(r["density"][DENSITY_RULES[0]])
              + " |", "|---|" + "---|" * len(DENSITIES)]
    for rule, by_d in r["density"].items():
        lines.append(f"| {rule} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in by_d.values()) + " |")
    lines += ["", "Learning rate at density d: the searched 1e-3 lr of the rule, scaled by (1e-3/d)^a, where a "
              "is fitted so that d = 1 gives full ZO's searched lr (a power law through the two searched points).",
              "", "## Plots", ""]
    lines += [f"- `{name}_{t}.png`: test accuracy vs steps, one line per method" for t in TASKS]
    lines += [f"- `{name}_density.png`: SST-2 accuracy vs density", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/reproduction")
    ap.add_argument("--workers", type=int, default=2, help="single-threaded worker processes")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the cells that exist")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    store = Store(out)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        sys.exit(1 if work(store) else 0)
    command = "python benchmarks/reproduce.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    failed = 0
    if not args.report_only:
        store.clear_locks()  # left by a killed run; no worker of ours is alive yet
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--out", str(out)], env=env)
                 for _ in range(args.workers)]
        failed = sum(p.wait() != 0 for p in procs)
    result = report(store, out, command.replace(" --report-only", ""))
    pooled = [{k: v for k, v in c.items() if k != "per_task"} for c in result["claims"]]
    print(json.dumps({**{k: result[k] for k in ("cells_done", "cells_total", "cell_seconds", "lr")}, "claims": pooled}))
    if failed or result["cells_done"] < result["cells_total"]:
        sys.exit(f"{result['cells_total'] - result['cells_done']} cells missing; re-run to fill them")


if __name__ == "__main__":
    main()
