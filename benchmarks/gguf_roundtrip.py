"""GGUF round trip with the real consumers: a sparsezo fine-tune exported to GGUF, read by llama.cpp.

    python benchmarks/gguf_roundtrip.py --run RUN [--types f16 q8_0 q4_0 q4_0+q8_0 llama.cpp:Q4_K_M]
        [--out results/gguf_roundtrip.json]

RUN is a finished ``sparsezo train`` run on the default model (or any llama-family base that came
from GGUF), e.g. ``sparsezo train --task sst2 --steps 50 --num-dev 50 --num-test 200``. For each
``--types`` entry the script runs ``sparsezo export --format gguf --type TYPE`` (or, for
``llama.cpp:FTYPE``, quantizes the f16 export with llama.cpp's own quantizer, as ``llama-quantize``
would: the K-quants that gguf-py cannot write) and measures:

- file size;
- the share of trained entries whose value in the file differs from the base's value stored the
  same way (per tensor type; read back through sparsezo's GGUF importer), and the stored change's
  size relative to the trained change;
- logits on fixed prompts of the exported file in llama.cpp (llama-cpp-python) and in transformers'
  ``gguf_file=`` loader against sparsezo's merged model (the run's base + delta in the run's dtype,
  computed in fp32): max |Δ| and max |Δ| / max |logit|;
- whether llama.cpp's own tokenizer gives the token ids sparsezo's tokenizer gives (the tokenizer
  metadata is copied from the base's GGUF);
- test accuracy of the fine-tune scored by llama.cpp on the run's own test split (sum of candidate
  token log-probs, as sparsezo scores), next to sparsezo's, and the share of identical predictions;
  the base's accuracy (the original GGUF file in llama.cpp, and sparsezo's base) shows what the
  fine-tune added.

Also writes the same run as a PEFT SHiRA adapter and reports its size and padding. llama-cpp-python
compiles llama.cpp when installed (``pip install llama-cpp-python``; minutes) and so is not a test
dependency: this script is how the llama.cpp side is verified. Prints one JSON object and writes it
to ``--out``. Threads: ``--threads`` (default 1: the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from sparsezo.training.checkpoint import load_delta
from sparsezo.cli import main as sparsezo
from sparsezo.io import write_json
from sparsezo.model.load import load_model
from sparsezo.model.paths import DEFAULT_MODEL, fetch_default_gguf, sparsezo_home
from sparsezo.eval.scoring import accuracy, encode, predict
from sparsezo.export.gguf import export_gguf
from sparsezo.tasks import get_task

LLAMA_QUANTIZE = "llama.cpp:"  # a --types entry "llama.cpp:Q4_K_M": llama.cpp's quantizer on the f16 export
PROMPTS = ["The movie was a delight from start to finish. It was",
           "Question: What is the capital of France?\nAnswer:",
           "def fibonacci(n):\n    if n < 2:\n        return n\n"]


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits of llama.cpp for one token sequence (fresh context)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def llama_accuracy(llm, encoded) -> tuple[float, list[int]]:
    """Accuracy and predictions with llama.cpp scoring each candidate as sparsezo does (sum of token log-probs);
    one-token candidates (SST-2's " great"/" terrible") are all read from the prompt's last position."""
    preds = []
    for e in encoded:
        n = len(e.prompt)
        if all(len(c) == 1 for c in e.cands):
            lp = llama_log_softmax(llama_logits(llm, e.prompt)[-1])
            scores = [lp[c[0]] for c in e.cands]
        else:
            scores = []
            for cand in e.cands:
                lp = llama_log_softmax(llama_logits(llm, e.prompt + cand))
                scores.append(sum(lp[n - 1 + j, t] for j, t in enumerate(cand)))
        preds.append(int(np.argmax(scores)))
    return sum(p == e.gold for p, e in zip(preds, encoded)) / len(encoded), preds


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def file_values(path: Path, names: list[str], work: Path) -> dict[str, torch.Tensor]:
    """The ``names`` tensors (Hugging Face names and layout) exactly as the GGUF file ``path`` stores them:
    sparsezo's own importer dequantizes the file to fp32 and undoes llama.cpp's Q/K row permutation."""
    from safetensors import safe_open

    from sparsezo.model.gguf_import import convert_gguf

    folder = work / f"{path.stem}-fp32"
    if not folder.exists():
        convert_gguf(path, folder, torch.float32)
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k in names})
    return out


def python_stored(t: torch.Tensor, qtype) -> torch.Tensor:
    """``t`` stored as GGML type ``qtype`` by gguf-py's quantizer (what ``sparsezo export`` writes) and read back."""
    import gguf

    a = t.detach().float().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(a.copy())
    if qtype == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(a.astype(np.float16).astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype).copy())


