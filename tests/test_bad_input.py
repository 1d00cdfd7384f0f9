"""Hostile input, table-driven: every bad flag, file or run directory is one error line, exit code 2, nothing written.

Each case builds its inputs in a fresh folder (the current directory during the call), runs the
CLI in-process and checks: exit code 2; exactly one ``sparsezo: error:`` line on stderr, which
names what the case is about; no traceback; and the folder and the shared fixtures are
byte-for-byte and mode-for-mode as before (nothing written, nothing damaged, no temporary or
lock file left). Crafted files are written with safetensors directly, as an attacker would.

Outside the table: SIGTERM, two writers on one run directory, the run lock, umask-respecting
permissions, a full and a read-only disk (tmpfs, needs root), the divergence guard, and the
internal-bug path of the error boundary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import save_tiny_model, write_jsonl, write_sst2
from sparsezo.cli import main
from sparsezo.training.lock import RunLock

DATA = ["--dtype", "float32", "--num-train", "64", "--num-dev", "16", "--num-test", "16"]
ZO = ["--mask", "random", "--density", "0.05", "--lr", "3e-3", "--eps", "1e-3", "--eval-every", "4"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model and data, a finished run, and an interrupted one (a checkpoint, no delta).

    The interrupted run is stopped by a real SIGTERM sent to this process right after its second
    checkpoint: main() must unwind, keep the run and exit 143.
    """
    root = tmp_path_factory.mktemp("bad")
    e = {"root": root, "model": str(save_tiny_model(root / "model")), "data": str(write_sst2(root / "sst2"))}
    e["other_model"] = str(save_tiny_model(root / "other", seed=3))
    e["base"] = ["--model", e["model"], "--data-dir", e["data"], *DATA]
    done = root / "done"
    assert main(["train", *e["base"], *ZO, "--steps", "8", "--checkpoint-every", "2", "--out", str(done)]) == 0
    e["done"] = done

    import sparsezo.training.loop as train_mod

    real = train_mod.save_checkpoint
    seen = []

    def save_then_sigterm(run_dir, state, keep=1):
        path = real(run_dir, state, keep)
        seen.append(state.step)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    partial = root / "partial"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "save_checkpoint", save_then_sigterm)
        rc = main(["train", *e["base"], *ZO, "--steps", "8", "--checkpoint-every", "2", "--out", str(partial)])
    assert rc == 128 + signal.SIGTERM
    assert (partial / "checkpoint-00000004").is_dir() and not (partial / "delta.safetensors").exists()
    e["partial"] = partial
    other_mask = root / "other-mask.safetensors"
    assert main(["mask", "compute", "--model", e["model"], "--mask", "random", "--density", "0.05", "--seed", "7",
                 "--out", str(other_mask)]) == 0
    e["other_mask"] = other_mask
    return e


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its mode and (files) content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (st.st_mode, digest)
    return out


