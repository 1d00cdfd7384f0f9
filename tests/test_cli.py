"""The command line end to end on a tiny model and tiny SST-2-shaped files."""

import json
import subprocess
import sys

import pytest

from helpers import save_tiny_model, write_sst2
from sparsezo.cli import main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"model": str(save_tiny_model(root / "model")), "data": str(write_sst2(root / "sst2")), "root": root}


def _common(env):
    return ["--model", env["model"], "--data-dir", env["data"], "--dtype", "float32"]


def _train_args(env, out, *extra):
    return ["train", *_common(env), "--mask", "random", "--density", "0.05", "--steps", "20", "--eval-every", "10",
            "--num-train", "64", "--num-dev", "16", "--num-test", "32", "--lr", "0.03", "--eps", "1e-3",
            "--keep-last", "--out", str(out), *extra]


def test_train_then_eval_end_to_end(env, capsys):
    out = env["root"] / "run"
    assert main(_train_args(env, out, "--json")) == 0
    result = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert main(["info", str(out)]) == 0  # --keep-last: the delta is the last θ, whatever dev said
    assert "20 steps, the delta is θ at step 20 (last step: --keep-last)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "delta.safetensors", "mask.safetensors",
                                                     "metrics.jsonl", "trajectory.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["zo"]["lr"] == 0.03 and config["train"]["steps"] == 20 and config["mask_rule"] == "random"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert [r["step"] for r in rows if "dev_accuracy" in r] == [0, 10, 20]
    assert 0 <= result["test_accuracy"] <= 1 and result["n_test"] == 32

    assert main(["eval", *_common(env), "--num-test", "32", "--delta", str(out), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["task"] == "sst2" and ev["metric"] == "accuracy" and ev["n"] == 32
    assert ev["value"] == result["test_accuracy"]  # the saved delta reproduces the in-memory model exactly

    assert main(["eval", *_common(env), "--num-test", "32"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["task", "split", "n", "metric"]


def test_mask_compute_and_info(env, capsys):
    path = env["root"] / "mask.safetensors"
    assert main(["mask", "compute", "--model", env["model"], "--mask", "magnitude-small", "--density", "0.01",
                 "--out", str(path), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert main(["mask", "info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_trainable"] == made["num_trainable"] == sum(r["trainable"] for r in info["layers"].values())
    out = env["root"] / "run-maskfile"
    assert main(["train", *_common(env), "--mask", str(path), "--steps", "2", "--eval-every", "1", "--num-train", "16",
                 "--num-dev", "8", "--num-test", "8", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_trainable"] == made["num_trainable"]


def _bad(env, tmp_path, name, content):
    d = tmp_path / name
    d.mkdir()
    for fname, text in content.items():
        (d / fname).write_text(text)
    return str(d)


@pytest.mark.parametrize("case", ["model", "task", "density0", "density2", "steps0", "steps-1", "missing_file",
                                  "bad_header", "bad_label", "empty"])
def test_bad_input_gives_one_line_exit_2_and_no_output(env, tmp_path, capsys, case):
    out = tmp_path / "out"
    good_dev = "label\tcontent\n1\tgood film\n"
    args = {
        "model": ["--model", str(tmp_path / "nope")],
        "task": ["--task", "nosuchtask"],
        "density0": ["--density", "0"],
        "density2": ["--density", "2"],
        "steps0": ["--steps", "0"],
        "steps-1": ["--steps", "-1"],
        "missing_file": ["--data-dir", _bad(env, tmp_path, "d1", {"dev.tsv": good_dev})],
        "bad_header": ["--data-dir", _bad(env, tmp_path, "d2", {"train.tsv": "x\ty\n1\tgood\n", "dev.tsv": good_dev})],
        "bad_label": ["--data-dir", _bad(env, tmp_path, "d3", {"train.tsv": "label\tsentence\n" + "7\tgood\n" * 200,
                                                               "dev.tsv": good_dev})],
        "empty": ["--data-dir", _bad(env, tmp_path, "d4", {"train.tsv": "", "dev.tsv": good_dev})],
    }[case]
    assert main(_train_args(env, out) + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsezo: error: "), err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary leftovers either


def test_module_entry_point_reports_errors_on_stderr(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsezo", "eval", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().startswith("sparsezo: error: --model") and "config.json" in proc.stderr


def test_sensitive_mask_compare_info_plot_mass(env, tmp_path, capsys):
    from helpers import sentences

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(s for _, s in sentences(100, 5)))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    base = ["mask", "compute", "--model", env["model"], "--dtype", "float32", "--density", "0.01", "--json"]
    assert main([*base, "--mask", "sensitive", "--calib", str(calib), "--seq-len", "16", "--calib-tokens", "256",
                 "--out", str(a)]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["rule"] == "sensitive" and made["peak_memory_bytes"] > 0 and made["seconds"] >= 0
    assert 0 < made["fisher_mass"]["0.001"] < made["fisher_mass"]["0.01"] < made["fisher_mass"]["0.1"] <= 1
    assert main([*base, "--mask", "sensitive-task", "--data-dir", env["data"], "--num-train", "50", "--num-dev", "10",
                 "--seq-len", "16", "--out", str(b)]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "task:sst2:train"
    assert main(["mask", "compare", str(a), str(a), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["jaccard"] == 1.0
    assert main(["mask", "compare", str(a), str(b)]) == 0
    assert capsys.readouterr().out.startswith("Jaccard overlap 0.")
    png = tmp_path / "layers.png"
    assert main(["mask", "info", str(a), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "total" in out and f"chart -> {png}" in out and png.stat().st_size > 1000
    assert main(["mask", "mass", "--model", env["model"], "--dtype", "float32", "--calib", str(calib), "--seq-len", "16",
                 "--calib-tokens", "256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mass"]["0.001"] == made["fisher_mass"]["0.001"]


@pytest.mark.parametrize("case", ["mismatch", "corrupt", "empty_calib", "density"])
def test_bad_mask_input(env, tmp_path, capsys, case):
    from helpers import save_tiny_model

    out = tmp_path / "m.safetensors"
    good = tmp_path / "good.safetensors"
    assert main(["mask", "compute", "--model", env["model"], "--mask", "random", "--out", str(good)]) == 0
    capsys.readouterr()
    if case == "mismatch":
        other = save_tiny_model(tmp_path / "other", seed=7)
        capsys.readouterr()
        args = ["train", "--model", str(other), "--data-dir", env["data"], "--mask", str(good), "--out", str(tmp_path / "run")]
        out = tmp_path / "run"
    elif case == "corrupt":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(good.read_bytes()[:100])
        args = ["mask", "info", str(bad)]
    elif case == "empty_calib":
        (tmp_path / "empty.txt").write_text("  \n")
        args = ["mask", "compute", "--model", env["model"], "--calib", str(tmp_path / "empty.txt"), "--out", str(out)]
    else:
        args = ["mask", "compute", "--model", env["model"], "--mask", "random", "--density", "1.5", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsezo: error: "), err
    assert not out.exists()


@pytest.mark.parametrize("rule", ["random", "full"])
def test_bench_reports_step_cost_and_mezo_baseline(env, capsys, rule):
    args = ["bench", "--model", env["model"], "--mask", rule, "--density", "0.05", "--batch", "2", "--seq-len", "8",
            "--steps", "2", "--baseline", "mezo", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    for r in (res, res["baseline"]):
        for key in ("forward_ms", "step_ms", "step_over_two_forwards", "perturb_ms", "peak_memory_bytes", "tokens_per_s"):
            assert r[key] > 0, key
        assert r["step_over_two_forwards"] == pytest.approx(r["step_ms"] / (2 * r["forward_ms"]))
    assert res["baseline"]["name"] == "mezo" and res["batch"] == 2 and res["seq_len"] == 8
    assert main(args[:-3]) == 0
    assert "sparsezo" in capsys.readouterr().out
    assert main(["bench", "--model", env["model"], "--batch", "0"]) == 2


def test_mezo_reference_restores_the_base_after_bench(env):
    import torch

    from sparsezo.bench import bench
    from sparsezo.masks import compute_mask
    from sparsezo.model.load import load_model

    model, _ = load_model(env["model"], "float32")  # fp32: even a 1e-9 update would show
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bench(model, compute_mask(model, "full"), batch=2, seq_len=8, repeats=2, baseline="mezo")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
