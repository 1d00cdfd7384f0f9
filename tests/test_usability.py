"""Issue 23: help that shows defaults, per-command options, progress on stderr, eval --delta taking
the run's settings, template escapes, curves as PNG, layers in numeric order, one shared recipe."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from itertools import takewhile

import pytest

from helpers import save_tiny_model, sentences, write_jsonl, write_sst2
from sparsezo.cli import build_parser, main
from sparsezo.cli.mask import by_layer
from sparsezo.cli.options import HelpFormatter
from sparsezo.cli.train import train_argv


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[prefix + name] = sub
                out.update(_commands(sub, prefix + name + " "))
    return out


COMMANDS = _commands(build_parser())


def _options(cmd: str) -> set[str]:
    return {o for a in COMMANDS[cmd]._actions for o in a.option_strings}


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_option_has_a_meaning_and_shows_its_default(cmd):
    formatter = HelpFormatter("sparsezo")
    for action in COMMANDS[cmd]._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        text = formatter._get_help_string(action)
        assert action.help and len(action.help) > 8, (cmd, action.option_strings)
        assert "default" in text or action.required, (cmd, action.option_strings, text)
    assert COMMANDS[cmd].description  # `sparsezo CMD --help` says what the command does


def test_top_level_help_shows_defaults_and_no_raw_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "`" not in out and "demo" in out and "debug-level" in out  # -v has a meaning too
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("--steps STEPS ZO steps", "(default: 1000)", "--calib-seq-len", "(default: 32768)", "--batch-size"):
        assert shown in out
    assert "--seq-len" not in out  # the deprecated spelling is hidden


def test_train_help_files_every_option_under_a_heading(capsys, monkeypatch):
    """`train --help` (45 options) reads by heading: each option in the group a user looks in, none left
    in the catch-all "options", a one-line usage and a short --lr entry (the long story is in the docs)."""
    from sparsezo.cli.train import GROUPS

    where = {o: g.title for g in COMMANDS["train"]._action_groups for a in g._group_actions for o in a.option_strings
             if a.help != argparse.SUPPRESS}
    assert {t for o, t in where.items() if o not in ("-h", "--help")} == set(GROUPS)
    expected = {"--model": "model", "--quant": "model", "--task": "data", "--seed": "data", "--data": GROUPS[2],
                "--mask": "mask", "--max-memory": "mask", "--lr": "optimisation", "--optimizer": "optimisation",
                "--keep-last": "optimisation", "--out": "output", "--json": "output", "--resume": "output",
                "--fused-pm": "advanced", "--cuda-graphs": "advanced", "--eval-batch-size": "advanced",
                "--nproc": GROUPS[-1]}
    assert {o: where[o] for o in expected} == expected
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: sparsezo train [-h] [OPTION ...]") and lines[1] == ""
    assert [t + ":" for t in GROUPS] == [line for line in lines if line.rstrip(":") in GROUPS]
    lr = next(i for i, line in enumerate(lines) if line.lstrip().startswith("--lr LR"))
    assert len(list(takewhile(lambda line: line.startswith(" " * 10), lines[lr + 1:]))) <= 3
    with pytest.raises(SystemExit):  # commands sharing the helpers keep their flat list and sub-group
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "user task (--task custom):" in out and "\nmodel:" not in out and "--json" in out
    for cmd in ("demo", "quantize", "bench", "mask compute", "mask mass"):  # grouped the same way: model ... output
        titles = [g.title for g in COMMANDS[cmd]._action_groups if g._group_actions]
        assert "model" in titles and titles[-1] == "output", (cmd, titles)
        loose = {o for g in COMMANDS[cmd]._action_groups if g.title == "options" for a in g._group_actions
                 for o in a.option_strings}
        assert loose <= {"-h", "--help", "--seed"}, (cmd, loose)


def test_commands_do_not_list_options_they_ignore():
    for cmd in ("quantize", "mask compute", "mask mass"):
        assert not _options(cmd) & {"--num-test", "--split", "--icl", "--steps", "--lr"}, cmd
    assert "--quant" not in _options("mask mass")  # its Fisher mass is the dense model's
    assert "--quant" in _options("mask compute")  # used: the Fisher score over a 4-bit base
    assert not _options("mask mass") & {"--density", "--scope", "--out"}
    assert {"--task", "--data", "--num-train"} <= _options("mask compute")  # used by --mask sensitive-task
    assert "--seq-len" not in _options("eval")


def test_seq_len_is_a_deprecated_alias_of_calib_seq_len(capsys):
    args = build_parser().parse_args(["train", "--seq-len", "128"])
    assert args.calib_seq_len == 128
    assert "--seq-len is deprecated, use --calib-seq-len" in capsys.readouterr().err
    assert build_parser().parse_args(["train", "--calib-seq-len", "64"]).calib_seq_len == 64
    assert capsys.readouterr().err == ""
    argv = train_argv(build_parser().parse_args(["train", "--seq-len", "128", "--nproc", "2"]))
    assert "--seq-len" not in argv and argv[argv.index("--calib-seq-len") + 1] == "128"  # torchrun children


def test_demo_train_and_api_share_one_recipe():
    from sparsezo.training.recipe import DEMO, TRAIN

    train = build_parser().parse_args(["train"])
    demo = build_parser().parse_args(["demo"])
    for key in ("steps", "lr", "eps", "batch_size", "eval_every", "num_train", "num_dev", "num_test", "density",
                "calib_tokens", "calib_seq_len", "seed"):
        assert getattr(train, key) == getattr(TRAIN, key), key
    for key in ("steps", "lr", "eps", "density", "eval_every", "num_dev", "calib_tokens", "seed"):
        assert getattr(demo, key) == getattr(DEMO, key), key
    differ = {k for k in vars(TRAIN) if getattr(TRAIN, k) != getattr(DEMO, k)}
    assert differ == {"steps", "num_dev", "calib_tokens", "lr"}  # what the README and the help texts state
    cfg = DEMO.train_config()
    assert (cfg.steps, cfg.batch_size, cfg.zo.lr, cfg.zo.eps) == (400, 16, 1e-4, 1e-2)


def test_layers_sort_numerically(tmp_path, capsys):
    assert [k for k, _ in by_layer({"10": 0, "2": 0, "None": 0, "1": 0})] == ["1", "2", "10", "None"]
    from sparsezo.masks import compute_mask
    from sparsezo.testing import tiny_llama

    path = tmp_path / "m.safetensors"
    compute_mask(tiny_llama(layers=12, hidden=16), "random", 0.05).save(path)
    assert main(["mask", "info", str(path)]) == 0
    rows = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.split()[0] == "layer"]
    assert rows == [str(i) for i in range(12)]
    assert main(["mask", "compare", str(path), str(path)]) == 0
    rows = [line.split()[1].rstrip(":") for line in capsys.readouterr().out.splitlines() if "layer" in line]
    assert rows == [str(i) for i in range(12)]


def test_template_escapes_and_backslash_warning(tmp_path, caplog):
    from sparsezo.tasks import get_task

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": s, "label": y} for y, s in sentences(10)])
    labels = '{"0": " bad", "1": " good"}'
    task = get_task("custom", data=str(data), template=r"Review: {text}\nSentiment:\t", labels=labels)
    assert task.template == "Review: {text}\nSentiment:\t"
    assert "\\" not in task.splits(0, 4, 2, 2)["train"][0].prompt
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="sparsezo"):
        kept = get_task("custom", data=str(data), template=r"{text} \r It was \\n", labels=labels)
    assert kept.template == "{text} \\r It was \\n"  # \\ is one backslash; \r is not an escape: kept ...
    assert any("literal backslash" in r.getMessage() and "\\r" in r.getMessage() for r in caplog.records)  # ... warned


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """A finished custom-task run, trained with relative paths from its own folder."""
    import os

    root = tmp_path_factory.mktemp("usability")
    save_tiny_model(root / "model")
    write_jsonl(root / "reviews.jsonl", [{"text": s, "label": y} for y, s in sentences(80, 3)])
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "--model", "model", "--dtype", "float32", "--task", "custom", "--data", "reviews.jsonl",
                     "--template", r"{text}\nIt was", "--labels", '{"0": " bad", "1": " good"}', "--mask", "random",
                     "--density", "0.05", "--steps", "6", "--eval-every", "3", "--num-train", "40", "--num-dev", "12",
                     "--lr", "0.03", "--eps", "1e-3", "--out", "run", "--json"]) == 0
    finally:
        os.chdir(cwd)
    return root


def test_run_records_absolute_paths(custom_run):
    config = json.loads((custom_run / "run" / "config.json").read_text())
    assert config["model"] == str((custom_run / "model").resolve())
    assert config["task_options"]["data"] == str((custom_run / "reviews.jsonl").resolve())
    assert config["args"]["model"] == config["model"]  # what --resume reads


def test_eval_delta_takes_model_task_and_data_from_the_run(custom_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # elsewhere: the run's relative paths would no longer resolve
    capsys.readouterr()
    assert main(["eval", "--delta", str(custom_run / "run"), "--json"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    config = json.loads((custom_run / "run" / "config.json").read_text())
    assert res["task"] == "custom" and res["n"] == config["split_sizes"]["test"]
    assert res["value"] == config["results"]["test_accuracy"]  # the run's own test split, same number
    assert "custom test" in out.err  # eval's progress bar, on stderr
    base, tuned = res["results"]  # the base is scored first, for comparison; the top level is the fine-tune's
    assert base["delta"] is None and tuned["delta"] == str(custom_run / "run") and tuned["value"] == res["value"]
    assert base["n"] == tuned["n"] and "loss" in base  # this run kept step 0: the same numbers
    assert main(["eval", "--delta", str(custom_run / "run")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[1].endswith("  base") and table[2].endswith(str(custom_run / "run"))
    assert main(["eval", "--delta", str(custom_run / "run"), "--no-base", "--json"]) == 0
    assert "results" not in json.loads(capsys.readouterr().out)


def test_eval_delta_on_another_task_warns(custom_run, tmp_path, capsys, caplog):
    data = write_sst2(tmp_path / "sst2")
    with caplog.at_level(logging.WARNING, logger="sparsezo"):
        assert main(["eval", "--delta", str(custom_run / "run"), "--task", "sst2", "--data-dir", str(data),
                     "--num-test", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "sst2"
    assert any("evaluating a custom fine-tune" in r.getMessage() for r in caplog.records)


def test_training_shows_each_evaluation_as_its_own_bar(tmp_path, capsys):
    model, data = save_tiny_model(tmp_path / "model"), write_sst2(tmp_path / "sst2")
    assert main(["train", "--model", str(model), "--data-dir", str(data), "--dtype", "float32", "--mask", "random",
                 "--density", "0.05", "--steps", "4", "--eval-every", "2", "--num-train", "32", "--num-dev", "8",
                 "--num-test", "8", "--out", str(tmp_path / "run"), "--plot"]) == 0
    err = capsys.readouterr().err
    for bar in ("dev @ step 0", "dev @ step 2", "dev @ step 4", "test (best dev θ)", "zo"):
        assert bar in err, bar
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_command_and_missing_matplotlib(custom_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "c.png"
    assert main(["plot", str(custom_run / "run"), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [plot] extra were not installed
    assert main(["plot", str(custom_run / "run"), "--out", str(tmp_path / "d.png")]) == 2
    assert "pip install 'sparsezo[plot]'" in capsys.readouterr().err and not (tmp_path / "d.png").exists()
    run = tmp_path / "never"
    assert main(["train", "--model", str(custom_run / "model"), "--task", "custom", "--data",
                 str(custom_run / "reviews.jsonl"), "--template", "{text}", "--labels", '{"0": " bad", "1": " good"}',
                 "--out", str(run), "--plot"]) == 2  # refused before any training
    assert not run.exists()


def test_demo_records_its_settings_and_metrics(tmp_path, monkeypatch, capsys):
    """The demo on a tiny model standing in for the default one (real demo numbers: see the README)."""
    import random

    from helpers import FILLER
    from sparsezo.model.paths import DEFAULT_MODEL

    save_tiny_model(tmp_path / "home" / "models" / DEFAULT_MODEL)
    write_sst2(tmp_path / "assets" / "data" / "glue" / "SST-2")
    (tmp_path / "assets" / "calibration").mkdir()
    (tmp_path / "assets" / "calibration" / "wikitext2_raw_test.txt").write_text(
        " ".join(random.Random(0).choices(FILLER, k=2000)))
    monkeypatch.setenv("SPARSEZO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPARSEZO_ASSETS", str(tmp_path / "assets"))
    out = tmp_path / "demo"
    assert main(["demo", "--dtype", "float32", "--steps", "4", "--eval-every", "2", "--num-dev", "8",
                 "--calib-tokens", "512", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert "test (zero-shot)" in captured.err and "test (fine-tuned)" in captured.err and "dev @ step 0" in captured.err
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "demo" and config["calib_tokens"] == 512 and config["num_dev"] == 8
    assert config["calib_seq_len"] == 256 and config["num_train"] == 1000 and config["train"]["steps"] == 4
    assert config["results"]["test_accuracy"] == res["finetuned_accuracy"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev_accuracy" in r] == [0, 2, 4] and sum("loss" in r for r in rows) == 4
    assert main(["eval", "--delta", str(out), "--json"]) == 0  # the demo's run is a run like train's
    assert json.loads(capsys.readouterr().out)["value"] == res["finetuned_accuracy"]


def test_step_bar_eta_leaves_out_the_dev_evaluations(monkeypatch, capsys):
    """Dev passes get their own bar; the step bar's elapsed time and rate count ZO steps only."""
    import re
    import time

    import sparsezo.training.loop as train_mod
    from helpers import tiny_model, tiny_tokenizer
    from sparsezo.masks import compute_mask
    from sparsezo.tasks import Example
    from sparsezo.training.config import TrainConfig
    from sparsezo.training.loop import fine_tune
    from sparsezo.zo import TrainableParams, ZOConfig

    real = train_mod.evaluate_split

    def slow_evaluation(*args, **kwargs):
        time.sleep(1.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate_split", slow_evaluation)
    examples = [Example(f"{s} It was", [" terrible", " great"], y) for y, s in sentences(32, 1)]
    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "random", 0.05))
    cfg = TrainConfig(steps=4, batch_size=4, eval_every=2, zo=ZOConfig(lr=1e-2, eps=1e-3))
    fine_tune(model, tok, params, examples, examples[:8], cfg)
    final = re.findall(r"zo: 100%.*?4/4 \[(\d\d:\d\d)<", capsys.readouterr().err)
    assert final and final[-1] == "00:00", final  # 2.4 s of dev passes inside the loop are not counted


def test_replay_shows_progress(custom_run, tmp_path, capsys):
    assert main(["replay", str(custom_run / "run"), "--out", str(tmp_path / "r.safetensors")]) == 0
    assert "replay" in capsys.readouterr().err


def test_version_and_a_bare_command_line_show_what_sparsezo_is(capsys):
    from importlib.metadata import version

    from sparsezo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"sparsezo {version('sparsezo')}"
    assert main([]) == 2  # no command: the full help (every command listed), not only a usage error
    out = capsys.readouterr().out
    assert "COMMAND" in out and all(c in out for c in ("train", "demo", "mask", "export", "replay"))
