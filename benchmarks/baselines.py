"""Zero-shot and k-shot in-context baselines of the default model on every task with data here.

    python benchmarks/baselines.py [--tasks sst2,rte,...] [--max-test 1000] [--shots 16] [--out results/baselines]

MeZO's ICL baseline: k demonstrations drawn once (seeded) from the task's training split
(1000 rows, or 2/3 of a smaller pool), prepended to every test prompt. Prompts longer than
1024 tokens are cut from the left, i.e. the earliest demonstrations are dropped in part.
Each (task, mode) cell is saved in OUT_cells.json as soon as it is done (keyed by model,
dtype, seed, max-test and shots), so a re-run, or one interrupted on the shared machine,
only computes the missing cells. Writes OUT.md and OUT.json, both with the command that
regenerates them, and prints the JSON. Tasks whose data is absent (SQuAD, DROP here) are
listed as such, never cached.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from sparsezo.errors import SparseZOError
from sparsezo.eval.evaluate import evaluate
from sparsezo.io import write_json, write_text
from sparsezo.tasks import TASKS, get_task
from sparsezo.tasks.icl import with_demonstrations

DEFAULT_TASKS = [t for t in TASKS if t != "custom"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--max-test", type=int, default=1000, help="test examples per task (MeZO: 1000)")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="results/baselines")
    args = ap.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if unknown := [t for t in tasks if t not in DEFAULT_TASKS]:
        sys.exit(f"unknown task(s) {unknown}; choose from {', '.join(DEFAULT_TASKS)}")
    command = "python benchmarks/baselines.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    cells_path = Path(f"{args.out}_cells.json")
    cells = json.loads(cells_path.read_text()) if cells_path.exists() else {}
    modes = {"zero-shot": 0, f"{args.shots}-shot": args.shots}
    model = tok = None
    table, missing_data = {}, {}
    for name in tasks:
        task = get_task(name)
        try:
            splits = task.splits(args.seed, 1000, 500, args.max_test)
        except SparseZOError as e:
            missing_data[name] = str(e)
            continue
        for mode, k in modes.items():
            key = f"{name}|{mode}|{args.model or 'default'}|{args.dtype}|seed{args.seed}|test{args.max_test}"
            if key not in cells:
                if model is None:
                    from sparsezo.model.load import load_model

                    model, tok = load_model(args.model, args.dtype)
                examples = with_demonstrations(splits["test"], splits["train"], k, args.seed)
                t0 = time.perf_counter()
                with tqdm(total=len(examples), desc=f"{name} {mode}", file=sys.stderr, dynamic_ncols=True) as bar:
                    res = evaluate(model, tok, task, examples, args.batch_size, progress=bar)
                cells[key] = {**res, "task": name, "mode": mode, "shots": k, "n_train_pool": len(splits["train"]),
                              "seconds": round(time.perf_counter() - t0, 1)}
                write_json(cells_path, cells)
            table.setdefault(name, {})[mode] = cells[key]
    result = {"command": command, "model": args.model or "SmolLM2-135M-Instruct (embedded)", "dtype": args.dtype,
              "seed": args.seed, "max_test": args.max_test, "results": table, "no_data": missing_data}
    write_json(f"{args.out}.json", result)
    write_text(f"{args.out}.md", _markdown(result, list(modes)))
    print(json.dumps(result))


def _markdown(result: dict, modes: list[str]) -> str:
    lines = [f"# In-context baselines of {result['model']} ({result['dtype']})", "",
             f"Regenerate: `{result['command']}`", "",
             "Test = up to max-test seeded examples of each task's test pool (the official validation set for "
             "SuperGLUE, GLUE dev for SST-2; ReCoRD: dev32); demonstrations come from the task's training split "
             "and are the same for every test example. Generation tasks report token F1 (EM in brackets).", "",
             "| task | metric | n test | " + " | ".join(modes) + " |", "|---|---|---|" + "---|" * len(modes)]
    for name, row in result["results"].items():
        first = next(iter(row.values()))
        vals = [f"{row[m]['value']:.4f}" + (f" ({row[m]['em']:.4f})" if "em" in row[m] else "") for m in modes]
        lines.append(f"| {name} | {first['metric']} | {first['n']} | " + " | ".join(vals) + " |")
    lines += [f"| {name} | - | - | " + " | ".join("no data here" for _ in modes) + " |" for name in result["no_data"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