def update_survival(path: Path, model, base_model, delta, work: Path, base_file: Path | None = None) -> dict:
    """How much of the fine-tune the file ``path`` keeps: the share of trained entries whose stored value differs
    from the base's value stored the same way, and the stored change's mean size relative to the trained change.
    The base stored the same way is the base quantized by gguf-py in each tensor's type in ``path`` (what sparsezo's
    export writes), or ``base_file``, the base written by the same tool (llama.cpp's quantizer)."""
    import gguf

    from sparsezo.export.gguf import gguf_tensor_name

    names = [n for n, idx in delta.mask.indices.items() if idx is not None and idx.numel()]
    after = file_values(path, names, work)
    before = file_values(base_file, names, work) if base_file is not None else None
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    changed = total = 0
    kept = moved = 0.0
    share_by_type: dict[str, int] = {}
    for name in names:
        idx = delta.mask.indices[name]
        qtype = types[gguf_tensor_name(model.config, name)]
        sa = after[name].reshape(-1)[idx]
        sb = (before[name] if before is not None else python_stored(base_model.get_parameter(name), qtype)).reshape(-1)[idx]
        changed += int((sa != sb).sum())
        total += idx.numel()
        share_by_type[qtype.name] = share_by_type.get(qtype.name, 0) + idx.numel()
        kept += float((sa - sb).abs().sum())
        moved += float((model.get_parameter(name).detach().float().reshape(-1)[idx]
                        - base_model.get_parameter(name).detach().float().reshape(-1)[idx]).abs().sum())
    counts: dict[str, int] = {}
    for qtype in types.values():
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return {"trained_entries_changed_in_file": changed / total, "update_size_kept": kept / moved if moved else 1.0,
            "trained_entries_by_type": {k: v / total for k, v in sorted(share_by_type.items())},
            "tensor_types": dict(sorted(counts.items()))}


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    """llama.cpp's own quantizer (``llama-quantize``) on an f16 GGUF: e.g. ``Q4_K_M``, Ollama's default type."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")


def without_extra_buffers() -> None:
    """Load models with llama.cpp's extra buffer types off (``--no-extra-bufts``): on this VM the CPU reports
    AMX but the kernel does not grant its tile state, and ggml's AMX kernels for Q4/Q8 weights die with an
    illegal instruction; the plain CPU kernels compute the same model."""
    import llama_cpp.llama_cpp as capi

    default = capi.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished sparsezo train run")
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    ap.add_argument("--base-gguf", default=None, help="the base's original GGUF (default: the default model's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/gguf_roundtrip.json")
    ap.add_argument("--keep", default=None, help="folder to keep the exported files in (default: a temp folder)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    try:
        import llama_cpp
        from llama_cpp import Llama

        without_extra_buffers()
    except ImportError:  # the transformers-side figures are still worth having; the report says what is missing
        Llama = None
        print("llama-cpp-python is not installed: measuring with transformers only", file=sys.stderr)

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    delta = load_delta(run)
    base_path, dtype = delta.meta["model"], delta.meta.get("dtype", "bfloat16")
    model, tok = load_model(base_path, dtype)
    base_model, _ = load_model(base_path, dtype)
    delta.apply(model)
    ref = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()  # merged weights, in fp32
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False)
    ref.tie_weights()
    task = get_task(config["task"])
    args_rec = config.get("args") or {}
    seed, num_test = args_rec.get("seed", 0), args_rec.get("num_test", 200)
    test = task.splits(seed, 0, 0, num_test)["test"]
    encoded = encode(tok, test)
    prompt_ids = [tok(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        ref_logits = [ref(torch.tensor([ids])).logits[0].numpy() for ids in prompt_ids]
        shift = max(float((model(torch.tensor([ids])).logits[0].float() - base_model(torch.tensor([ids])).logits[0]
                           .float()).abs().max()) for ids in prompt_ids)
    scale = max(float(np.abs(x).max()) for x in ref_logits)
    t0 = time.perf_counter()
    sz_preds = predict(model, tok, test).tolist()
    sz_acc = sum(p == e.gold for p, e in zip(sz_preds, encoded)) / len(encoded)
    base_acc = accuracy(base_model, tok, test)
    report = {
        "run": str(run), "task": config["task"], "n_test": len(test), "base": base_path, "dtype": dtype,
        "num_trained": delta.mask.num_trainable, "delta_bytes": (run / "delta.safetensors").stat().st_size,
        "sparsezo": {"test_accuracy": sz_acc, "base_test_accuracy": base_acc, "max_abs_logit": scale,
                     "fine_tune_max_abs_logit_shift": shift},
        "versions": {**{p: _version(p) for p in ("gguf", "transformers", "torch", "peft")},
                     "llama_cpp_python": llama_cpp.__version__ if Llama is not None else None},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads}, "types": {},
    }
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gguf-roundtrip-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if args.base_gguf is None and Path(base_path).resolve() == (sparsezo_home() / "models" / DEFAULT_MODEL).resolve():
        args.base_gguf = str(fetch_default_gguf(tmp))
    if args.base_gguf and Llama is not None:
        llm = Llama(model_path=args.base_gguf, n_ctx=512, logits_all=True, n_threads=args.threads, verbose=False)
        acc, _ = llama_accuracy(llm, encoded)
        report["original_gguf"] = {"path": args.base_gguf, "bytes": Path(args.base_gguf).stat().st_size,
                                   "llama_cpp_test_accuracy": acc}
        del llm
    for kind in args.types:
        out = tmp / f"{run.name}-{kind.replace(':', '-')}.gguf"
        t = time.perf_counter()
        base_file = None
        if kind.startswith(LLAMA_QUANTIZE):  # llama.cpp's quantizer on the f16 export, and on the base's
            ftype = kind.removeprefix(LLAMA_QUANTIZE)
            f16, base_f16, base_file = tmp / "ft-f16.gguf", tmp / "base-f16.gguf", tmp / f"base-{ftype}.gguf"
            if not f16.exists():
                assert sparsezo(["export", "--format", "gguf", "--delta", str(run), "--out", str(f16)]) == 0
            if not base_f16.exists():
                export_gguf(base_model, tok, base_f16, None, "f16")
            llama_quantize(f16, out, ftype, args.threads)
            llama_quantize(base_f16, base_file, ftype, args.threads)
        else:
            assert sparsezo(["export", "--format", "gguf", "--delta", str(run), "--out", str(out), "--type", kind]) == 0
        row = {"bytes": out.stat().st_size, "export_seconds": round(time.perf_counter() - t, 2),
               **update_survival(out, model, base_model, delta, tmp, base_file)}
        hf = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=out.name, dtype=torch.float32).eval()
        with torch.no_grad():
            err = max(float(np.abs(hf(torch.tensor([ids])).logits[0].numpy() - r).max())
                      for ids, r in zip(prompt_ids, ref_logits))
        row["transformers_max_abs_logit_err"] = err
        del hf
        report["types"][kind] = row
        if Llama is None:
            continue
        llm = Llama(model_path=str(out), n_ctx=512, logits_all=True, n_threads=args.threads, verbose=False)
        err = max(float(np.abs(llama_logits(llm, ids) - r).max()) for ids, r in zip(prompt_ids, ref_logits))
        row["llama_cpp_max_abs_logit_err"] = err
        row["llama_cpp_rel_logit_err"] = err / scale
        same = [llm.tokenize(p.encode(), add_bos=False, special=False) == ids for p, ids in zip(
            [ex.prompt for ex in test[:50]], [e.prompt for e in encoded[:50]])]
        row["llama_cpp_tokenizer_agrees"] = sum(same) / len(same)
        acc, preds = llama_accuracy(llm, encoded)
        row["llama_cpp_test_accuracy"] = acc
        row["same_predictions_as_sparsezo"] = sum(a == b for a, b in zip(preds, sz_preds)) / len(preds)
        del llm
        print(f"{kind}: {row}", file=sys.stderr)
        write_json(args.out, report)  # what is measured so far survives a later failure
    adapter = tmp / f"{run.name}-peft"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert sparsezo(["export", "--format", "peft", "--delta", str(run), "--out", str(adapter), "--json"]) == 0
    peft_info = json.loads(printed.getvalue())
    report["peft_shira"] = {k: peft_info[k] for k in ("bytes", "r", "layers", "dense_layers", "trained_entries",
                                                      "stored_entries", "padding", "supertuning_entries")}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.out, report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