# ----------------------------------------------------------------------------- crafting files
def craft(path: Path, tensors: dict[str, torch.Tensor], meta, raw_meta: str | None = None) -> Path:
    """A safetensors file with ``meta`` as the sparsezo header (or a raw header string)."""
    header = {} if meta is None and raw_meta is None else {"sparsezo": raw_meta if raw_meta is not None else json.dumps(meta)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path


def read_st(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["sparsezo"])
    return load_file(str(path)), meta


def copy_run(env, tmp: Path, which: str = "done") -> Path:
    dst = tmp / "run"
    shutil.copytree(env[which], dst)
    return dst


def mask_variant(env, tmp: Path, edit: Callable[[dict, dict], None], name: str = "m.safetensors") -> Path:
    """The finished run's mask with ``edit(tensors, meta)`` applied."""
    tensors, meta = read_st(env["done"] / "mask.safetensors")
    edit(tensors, meta)
    return craft(tmp / name, tensors, meta)


def delta_variant(env, tmp: Path, edit: Callable[[dict, dict], None]) -> Path:
    tensors, meta = read_st(env["done"] / "delta.safetensors")
    edit(tensors, meta)
    return craft(tmp / "d.safetensors", tensors, meta)


def traj_variant(env, tmp: Path, edit: Callable[[dict, dict], None]) -> Path:
    tensors, meta = read_st(env["done"] / "trajectory.safetensors")
    edit(tensors, meta)
    return craft(tmp / "t.safetensors", tensors, meta)


def first(tensors: dict, suffix: str = "") -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def edit_config(run: Path, fn: Callable[[dict], object]) -> None:
    cfg = json.loads((run / "config.json").read_text())
    new = fn(cfg)
    (run / "config.json").write_text(json.dumps(cfg if new is None else new))


def edit_state(run: Path, fn_json: Callable[[dict], object] | None = None,
               fn_tensors: Callable[[dict], None] | None = None) -> None:
    """Alter the (only) checkpoint of ``run``; with tensors changed, the recorded SHA-256 is updated to match."""
    ckpt = sorted(run.glob("checkpoint-*"))[-1]
    info = json.loads((ckpt / "state.json").read_text())
    if fn_tensors is not None:
        tensors, meta = read_st(ckpt / "state.safetensors")
        fn_tensors(tensors)
        craft(ckpt / "state.safetensors", tensors, meta)
        info["sha256"] = hashlib.sha256((ckpt / "state.safetensors").read_bytes()).hexdigest()
    new = fn_json(info) if fn_json is not None else None
    (ckpt / "state.json").write_text(json.dumps(info if new is None else new))


# ----------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    build: Callable[[dict, Path], list[str]]  # (env, case folder) -> argv
    match: str  # must appear in the error line
    needs_gpu_absent: bool = False


def train(env, tmp, *extra):
    return ["train", *env["base"], *ZO, "--steps", "4", "--out", str(tmp / "out"), *extra]


def evaluate(env, *extra):
    return ["eval", *env["base"], *extra]


def replay(env, tmp, traj=None, mask=None, *extra):
    return ["replay", "--mask", str(mask or env["done"] / "mask.safetensors"),
            "--trajectory", str(traj or env["done"] / "trajectory.safetensors"), "--out", str(tmp / "r.safetensors"),
            *extra]


def resume(env, tmp, edit: Callable[[Path], None]):
    run = copy_run(env, tmp, "partial")
    edit(run)
    return ["train", "--resume", str(run)]


def custom(env, tmp, rows_or_text, labels='{"0": " terrible", "1": " great"}', suffix=".jsonl", *extra):
    path = tmp / f"data{suffix}"
    if rows_or_text is None:  # the caller wrote the file
        pass
    elif isinstance(rows_or_text, str):
        path.write_text(rows_or_text, encoding="utf-8")
    else:
        write_jsonl(path, rows_or_text)
    return ["train", "--model", env["model"], *DATA, *ZO, "--steps", "2", "--task", "custom", "--data", str(path),
            "--template", "{text} It was", "--labels", labels, "--out", str(tmp / "out"), *extra]


ROWS = [{"text": f"good film {i}", "label": i % 2} for i in range(20)]


def _set(d: dict, key: str, value) -> None:
    d[key] = value


def _float_indices(t, m):
    k = first(t)
    t[k] = t[k].float()


def _unsorted(t, m, suffix=""):
    k = first(t, suffix)
    t[k] = t[k].flip(0).contiguous()


def _duplicated(t, m, suffix=""):
    k = first(t, suffix)
    t[k] = torch.cat([t[k][:1], t[k][:-1]])


def _out_of_range(t, m, suffix=""):
    k = first(t, suffix)
    v = t[k].clone()
    v[-1] = 10**6
    t[k] = v


def _negative(t, m):
    k = first(t)
    v = t[k].clone()
    v[0] = -1
    t[k] = v


def _empty_mask(t, m):
    for k in t:
        t[k] = t[k][:0]
    m.pop("num_trainable", None)


def _nan_values(t, m, value=float("nan")):
    k = first(t, ".values")
    v = t[k].clone()
    v[0] = value
    t[k] = v


def _fewer_seeds(t, m):
    t["seeds"] = t["seeds"][:-2].contiguous()


def _nan_grad(t, m):
    g = t["grads"].clone()
    g[1, 0] = float("nan")
    t["grads"] = g


def _negative_lr(t, m):
    lr = t["lrs"].clone()
    lr[0] = -1.0
    t["lrs"] = lr


def _nan_theta(t):
    v = t["theta"].clone()
    v[0] = float("nan")
    t["theta"] = v


def _short_theta(t):
    t["theta"] = t["theta"][:-1].contiguous()


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _garbage(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def _truncated_model(env, tmp):
    d = tmp / "model"
    shutil.copytree(env["model"], d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return ["train", "--model", str(d), "--data-dir", env["data"], *DATA, *ZO, "--steps", "2", "--out", str(tmp / "out")]


def _pickle_only_model(env, tmp):
    from helpers import tiny_model, tiny_tokenizer

    d = tmp / "model"
    model = tiny_model()
    model.config.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # the legacy pickle format sparsezo must not read
    return ["train", "--model", str(d), "--data-dir", env["data"], *DATA, *ZO, "--steps", "2", "--out", str(tmp / "out")]


def _renamed_key_model(env, tmp, quant=None):
    """A checkpoint whose embedding was renamed in the safetensors header: transformers would
    initialise it at random and train on."""
    d = tmp / "model"
    shutil.copytree(env["model"], d)
    w = d / "model.safetensors"
    tensors = load_file(w)
    tensors["model.embed_tokenz.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, w, metadata={"format": "pt"})
    return ["train", "--model", str(d), "--data-dir", env["data"], *DATA, *ZO, "--steps", "2",
            *(["--quant", quant] if quant else []), "--out", str(tmp / "out")]


def _live_run(env, tmp: Path) -> Path:
    """A finished run that a writer (another open file description, as another process) holds again."""
    run = copy_run(env, tmp)
    _held_lock(run)
    return run


def _held_lock(path: Path) -> None:
    """Hold ``path``'s run lock from another open file description, as a second process would."""
    lock = RunLock(path).acquire()
    _HELD.append(lock)


_HELD: list[RunLock] = []


CASES = [
    # --- flags: ranges, finiteness, regexes, devices (all refused before any model load)
    Case("args-not-an-int", lambda e, t: train(e, t, "--steps", "ten"), "invalid int value: 'ten'; see `sparsezo train"),
    Case("args-bad-choice", lambda e, t: train(e, t, "--dtype", "int8"), "invalid choice: 'int8'"),
    Case("args-bad-truncation-side", lambda e, t: train(e, t, "--truncation-side", "middle"),
         r"invalid choice: 'middle' \(choose from 'left', 'right'\)"),
    Case("args-unknown-option", lambda e, t: train(e, t, "--turbo"), "unrecognized arguments: --turbo"),
    Case("args-unknown-command", lambda e, t: ["trian"], "invalid choice: 'trian'"),
    Case("seed-negative", lambda e, t: train(e, t, "--seed", "-1"), "--seed must be in 0"),
    Case("seed-too-large", lambda e, t: train(e, t, "--seed", str(2**40)), "--seed must be in 0"),
    Case("warmup-negative", lambda e, t: train(e, t, "--warmup", "-5"), "--warmup must be >= 0"),
    Case("lr-nan", lambda e, t: train(e, t, "--lr", "nan"), "--lr must be a finite number"),
    Case("lr-inf", lambda e, t: train(e, t, "--lr", "inf"), "--lr must be a finite number"),
    Case("lr-zero", lambda e, t: train(e, t, "--lr", "0"), "--lr must be > 0"),
    Case("eps-negative", lambda e, t: train(e, t, "--eps=-1e-3"), "--eps must be > 0"),
    Case("eps-huge", lambda e, t: train(e, t, "--eps", "1e30", "--loss", "acc"), "--eps 1e\\+30 is not small"),
    Case("eps-weight-sized", lambda e, t: train(e, t, "--eps", "0.5"), "their RMS is"),
    Case("lr-diverges", lambda e, t: train(e, t, "--lr", "1e3"), "θ diverged at step"),
    Case("weight-decay-negative", lambda e, t: train(e, t, "--weight-decay", "-0.1"), "--weight-decay must be >= 0"),
    Case("q-zero", lambda e, t: train(e, t, "--q", "0"), "--q must be > 0"),
    Case("fused-pm-one-sided", lambda e, t: train(e, t, "--optimizer", "fzoo", "--q", "4", "--fused-pm"),
         "no ±ε pair to fuse"),
    Case("batch-size-zero", lambda e, t: train(e, t, "--batch-size", "0"), "--batch-size must be > 0"),
    Case("eval-every-zero", lambda e, t: train(e, t, "--eval-every", "0"), "--eval-every must be > 0"),
    Case("train-eval-batch-size-zero", lambda e, t: train(e, t, "--eval-batch-size", "0"), "--eval-batch-size must be > 0"),
    Case("density-nan", lambda e, t: train(e, t, "--density", "nan"), "--density must be a finite number"),
    Case("checkpoint-every-negative", lambda e, t: train(e, t, "--checkpoint-every", "-1"), "--checkpoint-every must be >= 0"),
    Case("keep-checkpoints-zero", lambda e, t: train(e, t, "--keep-checkpoints", "0"), "--keep-checkpoints must be > 0"),
    Case("dist-timeout-zero", lambda e, t: train(e, t, "--dist-timeout", "0"), "--dist-timeout must be > 0"),
    Case("include-bad-regex", lambda e, t: train(e, t, "--include", "("), "--include '\\(' is not a valid regular"),
    Case("exclude-bad-regex", lambda e, t: train(e, t, "--exclude", "[a-"), "--exclude '\\[a-' is not a valid regular"),
    Case("mask-compute-bad-regex", lambda e, t: ["mask", "compute", "--model", e["model"], "--mask", "random",
                                                 "--include", "(", "--out", str(t / "m.safetensors")], "--include"),
    Case("calib-binary-bytes", lambda e, t: ["mask", "compute", "--model", e["model"], "--mask", "sensitive",
                                             "--calib", str(_garbage(t, "random.bin", bytes(range(1, 128)) * 40)),
                                             "--out", str(t / "m.safetensors")], "does not look like text"),
    Case("calib-too-short", lambda e, t: ["mask", "compute", "--model", e["model"], "--mask", "sensitive",
                                          "--calib", str(_garbage(t, "short.txt", b"a few words")),
                                          "--out", str(t / "m.safetensors")], "smaller --calib-seq-len"),
    Case("model-missing-key", lambda e, t: _renamed_key_model(e, t), "2 missing keys \\(lm_head.weight, model.embed_tokens.weight\\); 1 unexpected keys"),
    Case("model-missing-key-nf4", lambda e, t: _renamed_key_model(e, t, "nf4"), "does not match its config.json"),
    Case("device-banana", lambda e, t: train(e, t, "--device", "banana"), "--device 'banana' is not a device"),
    Case("device-cuda-99", lambda e, t: train(e, t, "--device", "cuda:99"), "--device cuda:99"),
    Case("device-cuda-no-gpu", lambda e, t: train(e, t, "--device", "cuda"), "no CUDA GPU", needs_gpu_absent=True),
    Case("device-meta", lambda e, t: train(e, t, "--device", "meta"), "runs on cpu or cuda"),
    Case("eval-eval-batch-size-zero", lambda e, t: evaluate(e, "--eval-batch-size", "0"), "--eval-batch-size must be > 0"),
    Case("eval-icl-negative", lambda e, t: evaluate(e, "--icl", "-1"), "--icl must be >= 0"),
    Case("eval-max-new-tokens-zero", lambda e, t: evaluate(e, "--max-new-tokens", "0"), "--max-new-tokens must be > 0"),
    Case("eval-seed-negative", lambda e, t: evaluate(e, "--seed", "-3"), "--seed must be in 0"),
    Case("eval-device-banana", lambda e, t: evaluate(e, "--device", "banana"), "--device 'banana'"),
    # --- output paths
    Case("out-is-a-file", lambda e, t: (t / "out").write_text("x") and train(e, t),
         "^(?!.*--resume).*already exists; choose another --out or remove it"),
    # an existing --out: --resume is offered only for what it can continue
    Case("out-is-a-finished-run", lambda e, t: (shutil.copytree(e["done"], t / "out"), train(e, t))[1],
         "^(?!.*--resume).*holds a finished run; use it \\(sparsezo eval --delta .*out, merge, export\\)"),
    Case("out-is-an-unfinished-run", lambda e, t: (shutil.copytree(e["partial"], t / "out"), train(e, t))[1],
         "holds an unfinished run; continue it with sparsezo train --resume .*out"),
    Case("out-is-a-model-folder", lambda e, t: (shutil.copytree(e["model"], t / "out"), train(e, t))[1],
         "^(?!.*--resume).*already exists; choose another --out or remove it"),
    Case("out-under-a-file", lambda e, t: (t / "f").write_text("x") and
         train(e, t)[:-1] + [str(t / "f" / "run")], "is a file, not a folder"),
    Case("out-name-too-long", lambda e, t: train(e, t)[:-1] + [str(t / ("x" * 250))], "longer than this filesystem"),
    Case("out-needs-more-room-than-free", lambda e, t: train(e, t, "--steps", str(10**12)), "MiB free, the run needs"),
    Case("replay-out-exists", lambda e, t: (t / "r.safetensors").write_text("keep") and replay(e, t), "already exists"),
    Case("replay-out-under-a-file", lambda e, t: (t / "f").write_text("x") and
         replay(e, t)[:-1] + [str(t / "f" / "r.safetensors")], "is a file, not a folder"),
    # --- mask files
    Case("mask-truncated", lambda e, t: ["mask", "info", str(_garbage(t, "m.safetensors", (
        e["done"] / "mask.safetensors").read_bytes()[:100]))], "not a readable safetensors file"),
    Case("mask-garbage", lambda e, t: ["mask", "info", str(_garbage(t, "m.safetensors", os.urandom(64)))],
         "not a readable safetensors file"),
    Case("mask-meta-list", lambda e, t: ["mask", "info", str(craft(t / "m.safetensors", {"a": torch.arange(3)},
                                                                   [1, 2]))], "metadata is a JSON list"),
    Case("mask-meta-not-json", lambda e, t: ["mask", "info", str(craft(t / "m.safetensors", {"a": torch.arange(3)},
                                                                       None, raw_meta="{nope"))], "no sparsezo metadata"),
    Case("mask-meta-absent", lambda e, t: ["mask", "info", str(craft(t / "m.safetensors", {"a": torch.arange(3)},
                                                                     None))], "no sparsezo metadata"),
    Case("mask-no-shapes", lambda e, t: ["mask", "info", str(mask_variant(e, t, lambda x, m: m.pop("shapes")))],
         "lacks the field 'shapes'"),
    Case("mask-shapes-list", lambda e, t: ["mask", "info", str(mask_variant(e, t, lambda x, m: _set(m, "shapes", [1])))],
         "field 'shapes' is"),
    Case("mask-shape-string", lambda e, t: ["mask", "info", str(mask_variant(e, t, lambda x, m: _set(
        m, "shapes", {k: "32x32" for k in m["shapes"]})))], "expected a list of sizes"),
    Case("mask-is-a-folder", lambda e, t: (t / "m.safetensors").mkdir() or ["mask", "info", str(t / "m.safetensors")],
         "is not a file"),
    Case("mask-zero-bytes", lambda e, t: ["mask", "info", str(_garbage(t, "m.safetensors", b""))], "header too small"),
    Case("mask-full-tensors-unknown", lambda e, t: ["mask", "info", str(mask_variant(e, t, lambda x, m: _set(
        m, "full_tensors", ["ghost.weight"])))], "\\['ghost.weight'\\] that are not in its shapes"),
    Case("mask-float-indices", lambda e, t: ["mask", "info", str(mask_variant(e, t, _float_indices))],
         "indices are float32, expected int32 or int64"),
    Case("mask-2d-indices", lambda e, t: ["mask", "info", str(mask_variant(e, t, lambda x, m: _set(
        x, first(x), x[first(x)][:4].reshape(2, 2).contiguous())))], "expected one flat list"),
    Case("mask-unsorted", lambda e, t: ["mask", "info", str(mask_variant(e, t, _unsorted))], "not sorted"),
    Case("mask-duplicate", lambda e, t: ["mask", "info", str(mask_variant(e, t, _duplicated))], "appears twice"),
    Case("mask-out-of-range", lambda e, t: ["mask", "info", str(mask_variant(e, t, _out_of_range))], "outside the tensor"),
    Case("mask-negative-index", lambda e, t: ["mask", "info", str(mask_variant(e, t, _negative))], "index -1 is outside"),
    Case("mask-zero-entries", lambda e, t: ["mask", "info", str(mask_variant(e, t, _empty_mask))], "0 trainable entries"),
    Case("mask-extra-tensor", lambda e, t: ["mask", "info", str(mask_variant(e, t, lambda x, m: _set(
        x, "stray.weight", torch.arange(3, dtype=torch.int32))))], "not in its shapes"),
    Case("mask-missing-tensor", lambda e, t: ["mask", "info", str(mask_variant(e, t, lambda x, m: x.pop(first(x))))],
         "lacks indices for"),
    Case("mask-count-mismatch", lambda e, t: ["mask", "info", str(mask_variant(e, t, lambda x, m: _set(
        m, "num_trainable", 5)))], "its header says 5"),
    Case("mask-wrong-format", lambda e, t: ["mask", "info", str(mask_variant(e, t, lambda x, m: _set(
        m, "format", "sparsezo.delta/1")))], "has format 'sparsezo.delta/1'"),
    Case("train-with-bad-mask-file", lambda e, t: train(e, t)[:-2] + ["--mask", str(mask_variant(e, t, _duplicated)),
                                                                       "--out", str(t / "out")], "appears twice"),
    Case("train-with-other-models-mask", lambda e, t: ["train", "--model", e["other_model"], "--data-dir", e["data"],
                                                       *DATA, "--mask", str(e["done"] / "mask.safetensors"),
                                                       "--out", str(t / "out")], "different model"),
    # --- delta files
    Case("delta-nan", lambda e, t: evaluate(e, "--delta", str(delta_variant(e, t, _nan_values))), "NaN or infinite"),
    Case("delta-inf", lambda e, t: evaluate(e, "--delta", str(delta_variant(
        e, t, lambda x, m: _nan_values(x, m, float("inf"))))), "NaN or infinite"),
    Case("delta-unsorted", lambda e, t: evaluate(e, "--delta", str(delta_variant(
        e, t, lambda x, m: _unsorted(x, m, ".indices")))), "not sorted"),
    Case("delta-duplicate", lambda e, t: evaluate(e, "--delta", str(delta_variant(
        e, t, lambda x, m: _duplicated(x, m, ".indices")))), "appears twice"),
    Case("delta-out-of-range", lambda e, t: evaluate(e, "--delta", str(delta_variant(
        e, t, lambda x, m: _out_of_range(x, m, ".indices")))), "outside the tensor"),
    Case("delta-length-mismatch", lambda e, t: evaluate(e, "--delta", str(delta_variant(e, t, lambda x, m: _set(
        x, first(x, ".values"), x[first(x, ".values")][:-1].contiguous())))), "values in one flat list"),
    Case("delta-fp16-values", lambda e, t: evaluate(e, "--delta", str(delta_variant(e, t, lambda x, m: _set(
        x, first(x, ".values"), x[first(x, ".values")].half())))), "dtype float16, expected float32"),
    Case("delta-missing-values", lambda e, t: evaluate(e, "--delta", str(delta_variant(
        e, t, lambda x, m: x.pop(first(x, ".values"))))), "lacks values for"),
    Case("delta-extra-tensor", lambda e, t: evaluate(e, "--delta", str(delta_variant(e, t, lambda x, m: _set(
        x, "extra.values", torch.ones(2))))), "\\['extra.values'\\] not listed"),
    Case("delta-no-shapes", lambda e, t: evaluate(e, "--delta", str(delta_variant(e, t, lambda x, m: m.pop("shapes")))),
         "lacks the field 'shapes'"),
    Case("delta-meta-string", lambda e, t: evaluate(e, "--delta", str(craft(t / "d.safetensors", {"a": torch.ones(2)},
                                                                            "just a string"))), "JSON str"),
    Case("merge-nan-delta", lambda e, t: ["merge", "--delta", str(delta_variant(e, t, _nan_values)),
                                          "--out", str(t / "merged")], "NaN or infinite"),
    # --- trajectories (replay)
    Case("traj-fewer-seeds", lambda e, t: replay(e, t, traj_variant(e, t, _fewer_seeds)),
         "seeds holds 6 steps but lrs 8"),
    Case("traj-fewer-lrs", lambda e, t: replay(e, t, traj_variant(e, t, lambda x, m: _set(
        x, "lrs", x["lrs"][:-3].contiguous()))), "seeds holds 8 steps but lrs 5"),
    Case("traj-zo-lr-string", lambda e, t: replay(e, t, traj_variant(e, t, lambda x, m: m["zo"].update(lr="fast"))),
         "zo setting 'lr' is 'fast', expected type float"),
    Case("traj-zo-q-float", lambda e, t: replay(e, t, traj_variant(e, t, lambda x, m: m["zo"].update(q=1.5))),
         "zo setting 'q' is 1.5, expected type int"),
    Case("traj-zero-queries", lambda e, t: replay(e, t, traj_variant(e, t, lambda x, m: x.update(
        seeds=x["seeds"][:, :0].contiguous(), grads=x["grads"][:, :0].contiguous()))), "seeds is int64 \\[8, 0\\]"),
    Case("traj-nan-grad", lambda e, t: replay(e, t, traj_variant(e, t, _nan_grad)), "grads: 1 of"),
    Case("traj-negative-lr", lambda e, t: replay(e, t, traj_variant(e, t, _negative_lr)), "negative learning rates"),
    Case("traj-float-seeds", lambda e, t: replay(e, t, traj_variant(e, t, lambda x, m: _set(
        x, "seeds", x["seeds"].double()))), "seeds is float64"),
    Case("traj-best-step-beyond", lambda e, t: replay(e, t, traj_variant(e, t, lambda x, m: _set(
        m, "best_step", 99))), "best_step 99 is outside"),
    Case("traj-zo-unknown-key", lambda e, t: replay(e, t, traj_variant(e, t, lambda x, m: m["zo"].update(
        momentum=0.5))), "unknown key"),
    Case("traj-zo-bad-lr", lambda e, t: replay(e, t, traj_variant(e, t, lambda x, m: m["zo"].update(lr=-1.0))),
         "--lr must be > 0"),
    Case("traj-no-zo", lambda e, t: replay(e, t, traj_variant(e, t, lambda x, m: m.pop("zo"))), "no ZO settings"),
    Case("traj-missing-grads", lambda e, t: replay(e, t, traj_variant(e, t, lambda x, m: x.pop("grads"))),
         "lacks \\['grads'\\]"),
    Case("traj-truncated", lambda e, t: replay(e, t, _garbage(t, "t.safetensors", (
        e["done"] / "trajectory.safetensors").read_bytes()[:-50])), "not a readable safetensors file"),
    # --- run directories: config.json, checkpoints, swapped files, live runs
    Case("resume-config-not-json", lambda e, t: resume(e, t, lambda r: (r / "config.json").write_text("{oops")),
         "not valid JSON"),
    Case("resume-config-list", lambda e, t: resume(e, t, lambda r: edit_config(r, lambda c: [c])), "JSON list"),
    Case("resume-args-list", lambda e, t: resume(e, t, lambda r: edit_config(r, lambda c: _set(c, "args", [1]))),
         "'args' is a list"),
    Case("resume-args-unknown", lambda e, t: resume(e, t, lambda r: edit_config(
        r, lambda c: c["args"].update(turbo=True))), "unknown setting 'turbo'"),
    Case("resume-args-wrong-type", lambda e, t: resume(e, t, lambda r: edit_config(
        r, lambda c: c["args"].update(steps="ten"))), "steps = 'ten', expected int"),
    Case("resume-state-json-list", lambda e, t: resume(e, t, lambda r: edit_state(r, lambda i: [i])),
         "none of the 1 checkpoint"),
    Case("resume-state-nan-theta", lambda e, t: resume(e, t, lambda r: edit_state(r, fn_tensors=_nan_theta)),
         "theta: 1 of"),
    Case("resume-state-short-theta", lambda e, t: resume(e, t, lambda r: edit_state(r, fn_tensors=_short_theta)),
         "best_theta: shape"),
    Case("resume-state-step-string", lambda e, t: resume(e, t, lambda r: edit_state(r, lambda i: _set(i, "step", "4"))),
         "field 'step' is '4'"),
    Case("resume-state-best-step-beyond", lambda e, t: resume(e, t, lambda r: edit_state(
        r, lambda i: _set(i, "best_step", 99))), "best_step 99 is outside 0..4"),
    Case("resume-state-tensors-deleted", lambda e, t: resume(e, t, lambda r: next(r.glob("checkpoint-*")).joinpath(
        "state.safetensors").unlink()), "none of the 1 checkpoint"),
    Case("resume-mask-deleted", lambda e, t: resume(e, t, lambda r: (r / "mask.safetensors").unlink()),
         "mask.safetensors is missing"),
    Case("resume-swapped-mask", lambda e, t: resume(e, t, lambda r: shutil.copy(e["other_mask"], r / "mask.safetensors")),
         "mask digest"),
    Case("resume-swapped-model", lambda e, t: resume(e, t, lambda r: edit_config(
        r, lambda c: c["args"].update(model=e["other_model"]))), "different model"),
    Case("resume-live-run", lambda e, t: resume(e, t, _held_lock), "is in use by pid"),
    Case("reader-replay-live-run", lambda e, t: ["replay", str(_live_run(e, t)), "--out", str(t / "r.safetensors")],
         "is being written by pid .* cannot replay it"),
    Case("reader-merge-live-run", lambda e, t: ["merge", "--delta", str(_live_run(e, t)), "--out", str(t / "m")],
         "cannot merge it until that run finishes"),
    Case("reader-export-live-run", lambda e, t: ["export", "--delta", str(_live_run(e, t)), "--format", "gguf",
                                                 "--out", str(t / "x.gguf")], "cannot export it"),
    Case("reader-info-live-run", lambda e, t: ["info", str(_live_run(e, t))], "cannot read it"),
    Case("reader-eval-live-run", lambda e, t: evaluate(e, "--delta", str(_live_run(e, t))), "cannot evaluate it"),
    Case("resume-a-model-folder", lambda e, t: ["train", "--resume", e["model"]], "not a sparsezo run directory"),
    Case("second-writer-same-out", lambda e, t: (_held_lock(t / "out"), train(e, t))[1], "is in use by pid"),
    Case("resume-not-a-run", lambda e, t: ["train", "--resume", str(t)], "no config.json"),
    Case("resume-a-finished-run", lambda e, t: ["train", "--resume", str(copy_run(e, t))],
         "already complete .*; use it \\(sparsezo eval --delta .*run, merge, export\\)"),
    Case("info-config-not-json", lambda e, t: (_write(copy_run(e, t) / "config.json", "[1,"), ["info", str(t / "run")])[1],
         "not valid JSON"),
    Case("info-config-list", lambda e, t: (edit_config(copy_run(e, t), lambda c: [1]), ["info", str(t / "run")])[1],
         "JSON list"),
    Case("info-train-list", lambda e, t: (edit_config(copy_run(e, t), lambda c: _set(c, "train", [])),
                                          ["info", str(t / "run")])[1], "field 'train' is"),
    Case("info-dtype-bogus", lambda e, t: (edit_config(copy_run(e, t), lambda c: _set(c, "dtype", "int3")),
                                           ["info", str(t / "run")])[1], "dtype 'int3'"),
    # --- user tasks
    Case("custom-same-label-words", lambda e, t: custom(e, t, ROWS, '{"0": " great", "1": " great"}'),
         "to the same words"),
    Case("custom-repeated-label-key", lambda e, t: custom(e, t, ROWS, '{"0": " bad", "0": " great", "1": " ok"}'),
         "key '0' twice"),
    Case("custom-labels-list", lambda e, t: custom(e, t, ROWS, "[1, 2]"), "--labels must map >= 2 labels"),
    Case("custom-jsonl-array-row", lambda e, t: custom(e, t, ROWS[:3] + [[1, 2]]), "line 4 is not a JSON object"),
    Case("custom-latin1-file", lambda e, t: (_write_bytes(t / "data.csv", "text,label\ncaf\xe9,1\n".encode("latin-1")),
                                             custom(e, t, None, suffix=".csv"))[1], "'utf-8' codec can't decode"),
    Case("custom-null-label", lambda e, t: custom(e, t, ROWS[:5] + [{"text": "x", "label": None}] + ROWS[5:]),
         "line 6 has null in field\\(s\\) \\['label'\\]"),
    Case("custom-null-text", lambda e, t: custom(e, t, ROWS[:3] + [{"text": None, "label": 1}]),
         "line 4 has null in field\\(s\\) \\['text'\\]"),
    Case("custom-csv-long-row", lambda e, t: custom(e, t, "text,label\n" + "good film,1\n" * 5 + "a,b,1\n", suffix=".csv"),
         "line 7 has 3 field\\(s\\), the header has 2"),
    Case("custom-csv-short-row", lambda e, t: custom(e, t, "text,label\n" + "good film,1\n" * 5 + "lonely\n",
                                                     suffix=".csv"), "line 7 has 1 field\\(s\\), the header has 2"),
    Case("custom-tsv-repeated-column", lambda e, t: custom(e, t, "text\ttext\tlabel\n" + "a\tb\t1\n" * 5, suffix=".tsv"),
         "repeated column\\(s\\) \\['text'\\]"),
    Case("custom-csv-empty-label", lambda e, t: custom(e, t, "text,label\n" + "good film,1\n" * 5 + "meh,\n",
                                                       suffix=".csv"), "line 7 has an empty label"),
    # --- models (load_model: safetensors only, unreadable weights refused)
    Case("model-truncated-weights", _truncated_model, "model"),
    Case("model-pickle-only", _pickle_only_model, "safetensors"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(case, env, tmp_path, monkeypatch, capsys):
    if case.needs_gpu_absent and torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    work = tmp_path / "case"
    work.mkdir()
    monkeypatch.chdir(work)  # default outputs (runs/...) would land here and be caught
    argv = case.build(env, work)
    capsys.readouterr()
    before, shared = snapshot(work), snapshot(env["root"])
    try:
        rc = main(argv)
        after = snapshot(work)  # while a held lock is still held: its file must be untouched too
    finally:
        while _HELD:
            _HELD.pop().release()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sparsezo: error:")]
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert re.search(case.match, errors[0]), errors[0]
    assert after == before, "the case wrote or changed files"
    assert snapshot(env["root"]) == shared, "the case touched the shared fixtures"


def test_the_table_covers_every_category():
    assert len(CASES) >= 60
    prefixes = {c.id.split("-")[0] for c in CASES}
    for kind in ("args", "seed", "device", "include", "out", "mask", "delta", "traj", "resume", "info", "custom",
                 "model"):
        assert kind in prefixes, kind


# ----------------------------------------------------------------------------- behaviour beyond one error line
def test_an_internal_bug_keeps_its_traceback_and_says_so(env, monkeypatch, capsys):
    import sparsezo.cli.info as cli_info

    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli_info, "run", broken)
    assert main(["info", str(env["done"])]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: boom" in err and "this is a bug in sparsezo" in err
    assert "sparsezo: error:" not in err


def test_an_os_error_anywhere_is_one_line(env, monkeypatch, capsys):
    import errno

    import sparsezo.cli.info as cli_info

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x")

    monkeypatch.setattr(cli_info, "run", full)
    assert main(["info", str(env["done"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparsezo: error: cannot access /data/out/x (No space left on device); the disk is full: free "
                   "some space or choose another --out"]


def test_a_bom_csv_header_is_recognised(env, tmp_path, capsys):
    path = tmp_path / "data.csv"
    path.write_text("\ufefftext,label\n" + "".join(f"good film {i},{i % 2}\n" for i in range(20)), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", "--model", env["model"], *DATA, *ZO, "--steps", "2", "--task", "custom", "--data", str(path),
                 "--template", "{text} It was", "--labels", '{"0": " terrible", "1": " great"}', "--out", str(out)]) == 0
    assert (out / "delta.safetensors").is_file()


def test_diverged_theta_stops_and_keeps_the_last_good_checkpoint(env, tmp_path, capsys, monkeypatch):
    """A bounded loss (acc) stays finite while θ overflows; the θ guard stops the run, keeping the last checkpoint."""
    from sparsezo.zo import spsa

    real = spsa.ZOEngine.apply

    def overflow_at_step_5(self, step, seeds, grads, lr, *rest):
        return real(self, step, seeds, grads, float("inf") if step == 5 else lr, *rest)

    monkeypatch.setattr(spsa.ZOEngine, "apply", overflow_at_step_5)
    out = tmp_path / "run"
    assert main(["train", *env["base"], *ZO, "--loss", "acc", "--steps", "8", "--checkpoint-every", "2",
                 "--keep-last", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "became NaN or infinite at step 5" in err and "Traceback" not in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-00000004"]
    assert not (out / "delta.safetensors").exists()


def test_checkpoints_record_mask_and_model_and_refuse_others(env):
    from sparsezo.training.checkpoint import check_resumable, load_checkpoint
    from sparsezo.masks import Mask
    from sparsezo.model.load import load_model
    from sparsezo.model.params import model_fingerprint
    from sparsezo.zo import TrainableParams
    from sparsezo.zo.sgd import SGD

    state = load_checkpoint(env["partial"])
    model, _ = load_model(env["model"], "float32")
    mask = Mask.load(env["partial"] / "mask.safetensors")
    params, fingerprint = TrainableParams(model, mask), model_fingerprint(model)
    assert state.mask_digest == mask.digest() and state.fingerprint == fingerprint
    opt = SGD(params.numel, "cpu").state
    check_resumable(state, params, opt, fingerprint)  # the run's own mask and model: accepted
    other = TrainableParams(model, Mask.load(env["other_mask"]))
    with pytest.raises(Exception, match="mask digest"):
        check_resumable(state, other, opt, fingerprint)
    with pytest.raises(Exception, match="another base model"):
        check_resumable(state, params, opt, dict(fingerprint, values="0" * 16))


def test_a_delta_with_nan_values_is_never_written(env, tmp_path):
    from sparsezo.training.checkpoint import load_delta

    delta = load_delta(env["done"])
    name = next(iter(delta.values))
    delta.values[name] = delta.values[name].clone()
    delta.values[name][0] = float("nan")
    with pytest.raises(Exception, match="NaN or infinite"):
        delta.save(tmp_path / "d.safetensors")
    assert not list(tmp_path.iterdir())


def test_a_huge_lr_stops_the_run_when_theta_moved_implausibly(env, tmp_path, capsys):
    """A finite but destroyed θ (lr 1e3) is stopped, not kept: exit 2, one line, no delta; a calm run is untouched."""
    out = tmp_path / "run"
    assert main(["train", *env["base"], "--mask", "random", "--density", "0.05", "--eps", "1e-3", "--lr", "1e3",
                 "--steps", "10", "--eval-every", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("sparsezo: error:")] == [
        next(line for line in err.splitlines() if "θ diverged at step" in line)]
    assert not (out / "delta.safetensors").exists()
    assert main(["train", *env["base"], *ZO, "--steps", "10", "--out", str(tmp_path / "calm")]) == 0
    assert "diverged" not in capsys.readouterr().err


def test_a_large_lr_warns_once_that_theta_moved_far_and_keeps_training(env, tmp_path, caplog):
    """Between 10x and 1000x the layers' RMS a tiny model may still be learning: warned, not stopped."""
    with caplog.at_level("WARNING", logger="sparsezo"):
        assert main(["train", *env["base"], "--mask", "random", "--density", "0.05", "--eps", "1e-3", "--lr", "10",
                     "--steps", "6", "--eval-every", "3", "--out", str(tmp_path / "run")]) == 0
    assert len([r for r in caplog.records if "implausibly large" in r.getMessage()]) == 1


def test_files_and_folders_follow_the_umask(env, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        out, merged = tmp_path / "run", tmp_path / "merged"
        assert main(["train", *env["base"], *ZO, "--steps", "4", "--out", str(out)]) == 0
        assert main(["merge", "--delta", str(out), "--out", str(merged)]) == 0
    finally:
        os.umask(old)
    for d in (out, merged):
        assert d.stat().st_mode & 0o777 == 0o750, d
        for f in d.iterdir():
            assert f.stat().st_mode & 0o777 == 0o640, f


def test_a_stale_lock_of_a_dead_process_is_taken_over(env, tmp_path, capsys):
    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    lock.write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday"}))  # nobody flocks it
    assert main(["train", *env["base"], *ZO, "--steps", "2", "--out", str(out)]) == 0
    assert (out / "delta.safetensors").is_file() and not lock.exists()


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparsezo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen, what: str, limit: float = 60) -> None:
    deadline = time.time() + limit
    while not cond():
        assert proc.poll() is None, f"the process ended before {what}: {proc.communicate()[1][-1500:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


LONG = ["--steps", "200", "--eval-every", "100", "--checkpoint-every", "5"]  # seconds: time to interrupt it


@pytest.fixture(scope="module")
def long_ref(env):
    """An uninterrupted long run: what an interrupted and resumed one must equal byte for byte."""
    ref = env["root"] / "long-ref"
    assert main(["train", *env["base"], *ZO, *LONG, "--out", str(ref)]) == 0
    return ref


def test_sigterm_stops_cleanly_and_the_run_resumes_to_the_same_bytes(env, long_ref, tmp_path, capsys):
    ref = long_ref
    args = [*env["base"], *ZO, *LONG]
    run = tmp_path / "run"
    proc = _spawn(["train", *args, "--out", str(run)])
    _wait_for(lambda: any(run.glob("checkpoint-*")), proc, "its first checkpoint")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-1500:]
    assert "sparsezo: interrupted (SIGTERM)" in err and "Traceback" not in err
    assert any(run.glob("checkpoint-*")) and not (run / "delta.safetensors").exists()
    assert not (tmp_path / ".run.lock").exists()
    assert main(["train", "--resume", str(run)]) == 0
    for name in ("delta.safetensors", "trajectory.safetensors"):
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name


def test_two_trains_into_one_out_one_wins_and_the_run_is_consistent(env, tmp_path, capsys):
    """Started together: exactly one succeeds, the other fails with one line, and the run directory is one run's."""
    out = tmp_path / "run"
    common = [*env["base"], "--mask", "random", "--density", "0.05", "--eps", "1e-3", "--eval-every", "50",
              "--steps", "60", "--out", str(out)]
    procs = [_spawn(["train", *common, "--lr", lr]) for lr in ("1e-3", "2e-3")]
    results = [(p.communicate(timeout=120)[1], p.returncode)[::-1] for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], [(rc, e[-800:]) for rc, e in results]
    loser = next(e for rc, e in results if rc == 2)
    errors = [line for line in loser.splitlines() if line.startswith("sparsezo: error:")]
    assert len(errors) == 1 and "Traceback" not in loser
    assert "in use by pid" in errors[0] or "already exists" in errors[0] or "another process" in errors[0]
    winner_lr = ("1e-3", "2e-3")[next(i for i, (rc, _) in enumerate(results) if rc == 0)]
    config = json.loads((out / "config.json").read_text())
    assert config["zo"]["lr"] == float(winner_lr)
    replayed = tmp_path / "replayed.safetensors"
    assert main(["replay", str(out), "--out", str(replayed)]) == 0  # config, mask, trajectory and delta agree
    assert replayed.read_bytes() == (out / "delta.safetensors").read_bytes()


def test_resume_of_a_live_run_is_refused_naming_its_pid(env, tmp_path, capsys):
    run = tmp_path / "run"
    proc = _spawn(["train", *env["base"], *ZO, "--steps", "20000", "--eval-every", "10000", "--checkpoint-every", "5",
                   "--out", str(run)])
    try:
        _wait_for(lambda: any(run.glob("checkpoint-*")), proc, "its first checkpoint")
        before = (run / "config.json").read_bytes()
        assert main(["train", "--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {proc.pid}" in err
        assert main(["train", *env["base"], *ZO, "--steps", "2", "--out", str(run)]) == 2
        assert (run / "config.json").read_bytes() == before
        assert proc.poll() is None, "the live run ended during the checks: they proved nothing"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and not (tmp_path / ".run.lock").exists()
    RunLock(run).acquire().release()  # free again once the holder is gone (however it went)


# ----------------------------------------------------------------------------- a full and a read-only disk
@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs folders (root only); skip with the reason where mounting is not allowed."""
    mounted = []

    def mount(name: str, size: str, *options: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        opts = ",".join([f"size={size}", "mode=0755", *options])
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()[:200]}")
        mounted.append(d)
        return d

    if shutil.which("mount") is None:
        pytest.skip("no mount command: the full-disk tests need a tmpfs")
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(d: Path, leave: int) -> Path:
    """Fill ``d`` until at most ``leave`` bytes are free."""
    filler = d / "filler"
    with open(filler, "wb") as f:
        while shutil.disk_usage(d).free > leave:
            try:
                f.write(b"\0" * 4096)
                f.flush()
            except OSError:  # ENOSPC: full
                break
    return filler


def test_a_full_disk_is_refused_before_the_model_loads(env, tmpfs, capsys, monkeypatch):
    import sparsezo.model.load as models

    disk = tmpfs("full", "256k")
    _fill(disk, 8192)
    before = snapshot(disk)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["train", *env["base"], *ZO, "--steps", "4", "--out", str(disk / "run")]) == 2
    err = capsys.readouterr().err
    assert "sparsezo: error: --out" in err and "MiB free" in err and "Traceback" not in err
    assert snapshot(disk) == before


def test_a_read_only_disk_is_refused_before_the_model_loads(env, tmpfs, capsys):
    disk = tmpfs("ro", "64k", "ro")
    assert main(["train", *env["base"], *ZO, "--steps", "4", "--out", str(disk / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be created" in err[0] and "read-only" in err[0], err
    assert main(["replay", str(env["done"]), "--out", str(disk / "d.safetensors")]) == 2
    assert "read-only" in capsys.readouterr().err
    assert not any(disk.iterdir())


def test_a_disk_filling_up_mid_run_keeps_the_last_checkpoint_and_resumes(env, long_ref, tmpfs, capsys):
    """The disk fills while training: one error line, no temporary files left, the run resumes to the same bytes."""
    ref = long_ref
    args = [*env["base"], *ZO, *LONG]
    disk = tmpfs("filling", "2m")
    run = disk / "run"
    proc = _spawn(["train", *args, "--out", str(run)])
    _wait_for(lambda: any(run.glob("checkpoint-*")), proc, "its first checkpoint")
    filler = _fill(disk, 0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-1500:]
    errors = [line for line in err.splitlines() if line.startswith("sparsezo: error:")]
    assert len(errors) == 1 and "Traceback" not in err and ("disk is full" in errors[0]), err[-1500:]
    assert not list(run.glob(".*")), "temporary files were left behind"
    assert any(run.glob("checkpoint-*")) and not (run / "delta.safetensors").exists()
    filler.unlink()
    assert main(["train", "--resume", str(run)]) == 0
    for name in ("delta.safetensors", "trajectory.safetensors"):
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name


def test_streaming_4bit_load_refuses_a_tensor_of_another_model(env, tmp_path):
    """The 4-bit path reads the checkpoint itself (no from_pretrained): a stray tensor is an error there too."""
    from sparsezo.masks import Mask
    from sparsezo.quant.convert import load_quantized

    _renamed_key_model(env, tmp_path)
    mask = Mask.load(env["other_mask"])
    with pytest.raises(Exception, match="holds model.embed_tokenz.weight, which has no place in the model"):
        load_quantized(tmp_path / "model", mask, torch.float32)


def test_os_hints_name_the_option_that_gave_the_path():
    """A read-only folder given to --plot must not be answered with "choose another --out"."""
    import errno as errno_mod

    from sparsezo.errors import from_os_error

    e = OSError(errno_mod.EROFS, "Read-only file system", "/ro/chart.png")
    assert str(from_os_error(e, "cannot write the --plot chart", flag="--plot")).endswith(
        "the filesystem is read-only: choose another --plot")
    assert "choose another --out" in str(from_os_error(e))
