"""Issues 19 and 37: forwards (not steps) to reach 95% of ZO-SGD's plateau, per optimiser, on several tasks.

    python benchmarks/convergence.py [--optimizers sgd hizoo fzoo] [--tasks sst2 rte copa boolq cb wic]
                                     [--seeds 0 1 2] [--lrs ...] [--budget 2000] [--dry-run] [--report-only]

What a ZO user pays for is forward passes, and optimisers differ in forwards per step (ZO-SGD 2,
hizoo 3, fzoo q+1 = 9), so every curve here is dev accuracy against *forwards*: ZO forwards over a
training batch, plus the ``--lr auto`` probe's when a cell uses it (dev evaluations are not
counted: every optimiser pays the same for them). Protocol, on the default model
(SmolLM2-135M-Instruct, bf16) or another of ``--models`` (Qwen2.5-Coder-0.5B: fetch it first with
``python benchmarks/qwen.py``), sensitive 0.1% mask (WikiText-2, computed once per model and cached):

- one *cell* = (optimiser, task, seed, lr, budget): ``budget`` forwards of training (steps =
  budget / forwards per step), dev evaluated every ``budget / EVALS`` forwards, then the test
  accuracy of the best-dev θ; saved as ``results/convergence_cells/<opt>-<task>-seed<s>-lr<lr>-b<budget>.json``
  (atomic) the moment it is done, so the grid runs across sessions: a re-run only fills missing
  cells (or cells whose recorded settings differ). ``lr`` may be ``auto`` (the probe's forwards
  then count). The zero-shot test accuracy of each (task, seed) sample is measured once and cached.
- plateau of a row (optimiser, lr, ...) = the mean dev accuracy of the last quarter of its curve
  (the evaluations at ≥ 3/4 of its steps), averaged over seeds. A row's best dev is a maximum over
  a noisy curve, which rewards noise, not speed; the plateau averages it away.
- target per (task, budget) = 95% of the way from the step-0 dev to ZO-SGD's plateau, for ZO-SGD at
  the lr of its grid with the highest plateau. 95% of the gain rather than 95% of the accuracy:
  from a 0.53 start, 95% of a 0.77 plateau (0.73) would be reached by a run that kept only 84% of the gain.
- forwards to target per row = the first evaluation at which the seeds' mean dev curve reaches the
  target (the mean over seeds of that evaluation's forwards), or "—" if it never does;
- gain = test accuracy of the best-dev θ − zero-shot test accuracy, mean over seeds with a 95%
  Student-t interval (dev picks θ, so only test measures the gain without selection bias).

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

from sparsezo.errors import SparseZOError
from sparsezo.io import read_json, write_json, write_text
from stats import paired

CELLS = Path("results/convergence_cells")
REPORT = Path("results/convergence.md")
BATCH, EPS, DENSITY, CALIB_TOKENS, EVALS = 16, 1e-2, 1e-3, 8192, 10
SEC_PER_FORWARD = 0.24  # batch-16 bf16 forward of a ~25-token SST-2 prompt on the 2-core CPU (DESIGN §8)
SST2_TOKENS = 25


@dataclass(frozen=True)
class TaskSpec:
    num_train: int
    num_dev: int
    num_test: int
    max_prompt_tokens: int


# Labelled rows here: SST-2 67k; RTE 2,490; COPA 400 (300 train / 100 dev); CB 250 (200 / 50);
# BoolQ and WiC 64 (FewGLUE train + dev32: 32 / 32). Test = the official validation set (GLUE dev for SST-2).
TASKS = {"sst2": TaskSpec(1000, 200, 500, 64), "rte": TaskSpec(1000, 100, 277, 128),
         "copa": TaskSpec(300, 100, 100, 64), "boolq": TaskSpec(32, 32, 300, 128),
         "cb": TaskSpec(200, 50, 56, 128), "wic": TaskSpec(32, 32, 300, 64)}
# lr grids: ZO-SGD around the measured 1e-4 (DESIGN §8); hizoo's lr is a fraction of a line-search step;
# fzoo's a per-entry step of ~lr/√q in normalised units
LRS = {"sgd": ("3e-05", "0.0001", "0.0003", "auto"), "hizoo": ("0.03", "0.1", "0.3", "auto"),
       "fzoo": ("0.001", "0.003", "0.01", "auto"),
       "adam": ("1e-05", "3e-05", "0.0001", "auto"), "sign": ("1e-06", "3e-06", "1e-05", "auto"),
       "momentum": ("3e-06", "1e-05", "3e-05", "auto")}
# Models: the default in bf16; the same with the 4-bit NF4 base (SensZOQ's setting); a stand-in for
# "another family": the default with its final norm ×3, so logits and projected gradients are ~3× larger
# (a user's report: a 270M model whose gradients are ~3× SmolLM2's learned nothing at ZO-SGD's default lr);
# and the second family itself, Qwen2.5-Coder-0.5B (qwen2) in bf16, fetched by benchmarks/qwen.py.
MODELS = ("smollm2", "smollm2-nf4", "smollm2-logits3x", "qwen2.5-0.5b")
QUERIES = {"fzoo": 8}  # queries a step where the rule needs several (FZOO's batch of one-sided slopes); else 1


@dataclass(frozen=True)
class Cell:
    optimizer: str
    task: str
    seed: int
    lr: str  # a number as text, or "auto"
    budget: int
    model: str = MODELS[0]
    schedule: str = "constant"  # the lr schedule over the cell's steps (spsa.SCHEDULES)
    queries: int | None = None  # queries a step; None: QUERIES' default for the optimiser
    density: float = DENSITY  # of the sensitive mask: a sparser set has fewer dimensions to estimate

    @property
    def q(self) -> int:
        return self.queries or QUERIES.get(self.optimizer, 1)

    @property
    def path(self) -> Path:
        sched = "" if self.schedule == "constant" else f"-{self.schedule}"
        q = "" if self.q == QUERIES.get(self.optimizer, 1) else f"-q{self.q}"
        d = "" if self.density == DENSITY else f"-d{self.density:g}"
        name = f"{self.optimizer}-{self.task}-seed{self.seed}-lr{self.lr}{sched}{q}{d}-b{self.budget}.json"
        return CELLS / self.model / name

    def spec(self) -> dict:
        from sparsezo.training.lr_probe import probe_rule

        t = TASKS[self.task]
        # an auto cell's lr depends on the probe's rule: a cell probed under another one is stale
        probe = {f"probe_{k}": v for k, v in probe_rule().items()} if self.lr == "auto" else {}
        return {**probe, "model": self.model, "optimizer": self.optimizer, "task": self.task, "seed": self.seed, "lr": self.lr,
                "budget": self.budget, "q": self.q, "schedule": self.schedule, "batch": BATCH, "eps": EPS,
                "density": self.density, "calib_tokens": CALIB_TOKENS, "evals": EVALS, "num_train": t.num_train,
                "num_dev": t.num_dev, "num_test": t.num_test, "max_prompt_tokens": t.max_prompt_tokens}

    def done(self) -> bool:
        return self.path.is_file() and read_json(self.path, "cell").get("spec") == self.spec()


def steps_for(cell: Cell) -> int:
    from sparsezo.zo.registry import forwards_per_step

    return max(1, cell.budget // forwards_per_step(cell.optimizer, cell.q))


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
    splits = get_task(task_name).splits(seed, spec.num_train, spec.num_dev, spec.num_test)
    return {k: truncated(v, tok, spec.max_prompt_tokens) for k, v in splits.items()}


def mean_tokens(splits: dict, tok) -> float:
    ex = splits["train"][:100]
    return statistics.mean(len(tok(e.prompt + e.candidates[e.gold]).input_ids) for e in ex)


def model_source(name: str) -> str | None:
    """The ``--model`` of a variant: None (the embedded default) or the Qwen2.5 file, which must be fetched first."""
    if not name.startswith("qwen"):
        return None
    from qwen import available, path

    if not available():
        raise SparseZOError(f"model {name}: {path()} is missing; fetch it once with python benchmarks/qwen.py")
    return str(path())


def load_variant(name: str, density: float = DENSITY):
    """Model, tokenizer and sensitive mask (at ``density``) of one of :data:`MODELS`."""
    from sparsezo.model.load import load_model
    from sparsezo.quant.convert import quantize_model

    model, tok = load_model(model_source(name), "bfloat16")
    if name == "smollm2-logits3x":
        model.model.norm.weight.mul_(3)  # logits = head(norm(h)): ×3, up to bf16 rounding of the norm weights
    # the logit-scaled model has its own Fisher scores; the 4-bit one takes the full-precision model's mask
    mask = sensitive_mask(model, tok, "smollm2" if name == "smollm2-nf4" else name, density)
    if name == "smollm2-nf4":  # SensZOQ: the mask from the full-precision model, the rest 4-bit
        quantize_model(model, mask, quant="nf4")
    return model, tok, mask


def sensitive_mask(model, tok, name: str, density: float = DENSITY):
    """The sensitive mask of a model, computed once (a minute) and cached with the cells."""
    from sparsezo.assets import default_calibration_file
    from sparsezo.masks import Mask, compute_mask
    from sparsezo.masks.sensitive import read_texts

    tag = "" if name == "smollm2" else f"{name}-"
    path = CELLS / "masks" / f"{tag}sensitive-d{density:g}-c{CALIB_TOKENS}.safetensors"
    if path.is_file():
        return Mask.load(path)
    calib = default_calibration_file()
    mask = compute_mask(model, "sensitive", density, tokenizer=tok, texts=read_texts(calib), source=str(calib),
                        calib_tokens=CALIB_TOKENS)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(path)
    return mask


def test_accuracy(model, tok, task: str, examples: list) -> float:
    from sparsezo.eval.evaluate import evaluate
    from sparsezo.tasks import get_task

    return evaluate(model, tok, get_task(task), examples, batch_size=32)["value"]


def zero_shot(cell: Cell, model, tok, test: list) -> float:
    """The base model's test accuracy on the (task, seed) sample, measured once for every optimiser."""
    task, seed, t = cell.task, cell.seed, TASKS[cell.task]
    path = CELLS / cell.model / f"zeroshot-{task}-seed{seed}.json"
    spec = {"task": task, "seed": seed, "num_test": t.num_test, "max_prompt_tokens": t.max_prompt_tokens}
    cached = read_json(path, "zero-shot cell") if path.is_file() else {}
    if cached.get("spec") == spec:
        return cached["test"]
    acc = test_accuracy(model, tok, task, test)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"spec": spec, "test": acc})
    return acc


