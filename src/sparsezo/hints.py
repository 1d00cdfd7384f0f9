"""How a warning names a setting: the CLI flag under ``sparsezo …``, the API's field in a script.

The library's warnings ("lower --lr", "more --steps") reach both kinds of user; a script's author
has no ``--lr`` to pass, but a ``ZOConfig(lr=…)``. The CLI runs its commands inside
:func:`cli_style`; everywhere else the API's names are used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_CLI: ContextVar[bool] = ContextVar("sparsezo_cli_style", default=False)

# name -> (CLI flag, API owner, API field, fixed value or None)
SETTINGS: dict[str, tuple[str, str, str, str | None]] = {
    "lr": ("--lr", "ZOConfig", "lr", None),
    "lr_auto": ("--lr auto", "TrainConfig", "lr_auto", "True"),
    "eps": ("--eps", "ZOConfig", "eps", None),
    "steps": ("--steps", "TrainConfig", "steps", None),
    "loss": ("--loss", "TrainConfig", "loss", None),
    "num_dev": ("--num-dev", "fine_tune", "dev", "<a larger dev list>"),
    "calib": ("a longer --calib file", "compute_mask", "texts", "<longer texts>"),
    "calib_tokens": ("--calib-tokens", "compute_mask", "calib_tokens", None),
}


@contextlib.contextmanager
def cli_style() -> Iterator[None]:
    """Name settings by their CLI flags while this context is active (the CLI's commands run in it)."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def setting(name: str, value: object = None) -> str:
    """``setting("lr", 3e-4)`` → ``--lr 0.0003`` under the CLI, ``ZOConfig(lr=0.0003)`` in the API;
    without a value, the flag or ``ZOConfig.lr``."""
    flag, owner, field, fixed = SETTINGS[name]
    shown = fixed if fixed is not None else (None if value is None else f"{value:.3g}" if isinstance(value, float)
                                              else str(value))
    if _CLI.get():
        return flag if value is None or fixed is not None else f"{flag} {shown}"
    return f"{owner}({field}={shown})" if shown is not None else f"{owner}.{field}"
