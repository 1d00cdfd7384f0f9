"""SuperGLUE task modules: templates on real rows, splits on the real files, small pools, bad data."""

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import write_jsonl, write_sst2

from sparsezo.errors import SparseZOError
from sparsezo.tasks import TASKS, Example, get_task
from sparsezo.tasks.base import read_jsonl

SUPERGLUE = ["rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record"]
YES_NO = [" Yes", " No"]

# (task, "idx" of a training-pool row, exact prompt, candidates, gold), checked by hand against the files.
REAL = [
    ("rte", 0, 'No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that "Weapons of Mass Destruction '
     'Found in Iraq." is true? Yes or No?\nAnswer:', YES_NO, 1),
    ("cb", 0, 'It was a complex language. Not written down but handed down. One might say it was peeled down.\n'
     'Does this mean that "the language was peeled down" is true? Yes, No, or Maybe?\nAnswer:',
     [" Yes", " No", " Maybe"], 0),
    ("boolq", 6262, "Twisted (TV series) -- The series was originally titled Socio, but was renamed during production "
     "in early 2013.\nQuestion: is the show twisted based on a book?\nAnswer:", YES_NO, 1),
    ("wsc", 461, 'John hired Bill to take care of him .\nIn the previous sentence, does the pronoun "him" refer to '
     "John? Yes or No?\nAnswer:", YES_NO, 0),
    ("wic", 4232, 'Does the word "feel" have the same meaning in these two sentences? Yes, No?\nYou make me feel '
     "naked.\nShe felt small and insignificant.\nAnswer:", YES_NO, 0),
    ("multirc", 9610, "Once upon a time Jimmy had a mother who told him that he was good at music. Jimmy wanted to "
     "play music. He did not know which instrument to play, so he tried a piano first. The piano went like a sound. "
     "Then he tried a guitar. The guitar played. His brother told him that the piano was better to start, so Jimmy "
     "played the piano. He hammered on the keys. Jimmy's brother liked this, but mom did not like this. Jimmy tried "
     "playing very quiet. Jimmy's mom liked this, but Jimmy's brother did not like this. Jimmy tried playing in the "
     "middle. Jimmy liked this, and Jimmy's mom liked this, and Jimmy's brother liked this. It was great.\n"
     "Question: When Jimmy played quietly, who didn't like it?\n"
     'I found this answer "Brother". Is that correct? Yes or No?\nAnswer:', YES_NO, 1),
    ("copa", 0, "My body cast a shadow over the grass because", [" the sun was rising.", " the grass was cut."], 0),
    ("copa", 36, "The papers were disorganized so",
     [" I made photocopies of them.", " I put them into alphabetical order."], 1),
    ("record", 45067, "By Leon Watson PUBLISHED: 12:24 EST, 15 October 2012 | UPDATED: 01:47 EST, 16 October 2012 A "
     "thug who stabbed his friend 11 times and left him for dead after a row over a game of darts has been jailed for "
     "eight years. Peter Roberts, 46, from Northampton, launched a 'frenzied and determined' attack on Shane Reeves, "
     "22, after they fell out on July 5 this year. Roberts plunged a kitchen knife into his friend's chest, abdomen, "
     "shoulder and arm before dumping him on a landing. Peter Roberts, from Northampton, stabbed his friend 11 times "
     "and left him for dead after a row over a game of darts. He has been jailed for eight years\n"
     "- Peter Roberts, from Northampton, jailed for attack on Shane Reeves\n"
     "- The pair, aged 46 and 22, were friends but fell out on July 5 this year\n",
     [f"After undergoing surgery, Mr {e} spent a month recovering from his injuries."
      for e in ["Leon Watson", "Peter Roberts", "Northampton", "Shane Reeves", "Roberts"]], 3),
]

# Sizes on the real files with the defaults (1000 train / 500 dev / 1000 test): pools smaller than 1500 are split 2:1.
SIZES = {
    "rte": (1000, 500, 277),  # train_full 2490 / val 277
    "cb": (166, 84, 56),  # train_full 250 / val 56
    "boolq": (42, 22, 1000),  # train + dev32 = 64 / val 3270
    "wsc": (42, 22, 104),
    "wic": (42, 22, 638),
    "multirc": (214, 107, 1000),  # 154 + 167 (question, answer) pairs / 4848 pairs
    "copa": (266, 134, 100),  # train_full 400 / val 100
    "record": (21, 11, 32),  # train 32 queries / dev32 32 queries (no val.jsonl)
}


