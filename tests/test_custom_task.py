"""User tasks: JSONL/CSV/TSV files + template + label map, from flags or a task file, through the CLI."""

import json

import pytest

from helpers import save_tiny_model, sentences
from sparsezo.cli import main
from sparsezo.errors import SparseZOError
from sparsezo.tasks import get_task

LABELS = {"pos": " very good", "neg": " quite bad", "mixed": " fine and dull"}  # 3 classes, multi-token words
TEMPLATE = "{text} It was"


def _rows(n, seed=0):
    return [{"text": s, "label": ["neg", "pos", "mixed"][(y + i) % 3 if i % 4 == 0 else y]}
            for i, (y, s) in enumerate(sentences(n, seed))]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _task(path, **kw):
    return get_task("custom", None, data=str(path), template=TEMPLATE, labels=json.dumps(LABELS), **kw)


def test_jsonl_rows_become_examples_with_a_fixed_20_percent_holdout(tmp_path):
    rows = _rows(50)
    task = _task(_jsonl(tmp_path / "d.jsonl", rows))
    train, test = task.load_pools()
    assert len(train) == 40 and len(test) == 10
    assert {r["text"] for r in train}.isdisjoint({r["text"] for r in test}) or len({r["text"] for r in rows}) < 50
    ex = task.format(rows[0])
    assert ex.prompt == rows[0]["text"] + " It was" and ex.candidates == list(LABELS.values())
    assert ex.gold == list(LABELS).index(rows[0]["label"])
    assert task.load_pools() == (train, test)  # the holdout does not depend on the run seed
    splits = task.splits(seed=3, num_train=30, num_dev=10, num_test=100)
    assert [len(splits[k]) for k in ("train", "dev", "test")] == [30, 10, 10]


def test_csv_tsv_label_field_test_data_and_non_string_labels(tmp_path):
    (tmp_path / "d.csv").write_text('y,text\n1,"good, very good"\n0,bad\n')
    (tmp_path / "t.tsv").write_text('y\ttext\n0\t"awful"\n')
    task = get_task("custom", None, data=str(tmp_path / "d.csv"), test_data=str(tmp_path / "t.tsv"),
                    template="Review: {text}\nSentiment:", labels='{"1": " good", "0": " bad"}', label_field="y")
    train, test = task.load_pools()
    assert [task.format(r).prompt for r in train] == ["Review: good, very good\nSentiment:", "Review: bad\nSentiment:"]
    assert [task.format(r).gold for r in train + test] == [0, 1, 1]
    assert task.format(test[0]).prompt == 'Review: "awful"\nSentiment:'  # TSV keeps quotes, as GLUE files do
    _jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": True}])
    nums = get_task("custom", None, data=str(tmp_path / "n.jsonl"), template="{text}", labels={1: " x", "true": " y"},
                    test_data=str(tmp_path / "n.jsonl"))
    assert [nums.format(r).gold for r in nums.load_pools()[0]] == [0, 1]


def test_task_file_json_and_yaml_with_relative_paths_and_flag_override(tmp_path):
    _jsonl(tmp_path / "d.jsonl", _rows(10))
    (tmp_path / "t.json").write_text(json.dumps({"data": "d.jsonl", "template": TEMPLATE, "labels": LABELS}))
    task = get_task("custom", None, task_file=str(tmp_path / "t.json"))
    assert task.data == tmp_path / "d.jsonl" and len(task.load_pools()[0]) == 8
    assert get_task("custom", None, task_file=str(tmp_path / "t.json"), template="{text}!").template == "{text}!"
    pytest.importorskip("yaml")
    (tmp_path / "t.yaml").write_text("data: d.jsonl\ntemplate: '{text} It was'\nlabels:\n  pos: ' very good'\n"
                                     "  neg: ' quite bad'\n  mixed: ' fine and dull'\n")
    assert get_task("custom", None, task_file=str(tmp_path / "t.yaml")).verbalizer == LABELS


