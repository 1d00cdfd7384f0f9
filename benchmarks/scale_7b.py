"""The whole pipeline on the Llama-2-7B architecture, each stage under a hard memory limit.

    python benchmarks/scale_7b.py [--layers 32] [--limit 4.5G] [--mask-limit 4.5G] [--calib-tokens 256]
                                  [--work DIR] [--stages build,mask,quantize,...] [--out results/scale_7b.json]

1. ``build``: a Llama-2-7B-shaped checkpoint (hidden 4096, 32 layers, vocab 32000, random bf16
   weights, std 0.02) written shard by shard as safetensors (never whole in memory), with a
   32000-entry BPE tokenizer trained on the calibration text (or on generated words when the
   shared assets are absent). ``--layers N`` makes an N-layer model of the same width (CI).
2. Each later stage runs as a ``sparsezo`` command inside ``../shared/tools/memlimit LIMIT`` (a
   fresh cgroup with a hard limit; page cache is reclaimed under it, so what counts is the
   anonymous memory the program really needs): ``mask`` (sensitive, Fisher on WikiText-2),
   ``quantize`` (streaming from bf16), ``bench`` at b1x32 and b1x256 (4-bit base, the mask's
   entries trainable), ``train`` (a few ZO steps on SST-2 over the 4-bit base), ``eval`` of the
   delta, ``merge`` (onto the bf16 checkpoint) and ``merge4`` (onto the run's own 4-bit base,
   dequantized layer by layer) — plain HF folders written shard by shard — ``stream`` (bench at b1x32
   with ``--quant nf4`` straight from the bf16 checkpoint, quantized while it is read).

Prints one JSON object per stage (stage, limit, passed, peak anonymous bytes, seconds, and for
bench: forward ms, step ms, step/2fwd) and writes them all to ``--out``. A stage whose output
already exists in ``--work`` is skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MEMLIMIT = REPO.parent / "shared" / "tools" / "memlimit"
STAGES = ("build", "mask", "quantize", "bench32", "bench256", "train", "eval", "merge", "merge4", "stream")

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on the calibration text (seconds), saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sparsezo.assets import assets_dir

    assets = assets_dir(required=False)
    if assets is not None:
        text = (assets / "calibration" / "wikitext2_raw_test.txt").read_text(encoding="utf-8").splitlines()
    else:  # no assets: made-up words, enough to fill the vocabulary
        g = torch.Generator().manual_seed(0)
        letters = "abcdefghijklmnopqrstuvwxyz"
        text = [" ".join("".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=g))
                         for n in torch.randint(2, 9, (64,), generator=g)) for _ in range(4000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def build(folder: Path, layers: int, shard_bytes: int = 1 << 30, seed: int = 0) -> dict:
    """Write the checkpoint tensor by tensor: at most one shard (≤ ``shard_bytes``) is in memory."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from sparsezo.io import atomic_dir

    cfg = LlamaConfig(**dict(LLAMA2_7B, num_hidden_layers=layers), dtype="bfloat16")
    h, inter, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (h, h)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter)),
                   (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    with atomic_dir(folder) as tmp:
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in shapes:
            nbytes = 2 * torch.Size(shape).numel()
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape))
            size += nbytes
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name, shape in shard:
                if len(shape) == 1:
                    tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
                weight_map[name] = fname
                total += tensors[name].numel() * 2
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        cfg.save_pretrained(tmp)
        _tokenizer(tmp, v)
    return {"stage": "build", "layers": layers, "bytes": total, "shards": len(shards),
            "seconds": round(time.perf_counter() - t0, 1)}