def test_all_superglue_tasks_are_registered():
    assert set(SUPERGLUE) <= set(TASKS)


@pytest.mark.parametrize("name,idx,prompt,candidates,gold", REAL, ids=[f"{r[0]}-{r[1]}" for r in REAL])
def test_template_on_a_real_row(assets, name, idx, prompt, candidates, gold):
    task = get_task(name)
    rows = [r for r in task.load_pools()[0] if r["idx"] == idx]
    assert len(rows) == 1
    ex = task.format(rows[0])
    assert (ex.prompt, ex.candidates, ex.gold) == (prompt, candidates, gold)


def _recording_splits(task, **kw):
    """splits() plus the identity of the pool row behind every example, in train, dev, test order."""
    rows, fmt = [], task.format
    task.format = lambda row: (rows.append(id(row)), fmt(row))[1]
    out = task.splits(**kw)
    n_train, n_dev = len(out["train"]), len(out["dev"])
    return out, rows[:n_train], rows[n_train : n_train + n_dev]


@pytest.mark.parametrize("name", SUPERGLUE)
def test_splits_on_the_real_files(assets, name, caplog):
    task = get_task(name)
    with caplog.at_level(logging.WARNING):
        splits, train_ids, dev_ids = _recording_splits(task, seed=0)
    sizes = tuple(len(splits[k]) for k in ("train", "dev", "test"))
    assert sizes == SIZES[name]
    assert task.split_sizes == dict(zip(("train", "dev", "test"), sizes))
    assert (f"task {name}" in caplog.text) == (name != "rte")
    assert len(set(train_ids)) == len(train_ids) and len(set(dev_ids)) == len(dev_ids)
    assert not set(train_ids) & set(dev_ids)
    assert splits == get_task(name).splits(seed=0)
    assert splits["train"] != get_task(name).splits(seed=1)["train"]
    for ex in splits["train"] + splits["dev"] + splits["test"]:
        assert 0 <= ex.gold < len(ex.candidates) and ex.prompt and all(ex.candidates)


def _rte_rows(n):
    return [{"premise": f"P{i}.", "hypothesis": f"H{i}.", "label": ["entailment", "not_entailment"][i % 2], "idx": i}
            for i in range(n)]


def _rte_dir(tmp_path, n_train=10, n_test=3):
    write_jsonl(tmp_path / "train_full.jsonl", _rte_rows(n_train))
    write_jsonl(tmp_path / "val.jsonl", _rte_rows(n_test))
    return tmp_path


def test_small_pool_is_split_proportionally_and_warns(tmp_path, caplog):
    task = get_task("rte", _rte_dir(tmp_path))
    with caplog.at_level(logging.WARNING):
        splits, train_ids, dev_ids = _recording_splits(task, seed=3, num_train=1000, num_dev=500)
    assert task.split_sizes == {"train": 6, "dev": 4, "test": 3}
    assert "task rte" in caplog.text and "10 rows" in caplog.text and "6 train + 4 dev" in caplog.text
    assert "4 dev examples are below the 32 that selecting the best step needs" in caplog.text
    assert not set(train_ids) & set(dev_ids)
    assert splits == get_task("rte", tmp_path).splits(seed=3, num_train=1000, num_dev=500)
    # a huge --num-train starves dev: said, with the minimum
    big = get_task("rte", _rte_dir(tmp_path / "big", n_train=1000))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        big.splits(seed=0, num_train=100_000, num_dev=500)
    assert big.split_sizes["dev"] == 5 and "5 dev examples are below the 32" in caplog.text
    # extreme ratios still leave one of each; eval-only and exact fits are untouched and silent
    assert get_task("rte", tmp_path).splits(seed=0, num_train=1, num_dev=1000)["train"] != []
    assert {k: len(v) for k, v in get_task("rte", tmp_path).splits(seed=0, num_train=1000, num_dev=1).items()} == \
        {"train": 9, "dev": 1, "test": 3}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(get_task("rte", tmp_path).splits(seed=0, num_train=0, num_dev=0)["test"]) == 3
        assert len(get_task("rte", tmp_path).splits(seed=0, num_train=7, num_dev=3)["dev"]) == 3
    assert caplog.text == ""


