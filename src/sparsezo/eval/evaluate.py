"""One evaluation entry point for every task kind, used by ``train`` (dev selection) and ``eval``.

Classification tasks score their candidates (accuracy); generation tasks decode an answer
greedily and report token F1 (the main metric, as in MeZO) and exact match.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from tqdm import tqdm

from ..errors import SparseZOError
from .generation import generate
from .metrics import accuracy, exact_match, f1_score
from .scoring import candidate_scores, dev_loss
from ..tasks import Example, Task


def evaluate(model: nn.Module, tokenizer, task: Task | None, examples: list[Example], batch_size: int = 32,
             max_new_tokens: int = 50, progress=None, desc: str | None = None) -> dict[str, Any]:
    """``{"metric": name, "value": main metric, "n": examples, <each metric>: value}``.

    Classification also reports ``loss``, the mean cross-entropy over candidates, and its standard
    error ``loss_se``: free once the candidates are scored, and what dev selection falls back on when
    accuracy ties or sits at its ceiling.

    ``task=None`` means classification (candidate accuracy), for callers without a Task.
    ``desc`` shows a progress bar of its own on stderr (examples, with ETA) under that name:
    a long evaluation (a 16-shot test set takes minutes) must not look like a hang. A caller
    that counts progress itself passes its bar as ``progress`` instead.
    """
    if not examples:
        raise SparseZOError("nothing to evaluate: the split is empty; raise --num-test/--num-dev")
    if desc is not None and progress is None:
        with tqdm(total=len(examples), desc=desc, unit="ex", leave=False, dynamic_ncols=True) as bar:
            return evaluate(model, tokenizer, task, examples, batch_size, max_new_tokens, progress=bar)
    if task is None or task.kind == "classification":
        scores = candidate_scores(model, tokenizer, examples, batch_size, progress=progress)
        gold = [e.gold for e in examples]
        acc = accuracy(scores.argmax(1).tolist(), gold)
        loss, loss_se = dev_loss(scores, gold)
        return {"metric": "accuracy", "value": acc, "n": len(examples), "accuracy": acc, "loss": loss,
                "loss_se": loss_se}
    if any(not e.answers for e in examples):
        raise SparseZOError(f"task {task.name}: generation examples need gold 'answers'")
    answers = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size, progress=progress)
    em = sum(exact_match(a, e.answers) for a, e in zip(answers, examples)) / len(examples)
    f1 = sum(f1_score(a, e.answers) for a, e in zip(answers, examples)) / len(examples)
    return {"metric": "f1", "value": f1, "n": len(examples), "f1": f1, "em": em}
