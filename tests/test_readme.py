"""The README is checked, not trusted: its API example runs as written, and its flags exist.

The API example is executed verbatim on a tiny model: only the environment changes —
``$SPARSEZO_HOME`` holds a tiny model where the embedded default model is cached (so
``load_model()`` takes its ordinary path) and ``$SPARSEZO_ASSETS`` tiny SST-2-shaped files and
calibration text.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
from pathlib import Path

import pytest

from helpers import FILLER, NEGATIVE, POSITIVE, save_tiny_model, write_sst2
from sparsezo.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# flags of other programs that README command lines pass through (pip, torchrun)
FOREIGN = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
           "--torch-backend", "--index-url", "--extra-index-url"}


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(README.read_text()) if kind == lang]


def api_example() -> str:
    """The python block of the README's ``## API`` section."""
    text = README.read_text()
    section = text[text.index("\n## API\n"):]
    return FENCE.search(section).group(2)


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch):
    from safetensors import safe_open

    from sparsezo.model.paths import DEFAULT_MODEL

    home, assets, work = tmp_path / "home", tmp_path / "assets", tmp_path / "work"
    save_tiny_model(home / "models" / DEFAULT_MODEL)
    write_sst2(assets / "data" / "glue" / "SST-2")
    rng = random.Random(0)
    (assets / "calibration").mkdir(parents=True)
    (assets / "calibration" / "wikitext2_raw_test.txt").write_text(
        "\n".join(" ".join(rng.choices(FILLER + POSITIVE + NEGATIVE, k=40)) for _ in range(60)))
    work.mkdir()
    monkeypatch.setenv("SPARSEZO_HOME", str(home))
    monkeypatch.setenv("SPARSEZO_ASSETS", str(assets))
    monkeypatch.chdir(work)

    code = api_example()
    exec(compile(code, "README.md (API example)", "exec"), {"__name__": "readme_example"})

    written = {p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()}
    assert {"api-example/mask.safetensors", "api-example/delta.safetensors", "api-example/metrics.jsonl",
            "api-example/trajectory.safetensors", "api-example/merged-model/config.json"} <= written

    def tensors(path):
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    from sparsezo.training.checkpoint import load_delta
    from sparsezo.masks import Mask
    from sparsezo.model.load import load_model
    from sparsezo.training.replay import replayed_delta
    from sparsezo.zo import Trajectory

    # what the example claims: the trajectory alone rebuilds the trained delta
    base, _ = load_model()
    rebuilt = replayed_delta(base, Mask.load(work / "api-example/mask.safetensors"),
                             Trajectory.load(work / "api-example/trajectory.safetensors"), progress=False)
    saved = load_delta(work / "api-example/delta.safetensors")
    assert rebuilt.values.keys() == saved.values.keys()
    assert all(rebuilt.values[k].equal(saved.values[k]) for k in saved.values)
    from sparsezo.training.recipe import DEMO

    rows = [json.loads(line) for line in (work / "api-example/metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == DEMO.steps  # the recipe's steps ran
    assert tensors(work / "api-example/merged-model/model.safetensors")


def test_readme_api_example_outputs_are_git_ignored():
    """Everything the example writes goes under one folder that .gitignore lists."""
    code = api_example()
    outputs = set(re.findall(r'"([^"]+\.(?:safetensors|jsonl)|[^"]+-model)"', code))
    assert outputs and all(o.startswith("api-example/") for o in outputs), outputs
    ignored = (README.parent / ".gitignore").read_text().splitlines()
    assert "/api-example/" in ignored


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """'train' -> its parser, 'mask compute' -> ..., for every (nested) command."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return out


COMMANDS = _subparsers(build_parser())


def _options(cmd: str) -> set[str]:
    return {o for a in COMMANDS[cmd]._actions for o in a.option_strings}


def readme_command_lines() -> list[tuple[str, list[str]]]:
    """(command, its --flags) for every sparsezo invocation in the README's bash blocks."""
    found = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part, posix=True) if part.strip() else []
                if "sparsezo" not in words:
                    continue
                rest = words[words.index("sparsezo") + 1:]
                cmd = rest[0] if rest and rest[0] in COMMANDS else None
                if cmd and len(rest) > 1 and f"{cmd} {rest[1]}" in COMMANDS:
                    cmd = f"{cmd} {rest[1]}"
                if cmd:
                    found.append((cmd, [w for w in rest if FLAG.fullmatch(w)]))
    return found


def test_every_readme_command_line_flag_exists_in_that_command():
    lines = readme_command_lines()
    assert len(lines) > 20 and {c for c, _ in lines} >= {"train", "eval", "demo", "replay", "merge", "mask compute",
                                                          "mask info", "bench", "quantize", "info", "plot"}
    missing = [(cmd, f) for cmd, flags in lines for f in flags if f not in _options(cmd)]
    assert not missing, f"README documents flags its commands do not have: {missing}"


def _paragraph(start: str) -> str:
    text = README.read_text()
    i = text.index(start)
    return text[i:text.index("\n\n", i)]


@pytest.mark.parametrize("cmd,start", [("train", "`train` options"), ("eval", "`eval` prints a table")])
def test_flags_of_the_option_paragraphs_exist(cmd, start):
    flags = set(FLAG.findall(_paragraph(start)))
    assert len(flags) > 5
    assert not flags - _options(cmd), f"{cmd}: {sorted(flags - _options(cmd))}"


def test_every_flag_in_the_readme_exists_somewhere():
    """Prose mentions (outside the per-command checks above) name real options of some command."""
    text = FENCE.sub(lambda m: m.group(0) if m.group(1) == "bash" else "", README.read_text())
    text = re.sub(r"`python [^`]*`", "", text)  # benchmark scripts have options of their own
    every = set().union(*(_options(c) for c in COMMANDS))
    unknown = set(FLAG.findall(text)) - every - FOREIGN
    assert not unknown, f"README mentions options no command has: {sorted(unknown)}"