def test_large_pools_keep_the_original_permutation(tmp_path):
    """Same draws as before shrinking existed: one permutation of the pool, then one of the test file."""
    task = get_task("sst2", write_sst2(tmp_path, n_train=200, n_test=60))
    train_pool, test_pool = task.load_pools()
    rng = np.random.default_rng(5)
    order, test_order = rng.permutation(200), np.sort(rng.permutation(60)[:40])
    splits = task.splits(seed=5, num_train=100, num_dev=50, num_test=40)
    assert splits["train"] == [task.format(train_pool[i]) for i in order[:100]]
    assert splits["dev"] == [task.format(train_pool[i]) for i in order[100:150]]
    assert splits["test"] == [task.format(test_pool[i]) for i in test_order]


def test_train_and_dev32_form_the_pool_without_train_full(tmp_path):
    rows = [{"question": f"q{i}", "passage": f"p{i}", "label": bool(i % 2), "idx": i} for i in range(5)]
    write_jsonl(tmp_path / "train.jsonl", rows[:3])
    write_jsonl(tmp_path / "dev32.jsonl", rows[3:])
    write_jsonl(tmp_path / "val.jsonl", rows[:2])
    train, test = get_task("boolq", tmp_path).load_pools()
    assert [r["idx"] for r in train] == [0, 1, 2, 3, 4] and len(test) == 2


@pytest.mark.parametrize("content,match", [
    (None, r"/train\.jsonl does not exist"),  # no train_full.jsonl: falls back to train + dev32
    ('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n{"premise": "a",\n', r"line 2 is not valid JSON"),
    ('{"premise": "a", "label": "entailment"}\n', r"line 1 lacks field\(s\) \['hypothesis'\]"),
    ('["premise", "hypothesis", "label"]\n', r"line 1 is not a JSON object"),
    ("", r"is empty"),
    ("\n\n", r"is empty"),
])
def test_bad_files_raise_one_clear_error(tmp_path, content, match):
    if content is not None:
        (tmp_path / "train_full.jsonl").write_text(content)
    with pytest.raises(SparseZOError, match=match) as err:
        get_task("rte", tmp_path).splits(seed=0)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_missing_val_file_is_named(tmp_path):
    write_jsonl(tmp_path / "train_full.jsonl", _rte_rows(4))
    with pytest.raises(SparseZOError, match=r"val\.jsonl does not exist"):
        get_task("rte", tmp_path).load_pools()


def test_read_jsonl_skips_blank_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
    assert read_jsonl(tmp_path / "a.jsonl", ["x"]) == [{"x": 1}, {"x": 2}]


ENTITIES = {"text": "Ann met Bob.\n@highlight\nAnn smiled",
            "entities": [{"start": 0, "end": 2}, {"start": 8, "end": 10}]}
BAD_ROWS = [
    ("rte", {"premise": "a", "hypothesis": "b", "label": "maybe"}, r"rte: .*'label' is 'maybe', not one of"),
    ("cb", {"premise": "a", "hypothesis": "b", "label": "not_entailment"}, r"cb: .*'label'"),
    ("rte", {"premise": "a", "hypothesis": 3, "label": "entailment"}, r"rte: .*field 'hypothesis'"),
    ("boolq", {"passage": "p", "question": "q", "label": "yes"}, r"boolq: .*'label' is 'yes'"),
    ("boolq", {"passage": " ", "question": "q", "label": True}, r"boolq: .*field 'passage'"),
    ("wsc", {"text": "t", "target": {"span1_text": "Ann"}, "label": False}, r"wsc: .*'target\.span2_text'"),
    ("wic", {"word": "w", "sentence1": "a", "sentence2": "b", "label": 2}, r"wic: .*'label' is 2"),
    ("multirc", {"paragraph": "p", "question": "q", "answer": "a", "label": None}, r"multirc: .*'label' is None"),
    ("copa", {"premise": "p.", "choice1": "A.", "choice2": "B.", "question": "why", "label": 0}, r"copa: .*'question'"),
    ("copa", {"premise": "p.", "choice1": "A.", "choice2": "B.", "question": "cause", "label": 2}, r"copa: .*'label'"),
    ("copa", {"premise": "p.", "choice1": "A.", "question": "cause", "label": 0}, r"copa: .*'choice2'"),
    ("record", {"passage": ENTITIES, "query": "@placeholder left", "answers": [{"text": "Eve"}]}, r"record: .*answers"),
    ("record", {"passage": ENTITIES, "query": "no slot", "answers": [{"text": "Bob"}]}, r"record: .*@placeholder"),
    ("record", {"passage": {"text": "Ann"}, "query": "@placeholder", "answers": []}, r"record: .*passage\.entities"),
]


