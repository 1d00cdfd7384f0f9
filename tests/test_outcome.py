"""Issue 36: dev selection at the metric's ceiling (ties broken on the dev loss, verdict on the loss),
and warnings that name CLI flags under the CLI and API fields in a script."""

import logging

import pytest
import torch

from helpers import sentences, tiny_model, tiny_tokenizer
from sparsezo.eval.evaluate import evaluate
from sparsezo.eval.scoring import predict
from sparsezo.hints import cli_style, setting
from sparsezo.masks import compute_mask
from sparsezo.tasks import Example
from sparsezo.training.config import TrainConfig
from sparsezo.training.loop import fine_tune
from sparsezo.training.outcome import Outcome, at_ceiling, better
from sparsezo.zo import TrainableParams, ZOConfig


def test_ties_are_broken_on_the_dev_loss_only_at_the_ceiling():
    assert better(0.8, 9.0, 0.7, 0.1, False) and not better(0.7, 0.1, 0.8, 9.0, True)  # the metric first
    assert not better(0.7, 0.1, 0.7, 0.2, False)  # below the ceiling a tie keeps the earlier θ
    assert better(1.0, 0.1, 1.0, 0.2, True) and not better(1.0, 0.3, 1.0, 0.2, True)
    assert not better(1.0, None, 1.0, 0.2, True)  # no loss (generation tasks): ties keep the earlier θ


@pytest.mark.parametrize("start, n, expected", [(1.0, 200, True), (0.99, 100, True), (0.9, 200, False),
                                                (0.995, 1000, False)])
def test_at_ceiling_means_no_gain_could_clear_the_noise(start, n, expected):
    assert at_ceiling(start, n) is expected


def _history(best_loss):
    return [{"step": 0, "dev_accuracy": 1.0, "dev_loss": 0.32, "dev_loss_se": 0.01},
            {"step": 10, "loss": 0.3}, {"step": 20, "dev_accuracy": 1.0, "dev_loss": best_loss, "dev_loss_se": 0.01}]


def test_at_the_ceiling_the_verdict_is_the_dev_loss_and_the_hint_says_so():
    fell = Outcome.of(_history(0.20), 20, 1.0, 0.20, 50)
    assert fell.ceiling and fell.improved and fell.start_loss == 0.32
    flat = Outcome.of(_history(0.31), 20, 1.0, 0.31, 50)  # 0.01 lower: within 2 standard errors
    assert flat.ceiling and not flat.improved
    text = flat.explain(_history(0.31), 1e-3)
    assert "already 1.0000 at step 0, at its ceiling" in text and "0.3200 at step 0, 0.3100 at step 20" in text
    below = Outcome.of([{"step": 0, "dev_accuracy": 0.6}], 0, 0.6, None, 200)
    assert not below.ceiling and "ceiling" not in below.explain([{"step": 0, "dev_accuracy": 0.6}], 1e-3)


def test_hints_name_api_fields_in_a_script_and_flags_under_the_cli():
    history = [{"step": 0, "dev_accuracy": 0.5}, {"step": 10, "dev_accuracy": 0.5}]
    api = Outcome.of(history, 0, 0.5, None, 100).explain(history, 1e-4)
    assert "ZOConfig(lr=0.0003)" in api and "TrainConfig(lr_auto=True)" in api and "--" not in api
    with cli_style():
        cli = Outcome.of(history, 0, 0.5, None, 100).explain(history, 1e-4)
        assert setting("steps") == "--steps" and setting("lr", 1e-4) == "--lr 0.0001"
    assert "--lr 0.0003" in cli and "--lr auto" in cli and "ZOConfig" not in cli
    assert setting("steps") == "TrainConfig.steps"  # the style ends with the context


def _labelled_by_the_base(model, tok, n, seed):
    """Examples whose gold is the base model's own prediction: dev accuracy is 100% at step 0."""
    examples = [Example(f"{s} It was", [" terrible", " great"], 0) for _, s in sentences(n, seed)]
    preds = predict(model, tok, examples).tolist()
    return [Example(e.prompt, e.candidates, p) for e, p in zip(examples, preds)]


def test_a_run_at_the_ceiling_is_selected_and_judged_on_the_dev_loss(caplog):
    model, tok = tiny_model(), tiny_tokenizer()
    train, dev = _labelled_by_the_base(model, tok, 64, 1), _labelled_by_the_base(model, tok, 32, 2)
    params = TrainableParams(model, compute_mask(model, "full"))
    cfg = TrainConfig(steps=40, batch_size=16, eval_every=10, zo=ZOConfig(lr=0.3, eps=1e-3, optimizer="hizoo"))
    with caplog.at_level(logging.INFO, logger="sparsezo"):
        res = fine_tune(model, tok, params, train, dev, cfg, progress=False)
    evals = [r for r in res.history if "dev_accuracy" in r]
    assert evals[0]["dev_accuracy"] == 1.0 and res.at_ceiling
    assert all("dev_loss" in r and r["dev_loss_se"] > 0 for r in evals)
    top = [r for r in evals if r["dev_accuracy"] == 1.0]
    chosen = min(top, key=lambda r: (r["dev_loss"], r["step"]))
    assert res.best_step == chosen["step"] > 0 and res.best_loss == chosen["dev_loss"] < evals[0]["dev_loss"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    if res.improved:
        assert "selected on the dev loss" in messages and "nothing was learned" not in messages
    else:
        assert "at its ceiling" in messages
    # the selected θ is the one that run left in params: its dev loss is the recorded one
    assert evaluate(model, tok, None, dev)["loss"] == pytest.approx(res.best_loss, abs=1e-6)
    assert torch.isfinite(params.theta).all()


def test_the_hint_does_not_suggest_lr_auto_to_a_run_that_used_it():
    history = [{"step": 0, "dev_accuracy": 0.5}, {"step": 10, "dev_accuracy": 0.5}]
    with cli_style():
        text = Outcome.of(history, 0, 0.5, None, 100).explain(history, 0.042, probed=True)
    assert "--lr auto chose lr 0.042" in text and "to probe a grid" not in text and "--lr 0.126" in text
