"""The demo's packaged data: the same rows as the full assets, loadable with no assets at all,
and a fresh machine (no ../shared, nothing but the package and a model) runs the demo's path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sparsezo
from helpers import save_tiny_model
from sparsezo import assets as assets_module
from sparsezo.assets import assets_dir
from sparsezo.errors import SparseZOError
from sparsezo import DEMO
from sparsezo.tasks import get_task
from sparsezo.tasks.embedded import (EmbeddedSST2, build_demo_data, demo_calibration_file, demo_data_dir, demo_task,
                                     manifest)

PACKAGED = ("sst2_train.tsv", "sst2_dev.tsv", "wikitext2_excerpt.txt", "manifest.json")


@pytest.fixture
def no_assets(tmp_path, monkeypatch):
    """SPARSEZO_ASSETS names a folder that does not exist: the only place looked at, so ../shared is hidden."""
    monkeypatch.setenv("SPARSEZO_ASSETS", str(tmp_path / "nowhere"))
    assert assets_dir(required=False) is None


def test_packaged_files_are_what_the_builder_makes_from_the_full_assets(assets, tmp_path):
    build_demo_data(assets, tmp_path, DEMO.num_train, DEMO.num_dev, DEMO.calib_tokens)
    for name in PACKAGED:
        assert (tmp_path / name).read_bytes() == (demo_data_dir() / name).read_bytes(), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_embedded_splits_equal_the_splits_of_the_full_assets(assets, seed):
    for num_dev in (DEMO.num_dev, 32):
        full = get_task("sst2").splits(seed, DEMO.num_train, num_dev, DEMO.num_test)
        embedded = EmbeddedSST2().splits(seed, DEMO.num_train, num_dev, DEMO.num_test)
        assert embedded == full
        assert {k: len(v) for k, v in embedded.items()} == {"train": DEMO.num_train, "dev": num_dev, "test": 872}


def test_calibration_excerpt_gives_the_full_files_calibration_rows(assets):
    from transformers import AutoTokenizer

    from sparsezo.masks.sensitive import calibration_batches, read_texts
    from sparsezo.model.paths import DEFAULT_MODEL, sparsezo_home

    assert assets.joinpath("calibration", "wikitext2_raw_test.txt").read_text(encoding="utf-8").startswith(
        (demo_data_dir() / "wikitext2_excerpt.txt").read_text(encoding="utf-8"))
    folder = sparsezo_home() / "models" / DEFAULT_MODEL
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"the default model's tokenizer is not cached in {folder}")
    tok = AutoTokenizer.from_pretrained(folder)
    rows = lambda path: calibration_batches(tok, read_texts(path), DEMO.calib_tokens, DEMO.calib_seq_len)  # noqa: E731
    full = rows(assets / "calibration" / "wikitext2_raw_test.txt")
    assert full.numel() == DEMO.calib_tokens and full.equal(rows(demo_data_dir() / "wikitext2_excerpt.txt"))


def test_demo_data_loads_with_the_assets_hidden(no_assets):
    task = demo_task()
    assert isinstance(task, EmbeddedSST2)
    splits = task.splits(1, DEMO.num_train, DEMO.num_dev, DEMO.num_test)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1000, "dev": 200, "test": 872}
    assert len({e.prompt for e in splits["train"] + splits["dev"]}) > 1150  # real, distinct sentences
    assert demo_calibration_file(DEMO.calib_tokens) == demo_data_dir() / "wikitext2_excerpt.txt"
    assert manifest()["pool_size"] == 67349


def test_embedded_data_refuses_what_it_does_not_hold(no_assets):
    with pytest.raises(SparseZOError, match="seeds 0, 1, 2 .* SPARSEZO_ASSETS"):
        demo_task().splits(3, DEMO.num_train, DEMO.num_dev, DEMO.num_test)
    with pytest.raises(SparseZOError, match="SPARSEZO_ASSETS"):
        demo_task().splits(0, DEMO.num_train, DEMO.num_dev + 1, DEMO.num_test)
    with pytest.raises(SparseZOError, match="--calib-tokens 8193:.* SPARSEZO_ASSETS"):
        demo_calibration_file(DEMO.calib_tokens + 1)


def test_other_tasks_still_need_the_assets_with_one_line_naming_the_variable(no_assets):
    with pytest.raises(SparseZOError) as e:
        get_task("sst2").splits(0)
    assert "SPARSEZO_ASSETS" in str(e.value) and "\n" not in str(e.value) and "nowhere" in str(e.value)


def test_assets_error_names_each_place_once(tmp_path, monkeypatch):
    clone = tmp_path / "clone"  # run from the root of a clone with nothing beside it: both defaults are one folder
    clone.mkdir()
    monkeypatch.delenv("SPARSEZO_ASSETS", raising=False)
    monkeypatch.setattr(assets_module, "_REPO_ROOT", clone)
    monkeypatch.chdir(clone)
    with pytest.raises(SparseZOError) as e:
        assets_dir()
    message = str(e.value)
    where = str(tmp_path / "shared" / "assets")
    assert message.count(where) == 1 and "SPARSEZO_ASSETS" in message and "\n" not in message


def test_fresh_machine_runs_the_demo_path_on_the_packaged_data(tmp_path):
    """The demo's command from outside the repository, no assets anywhere it looks, a tiny model as the default:
    the packaged data loads, the mask and a few ZO steps run and the test split is scored."""
    from sparsezo.model.paths import DEFAULT_MODEL

    home, work = tmp_path / "home", tmp_path / "work"
    save_tiny_model(home / "models" / DEFAULT_MODEL)
    work.mkdir()
    env = dict(os.environ, SPARSEZO_HOME=str(home), SPARSEZO_ASSETS=str(tmp_path / "no-assets"),
               PYTHONPATH=str(Path(sparsezo.__file__).parents[1]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sparsezo", "demo", "--dtype", "float32", "--steps", "3", "--eval-every", "3",
           "--num-dev", "8", "--calib-tokens", "512", "--out", "run", "--json"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["n_test"] == 872 and result["steps"] == 3 and result["num_trainable"] > 0
    assert 0 <= result["zero_shot_accuracy"] <= 1 and 0 <= result["finetuned_accuracy"] <= 1
    config = json.loads((work / "run" / "config.json").read_text())
    assert Path(config["calib"]) == (demo_data_dir() / "wikitext2_excerpt.txt").resolve()
    assert config["split_sizes"] == {"train": 1000, "dev": 8, "test": 872}
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in metrics if "loss" in r]) == 3