@pytest.mark.parametrize("name,row,match", BAD_ROWS)
def test_bad_rows_name_the_task_and_field(name, row, match):
    with pytest.raises(SparseZOError, match=match):
        get_task(name).format(row)


def test_binary_labels_accept_booleans_and_0_1():
    task = get_task("multirc")
    row = {"paragraph": "p", "question": "q", "answer": "a"}
    assert [task.format({**row, "label": v}).gold for v in (1, True, 0, False)] == [0, 0, 1, 1]


def test_record_dedups_entities_and_marks_the_first_answer():
    passage = {**ENTITIES, "entities": ENTITIES["entities"] * 2 + [{"start": 24, "end": 26}]}  # Ann, Bob, Ann, Bob, Ann
    row = {"passage": passage, "query": "Then @placeholder left.", "answers": [{"text": "Bob"}]}
    ex = get_task("record").format(row)
    assert ex.prompt == "Ann met Bob.\n- Ann smiled\n"
    assert ex.candidates == ["Then Ann left.", "Then Bob left."] and ex.gold == 1


def test_multirc_flattens_passages_into_pairs(tmp_path):
    passage = {"idx": 0, "passage": {"text": "Sky is blue.", "questions": [
        {"question": "Color?", "answers": [{"text": "Blue", "label": 1, "idx": 0},
                                           {"text": "Red", "label": 0, "idx": 1}]},
        {"question": "What?", "answers": [{"text": "Sky", "label": 1, "idx": 2}]}]}}
    for f in ("train.jsonl", "dev32.jsonl", "val.jsonl"):
        write_jsonl(tmp_path / f, [passage])
    train, test = get_task("multirc", tmp_path).load_pools()
    assert len(train) == 6 and len(test) == 3
    assert [(r["question"], r["answer"], r["label"]) for r in test] == [("Color?", "Blue", 1), ("Color?", "Red", 0),
                                                                        ("What?", "Sky", 1)]
    write_jsonl(tmp_path / "val.jsonl", [{"idx": 7, "passage": {"text": "t", "questions": [{"question": "q"}]}}])
    with pytest.raises(SparseZOError, match=r"multirc: passage idx=7 .*answers"):
        get_task("multirc", tmp_path).load_pools()


# ----------------------------------------------------------------------------- registry, SQuAD, DROP, ICL
FIXTURES = Path(__file__).parent / "fixtures"


def test_registry_names_are_the_command_line_names():
    assert list(TASKS) == ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop",
                           "custom"]
    assert {n for n, t in TASKS.items() if t.kind == "generation"} == {"squad", "drop"}
    with pytest.raises(SparseZOError, match=r"task rte takes no --template"):
        get_task("rte", None, template="{x}")


def test_squad_fixture_prompts_and_answers():
    task = get_task("squad", FIXTURES / "squad")
    train, test = task.load_pools()
    assert len(train) == 5 and len(test) == 2
    ex = task.format(test[0])
    assert ex.prompt == ("Title: Glacier\nContext: A glacier forms where snow accumulates faster than it melts. Over "
                         "centuries the snow is compressed into ice that flows slowly downhill under its own weight.\n"
                         "Question: What is snow compressed into?\nAnswer:")
    assert (ex.candidates, ex.gold, ex.answers) == ([" ice"], 0, ["ice", "ice that flows slowly downhill"])
    assert task.format(train[0]).answers == ["the Romans"] and task.format(train[0]).meta == {"idx": "lh-1"}
    splits = task.splits(seed=0, num_train=3, num_dev=2)
    assert [len(splits[k]) for k in ("train", "dev", "test")] == [3, 2, 2]