def run_stage(stage: str, cmd: list[str], limit: str, out_path: Path | None) -> dict:
    """Run one ``sparsezo`` command under memlimit; its JSON stdout and memlimit's report, merged."""
    full = [str(MEMLIMIT), limit, "--", sys.executable, "-m", "sparsezo.cli", *cmd, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", str(os.cpu_count() or 1))))
    seconds = time.perf_counter() - t0
    report = {}
    for line in reversed(proc.stderr.splitlines()):
        if line.startswith("{") and "peak_anon_bytes" in line:
            report = json.loads(line)
            break
    result = {}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    passed = proc.returncode == 0 and not report.get("oom_killed", False)
    row = {"stage": stage, "limit": limit, "passed": passed, "exit_code": proc.returncode,
           "oom_killed": report.get("oom_killed"), "peak_anon_bytes": report.get("peak_anon_bytes"),
           "peak_anon_gib": round(report.get("peak_anon_bytes", 0) / 2**30, 3),
           "seconds": round(seconds, 1), "command": "sparsezo " + " ".join(cmd)}
    keep = ("forward_ms", "step_ms", "step_over_two_forwards", "peak_rss_bytes", "num_trainable", "fisher_passes",
            "fisher_seconds", "fisher_checkpointed", "calib_tokens_used", "test_accuracy", "accuracy",
            "memory_estimate_bytes", "peak_memory_kind")
    row.update({k: result[k] for k in keep if k in result})
    if "peak_anon_bytes" in result:  # what the command itself reports, next to memlimit's measurement
        row["reported_peak_anon_bytes"] = result["peak_anon_bytes"]
    if not passed:
        row["stderr_tail"] = proc.stderr.strip().splitlines()[-3:]
        if out_path is not None and out_path.exists() and stage != "build":
            shutil.rmtree(out_path, ignore_errors=True) if out_path.is_dir() else out_path.unlink()
    return row


def table(rows: list[dict]) -> str:
    """The rows as the markdown table README and benchmarks/README show."""
    lines = ["| stage | command | limit | passed | peak anonymous (memlimit) | reported by the command | seconds | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["stage"] == "build":
            continue
        notes = []
        if "forward_ms" in r:
            notes.append(f"forward {r['forward_ms'] / 1000:.1f} s, step {r['step_ms'] / 1000:.1f} s, "
                         f"step/2fwd {r['step_over_two_forwards']:.2f}")
        if "fisher_passes" in r:
            notes.append(f"{r['fisher_passes']} pass(es), {r.get('num_trainable')} weights")
        if "peak_rss_bytes" in r:
            notes.append(f"RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
        reported = r.get("reported_peak_anon_bytes")
        cmd = re.sub(r"/(?:[^\s/]+/)+", "", r["command"])  # the work folder's paths, by their last part
        lines.append(f"| {r['stage']} | `{cmd}` | {r['limit']} | {'yes' if r['passed'] else '**no**'} | "
                     f"{r['peak_anon_bytes'] / 2**30:.2f} GiB | "
                     f"{'' if reported is None else f'{reported / 2**30:.2f} GiB'} | {r['seconds']:.0f} | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-2-7B; 2 for a quick check)")
    ap.add_argument("--limit", default="4.5G", help="memory limit of every stage but the mask")
    ap.add_argument("--mask-limit", default="4.5G", help="memory limit of the sensitive-mask stage")
    ap.add_argument("--calib-tokens", type=int, default=256, help="calibration tokens of the Fisher score")
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="ZO steps of the train stage")
    ap.add_argument("--work", default=None, help="folder for the checkpoint and outputs (default /tmp/sparsezo-7b-LAYERS)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--force", action="store_true", help="re-run stages whose outputs exist")
    ap.add_argument("--out", default=None, help="also write the JSON rows here")
    ap.add_argument("--report", default=None, metavar="JSON", help="print the markdown table of a rows file and exit")
    args = ap.parse_args()
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return 0
    if not MEMLIMIT.is_file():
        sys.exit(f"scale_7b: {MEMLIMIT} not found; it comes with the shared folder next to the checkout")
    work = Path(args.work or f"/tmp/sparsezo-7b-{args.layers}")
    work.mkdir(parents=True, exist_ok=True)
    model, mask, quant, run, merged = (work / n for n in ("bf16", "mask.safetensors", "nf4", "run", "merged"))
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        sys.exit(f"scale_7b: unknown stages {sorted(unknown)}; choose from {','.join(STAGES)}")
    L = args.limit
    plan = {
        "mask": (["mask", "compute", "--model", str(model), "--mask", "sensitive", "--density", "1e-3",
                  "--calib-tokens", str(args.calib_tokens), "--calib-seq-len", str(args.calib_seq_len), "--out", str(mask)],
                 args.mask_limit, mask),
        "quantize": (["quantize", "--model", str(model), "--mask", str(mask), "--out", str(quant)], L, quant),
        "bench32": (["bench", "--model", str(quant), "--mask", str(mask), "--batch", "1", "--seq-len", "32",
                     "--steps", "3"], L, None),
        "bench256": (["bench", "--model", str(quant), "--mask", str(mask), "--batch", "1", "--seq-len", "256",
                      "--steps", "3"], L, None),
        "train": (["train", "--model", str(quant), "--mask", str(mask), "--task", "sst2", "--steps", str(args.steps),
                   "--batch-size", "4", "--num-train", "16", "--num-dev", "4", "--num-test", "4",
                   "--eval-every", str(args.steps), "--eval-batch-size", "4", "--out", str(run)], L, run),
        "eval": (["eval", "--model", str(quant), "--task", "sst2", "--delta", str(run), "--num-test", "4",
                  "--eval-batch-size", "4"], L, None),
        "merge": (["merge", "--delta", str(run), "--model", str(model), "--out", str(merged)], L, merged),
        # the base the run recorded (the 4-bit folder): each layer dequantized as it is written
        "merge4": (["merge", "--delta", str(run), "--out", str(work / "merged4")], L, work / "merged4"),
        # the 4-bit base quantized while the bf16 checkpoint streams in (no quantized folder)
        "stream": (["bench", "--model", str(model), "--quant", "nf4", "--mask", str(mask), "--batch", "1",
                    "--seq-len", "32", "--steps", "2"], L, None),
    }
    rows = []
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage == "build":
            if model.exists() and not args.force:
                continue
            shutil.rmtree(model, ignore_errors=True)
            row = build(model, args.layers)
        else:
            cmd, limit, out = plan[stage]
            if out is not None and out.exists():
                if not args.force:
                    continue
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            row = run_stage(stage, cmd, limit, out)
        row["layers"] = args.layers
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:  # rows of stages not re-run this time are kept
        from sparsezo.io import write_json

        old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else []
        by_stage = {r["stage"]: r for r in old if r.get("layers") == args.layers} | {r["stage"]: r for r in rows}
        write_json(args.out, [by_stage[s] for s in STAGES if s in by_stage])
    return 0 if all(r.get("passed", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
