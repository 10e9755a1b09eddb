"""What `dgan tune` prints while a study runs: one line per trial start, report and end.

A Ray Tune callback on the driver; Ray's own progress tables are off (verbose=0).
"""

from __future__ import annotations

import time
from typing import Any

from ray import tune


class StudyProgress(tune.Callback):
    """Each trial's start, reports, config changes (a PBT exploit) and end, with the time."""

    def __init__(self, objective: str) -> None:
        self.objective = objective
        self.t0 = time.time()
        self.configs: dict[str, dict] = {}

    def say(self, trial, text: str) -> None:
        elapsed = int(time.time() - self.t0)
        short = trial.trial_id.rsplit("_", 1)[-1]
        print(f"[{elapsed // 60:3d}:{elapsed % 60:02d}] trial {short} {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        seen = self.configs.get(trial.trial_id)
        if seen is None:
            self.say(trial, "started: " + params_text(trial.config))
        elif seen != trial.config:  # a PBT exploit: another trial's checkpoint, perturbed
            self.say(trial, "continues another trial's checkpoint: " + params_text(trial.config))
        else:
            self.say(trial, "continues from its checkpoint")
        self.configs[trial.trial_id] = dict(trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.objective)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        self.say(trial, f"iteration {result.get('iteration')}: {self.objective} {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result.get("iteration") if trial.last_result else None
        self.say(trial, f"ended at iteration {last}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.say(trial, f"failed; its error is in {trial.path}")


def params_text(params: dict[str, Any]) -> str:
    """`lambda_rec=5.2 lr_g=0.0002`: the searched values, by the last part of their key."""
    return " ".join(
        f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
        for k, v in params.items()
    )
