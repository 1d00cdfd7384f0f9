"""The reproduction grid's bookkeeping (benchmarks/reproduce.py): lr choice per task, claims, flatness, stale cells.

The grid itself runs the real model for hours; here its decisions are checked on made-up cells.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from sparsezo.training.lock import RunLock

from helpers import load_benchmark

R = load_benchmark("reproduce")
import stats  # noqa: E402  (load_benchmark put benchmarks/ on sys.path, as a script run has it)


def _put(store, cell, **result):
    p = store.path(cell)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"spec": cell.spec(), **result}))


def _search(store, method, task, aucs):
    for lr, auc in zip(R.METHODS[method].lrs, aucs):
        _put(store, R.Cell("train", method, task, R.SEARCH_SEED, lr), dev_auc=auc, test_accuracy=auc)


def test_lr_is_chosen_per_task_on_dev_with_ties_to_the_smaller_and_waits_for_the_whole_search(tmp_path):
    store = R.Store(tmp_path / "r")
    grid = R.METHODS["random"].lrs
    _search(store, "random", "sst2", [0.5, 0.7])  # two of three candidates done
    assert store.lr("random", "sst2") is None
    assert not any(c.method == "random" and c.seed != R.SEARCH_SEED for c in R.all_cells(store))
    _search(store, "random", "sst2", [0.5, 0.7, 0.7])
    assert store.lr("random", "sst2") == grid[1] and store.lr("random", "copa") is None  # per task
    later = [c for c in R.all_cells(store) if c.method == "random" and c.seed != R.SEARCH_SEED]
    assert {(c.task, c.seed, c.lr) for c in later} == {("sst2", 1, grid[1]), ("sst2", 2, grid[1])}
    _search(store, "sensitive", "copa", [0.5, 0.6, 0.5])
    assert store.lr("sensitive-nf4", "copa") == store.lr("sensitive-262k", "copa") == R.METHODS["sensitive"].lrs[1]
    assert store.lr("sensitive-auto", "copa") is None  # --lr auto: no searched lr, its cells are listed anyway
    assert R.Cell("train", "sensitive-auto", "copa", 2) in R.all_cells(store)


def test_the_counted_result_is_the_cell_at_the_chosen_lr_and_the_grid_size_is_what_gets_listed(tmp_path):
    store = R.Store(tmp_path / "r")
    for t in R.TASKS:
        for m, spec in R.METHODS.items():
            if spec.lrs:
                _search(store, m, t, [0.5, 0.6, 0.5])
    chosen = R.METHODS["full"].lrs[1]
    assert store.result("full", "sst2", 0)["dev_auc"] == 0.6
    assert store.result("full", "sst2", 1) is None  # seed 1 not run yet
    _put(store, R.Cell("train", "full", "sst2", 1, chosen), test_accuracy=0.6)
    assert store.result("full", "sst2", 1)["test_accuracy"] == 0.6
    listed = R.all_cells(store)
    assert len(listed) == len(set(listed)) == R.expected_cells(store)


def test_a_narrowed_arm_lists_only_its_scope_keeps_its_cells_and_the_first_task_runs_first(tmp_path, monkeypatch):
    store = R.Store(tmp_path / "r")
    lr = R.METHODS["magnitude-large"].lrs[0]
    cell = R.Cell("train", "magnitude-large", "copa", R.SEARCH_SEED, lr)
    _put(store, cell, test_accuracy=0.5, dev_auc=0.5)
    wide = dataclasses.replace(R.METHODS["magnitude-large"], scope=())
    monkeypatch.setitem(R.METHODS, "magnitude-large", wide)
    n_wide = R.expected_cells(store)
    narrow = dataclasses.replace(wide, scope=(("copa", (R.SEARCH_SEED,)),))
    monkeypatch.setitem(R.METHODS, "magnitude-large", narrow)
    assert store.get(cell)["test_accuracy"] == 0.5  # the scope is not part of a cell's spec
    listed = R.all_cells(store)
    assert {(c.task, c.seed) for c in listed if c.method == "magnitude-large"} == {("copa", R.SEARCH_SEED)}
    # the other tasks lose their search (3 lrs) and later seeds (2) each, copa its later seeds
    assert R.expected_cells(store) == n_wide - 5 * (len(R.TASKS) - 1) - 2
    methods = {m: dataclasses.asdict(v) for m, v in R.METHODS.items()}
    assert f"`magnitude-large` on copa seed {R.SEARCH_SEED}" in R._narrowed(methods)[0]
    assert R._narrowed({m: {**v, "scope": ()} for m, v in methods.items()}) == []  # nothing narrowed: no line
    keys = [0 if c.task == R.GRID.first_task else 1 if c.seed == R.SEARCH_SEED else 2 for c in listed]
    assert keys == sorted(keys) and keys[0] == 0 and keys[-1] == 2


def test_a_cell_with_other_settings_is_stale_and_a_stored_spec_compares_equal(tmp_path):
    store = R.Store(tmp_path / "r")
    cell = R.Cell("train", "full", "sst2", 0, 1e-6)
    p = store.path(cell)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"spec": dict(cell.spec(), budget=1), "test_accuracy": 1.0}))
    assert store.get(cell) is None
    _put(store, cell, test_accuracy=0.5)
    assert store.get(cell)["test_accuracy"] == 0.5


def test_a_new_grid_keeps_the_cells_it_shares(tmp_path, monkeypatch):
    """The grid says which cells run, not what one computes: moving it must not make its cells stale."""
    store = R.Store(tmp_path / "r")
    lr = R.METHODS["full"].lrs[1]
    _put(store, R.Cell("train", "full", "sst2", 0, lr), test_accuracy=0.5)
    monkeypatch.setitem(R.METHODS, "full", dataclasses.replace(R.METHODS["full"], lrs=(lr / 10, lr)))
    assert store.get(R.Cell("train", "full", "sst2", 0, lr))["test_accuracy"] == 0.5
    monkeypatch.setitem(R.METHODS, "full", dataclasses.replace(R.METHODS["full"], calib_tokens=1))
    assert store.get(R.Cell("train", "full", "sst2", 0, lr)) is None  # another setting is another cell


@pytest.mark.parametrize("devs,rising", [([0.5, 0.5, 0.52, 0.5, 0.5, 0.51, 0.5], False),  # noise: flat
                                         ([0.5, 0.55, 0.6, 0.62, 0.66, 0.7, 0.72], True),
                                         ([0.5, 0.7, 0.72, 0.7, 0.68, 0.7, 0.71], False)])  # rose, then flat
def test_a_curve_is_still_rising_when_its_second_half_beats_its_first_by_a_standard_error(devs, rising):
    assert R.still_rising({"curve": [{"dev": d} for d in devs]}, n_dev=100) is rising


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


def test_equal_differences_have_no_interval_rather_than_a_zero_width_one():
    d = [0.69 - 0.70, 0.7633333 - 0.7733333]  # both -0.01 up to rounding: no spread to go on
    got = stats.paired(d)
    assert got["ci95"] == math.inf and got["verdict"] == "no significant difference"
    assert stats.paired([0.69 - 0.70, 0.75 - 0.77, 0.70 - 0.715])["verdict"] == "a worse"


@pytest.mark.parametrize("df,expected", [(1, 12.706), (2, 4.303), (14, 2.145), (120, 1.980)])
def test_t_quantile_matches_the_table(df, expected):
    assert stats.t_quantile(df) == pytest.approx(expected, abs=1e-3)


def test_report_gives_verdicts_flatness_and_flags_an_lr_on_the_edge(tmp_path):
    store = R.Store(tmp_path / "r")
    curve = lambda top: [{"step": i, "forwards": 2 * i, "dev": 0.5 + top * i / 6} for i in range(7)]  # noqa: E731
    run = lambda acc, top, lr=1e-3: dict(test_accuracy=acc, dev_auc=acc, curve=curve(top), improved=top > 0,  # noqa: E731
                                         probe_forwards=0, lr_used=lr, seconds=1.0)
    for s in R.SEEDS:
        _put(store, R.Cell("eval", "zero-shot", "sst2", s), test_accuracy=0.5, seconds=1.0)
        _put(store, R.Cell("train", "full", "sst2", s, R.METHODS["full"].lrs[1]), **run(0.5, 0.0))
    for lr in R.METHODS["full"].lrs[::2]:
        _put(store, R.Cell("train", "full", "sst2", 0, lr), **run(0.4, 0.0, lr))
    # best on the top edge, then on each new edge too: chosen, and flagged
    up1 = R.neighbour(R.METHODS["sensitive"].lrs[-1], up=True)
    top = R.neighbour(up1, up=True)
    for lr, acc in zip([*R.METHODS["sensitive"].lrs, up1, top], (0.6, 0.7, 0.75, 0.8, 0.81)):
        _put(store, R.Cell("train", "sensitive", "sst2", 0, lr), **run(acc, 0.3, lr))
    for s, acc in zip((1, 2), (0.78, 0.79)):
        _put(store, R.Cell("train", "sensitive", "sst2", s, top), **run(acc, 0.3, top))
    left = R.Cell("train", "random", "sst2", 0, 1e-9)  # no grid reaches it: a cell a moved grid left behind
    _put(store, left, test_accuracy=0.5, seconds=7.0)
    r = R.report(store, tmp_path / "r", "cmd")
    assert r["unused_cells"] == 1 and r["unused_seconds"] == 7
    claim = next(c for c in r["claims"] if (c["a"], c["b"]) == ("sensitive", "full"))
    assert claim["n"] == 3 and claim["verdict"] == "a better" and math.isclose(claim["mean_diff"], (0.81 + 0.78 + 0.79) / 3 - 0.5)
    assert r["status"]["sst2"]["sensitive"] == {"seeds": 3, "improved": 3, "rising": 3, "forwards": R.TASKS["sst2"].budget,
                                                "lr": [top] * 3}
    md = (tmp_path / "r.md").read_text()
    assert "improved 0/3, rising 0/3" in md and f"**{top:g}: 0.810** ⚠" in md
    assert "| SensZOQ: the sensitive 0.1% beats a random 0.1% | sensitive − random | 0 | - | - | cells missing |" in md
    assert (tmp_path / "r_sst2.png").is_file() and r["cells_done"] < r["cells_total"]


def test_a_best_lr_on_the_edge_grows_the_search_on_that_side_at_most_twice(tmp_path):
    store = R.Store(tmp_path / "r")
    grid = list(R.METHODS["full"].lrs)
    up1 = R.neighbour(grid[-1], up=True)
    up2 = R.neighbour(up1, up=True)
    _search(store, "full", "sst2", [0.5, 0.5, 0.6])  # best on the top edge
    assert store.search_lrs("full", "sst2") == [*grid, up1] and store.lr("full", "sst2") is None
    assert R.Cell("train", "full", "sst2", 0, up1) in R.all_cells(store)
    _put(store, R.Cell("train", "full", "sst2", 0, up1), dev_auc=0.7, test_accuracy=0.7)  # the edge again
    assert store.search_lrs("full", "sst2") == [*grid, up1, up2] and R.MAX_EXTEND == 2
    before = R.expected_cells(store)
    _put(store, R.Cell("train", "full", "sst2", 0, up2), dev_auc=0.8, test_accuracy=0.8)
    assert store.search_lrs("full", "sst2") == [*grid, up1, up2]  # at most MAX_EXTEND growths, even on the edge
    assert store.lr("full", "sst2") == up2 and R.expected_cells(store) == before
    _search(store, "random", "copa", [0.7, 0.5, 0.5])  # best on the low edge
    assert store.search_lrs("random", "copa")[0] == R.neighbour(R.METHODS["random"].lrs[0], up=False)
    _search(store, "sensitive", "rte", [0.5, 0.6, 0.5])  # inside: settled, no growth
    assert store.search_lrs("sensitive", "rte") == list(R.METHODS["sensitive"].lrs)
    assert store.lr("sensitive", "rte") == R.METHODS["sensitive"].lrs[1]


def test_auto_share_is_the_default_gain_over_the_searched_gain():
    cells = {("zero-shot", "sst2", s): 0.5 for s in R.SEEDS}
    cells.update({("sensitive", "sst2", s): 0.7 for s in R.SEEDS})
    cells.update({("sensitive-auto", "sst2", 0): 0.66, ("sensitive-auto", "sst2", 1): 0.64})  # seed 2 missing
    got = R.auto_share(lambda m, t, s: cells.get((m, t, s)), "sst2")
    assert got["n"] == 2 and math.isclose(got["gain_auto"], 0.15) and math.isclose(got["share"], 0.75)
    assert R.auto_share(lambda m, t, s: cells.get((m, t, s)), "copa") == {"n": 0}
    cells.update({("sensitive", "copa", 0): 0.5, ("sensitive-auto", "copa", 0): 0.5, ("zero-shot", "copa", 0): 0.5})
    assert R.auto_share(lambda m, t, s: cells.get((m, t, s)), "copa")["share"] is None  # nothing to share
    cells.update({("sensitive-nf4", "sst2", 0): 0.6, ("sensitive-nf4-auto", "sst2", 0): 0.58})
    got = R.auto_share(lambda m, t, s: cells.get((m, t, s)), "sst2", "sensitive-nf4")  # the 4-bit twin pairs
    assert got["n"] == 1 and math.isclose(got["share"], 0.8)


def test_each_auto_twin_differs_from_its_base_only_in_the_lr_rule():
    for base in R.AUTO_BASES:
        twin, b = R.METHODS[f"{base}-auto"], R.METHODS[base]
        assert twin.lr_auto and not b.lr_auto
        assert (twin.rule, twin.quant, twin.calib_tokens, twin.density) == (b.rule, b.quant, b.calib_tokens, b.density)


def test_an_auto_cell_probed_under_another_rule_is_stale(tmp_path, monkeypatch):
    store = R.Store(tmp_path / "r")
    cell = R.Cell("train", "sensitive-auto", "sst2", 0)
    _put(store, cell, test_accuracy=0.7)
    assert store.get(cell)["test_accuracy"] == 0.7
    monkeypatch.setattr("sparsezo.zo.sgd.REF_G2", 1.0)  # the grid's centre moved: the old choice no longer holds
    assert store.get(cell) is None


def test_a_cell_lock_is_held_while_its_worker_lives_and_free_once_it_is_gone(tmp_path):
    store = R.Store(tmp_path / "r")
    live, dead = (store.root / "train" / f"{n}.json" for n in ("live", "dead"))
    assert store.claim(live) and not store.claim(live)  # one owner at a time
    assert f"pid {os.getpid()}" in RunLock(live).holder()  # the lock says who holds it
    # a worker killed while holding a cell: nothing to clear, the next worker may take the cell
    holder = ("import os, sys; from sparsezo.training.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
              "print('held', flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", holder, str(dead)], capture_output=True, text=True)
    assert proc.stdout.strip() == "held" and proc.returncode == -9
    assert store.claim(dead)
    store.release(live)
    assert store.claim(live)
    store.release(live)
    store.release(dead)
    assert not list(store.root.rglob("*.lock"))  # released locks leave no files behind


@pytest.fixture
def qwen(monkeypatch):
    """The Qwen2.5 grid as the process's grid (main() sets it from --model)."""
    monkeypatch.setattr(R, "GRID", R.GRIDS["qwen2.5-0.5b"])
    return R.GRID


