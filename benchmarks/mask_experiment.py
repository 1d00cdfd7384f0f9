"""Issue 2 experiment: sensitive masks on SmolLM2-135M — cost, Fisher mass, transfer (overlap).

    python benchmarks/mask_experiment.py [--out results/masks] [--calib-tokens 32768]

Computes, each in its own process (so peak RSS is per mask): the WikiText-2 sensitive mask,
task-specific sensitive masks for SST-2 and RTE, magnitude-small/-large and random masks,
all at density 1e-3; then the Jaccard overlap of every pair. Writes OUT.md, OUT.json and
OUT_mass.png, and prints the JSON. Masks are kept in OUT_masks/ (reused on re-runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from sparsezo.io import atomic_path, write_text
from sparsezo.masks import Mask
from sparsezo.masks.analysis import compare

MASKS = {
    "wikitext": ["--mask", "sensitive"],
    "sst2-task": ["--mask", "sensitive-task", "--task", "sst2"],
    "rte-task": ["--mask", "sensitive-task", "--task", "rte"],
    "magnitude-small": ["--mask", "magnitude-small"],
    "magnitude-large": ["--mask", "magnitude-large"],
    "random": ["--mask", "random"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/masks")
    ap.add_argument("--density", default="1e-3")
    ap.add_argument("--calib-tokens", default="32768")
    args = ap.parse_args()
    out = Path(args.out)
    folder = out.parent / f"{out.name}_masks"
    folder.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, extra in MASKS.items():
        path = folder / f"{name}.safetensors"
        info_path = folder / f"{name}.json"
        if not info_path.exists():
            cmd = [sys.executable, "-m", "sparsezo", "mask", "compute", "--density", args.density,
                   "--calib-tokens", args.calib_tokens, "--out", str(path), "--json", *extra]
            print("+", " ".join(cmd[2:]), file=sys.stderr)
            res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            write_text(info_path, res.stdout)  # a cache: a half-written file would poison every later run
        runs[name] = json.loads(info_path.read_text())
    masks = {name: Mask.load(folder / f"{name}.safetensors") for name in MASKS}
    names = list(MASKS)
    jaccard = {a: {b: compare(masks[a], masks[b])["jaccard"] for b in names} for a in names}
    wiki_vs_task = {t: compare(masks["wikitext"], masks[t]) for t in ("sst2-task", "rte-task")}
    result = {"density": float(args.density), "runs": runs, "jaccard": jaccard,
              "layers_wikitext_vs_sst2": wiki_vs_task["sst2-task"]["modules"]}
    write_text(Path(f"{out}.json"), json.dumps(result, indent=2) + "\n")

    lines = [f"# Masks on SmolLM2-135M-Instruct (density {args.density})", "",
             f"Regenerate: `python benchmarks/mask_experiment.py --out {out} --calib-tokens {args.calib_tokens}` "
             "(2-core CPU, bf16 model, fp32 score accumulation).", "",
             "| mask | source | trainable | seconds | peak RSS (GiB) |", "|---|---|---|---|---|"]
    for name in names:
        r = runs[name]
        lines.append(f"| {name} | {r.get('source') or '-'} | {r['num_trainable']} | {r['seconds']:.1f} | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} |")
    lines += ["", "## Fisher mass: share of the total score held by the top d of weights", "",
              "| d | " + " | ".join(n for n in names if "fisher_mass" in runs[n]) + " |",
              "|---|" + "---|" * sum("fisher_mass" in runs[n] for n in names)]
    for d in runs["wikitext"]["fisher_mass"]:
        lines.append(f"| {d} | " + " | ".join(f"{runs[n]['fisher_mass'][d]:.3f}" for n in names if "fisher_mass" in runs[n]) + " |")
    lines += ["", "## Jaccard overlap at this density", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(f"{jaccard[a][b]:.3f}" for b in names) + " |")
    d = float(args.density)
    rand_j = d / (2 - d)
    shared = {t: wiki_vs_task[t]["intersection"] / masks["wikitext"].num_trainable for t in wiki_vs_task}
    lines += ["", f"Expected overlap of two independent random masks at density d is about d/(2-d) = {rand_j:.4f}.",
              "", "## What the numbers say", "",
              f"- The top {d:g} of weights hold {runs['wikitext']['fisher_mass'][f'{d:g}']:.0%} of the WikiText-2 Fisher "
              "mass (SensZOQ reports about 50% at 0.1% on Llama2-7B): the score is very concentrated here too.",
              f"- The WikiText-2 mask shares {shared['sst2-task']:.0%} of its entries with the SST-2 task mask and "
              f"{shared['rte-task']:.0%} with the RTE task mask (Jaccard {jaccard['wikitext']['sst2-task']:.2f} / "
              f"{jaccard['wikitext']['rte-task']:.2f}, about {jaccard['wikitext']['sst2-task'] / rand_j:.0f}x chance); "
              f"the two task masks overlap each other about as much ({jaccard['sst2-task']['rte-task']:.2f}). "
              "Sensitive weights are largely the same whatever the text, which supports SensZOQ's transfer claim; "
              "whether the unshared part matters for accuracy is measured by fine-tuning (issue 8).",
              f"- Magnitude masks pick nearly disjoint sets from the sensitive ones (Jaccard <= "
              f"{max(jaccard['wikitext']['magnitude-small'], jaccard['wikitext']['magnitude-large']):.3f}): Sparse "
              "MeZO's small weights and SensZOQ's sensitive weights are different hypotheses.",
              "- Timings were taken while other jobs shared the 2 cores (read them as upper bounds); the Fisher pass "
              "is one forward+backward per 8 x 256-token micro-batch (16 of them for 32,768 WikiText-2 tokens)."]
    write_text(Path(f"{out}.md"), "\n".join(lines) + "\n")
    _plot(runs, Path(f"{out}_mass.png"))
    print(json.dumps(result))


def _plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        if "fisher_mass" in r:
            ds = [float(d) for d in r["fisher_mass"]]
            ax.plot(ds, list(r["fisher_mass"].values()), marker="o", label=name)
    ax.plot(ds, ds, ls="--", color="grey", label="uniform (mass = d)")
    ax.set_xscale("log")
    ax.set_xlabel("density d (top-d weights by Fisher score)")
    ax.set_ylabel("share of total Fisher score")
    ax.set_title("Fisher mass, SmolLM2-135M")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


if __name__ == "__main__":
    main()
