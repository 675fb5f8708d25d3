"""ASHA that survives ``qsnet tune --resume``.

Ray Tune restores a search's searcher on ``Tuner.restore`` but not its scheduler: a resumed
search would start with empty rungs, so the first trials after a resume could never be stopped
(there is nothing to compare them with). This subclass writes its rungs to a file after every
result and reads them back the first time a restored copy is used.
"""

from __future__ import annotations

import os

from ray.tune.schedulers import ASHAScheduler

__all__ = ["ResumableASHA"]


class ResumableASHA(ASHAScheduler):
    def __init__(self, state_file: str, **kwargs):
        super().__init__(**kwargs)
        self._state_file = str(state_file)
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        path = self._state_file
        if os.path.exists(path):
            self.restore(path)   # the pickled __dict__: rungs, counters, and these two fields
            self._state_file = path
        self._loaded = True

    def _save(self) -> None:
        tmp = f"{self._state_file}.tmp-{os.getpid()}"
        self.save(tmp)
        os.replace(tmp, self._state_file)

    def on_trial_add(self, tune_controller, trial):
        self._load()
        return super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action