def test_the_qwen_grid_keeps_its_cells_and_masks_apart_and_the_default_grid_keeps_its_specs(tmp_path, qwen):
    cell = R.Cell("train", "sensitive", "rte", 0)
    assert cell.spec()["model"] == "qwen2.5-0.5b" and cell.spec()["lr_auto"] and cell.spec()["calib_tokens"] == 8192
    assert qwen.cache != R.GRIDS["smollm2"].cache and qwen.out != R.GRIDS["smollm2"].out
    store = R.Store(tmp_path / "r")
    _put(store, cell, test_accuracy=0.6)
    assert store.result("sensitive", "rte", 0)["test_accuracy"] == 0.6  # --lr auto: no search to wait for
    R.GRID = R.GRIDS["smollm2"]  # (monkeypatch restores the attribute after the test)
    assert "model" not in R.Cell("train", "full", "sst2", 0, 1e-4).spec()  # the 153 stored cells stay valid
    # the same name in another grid is another cell: its settings differ
    assert store.get(R.Cell("train", "sensitive", "rte", 0)) is None


def test_the_qwen_grid_runs_its_first_task_method_by_method_with_its_evals_first(tmp_path, qwen):
    listed = R.all_cells(R.Store(tmp_path / "r"))
    assert len(listed) == len(set(listed)) == R.expected_cells(R.Store(tmp_path / "r"))
    assert len(listed) == len(qwen.tasks) * len(R.SEEDS) * (len(qwen.methods) + len(qwen.eval_only))
    first = [(c.kind, c.method, c.seed) for c in listed if c.task == qwen.first_task]
    assert listed[:len(first)] == [c for c in listed if c.task == qwen.first_task]  # its whole block comes first
    assert first[:3] == [("eval", "zero-shot", s) for s in R.SEEDS]
    assert first[3:6] == [("train", next(iter(qwen.methods)), s) for s in R.SEEDS]  # one method's seeds, then the next
    assert all(c.lr is None for c in listed if c.kind == "train")  # every method runs --lr auto


