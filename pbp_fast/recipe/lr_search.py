"""The starting-rate search of a neuron stage (``pb_lr_search``), after the reference's
``find_best_lr``.

After a set of dendrites is added, the stage is trained for ``epochs`` trial epochs from its
full starting rate; the run then goes back to the stage's start and trains the same number of
epochs from ``factor`` times that rate, and so on while each lower rate reaches a better
validation accuracy (the best of its trial epochs) than the one before, for at most
``MAX_LOWERINGS`` lowerings.  The first rate that does worse ends the search: the run returns to
the end of the previous trial (model, controller, optimizer and schedule as they were) and the
stage goes on from there at that rate.  The discarded trials cost epochs of the run's budget and
stay in ``metrics.csv`` (marked ``lr_trial``); the controller's record holds the kept path only.

The reference steps a ReduceLROnPlateau schedule and compares after its second step; here every
neuron stage restarts a warmup-cosine schedule, so the trial is a fixed number of epochs.
"""
from __future__ import annotations

MAX_LOWERINGS = 3
TRIAL_EVENT = "lr_trial"  # the event of an epoch that ends a trial (metrics.csv)


def kept_epochs(events: list[str]) -> list[int]:
    """The indices of the epochs a run kept, from the events of all its epochs (metrics.csv's,
    trials included), in order: the path the controller's record holds.  A trial that ends
    with ``lr_trial: x<rate>`` sends the run back to its stage's start (after the event that
    began the stage), one that ends with ``lr_trial: x<rate> kept`` to the end of the trial
    before it."""
    path, start, prev = [], 0, []
    for i, event in enumerate(events):
        path.append(i)
        if event.startswith(TRIAL_EVENT):
            if event.endswith(" kept"):
                path = prev
            else:
                prev, path = path, path[:start]
        elif event:
            start = len(path)
    return path


class StartRateSearch:
    """Bookkeeping of one search; the run takes and restores the snapshots."""

    def __init__(self, epochs: int, factor: float):
        self.epochs, self.factor = epochs, factor
        self.active = False
        self.scale = 1.0          # the current trial's starting rate, relative to lr
        self.lowerings = 0        # trials so far minus one
        self.count = 0            # epochs of the current trial
        self.trial_best = None    # its best validation accuracy
        self.start = None         # snapshot of the run at the stage's start
        self.prev = None          # {"val", "scale", "snapshot"} of the previous (better) trial

    def begin(self, snapshot: dict) -> None:
        self.active, self.scale, self.lowerings = True, 1.0, 0
        self.count, self.trial_best = 0, None
        self.start, self.prev = snapshot, None

    def end(self) -> None:
        self.active, self.start, self.prev = False, None, None

    def after_epoch(self, val_acc: float, snapshot) -> tuple[dict, float] | None:
        """Count one epoch of the trial; at its end, return ``(snapshot to restore, starting
        rate scale to use)``, or None to go on.  ``snapshot()`` takes the run's state now."""
        self.count += 1
        self.trial_best = val_acc if self.trial_best is None else max(self.trial_best, val_acc)
        if self.count < self.epochs:
            return None
        if self.prev is not None and self.trial_best <= self.prev["val"]:
            keep = self.prev  # this rate did worse: back to the end of the previous trial
            self.end()
            return keep["snapshot"], keep["scale"]
        if self.lowerings >= MAX_LOWERINGS:
            self.end()      # the lowest rate tried is the best: go on from here
            return None
        self.prev = {"val": self.trial_best, "scale": self.scale, "snapshot": snapshot()}
        self.scale *= self.factor
        self.lowerings += 1
        self.count, self.trial_best = 0, None
        return self.start, self.scale

    def state_dict(self) -> dict:
        return dict(active=self.active, scale=self.scale, lowerings=self.lowerings,
                    count=self.count, trial_best=self.trial_best, start=self.start, prev=self.prev)

    def load_state_dict(self, state: dict) -> None:
        for k in ("active", "scale", "lowerings", "count", "trial_best", "start", "prev"):
            setattr(self, k, state[k])

