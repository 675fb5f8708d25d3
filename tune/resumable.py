"""The Ray Tune pieces of a search that must outlive ``qsnet tune --resume``.

- ``ResumableASHA``: Ray Tune restores a search's searcher on ``Tuner.restore`` but not its
  scheduler. A resumed search would start with empty rungs, and the first trials after a resume
  could never be stopped (nothing to compare them with). This subclass writes its rungs to a file
  after every change (a trial added, a result, a trial ended or removed) and reads them back the
  first time a restored copy is used. A result without a score (a trial whose validation loss was
  never finite) stops that trial and is kept out of the rungs.
- ``TrialEvents``: each trial's start and end, per session, in a JSON-lines file: what ran when,
  from the driver's side (a stopped trial never reaches the end of its own function).

Imported only when a search runs: importing Ray Tune takes seconds.
"""

from __future__ import annotations

import json
import os
import time

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

__all__ = ["ResumableASHA", "TrialEvents"]


class TrialEvents(Callback):
    def __init__(self, path: str):
        self.path = str(path)
        self.session = None

    def setup(self, **info):  # each run, also a resumed one (whose callback is unpickled)
        self.session = f"{os.getpid()}-{time.time():.0f}"

    def _write(self, event: str, trial) -> None:
        row = {"event": event, "trial": trial.trial_id, "session": self.session, "time": time.time(),
               "iteration": (trial.last_result or {}).get("training_iteration")}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._write("start", trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write("complete", trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write("error", trial)


class ResumableASHA(ASHAScheduler):
    def __init__(self, state_file: str, **kwargs):
        super().__init__(**kwargs)
        self._state_file = str(state_file)
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        path = self._state_file
        clock = self._time_attr
        if os.path.exists(path):
            self.restore(path)   # the pickled __dict__: rungs, counters, and these two fields
            self._state_file = path
            # a search saved by an older version counted Tune's per-session results: its rungs
            # stand, its clock is this version's (tune.search.EPOCHS)
            self._time_attr = clock
        self._loaded = True

    def _save(self) -> None:
        tmp = f"{self._state_file}.tmp-{os.getpid()}"
        self.save(tmp)
        os.replace(tmp, self._state_file)

    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)
        self._save()

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        if result.get(self._metric) is None:
            # a trial with no finite validation loss yet (it diverged at once): ASHA would raise
            # on it, and the error would end the whole search rather than this trial
            from ray.tune.schedulers import TrialScheduler

            return TrialScheduler.STOP
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._load()
        if result.get(self._metric) is None:
            # the STOP above ends here, with the same score-less result: ASHA would multiply None,
            # the trial would end in ERROR and a resume (resume_errored) would train it again with
            # the same seed, to the same end. It has no place in a rung: it only leaves
            self._trial_info.pop(trial.trial_id, None)
        else:
            super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller, trial):
        self._load()
        super().on_trial_remove(tune_controller, trial)
        self._save()
