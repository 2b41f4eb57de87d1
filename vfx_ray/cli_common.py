"""What every `vfx-ray` subcommand module shares: the user-error type and small formatters."""

from __future__ import annotations

import argparse


class CliError(Exception):
    """Wrong input from the user: printed as one line."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def metrics_line(m: dict) -> str:
    def f(key: str, digits: int = 2) -> str:
        return "n/a" if m.get(key) is None else f"{m[key]:.{digits}f}"

    return (
        f"sensitivity {f('sensitivity')}  specificity {f('specificity')}  accuracy {f('accuracy')}  "
        f"AUC {f('auc', 3)} [{f('auc_ci_low', 3)}, {f('auc_ci_high', 3)}]"
    )