def run_cell(cell: Cell, model, tok, mask) -> dict:
    import torch

    from sparsezo.training.config import TrainConfig

    from sparsezo.training.loop import fine_tune
    from sparsezo.zo import OPTIMIZERS, TrainableParams, ZOConfig
    from sparsezo.zo.registry import forwards_per_step

    splits = load_splits(cell.task, cell.seed, tok)
    steps, fps = steps_for(cell), forwards_per_step(cell.optimizer, cell.q)
    auto = cell.lr == "auto"
    cfg = TrainConfig(steps=steps, batch_size=BATCH, eval_every=max(1, steps // EVALS), lr_auto=auto,
                      zo=ZOConfig(lr=1e-4 if auto else float(cell.lr), eps=EPS, optimizer=cell.optimizer,
                                  q=cell.q, schedule=cell.schedule, seed=cell.seed))
    params = TrainableParams(model, mask)
    base = params.theta.clone()
    test0 = zero_shot(cell, model, tok, splits["test"])
    t0 = time.perf_counter()
    try:
        res = fine_tune(model, tok, params, splits["train"], splits["dev"], cfg, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - t0
        test = test_accuracy(model, tok, cell.task, splits["test"])  # the best-dev θ fine_tune left in the model
    finally:  # the next cell must start from the base
        params.theta.copy_(base)
        params.restore()
    extra = res.lr_probe["forwards"] if res.lr_probe else 0
    curve = [{"step": r["step"], "forwards": extra + r["step"] * fps, "dev": r["dev_accuracy"]}
             for r in res.history if "dev_accuracy" in r]
    state_bytes = 4 * params.numel * len(OPTIMIZERS[cell.optimizer].state_names)
    return {"spec": cell.spec(), "lr_used": res.lr, "probe_forwards": extra, "steps": steps,
            "forwards_per_step": fps, "best_dev": res.best_dev, "best_step": res.best_step,
            "start_dev": res.start_dev, "improved": res.improved, "curve": curve, "test_zero_shot": test0,
            "test": test, "seconds": round(seconds, 1), "sec_per_step": round(seconds / steps, 3),
            "threads": torch.get_num_threads(), "state_bytes": state_bytes, "lr_probe": res.lr_probe}


def cells(args) -> list[Cell]:
    return [Cell(o, t, s, lr, b, m, args.schedule, args.q, d) for m in args.models for d in args.density
            for b in args.budget for t in args.tasks for s in args.seeds for o in args.optimizers
            for lr in (args.lrs or LRS[o])]


def projected_seconds(cell: Cell, tokens: float) -> float:
    """Training forwards × a forward's cost scaled by prompt length, + dev and test passes (~1 forward / 16 rows)."""
    per_forward = SEC_PER_FORWARD * max(1.0, tokens / SST2_TOKENS)
    t = TASKS[cell.task]
    evals = (EVALS + 1) * math.ceil(t.num_dev * 2 / BATCH) + 2 * math.ceil(t.num_test * 2 / BATCH)
    return per_forward * (cell.budget * (1.1 if cell.lr == "auto" else 1.0) + evals)


# ----------------------------------------------------------------------------- report
PLATEAU_FROM, TARGET_SHARE = 0.75, 0.95  # the plateau is the last quarter; the target 95% of its gain


def mean_curve(rows: list[dict]) -> list[dict]:
    """The seeds' curves averaged point by point (same evaluation steps; forwards differ by the probe's)."""
    n = min(len(r["curve"]) for r in rows)
    return [{"step": rows[0]["curve"][i]["step"], "forwards": _mean(r["curve"][i]["forwards"] for r in rows),
             "dev": _mean(r["curve"][i]["dev"] for r in rows)} for i in range(n)]


def plateau(rows: list[dict]) -> float:
    """Mean dev of the last quarter of the seeds' mean curve (evaluations at ≥ PLATEAU_FROM of its steps)."""
    curve = mean_curve(rows)
    last = curve[-1]["step"]
    tail = [c["dev"] for c in curve if c["step"] > 0 and c["step"] >= PLATEAU_FROM * last]
    return _mean(tail or [curve[-1]["dev"]])  # a curve with no evaluation after step 0 plateaus at its start


def forwards_to(curve: list[dict], target: float) -> float:
    return next((c["forwards"] for c in curve if c["dev"] >= target), math.inf)


def finished_cells() -> dict[Cell, dict]:
    """Every cell on disk whose recorded settings are this script's (stale protocols are left out)."""
    out = {}
    for path in sorted(CELLS.glob("*/*-b*.json")):
        r = read_json(path, "cell")
        sp = r.get("spec", {})
        if sp.get("task") not in TASKS or sp.get("optimizer") not in LRS or sp.get("model") not in MODELS:
            continue
        c = Cell(sp["optimizer"], sp["task"], sp.get("seed", -1), sp.get("lr", ""), sp.get("budget", 0),
                 sp["model"], sp.get("schedule", ""), sp.get("q"), sp.get("density", -1.0))  # a missing field fails done()
        if c.path == path and c.done():
            out[c] = r
    return out


def _mean(xs) -> float:
    return statistics.mean(xs)


def report(done: dict[Cell, dict]) -> str:
    lines = [f"# Convergence: forwards to reach {TARGET_SHARE:.0%} of ZO-SGD's plateau", "",
             "Generated by `python benchmarks/convergence.py --report-only` from every cell in "
             "results/convergence_cells/ (protocol: the script's docstring). Plateau = mean dev of the last quarter "
             "of the seeds' mean dev curve. Target = step-0 dev + "
             f"{TARGET_SHARE:.0%} × (ZO-SGD's plateau − step-0 dev), for ZO-SGD's lr with the highest plateau; "
             "forwards to target = the first evaluation where the seeds' mean dev curve reaches it. Forwards = "
             f"training forwards over a batch of {BATCH} (+ the --lr auto probe's). Gain = test accuracy of the "
             "best-dev θ − zero-shot test accuracy, mean over seeds ± 95% Student-t half-width; **bold** = the "
             "interval excludes 0. s/step is wall time per step with the thread count shown (dev evaluations "
             "included).", ""]
    groups = sorted({(c.model, c.task, c.budget) for c in done},
                    key=lambda k: (MODELS.index(k[0]), list(TASKS).index(k[1]), k[2]))
    for model, task, budget in groups:
        by: dict[tuple[str, str], dict[int, dict]] = {}
        for c, r in done.items():
            if (c.model, c.task, c.budget) == (model, task, budget):
                by.setdefault((c.optimizer, c.lr, c.schedule, c.q, c.density), {})[c.seed] = r
        seeds = sorted({s for rs in by.values() for s in rs})
        # the target is the baseline's: ZO-SGD on the default-density mask
        sgd = {k: v for k, v in by.items()
               if k[0] == "sgd" and k[1] != "auto" and k[4] == DENSITY and len(v) == len(seeds)}
        zs = {s: r["test_zero_shot"] for rs in by.values() for s, r in rs.items()}
        lines += [f"## {model}: {task}, budget {budget} forwards", "",
                  f"zero-shot test accuracy {_mean(zs.values()):.4f} (mean over seeds {sorted(zs)}; "
                  f"test n = {TASKS[task].num_test}, dev n = {TASKS[task].num_dev})", ""]
        target = None
        if sgd:
            best = max(sgd, key=lambda k: plateau(list(sgd[k].values())))
            top, start = plateau(list(sgd[best].values())), _mean(r["start_dev"] for r in sgd[best].values())
            if top > start:
                target = start + TARGET_SHARE * (top - start)
                lines += [f"target: dev {target:.4f} = {start:.4f} + {TARGET_SHARE:g} × ({top:.4f} − {start:.4f}) "
                          f"(ZO-SGD lr {best[1]} {best[2]}: step-0 dev and plateau, mean over seeds {seeds})", ""]
            else:  # a plateau at or below the start leaves no gain to reach
                lines += [f"target: — (ZO-SGD's best lr, {best[1]}, has a plateau {top:.4f} at or below its "
                          f"step-0 dev {start:.4f} here)", ""]
        else:
            lines += ["target: — (no ZO-SGD lr has every seed yet)", ""]
        lines += ["| optimizer | lr | schedule | q | density | seeds | start dev | best dev | plateau | test gain (95% CI) | "
                  "forwards to target | share of budget | fwd/step | s/step (threads) | state MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (opt, lr, sched, q, density), rs in sorted(by.items()):
            rows = list(rs.values())
            ftt = math.inf if target is None else forwards_to(mean_curve(rows), target)
            ftt_text = "—" if math.isinf(ftt) else f"{ftt:.0f}"
            share = "—" if math.isinf(ftt) else f"{ftt / budget:.2f}"
            gain = paired([r["test"] - r["test_zero_shot"] for r in rows])
            half = gain.get("ci95", math.inf)
            g = f"{gain['mean_diff']:+.4f} ± {half:.4f}" if len(rows) > 1 else f"{gain['mean_diff']:+.4f}"
            if gain["mean_diff"] - half > 0:
                g = f"**{g}**"
            lr_text = lr if lr != "auto" else "auto (" + ", ".join(f"{r['lr_used']:g}" for r in rows) + ")"
            lines.append(f"| {opt} | {lr_text} | {sched} | {q} | {density:g} | {len(rows)} | "
                         f"{_mean(r['start_dev'] for r in rows):.4f} | {_mean(r['best_dev'] for r in rows):.4f} | "
                         f"{plateau(rows):.4f} | "
                         f"{g} | {ftt_text} | {share} | {rows[0]['forwards_per_step']} | "
                         f"{_mean(r['sec_per_step'] for r in rows):.2f} ({rows[0]['threads']}) | "
                         f"{rows[0]['state_bytes'] / 2**20:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", nargs="+", default=["sgd", "hizoo", "fzoo"], choices=list(LRS))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--models", nargs="+", default=[MODELS[0]], choices=MODELS)
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    p.add_argument("--q", type=int, default=None, help="queries a step (default: 8 for fzoo, 1 for the others)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", default=None, help="override every optimiser's lr grid (numbers or auto)")
    p.add_argument("--density", type=float, nargs="+", default=[DENSITY],
                   help="sensitive-mask densities (one grid each; the target is ZO-SGD's at the default)")
    p.add_argument("--budget", type=int, nargs="+", default=[2000], help="training forwards per cell (one grid each)")
    p.add_argument("--dry-run", action="store_true", help="print the projected cost and stop")
    p.add_argument("--report-only", action="store_true", help="rebuild results/convergence.md from every cell on disk")
    args = p.parse_args()
    try:
        for name in args.models:
            model_source(name)  # a missing model is one line now, not a traceback after the other models' cells
    except SparseZOError as e:
        sys.exit(f"error: {e}")
    grid = cells(args)
    if args.report_only:
        write_text(REPORT, report(finished_cells()) + "\n")
        print(f"wrote {REPORT}")
        return
    from sparsezo.model.load import load_model

    _, tok = load_model(model_source(args.models[0]), "bfloat16")  # prompt lengths, for the projected cost
    tokens = {t: mean_tokens(load_splits(t, 0, tok), tok) for t in args.tasks}
    todo = [c for c in grid if not c.done()]
    cost = sum(projected_seconds(c, tokens[c.task]) for c in todo)
    print(f"{len(todo)} of {len(grid)} cells to run; projected {cost / 3600:.2f} h ({cost / 60:.0f} min) on the "
          "2-core CPU for bf16 (mean tokens per example: " + ", ".join(f"{t} {v:.0f}" for t, v in tokens.items()) +
          ")", flush=True)
    if args.dry_run:
        return
    for name, density in dict.fromkeys((c.model, c.density) for c in todo):
        model, tok, mask = load_variant(name, density)
        for c in (c for c in todo if (c.model, c.density) == (name, density)):
            print(f"cell {c.model}/{c.path.name} ({steps_for(c)} steps) ...", flush=True)
            result = run_cell(c, model, tok, mask)
            c.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(c.path, result)
            print(f"  best dev {result['best_dev']:.4f} (start {result['start_dev']:.4f}, improved {result['improved']}); "
                  f"test {result['test']:.4f} (zero-shot {result['test_zero_shot']:.4f}) in {result['seconds']:.0f}s",
                  flush=True)
            write_text(REPORT, report(finished_cells()) + "\n")
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
