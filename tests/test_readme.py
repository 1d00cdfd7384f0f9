"""The README and docs/ are checked, not trusted: their Python examples run as written, and their flags exist.

The API example is executed verbatim on a tiny model: only the environment changes —
``$SPARSEZO_HOME`` holds a tiny model where the embedded default model is cached (so
``load_model()`` takes its ordinary path) and ``$SPARSEZO_ASSETS`` tiny SST-2-shaped files and
calibration text. The quick start runs verbatim too, in a folder holding the ``my-model`` and
``reviews.csv`` it names. ``docs/cli.md`` must list exactly the options each command has, with their defaults.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import shlex
from pathlib import Path

import pytest

from helpers import FILLER, NEGATIVE, POSITIVE, save_tiny_model, sentences, write_sst2
from sparsezo.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"
DOCS = [README, CLI_DOC, ROOT / "docs" / "method.md", ROOT / "docs" / "results.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# flags of other programs that README command lines pass through (pip, torchrun)
FOREIGN = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
           "--torch-backend", "--index-url", "--extra-index-url"}


def blocks(lang: str, doc: Path = README) -> list[str]:
    return [body for kind, body in FENCE.findall(doc.read_text()) if kind == lang]


def first_block(heading: str) -> str:
    """The first fenced python block after the README's ``heading`` line."""
    text = README.read_text()
    section = text[text.index(f"\n{heading}\n"):]
    return next(m.group(2) for m in FENCE.finditer(section) if m.group(1) == "python")


def api_example() -> str:
    """The python block of the README's ``## API`` section."""
    return first_block("## API")


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


def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    """The "your model, your data" snippet: a custom CSV task, a short recipe, a task-Fisher mask."""
    save_tiny_model(tmp_path / "my-model")
    with open(tmp_path / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([text, "pos" if y else "neg"] for y, text in sentences(120, 3))
    monkeypatch.chdir(tmp_path)

    code = first_block("## Your model, your data")
    namespace = {"__name__": "readme_quick_start"}
    exec(compile(code, "README.md (quick start)", "exec"), namespace)

    recipe, mask, splits = namespace["recipe"], namespace["mask"], namespace["splits"]
    assert recipe.steps < 400 and mask.meta["rule"] == "sensitive-task" and mask.num_trainable > 0
    assert splits["test"] and {e.candidates[e.gold] for e in splits["train"]} == {" great", " terrible"}
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert 0.0 <= float(printed) <= 1.0, printed


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


def command_lines(doc: Path = README) -> list[tuple[str, list[str]]]:
    """(command, its --flags) for every sparsezo invocation in a document's bash blocks."""
    found = []
    for body in blocks("bash", doc):
        for line in body.replace("\\\n", " ").splitlines():
            line = re.split(r"(?:^|\s)#", line)[0]  # a shell comment
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


LEAVES = {c for c in COMMANDS if not any(o.startswith(c + " ") for o in COMMANDS)}


def test_the_readme_shows_every_command():
    shown = {c for c, _ in command_lines()}
    assert LEAVES >= {"train", "eval", "demo", "mask compute", "export"}
    assert not LEAVES - shown, f"README has no example of: {sorted(LEAVES - shown)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_command_line_flag_exists_in_that_command(doc):
    lines = command_lines(doc)
    assert lines or doc.name == "method.md"
    missing = [(cmd, f) for cmd, flags in lines for f in flags if f not in _options(cmd)]
    assert not missing, f"{doc.name} documents flags its commands do not have: {missing}"


def _documented_options() -> dict[str, dict[str, str]]:
    """'train' -> {option: its default cell} from the tables of docs/cli.md's "## `sparsezo train`" section."""
    out = {}
    for sec in re.split(r"(?m)^## ", CLI_DOC.read_text()):
        m = re.match(r"`sparsezo ([a-z ]+)`\n", sec)
        if m:
            rows = re.findall(r"(?m)^\| ((?:`-[^`]+`(?:, )?)+)(?:[^|\\]|\\.)*\| ([^|]*) \|", sec)
            out[m.group(1)] = {f: default for flags, default in rows for f in re.findall(r"`(-[^`]+)`", flags)}
    return out


def _table_row(a: argparse.Action) -> str:
    """The docs/cli.md row of one option, as the parser defines it (printed when the page is stale)."""
    flag = ", ".join(f"`{o}`" for o in a.option_strings)
    if a.choices:
        flag += " " + "\\|".join(str(c) for c in a.choices)
    elif a.nargs != 0 and a.metavar:
        flag += " " + a.metavar
    meaning = (a.help or "").replace("%%", "%").replace("|", "\\|")
    return f"| {flag} | {_default_cell(a)} | {meaning} |"


def _default_cell(a: argparse.Action) -> str:
    d = a.default
    return "—" if d is None or d is False or d == [] else f"`{d}`"


def test_cli_doc_lists_exactly_the_options_of_every_command():
    """Each command's section lists its options with their defaults; a new or changed option fails here."""
    documented = _documented_options()
    assert not LEAVES - set(documented), f"docs/cli.md has no section for: {sorted(LEAVES - set(documented))}"
    for cmd, doc_defaults in documented.items():
        actions = [a for a in COMMANDS[cmd]._actions
                   if a.option_strings and a.help != argparse.SUPPRESS and "-h" not in a.option_strings]
        stale = [a for a in actions
                 if any(doc_defaults.get(o) != _default_cell(a) for o in a.option_strings)]
        extra = set(doc_defaults) - {o for a in actions for o in a.option_strings}
        assert not stale and not extra, (f"docs/cli.md, sparsezo {cmd}: not an option {sorted(extra)}; "
                                         "missing or with another default, the rows should read:\n"
                                         + "\n".join(_table_row(a) for a in stale))


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_flag_mentioned_exists_somewhere(doc):
    """Prose mentions (outside the per-command checks above) name real options of some command."""
    text = FENCE.sub(lambda m: m.group(0) if m.group(1) == "bash" else "", doc.read_text())
    text = re.sub(r"`python [^`]*`|^python .*$", "", text, flags=re.M)  # benchmark scripts have options of their own
    every = set().union(*(_options(c) for c in COMMANDS))
    unknown = set(FLAG.findall(text)) - every - FOREIGN
    assert not unknown, f"{doc.name} mentions options no command has: {sorted(unknown)}"