def test_drop_fixture_numbers_spans_and_dates():
    task = get_task("drop", FIXTURES / "drop")
    train, test = task.load_pools()
    got = {r["idx"]: task.format(r) for r in train + test}
    assert got["nfl_001_q1"].prompt == (
        "Passage: The Bears opened the scoring with a 32-yard field goal. The Lions answered with two touchdowns, a "
        "5-yard run and a 41-yard pass. Chicago kicked another field goal from 45 yards before halftime.\n"
        "Question: How many field goals did the Bears kick?\nAnswer:")
    assert got["nfl_001_q1"].answers == ["2"] and got["nfl_001_q1"].candidates == [" 2"]
    assert got["nfl_001_q2"].answers == ["The Bears"]
    assert got["hist_002_q1"].answers == ["14 March 1743"]
    assert got["hist_002_q2"].answers == ["Sweden", "Russia"]  # each span is an acceptable answer (MeZO)
    assert got["census_003_q1"].answers == ["250"]  # validated answers add alternatives, duplicates dropped
    assert got["census_003_q2"].answers == ["2000"]


def _write(path, text):
    path.mkdir(parents=True, exist_ok=True)
    for name in ("train.json", "dev.json"):
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize("name,text,match", [
    ("squad", '{"data": [', r"is not valid JSON"),
    ("squad", '{"version": "1.1"}', r"no top-level 'data' list"),
    ("squad", '{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "1", "answers": []}]}]}]}',
     r"squad: .*article 0 breaks the schema .*'question'"),
    ("squad", '{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "q7", "question": "q?", '
              '"answers": [{"text": " "}]}]}]}]}', r"squad: question idx=q7 has no non-empty gold answer"),
    ("squad", '{"data": []}', r"holds no questions"),
    ("drop", '{"p1": {"passage": "x", "qa_pairs": [{"query_id": "a", "question": "q"}]}}',
     r"drop: .*passage 'p1' breaks the schema .*'answer'"),
    ("drop", '{"p1": {"qa_pairs": []}}', r"holds no questions"),
    ("drop", '[1, 2]', r"not an object of passages"),
    ("drop", '{"p1": {"passage": "x", "qa_pairs": [{"query_id": "a", "question": "q", "answer": {"number": "", '
             '"spans": [], "date": {"day": "", "month": "", "year": ""}}}]}}', r"drop: question idx=a has no non-empty"),
])
def test_squad_drop_bad_files(tmp_path, name, text, match):
    task = get_task(name, _write(tmp_path / name, text))
    with pytest.raises(SparseZOError, match=match) as err:
        task.splits(seed=0, num_train=1, num_dev=1)
    assert "\n" not in str(err.value)


def test_squad_missing_files_name_the_path(tmp_path):
    with pytest.raises(SparseZOError, match=r"squad/train\.json does not exist"):
        get_task("squad", tmp_path / "squad").load_pools()


def _demo_pool(n):
    return [Example(f"p{i}", [" a", " b"], i % 2) for i in range(n)]


def test_icl_demonstrations_are_seeded_shared_and_never_the_example_itself():
    from sparsezo.tasks.icl import with_demonstrations

    pool, test = _demo_pool(20), [Example(f"t{i}", [" a", " b"], 0) for i in range(5)]
    out = with_demonstrations(test, pool, 3, seed=1)
    heads = {ex.prompt.rsplit("\n\n", 1)[0] for ex in out}
    assert len(heads) == 1  # the same demonstrations for every example of a call
    demos = heads.pop().split("\n\n")
    assert len(demos) == 3 and all(d in {p.prompt + p.candidates[p.gold] for p in pool} for d in demos)
    assert [ex.prompt.rsplit("\n\n", 1)[1] for ex in out] == [t.prompt for t in test]
    assert [(ex.candidates, ex.gold) for ex in out] == [(t.candidates, t.gold) for t in test]
    assert with_demonstrations(test, pool, 3, seed=1) == out != with_demonstrations(test, pool, 3, seed=2)
    assert with_demonstrations(test, pool, 0, seed=1) == test
    # evaluated on the pool itself: each example gets k demonstrations, none of them itself
    for ex, orig in zip(with_demonstrations(pool, pool, 3, seed=1), pool):
        shown = ex.prompt.split("\n\n")[:-1]
        assert len(shown) == 3 and orig.prompt + orig.candidates[orig.gold] not in shown
    with pytest.raises(SparseZOError, match=r"--icl 20 needs 20 training examples"):
        with_demonstrations(pool, pool, 20, seed=0)
