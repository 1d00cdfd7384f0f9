"""Which end of a too-long prompt is dropped, and the one warning that says so.

The side travels on the tokenizer (one attribute sparsezo owns, not transformers'
``truncation_side``, whose default "right" would silently flip sparsezo's long-standing "left"),
because every scorer of a run — training batches, dev and test evaluation, the ``--lr auto``
probe, generation — already receives the tokenizer: a run cuts the same way everywhere without
each function taking a flag. Only the prompt is ever cut, never a candidate answer: the answer is
what is scored.
"""

from __future__ import annotations

import logging
import weakref

from ..errors import SparseZOError

TRUNCATION_SIDES = ("left", "right")
DEFAULT_SIDE = "left"  # keeps the end of the prompt, where the question and the answer cue are
_ATTR = "sparsezo_truncation_side"
_log = logging.getLogger("sparsezo")
_REPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> what was reported for it


def set_truncation_side(tokenizer, side: str) -> None:
    """Make every prompt this tokenizer encodes for scoring or generation cut from ``side`` when too long."""
    if side not in TRUNCATION_SIDES:
        raise SparseZOError(f"--truncation-side {side!r}: choose one of {', '.join(TRUNCATION_SIDES)}")
    setattr(tokenizer, _ATTR, side)


def truncation_side(tokenizer) -> str:
    """The side set by :func:`set_truncation_side`, else ``left``."""
    return getattr(tokenizer, _ATTR, DEFAULT_SIDE)


def truncate(ids: list[int], room: int, side: str) -> list[int]:
    """``ids`` cut to ``room`` tokens: ``left`` drops the start, ``right`` the end."""
    return ids[len(ids) - room:] if side == "left" else ids[:room]


def report_truncation(tokenizer, n_cut: int, n: int, most: int, max_length: int, side: str) -> None:
    """One warning per tokenizer (a loaded model: one command) and distinct (cut, total, longest cut, side):
    evaluation re-encodes the same split often, and a second command in the same process must warn again."""
    seen = _REPORTED.setdefault(tokenizer, set())
    key = (n_cut, n, most, side)
    if key not in seen:
        seen.add(key)
        dropped, other = ("start", "right") if side == "left" else ("end", "left")
        _log.warning("warning: %d of %d prompts exceed %d tokens with their answer and were cut from the %s (their "
                     "%s dropped, up to %d tokens; the answer is kept whole); shorten the template or the inputs to "
                     "keep them whole, or keep their %s instead with --truncation-side %s",
                     n_cut, n, max_length, side, dropped, most, dropped, other)
