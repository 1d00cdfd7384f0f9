"""benchmarks/convergence.py's bookkeeping: which cells count, the plateau and target, forwards to target, gains."""

import pytest

from helpers import load_benchmark
from sparsezo.io import write_json

C = load_benchmark("convergence")


@pytest.fixture()
def cells(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "CELLS", tmp_path)

    def put(opt, seed, curve, test, lr="0.0001", task="sst2", budget=800, zero=0.5, density=C.DENSITY, **spec_changes):
        cell = C.Cell(opt, task, seed, lr, budget, density=density)
        fps = 9 if opt == "fzoo" else 2
        pts = [{"step": f // fps, "forwards": f, "dev": d} for f, d in curve]
        res = {"spec": {**cell.spec(), **spec_changes}, "lr_used": 1e-4 if lr == "auto" else float(lr), "curve": pts, "test": test,
               "test_zero_shot": zero, "start_dev": pts[0]["dev"], "best_dev": max(p["dev"] for p in pts),
               "forwards_per_step": fps, "sec_per_step": 1.0, "threads": 1, "state_bytes": 0}
        cell.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(cell.path, res)
        return cell

    return put


def test_the_target_is_95_percent_of_zo_sgds_plateau_gain_not_its_best_dev(cells):
    for s in (0, 1):  # a spike at 200 forwards: the best dev (0.8) is noise; the last quarter plateaus at 0.7
        cells("sgd", s, [(0, 0.5), (200, 0.8), (400, 0.6), (600, 0.7), (800, 0.7)], test=0.70)
    cells("fzoo", 0, [(0, 0.5), (180, 0.72), (792, 0.72)], test=0.72, lr="0.003")
    cells("fzoo", 1, [(0, 0.5), (180, 0.64), (792, 0.72)], test=0.74, lr="0.003")
    done = C.finished_cells()
    assert len(done) == 4
    text = C.report(done)
    assert "target: dev 0.6900 = 0.5000 + 0.95 × (0.7000 − 0.5000)" in text
    fz = next(line for line in text.splitlines() if line.startswith("| fzoo"))
    # the seeds' mean curve is 0.68 at 180 forwards (below 0.69) and 0.72 at 792: reached there
    assert "| 0.7200 | **+0.2300 ± 0.1271** | 792 | 0.99 |" in fz  # plateau, test gain (t with 1 df: 12.71), forwards
    sgd = next(line for line in text.splitlines() if line.startswith("| sgd"))
    assert "| 0.8000 | 0.7000 |" in sgd and "| 200 | 0.25 |" in sgd  # best dev, plateau; the spike reaches it first


def test_a_sparser_mask_is_its_own_row_and_never_sets_the_target(cells):
    for s in (0, 1):
        cells("sgd", s, [(0, 0.5), (800, 0.7)], test=0.7)
        sparse = cells("sgd", s, [(0, 0.5), (200, 0.75), (800, 0.8)], test=0.8, lr="0.001", density=1e-4)
    assert sparse.path.name == "sgd-sst2-seed1-lr0.001-d0.0001-b800.json"
    done = C.finished_cells()
    assert len(done) == 4 and {c.density for c in done} == {C.DENSITY, 1e-4}
    text = C.report(done)
    assert "target: dev 0.6900" in text  # the default-density ZO-SGD's, although the sparse row's plateau is higher
    row = next(line for line in text.splitlines() if line.startswith("| sgd | 0.001 "))
    assert "| 0.0001 | 2 |" in row and "| 200 | 0.25 |" in row


def test_a_mean_curve_below_the_target_is_unreached(cells):
    for s in (0, 1):
        cells("sgd", s, [(0, 0.5), (800, 0.7)], test=0.7)
    cells("fzoo", 0, [(0, 0.5), (396, 0.71)], test=0.7, lr="0.003")  # one seed above 0.69, the mean (0.68) below
    cells("fzoo", 1, [(0, 0.5), (396, 0.65)], test=0.6, lr="0.003")
    fz = next(line for line in C.report(C.finished_cells()).splitlines() if line.startswith("| fzoo"))
    assert "| 0.6800 | +0.1500 ± 0.6353 | — | — |" in fz


def test_no_target_when_zo_sgds_plateau_is_not_above_its_start(cells):
    cells("sgd", 0, [(0, 0.65), (1000, 0.7), (2000, 0.49)], test=0.63, task="copa", budget=2000, zero=0.63)
    text = C.report(C.finished_cells())
    assert "target: —" in text and "plateau 0.4900 at or below its step-0 dev 0.6500" in text


def test_the_plateau_is_the_last_quarter_of_the_mean_curve():
    row = {"curve": [{"step": s, "forwards": 2 * s, "dev": d} for s, d in
                     [(0, 0.5), (25, 0.9), (50, 0.6), (75, 0.7), (100, 0.8)]]}
    assert C.plateau([row]) == pytest.approx(0.75)  # steps 75 and 100
    assert C.plateau([{"curve": row["curve"][:1]}]) == 0.5  # nothing after step 0: the start


def test_cells_of_another_protocol_are_left_out(cells):
    cells("sgd", 0, [(0, 0.5), (800, 0.7)], test=0.7)
    cells("sgd", 1, [(0, 0.5), (800, 0.7)], test=0.7, batch=32)  # recorded with another batch size
    cells("sgd", 2, [(0, 0.5), (800, 0.7)], test=0.7, lr="auto", probe_backoff=1.0)  # probed under another rule
    cells("sgd", 3, [(0, 0.5), (800, 0.7)], test=0.7, lr="auto")
    assert sorted((c.seed, c.lr) for c in C.finished_cells()) == [(0, "0.0001"), (3, "auto")]


def test_the_qwen_variant_loads_the_fetched_file_or_says_how_to_fetch_it(tmp_path, monkeypatch):
    from sparsezo.errors import SparseZOError

    qwen = load_benchmark("qwen")
    assert C.model_source("smollm2") is None and C.model_source("smollm2-nf4") is None  # the embedded default
    monkeypatch.setenv("SPARSEZO_HOME", str(tmp_path))
    with pytest.raises(SparseZOError, match="python benchmarks/qwen.py"):
        C.model_source("qwen2.5-0.5b")
    f = qwen.path()
    f.parent.mkdir(parents=True)
    with open(f, "wb") as out:  # the pinned size is what `available` checks; fetch verified the hash
        out.truncate(qwen.SIZE)
    assert C.model_source("qwen2.5-0.5b") == str(f)
    assert "qwen2.5-0.5b" in C.Cell("sgd", "sst2", 0, "auto", 400, "qwen2.5-0.5b").path.parts