def test_the_qwen_report_has_its_claims_and_the_chosen_lrs_and_no_search_or_auto_share_sections(tmp_path, qwen):
    store = R.Store(tmp_path / "r")
    curve = [{"step": i, "forwards": 2 * i, "dev": 0.55 + 0.02 * i} for i in range(7)]
    for s in R.SEEDS:
        _put(store, R.Cell("eval", "zero-shot", "rte", s), test_accuracy=0.55, seconds=1.0)
        for m, acc in (("sensitive", 0.62 + 0.01 * s), ("random", 0.56)):
            _put(store, R.Cell("train", m, "rte", s), test_accuracy=acc, dev_auc=acc, curve=curve, improved=True,
                 probe_forwards=16, lr_used=2e-5 * (s + 1), seconds=1.0)
    r = R.report(store, tmp_path / "r", "cmd")
    claim = next(c for c in r["claims"] if (c["a"], c["b"]) == ("sensitive", "zero-shot"))
    assert claim["n"] == 3 and claim["verdict"] == "a better" and math.isclose(claim["mean_diff"], 0.08)
    assert next(c for c in r["claims"] if (c["a"], c["b"]) == ("sensitive", "full"))["n"] == 0
    assert r["model"] == "qwen2.5-0.5b" and r["cells_done"] == 9
    md = (tmp_path / "r.md").read_text()
    assert md.startswith(f"# Reproduction: {qwen.title}") and "Qwen2.5-Coder-0.5B-Instruct" in md
    assert "| sensitive | - | 2.0e-05, 4.0e-05, 6.0e-05 |" in md  # rte is the second column (the dict's order)
    assert "Learning-rate search" not in md and "against the searched lr" not in md
    assert (tmp_path / "r_rte.png").is_file()


def test_a_missing_second_model_is_one_error_line(tmp_path):
    env = dict(os.environ, SPARSEZO_HOME=str(tmp_path))  # no models fetched there
    proc = subprocess.run([sys.executable, str(R.__file__), "--model", "qwen2.5-0.5b", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "benchmarks/qwen.py" in proc.stderr and not (tmp_path / "r_cells").exists()
