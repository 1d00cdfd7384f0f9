"""Training end to end on a tiny model: loss goes down, runs are reproducible, deltas round-trip."""

import torch

from helpers import sentences, tiny_model, tiny_tokenizer
from sparsezo.training.checkpoint import Delta, load_delta
from sparsezo.masks import compute_mask
from sparsezo.eval.scoring import accuracy, batch_loss, encode, make_batch
from sparsezo.tasks import Example
from sparsezo.training.batches import batch_indices
from sparsezo.training.config import TrainConfig
from sparsezo.training.loop import fine_tune
from sparsezo.zo import TrainableParams, ZOConfig


def _examples(n, seed):
    return [Example(f"{s} It was", [" terrible", " great"], y) for y, s in sentences(n, seed)]


def _run(seed=0, steps=100, rule="full", density=1.0, lr=3e-2, keep_best=True):
    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, rule, density, seed=1))
    cfg = TrainConfig(steps=steps, batch_size=16, eval_every=50, keep_best=keep_best, zo=ZOConfig(lr=lr, eps=1e-3, seed=seed))
    res = fine_tune(model, tok, params, _examples(128, 1), _examples(32, 2), cfg, progress=False)
    return model, tok, params, res


def _train_loss(model, tok):
    b = make_batch(encode(tok, _examples(128, 1)), tok.pad_token_id)
    return batch_loss(model, b)


def test_zo_training_lowers_the_training_loss():
    model, tok = tiny_model(), tiny_tokenizer()
    before = _train_loss(model, tok)
    model, tok, _, res = _run(steps=100, keep_best=False)  # the final θ: selection by dev is tested elsewhere
    assert _train_loss(model, tok) < before - 0.01
    assert len([r for r in res.history if "loss" in r]) == 100


def test_same_seed_same_delta_other_seed_other_delta(tmp_path):
    deltas = []
    for i, seed in enumerate((0, 0, 1)):
        _, _, params, _ = _run(seed=seed, steps=30, rule="random", density=0.05, keep_best=False)
        Delta.from_params(params).save(tmp_path / f"{i}.safetensors")
        deltas.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert deltas[0] == deltas[1]
    assert deltas[0] != deltas[2]


def test_saved_delta_reproduces_in_memory_accuracy(tmp_path):
    model, tok, params, _ = _run(steps=40, rule="random", density=0.1, keep_best=False)
    test = _examples(64, 9)
    in_memory = accuracy(model, tok, test)
    logits = model(input_ids=torch.arange(10)[None]).logits
    Delta.from_params(params, {"note": "x"}).save(tmp_path / "delta.safetensors")
    fresh = tiny_model()
    assert not torch.equal(fresh(input_ids=torch.arange(10)[None]).logits, logits)
    applied = load_delta(tmp_path).apply(fresh)
    assert accuracy(fresh, tok, test) == in_memory
    assert torch.equal(fresh(input_ids=torch.arange(10)[None]).logits, logits)
    applied.remove()
    base = tiny_model()
    for (n, a), b in zip(fresh.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), n


def test_batches_are_seeded_epoch_permutations():
    n, bs = 10, 4
    seen = [i for step in range(5) for i in batch_indices(3, step, n, bs)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(3, 2, n, bs) == batch_indices(3, 2, n, bs) != batch_indices(4, 2, n, bs)


def test_best_dev_theta_is_kept():
    model, tok, params, res = _run(steps=60, lr=3e-2)
    evals = [r for r in res.history if "dev_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 50, 60]
    assert res.best_dev == max(r["dev_accuracy"] for r in evals)
    assert accuracy(model, tok, _examples(32, 2)) == res.best_dev


def test_on_eval_sees_each_evaluated_theta_and_does_not_steer_selection():
    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "random", 0.1, seed=1))
    held_out = _examples(48, 7)
    seen = []

    def on_eval(step):
        seen.append((step, params.theta.clone()))
        return {"held_out_accuracy": accuracy(model, tok, held_out)} if step else {}

    cfg = TrainConfig(steps=20, batch_size=16, eval_every=10, zo=ZOConfig(lr=3e-2, eps=1e-3, seed=0))
    res = fine_tune(model, tok, params, _examples(128, 1), _examples(32, 2), cfg, progress=False, on_eval=on_eval)
    evals = [r for r in res.history if "dev_accuracy" in r]
    assert [r["step"] for r in evals] == [s for s, _ in seen] == [0, 10, 20]
    assert "held_out_accuracy" not in evals[0] and all(0 <= r["held_out_accuracy"] <= 1 for r in evals[1:])
    assert not torch.equal(seen[1][1], seen[2][1])  # called with the θ of that step, not a copy of one
    # selection is by dev only: the same run without the hook ends on the same θ
    model2 = tiny_model()
    params2 = TrainableParams(model2, compute_mask(model2, "random", 0.1, seed=1))
    res2 = fine_tune(model2, tok, params2, _examples(128, 1), _examples(32, 2), cfg, progress=False)
    assert res2.best_step == res.best_step and torch.equal(params2.theta, params.theta)
