"""Generation tasks: SQuAD metrics, batched greedy decoding with its stop rule, evaluate() and dev selection."""

import pytest
import torch

from helpers import sentences, tiny_model, tiny_tokenizer
from sparsezo.eval.evaluate import evaluate
from sparsezo.eval.generation import clean_answer, generate, stop_token_ids
from sparsezo.masks import compute_mask
from sparsezo.eval.metrics import accuracy, exact_match, f1_score, normalize_answer
from sparsezo.tasks import Example, get_task
from sparsezo.training.config import TrainConfig
from sparsezo.training.loop import fine_tune
from sparsezo.zo import TrainableParams, ZOConfig


@pytest.mark.parametrize("text,norm", [
    ("The Cat!", "cat"), ("  an   apple, a pear ", "apple pear"), ("Theatre", "theatre"), ("U.S.A.", "usa"), ("", ""),
])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_exact_match_and_f1_on_known_cases():
    assert exact_match("The Cat!", ["cat"]) == 1.0 and f1_score("The Cat!", ["cat"]) == 1.0
    assert exact_match("black cat", ["cat"]) == 0.0
    # "the black cat sat" -> [black, cat, sat] vs "a cat sat down" -> [cat, sat, down]: 2 shared, P = R = 2/3
    assert f1_score("the black cat sat", ["a cat sat down"]) == pytest.approx(2 / 3)
    # "cat" vs "black cat": P = 1, R = 1/2, F1 = 2/3; against "cat sat down", P = 1, R = 1/3, F1 = 1/2
    assert f1_score("cat", ["cat sat down", "black cat"]) == pytest.approx(2 / 3)  # max over gold answers
    assert exact_match("Paris", ["London", "paris."]) == 1.0
    assert exact_match("", ["cat"]) == f1_score("", ["cat"]) == f1_score("cat", ["the"]) == 0.0
    assert f1_score("dog", ["cat"]) == 0.0
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5


def test_clean_answer_cuts_at_the_first_newline_and_strips():
    assert clean_answer(" Paris \nQuestion: next?\nAnswer: Rome") == "Paris"
    assert clean_answer("  the Romans  ") == "the Romans"
    assert clean_answer("\nno answer") == ""


PROMPTS = ["the movie was", "a film is very good and the plot", "the cast", "boring story and a dull"]


def test_batched_left_padded_greedy_equals_one_at_a_time():
    model, tok = tiny_model(), tiny_tokenizer()
    batched = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(a.split()) == 6 for a in batched)  # nothing stops this tokenizer early: no newline, no EOS


def test_generation_stops_at_a_stop_token_per_row():
    model, tok = tiny_model(), tiny_tokenizer()
    free = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4, stop_ids=[])
    stop_word = free[0].split()[1]  # the second word of the first answer becomes a "newline"
    stopped = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4, stop_ids=[tok.convert_tokens_to_ids(stop_word)])
    for a, b in zip(free, stopped):
        words = a.split()
        cut = words.index(stop_word) + 1 if stop_word in words else len(words)
        assert b.split() == words[:cut]  # generation ends with the stop token; later tokens are never produced
    assert len(stopped[0].split()) <= 2 < len(free[0].split())


def test_stop_tokens_are_eos_and_tokens_containing_a_newline():
    class Tok:
        eos_token_id = 3

        def __len__(self):
            return 5

        def batch_decode(self, ids):
            return ["a", "\n", ".\n\n", "</s>", "b"][: len(ids)]

    assert stop_token_ids(Tok()) == [1, 2, 3]
    assert stop_token_ids(tiny_tokenizer()) == []


def _qa(n, seed):
    return [Example(f"{s} It was", [" " + s.split()[0]], 0, answers=[s.split()[0], s.split()[1]])
            for _, s in sentences(n, seed)]


def test_evaluate_generation_reports_f1_and_em_of_the_generated_answers():
    model, tok = tiny_model(), tiny_tokenizer()
    task, examples = get_task("squad"), _qa(6, 3)
    res = evaluate(model, tok, task, examples, batch_size=4, max_new_tokens=2)
    answers = generate(model, tok, [e.prompt for e in examples], max_new_tokens=2)
    assert res["metric"] == "f1" and res["n"] == 6 and res["value"] == res["f1"]
    assert res["f1"] == pytest.approx(sum(f1_score(a, e.answers) for a, e in zip(answers, examples)) / 6)
    assert res["em"] == pytest.approx(sum(exact_match(a, e.answers) for a, e in zip(answers, examples)) / 6)
    cls = evaluate(model, tok, None, [Example("a film", [" good", " bad"], 1)] * 2)
    assert cls["metric"] == "accuracy" and cls["value"] in (0.0, 1.0) and cls["n"] == 2


def test_fine_tune_selects_on_dev_f1_for_generation_tasks():
    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "random", 0.1, seed=1))
    cfg = TrainConfig(steps=4, batch_size=4, eval_every=2, loss="lm", zo=ZOConfig(lr=1e-2, eps=1e-3))
    res = fine_tune(model, tok, params, _qa(16, 1), _qa(4, 2), cfg, progress=False, task=get_task("squad"))
    evals = [r for r in res.history if "dev_f1" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and not any("dev_accuracy" in r for r in res.history)
    assert res.best_dev == max(r["dev_f1"] for r in evals)
    assert torch.isfinite(params.theta).all()


def test_squad_train_and_eval_through_the_cli(tmp_path, capsys):
    import json
    from pathlib import Path

    from helpers import save_tiny_model
    from sparsezo.cli import main

    common = ["--model", str(save_tiny_model(tmp_path / "model")), "--dtype", "float32", "--task", "squad",
              "--data-dir", str(Path(__file__).parent / "fixtures" / "squad"), "--max-new-tokens", "3"]
    out = tmp_path / "run"
    train = [a for a in common if a not in ("--max-new-tokens", "3")]
    assert main(["train", *train, "--mask", "random", "--density", "0.05", "--steps", "2", "--eval-every", "1",
                 "--num-train", "3", "--num-dev", "2", "--loss", "lm", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "f1" and {"test_f1", "test_em", "best_dev_f1"} <= set(result) and result["n_test"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev_f1" in r] == [0, 1, 2]
    assert main(["eval", *common, "--icl", "1", "--num-train", "3", "--num-dev", "2", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert (ev["metric"], ev["n"], ev["icl"]) == ("f1", 2, 1) and 0 <= ev["em"] <= ev["f1"] <= 1
