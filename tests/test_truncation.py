"""--truncation-side: which end of a too-long prompt is dropped (never the answer), reported, recorded by
train and reused by eval --delta and --resume."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import FILLER, save_tiny_model, tiny_model, tiny_tokenizer
from sparsezo.cli import main
from sparsezo.eval.generation import generate
from sparsezo.eval.scoring import candidate_logprobs, encode, make_batch
from sparsezo.eval.truncation import set_truncation_side, truncation_side
from sparsezo.errors import SparseZOError
from sparsezo.tasks import Example

LONG = ["superb"] + FILLER * 5 + ["awful"]  # 62 words: first "superb", last "awful", neither in between


def _tok(side=None):
    tok = tiny_tokenizer()
    if side is not None:
        set_truncation_side(tok, side)
    return tok


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_prompt_is_cut_on_the_chosen_side_and_the_answer_kept_whole(side, caplog):
    tok = _tok(side)
    ex = Example(" ".join(LONG), [" fun film", " dull"], 0)
    with caplog.at_level("WARNING", logger="sparsezo"):
        enc = encode(tok, [ex, Example("the good", [" fun"], 0)], max_length=12)
    full = tok(ex.prompt)["input_ids"]
    assert enc[0].prompt == (full[-10:] if side == "left" else full[:10])  # 12 minus the 2-token longest answer
    answers = [tok(c, add_special_tokens=False)["input_ids"] for c in ex.candidates]
    assert enc[0].cands == answers and len(answers[0]) == 2
    kept = tok.convert_ids_to_tokens(enc[0].prompt)
    assert ("awful" in kept, "superb" in kept) == ((True, False) if side == "left" else (False, True))
    assert enc[1].prompt == tok("the good")["input_ids"]  # short prompts are untouched
    lines = [r.getMessage() for r in caplog.records if "cut from the" in r.getMessage()]
    assert len(lines) == 1 and f"cut from the {side}" in lines[0] and "1 of 2 prompts exceed 12 tokens" in lines[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_cut_prompt_is_scored_as_the_model_sees_it(side):
    """The scores of a truncated example are those of the kept prompt followed by the whole answer."""
    model, tok = tiny_model(), _tok(side)
    ex = Example(" ".join(LONG), [" fun film", " dull"], 0)
    enc = encode(tok, [ex], max_length=12)
    got = candidate_logprobs(model, make_batch(enc, tok.pad_token_id))[0]
    for j, cand in enumerate(enc[0].cands):
        ids = torch.tensor([enc[0].prompt + cand])
        logp = F.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        n = len(enc[0].prompt)
        assert got[j].item() == pytest.approx(sum(logp[n - 1 + t, c].item() for t, c in enumerate(cand)), abs=1e-5)


def test_default_side_is_left_and_bad_sides_are_refused():
    tok = tiny_tokenizer()
    assert truncation_side(tok) == "left" and tok.truncation_side == "right"  # transformers' own setting is ignored
    with pytest.raises(SparseZOError, match="--truncation-side 'middle': choose one of left, right"):
        set_truncation_side(tok, "middle")


@pytest.mark.parametrize("side", ["left", "right"])
def test_generation_cuts_the_prompt_on_the_chosen_side(side, caplog):
    model, tok = tiny_model(), _tok(side)
    prompt = " ".join(LONG)
    full = tok(prompt)["input_ids"]
    kept = full[-8:] if side == "left" else full[:8]
    with caplog.at_level("WARNING", logger="sparsezo"):
        got = generate(model, tok, [prompt], max_new_tokens=4, max_length=12, stop_ids=[])
    assert got == generate(model, tok, [tok.decode(kept)], max_new_tokens=4, max_length=64, stop_ids=[])
    assert any(f"cut from the {side}" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- CLI
def _sides(caplog) -> set[str]:
    """The sides named by the truncation warnings logged since the last call."""
    sides = {m.split("were cut from the ")[1].split()[0] for m in caplog.messages if "were cut from the" in m}
    caplog.clear()
    return sides


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model and a custom task whose every example is longer than the 1,024-token limit."""
    root = tmp_path_factory.mktemp("trunc")
    rows = [{"text": " ".join(FILLER * 90 + [w]), "label": lab}
            for i in range(40) for w, lab in [(("good", "pos"), ("bad", "neg"))[i % 2]]]
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(save_tiny_model(root / "model")), "root": root,
            "task": ["--task", "custom", "--data", str(data), "--template", "{text} It was",
                     "--labels", json.dumps({"pos": " fine", "neg": " dull"})]}


def _train(env, name, *extra):
    out = env["root"] / name
    return out, ["train", "--model", env["model"], "--dtype", "float32", *env["task"], "--mask", "random",
                 "--density", "0.05", "--steps", "2", "--eval-every", "2", "--batch-size", "4", "--num-train", "16",
                 "--num-dev", "8", "--lr", "1e-3", "--eps", "1e-3", "--out", str(out), "--json", *extra]


@pytest.mark.parametrize("side", ["left", "right"])
def test_train_records_the_side_and_eval_delta_reuses_it(env, caplog, side):
    caplog.set_level("WARNING", logger="sparsezo")
    out, argv = _train(env, f"run-{side}", *(["--truncation-side", side] if side == "right" else []))
    assert main(argv) == 0
    assert _sides(caplog) == {side}  # training batches, dev and test alike
    config = json.loads((out / "config.json").read_text())
    assert config["truncation_side"] == side and config["args"]["truncation_side"] == side

    assert main(["eval", "--delta", str(out), "--json"]) == 0
    assert _sides(caplog) == {side}
    other = "left" if side == "right" else "right"
    assert main(["eval", "--delta", str(out), "--truncation-side", other, "--json"]) == 0  # the flag overrides
    assert _sides(caplog) == {other}


def test_resume_trains_on_with_the_recorded_side(env, caplog):
    caplog.set_level("WARNING", logger="sparsezo")
    out, argv = _train(env, "run-resume", "--truncation-side", "right")
    assert main(argv) == 0
    (out / "delta.safetensors").unlink()  # as if killed before the end (no checkpoint: it starts over)
    caplog.clear()
    assert main(["train", "--resume", str(out), "--json"]) == 0
    assert _sides(caplog) == {"right"}
    assert json.loads((out / "config.json").read_text())["truncation_side"] == "right"