@pytest.mark.parametrize("case,match", [
    ("missing_field", r"d\.jsonl line 2 lacks field\(s\) \['text'\]"),
    ("bad_label", r"d\.jsonl line 1 has label 'meh', not in the label map"),
    ("empty", r"d\.jsonl has no rows"),
    ("bad_row_json", r"d\.jsonl line 2 is not valid JSON"),
    ("bad_task_json", r"task file .*t\.json is not valid JSON"),
    ("bad_labels", r"--labels is not valid JSON"),
    ("no_template_field", r"--template .* needs named placeholders"),
    ("missing_keys", r"task custom needs --template, --labels"),
    ("unknown_key", r"unknown key\(s\) \['lables'\]"),
    ("extension", r"must end in \.jsonl, \.csv or \.tsv"),
    ("format_spec", r"d\.jsonl line \d: --template '\{text:d\} It was' cannot format it"),
])
def test_bad_task_input_raises_one_clear_error(tmp_path, case, match):
    good = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    data = {"missing_field": [good[0], {"label": "neg"}], "bad_label": [{"text": "x", "label": "meh"}]}.get(case, good)
    path = _jsonl(tmp_path / "d.jsonl", data)
    spec = {"data": "d.jsonl", "template": TEMPLATE, "labels": LABELS}
    if case == "empty":
        path.write_text("\n")
    if case == "bad_row_json":
        path.write_text('{"text": "a", "label": "pos"}\n{"text": \n')
    if case == "unknown_key":
        spec["lables"] = spec.pop("labels")
    if case == "missing_keys":
        spec = {"data": "d.jsonl"}
    if case == "extension":
        spec["data"] = "d.txt"
        (tmp_path / "d.txt").write_text("x")
    if case in ("no_template_field", "format_spec"):
        spec["template"] = "{} It was" if case == "no_template_field" else "{text:d} It was"
    (tmp_path / "t.json").write_text("{" if case == "bad_task_json" else json.dumps(spec))
    kw = {"labels": "{pos: 1}"} if case == "bad_labels" else {}
    with pytest.raises(SparseZOError, match=match) as err:
        get_task("custom", None, task_file=str(tmp_path / "t.json"), **kw).splits(seed=0)
    assert "\n" not in str(err.value)


def test_options_are_only_for_custom_and_data_dir_is_not(tmp_path):
    with pytest.raises(SparseZOError, match=r"task sst2 takes no --data, --template"):
        get_task("sst2", None, data="x.jsonl", template="{x}")
    with pytest.raises(SparseZOError, match=r"--data-dir does not apply to --task custom"):
        get_task("custom", tmp_path, data="x.jsonl")


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    return {"model": str(save_tiny_model(root / "model")), "data": str(_jsonl(root / "d.jsonl", _rows(120))),
            "root": root}


def _flags(env):
    return ["--model", env["model"], "--dtype", "float32", "--task", "custom", "--data", env["data"],
            "--template", TEMPLATE, "--labels", json.dumps(LABELS)]


def test_custom_task_train_then_eval_through_the_cli(env, capsys):
    out = env["root"] / "run"
    assert main(["train", *_flags(env), "--mask", "random", "--density", "0.05", "--steps", "6", "--eval-every", "3",
                 "--num-train", "48", "--num-dev", "16", "--lr", "0.03", "--eps", "1e-3", "--loss", "acc",
                 "--keep-last", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "custom" and result["metric"] == "accuracy" and result["n_test"] == 24
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev_accuracy" in r] == [0, 3, 6]

    assert main(["eval", *_flags(env), "--delta", str(out), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert (ev["task"], ev["metric"], ev["n"], ev["split"]) == ("custom", "accuracy", 24, "test")
    assert ev["value"] == result["test_accuracy"]

    assert main(["eval", *_flags(env), "--split", "dev", "--num-train", "48", "--num-dev", "16", "--icl", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["task", "split", "n", "metric", "value"]
    assert table[1].split()[:4] == ["custom", "dev/2-shot", "16", "accuracy"]

    task_file = env["root"] / "task.json"
    task_file.write_text(json.dumps({"data": "d.jsonl", "template": TEMPLATE, "labels": LABELS}))
    mask = env["root"] / "m.safetensors"
    assert main(["mask", "compute", "--model", env["model"], "--task", "custom", "--task-file", str(task_file),
                 "--mask", "sensitive-task", "--density", "0.01", "--seq-len", "16", "--out", str(mask), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "task:custom:train"


@pytest.mark.parametrize("case", ["missing_field", "bad_label", "empty", "bad_json", "not_custom", "no_task_file"])
def test_bad_task_files_exit_2_with_one_line(env, tmp_path, capsys, case):
    task_file = tmp_path / "task.json"
    data = tmp_path / "d.jsonl"
    rows = {"missing_field": [{"label": "pos"}], "bad_label": [{"text": "good", "label": "great"}]}
    _jsonl(data, rows.get(case, [{"text": "good", "label": "pos"}] * 5))
    if case == "empty":
        data.write_text("")
    task_file.write_text("{'data': 'd.jsonl'}" if case == "bad_json" else
                         json.dumps({"data": "d.jsonl", "template": TEMPLATE, "labels": LABELS}))
    task = ["--task", "sst2" if case == "not_custom" else "custom",
            "--task-file", str(task_file if case != "no_task_file" else tmp_path / "nope.json")]
    for cmd in (["eval", "--model", env["model"]], ["train", "--model", env["model"], "--out", str(tmp_path / "o")]):
        assert main([*cmd, *task]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sparsezo: error: "), err
    assert not (tmp_path / "o").exists()
