"""The reproduction grid's bookkeeping (benchmarks/reproduce.py): lr choice, density lr law, claims, stale cells.

The grid itself runs the real model for hours; here its decisions are checked on made-up cells.
"""

import json
import math

import pytest

from helpers import load_benchmark

R = load_benchmark("reproduce")
import stats  # noqa: E402  (load_benchmark put benchmarks/ on sys.path, as a script run has it)


def _put(store, cell, **result):
    p = store.path(cell)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"spec": cell.spec(), **result}))


def _search(store, method, aucs):
    for lr, auc in zip(R.lr_grid(method), aucs):
        _put(store, R.Cell("search", method, R.SEARCH_TASK, R.SEARCH_SEED, lr=lr), dev_auc=auc)


def test_lr_is_chosen_on_dev_with_ties_to_the_smaller_and_waits_for_the_whole_search(tmp_path):
    store = R.Store(tmp_path / "r")
    _search(store, "random", [0.5, 0.7])  # two of four candidates done
    assert store.lr("random") is None and not R.ready(store, R.Cell("grid", "random", "sst2", 1))
    _search(store, "random", [0.5, 0.7, 0.7, 0.6])
    assert store.lr("random") == R.lr_grid("random")[1]
    assert R.ready(store, R.Cell("grid", "random", "sst2", 1))
    _search(store, "sensitive", [0.9, 0.5, 0.5, 0.5])  # best on the low edge: the grid grows downwards
    lrs, scores = store.search("sensitive")
    assert lrs == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3] and not scores and store.lr("sensitive") is None
    assert R.Cell("search", "sensitive", "sst2", 0, lr=1e-5) in R.all_cells(store)
    _put(store, R.Cell("search", "sensitive", R.SEARCH_TASK, R.SEARCH_SEED, lr=1e-5), dev_auc=0.8)
    assert store.lr("sensitive-nf4") == store.lr("sensitive") == 3e-5  # 1e-5 is worse: settled
    _search(store, "full", [0.1, 0.2, 0.3, 0.4])  # rising to the top edge: at most MAX_EXTEND more
    for lr in (3e-6, 1e-5):
        assert store.search("full")[0][-1] == lr
        _put(store, R.Cell("search", "full", R.SEARCH_TASK, R.SEARCH_SEED, lr=lr), dev_auc=0.5 + lr * 1e4)
    assert store.search("full")[0] == [3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5] and store.lr("full") == 1e-5


def test_density_lr_follows_the_power_law_through_the_two_searched_points(tmp_path):
    store = R.Store(tmp_path / "r")
    _search(store, "random", [0, 0, 1, 0])  # 3e-4 at 1e-3
    assert store.lr("random", 1e-2) is None  # needs full ZO's lr too
    _search(store, "full", [0, 1, 0, 0])  # 1e-7 at density 1
    assert math.isclose(store.lr("random", 1.0), 1e-7)
    assert math.isclose(store.lr("random", 1e-3), 3e-4)
    a = math.log(1e-7 / 3e-4) / math.log(1e-3)
    assert math.isclose(store.lr("random", 1e-5), 3e-4 * 100**a)
    assert store.lr("random", 1e-5) > 3e-4 > store.lr("random", 1e-1) > 1e-7


def test_a_cell_with_other_settings_is_stale(tmp_path):
    store = R.Store(tmp_path / "r")
    cell = R.Cell("grid", "full", "sst2", 0)
    p = store.path(cell)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"spec": dict(cell.spec(), steps=1), "test_accuracy": 1.0}))
    assert store.get(cell) is None
    _put(store, cell, test_accuracy=0.5)
    assert store.get(cell)["test_accuracy"] == 0.5


@pytest.mark.parametrize("diffs,verdict", [([0.1, 0.12, 0.09, 0.11], "a better"), ([-0.1, -0.12, -0.09, -0.11], "a worse"),
                                          ([0.1, -0.1, 0.05, -0.05], "no significant difference")])
def test_claims_are_paired_differences_with_a_confidence_interval(diffs, verdict):
    cells = {}
    pairs = [(t, s) for t in R.TASKS for s in R.SEEDS][: len(diffs)]
    for (t, s), d in zip(pairs, diffs):
        cells[("sensitive", t, s)], cells[("full", t, s)] = 0.6 + d, 0.6
    claim = R._claims(lambda m, t, s: cells.get((m, t, s)))[0]
    assert (claim["a"], claim["b"], claim["n"]) == ("sensitive", "full", len(diffs))
    assert math.isclose(claim["mean_diff"], sum(diffs) / len(diffs))
    assert claim["verdict"] == verdict
    per_task = {t: c for t, c in claim["per_task"].items() if c["n"]}
    assert sum(c["n"] for c in per_task.values()) == len(diffs)
    first = next(iter(per_task.values()))
    assert math.isclose(first["mean_diff"], sum(diffs[: first["n"]]) / first["n"])


def test_per_task_interval_uses_student_t_not_the_normal():
    # three seeds agreeing closely: the normal 1.96 would call +0.02 ± 0.011 significant, t(2) = 4.30 does not
    cells = {("sensitive", "sst2", s): 0.6 + d for s, d in zip(R.SEEDS, (0.01, 0.02, 0.03))}
    cells.update({("full", "sst2", s): 0.6 for s in R.SEEDS})
    c = R._claims(lambda m, t, s: cells.get((m, t, s)))[0]["per_task"]["sst2"]
    assert math.isclose(c["ci95"], 4.303 * 0.01 / math.sqrt(3), rel_tol=1e-3)
    assert c["verdict"] == "no significant difference"


@pytest.mark.parametrize("df,expected", [(1, 12.706), (2, 4.303), (14, 2.145), (120, 1.980)])
def test_t_quantile_matches_the_table(df, expected):
    assert stats.t_quantile(df) == pytest.approx(expected, abs=1e-3)
