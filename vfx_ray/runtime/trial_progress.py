"""What a person watching `train-cv` or `tune` sees: one progress bar of epochs and one line per
finished fold/trial, instead of Tune's status tables and every worker's log lines."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import ray.tune
from tqdm.auto import tqdm


class TrialProgress(ray.tune.Callback):
    """A tqdm bar over ``total_epochs`` (advanced by each reported epoch) and ``describe(trial)``
    printed when a trial ends. Only the arguments are pickled into Tune's state."""

    def __init__(self, desc: str, total_epochs: int, describe: Callable[[Any], str], enabled: bool = True) -> None:
        self.args = (desc, total_epochs, describe, enabled)
        self._bar: Any = None
        self._epochs: dict[str, int] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)

    def _progress(self) -> Any:
        if self._bar is None:
            desc, total, _, enabled = self.args
            self._bar = tqdm(total=total, desc=desc, unit="epoch", disable=not enabled, file=sys.stderr)
        return self._bar

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        epoch = int(result.get("epoch") or 0)
        done = self._epochs.get(trial.trial_id, 0)
        if epoch > done:
            self._progress().update(epoch - done)
            self._epochs[trial.trial_id] = epoch

    def _line(self, text: str) -> None:
        self._progress().write(text, file=sys.stderr)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._line(self.args[2](trial))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = str(trial.get_error() or "").strip().splitlines()
        self._line(f"{self.args[2](trial)}: FAILED {error[-1] if error else ''}")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
