"""The configuration of Perforated Backpropagation: one validated dataclass, the one source of
PB's defaults (the trainer's ``pb_*`` flags take theirs from here)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pbp_fast.ops import reference

__all__ = ["PBConfig", "CONTROLS", "SCORES", "SNAPSHOTS"]

# control="restarts": every neuron stage of PB's protocol (plateau switches, best model restored,
# optimizer and schedule restarted, retries), but no dendrite is ever added; "untrained": the
# candidates are adopted as soon as they are made, without a dendrite phase.
CONTROLS = ("none", "restarts", "untrained")
SNAPSHOTS = ("channel", "unit")
SCORES = reference.SCORES


@dataclass(frozen=True)
class PBConfig:
    """Configuration of :class:`PerforatedBackprop` (validated; bad values raise ValueError)."""
    maximize: bool = True               # True: higher score is better (accuracy); False: loss
    switch_mode: str = "patience"       # "patience" or "fixed" (phases of n_epochs / p_epochs)
    n_patience: int = 10                # neuron epochs without improvement before switching
    p_patience: int = 5                 # dendrite epochs without a candidate improving
    n_epochs: int | None = None         # cap on a neuron stage (exact length in "fixed" mode)
    p_epochs: int | None = None         # cap on a dendrite phase (exact length in "fixed" mode)
    max_dendrites: int = 5              # stop once every unit has this many dendrites
    max_tries: int = 2                  # consecutive failed dendrite sets before stopping
    improvement_threshold: float = 1e-4  # relative margin (of |best|) that counts as better
    improvement_threshold_abs: float = 0.0  # absolute margin; the larger of the two is used
    # candidate statistics: cumulative for warmup_batches batches (100 in the reference
    # implementation), then an EMA with stats_momentum; a snapshot whenever the score beats the
    # best by > snapshot_threshold, of each output channel on its own ("channel", the
    # reference's) or of the unit as a whole ("unit": sum_c |C_c|)
    warmup_batches: int = 100
    stats_momentum: float = reference.STATS_MOMENTUM
    snapshot_threshold: float = reference.SNAPSHOT_THRESHOLD
    snapshot: str = "channel"
    # what a candidate's score C_c normalises the covariance cov(v_c, e_c) by: std(e_c)
    # ("covariance") or std(v_c) std(e_c) ("pearson"); the candidates' gradient is the
    # covariance's either way
    score: str = "covariance"
    candidate_scale: float | None = 0.01  # candidates drawn N(0, 1) x this; None: conv init
    candidate_bn: bool = False          # a BatchNorm between a candidate's conv and sigmoid
    train_old_alphas: bool = True       # neuron phase: every alpha trains (else the newest)
    control: str = "none"               # "restarts" / "untrained": controls (see CONTROLS)
    # the lengths of the neuron stages, in order (a replay of another run's, e.g. PB's for its
    # restarts control): stage k ends after exactly stage_epochs[k] epochs, and training after
    # the last of them; () : stages end at a plateau or at n_epochs, training by the rules above
    stage_epochs: tuple[int, ...] = ()

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"PBConfig.{name} must be {want}, got {getattr(self, name)!r}")

        for name in ("maximize", "train_old_alphas", "candidate_bn"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "a bool")
        if self.switch_mode not in ("patience", "fixed"):
            bad("switch_mode", "'patience' or 'fixed'")
        if self.control not in CONTROLS:
            bad("control", f"one of {CONTROLS}")
        if self.snapshot not in SNAPSHOTS:
            bad("snapshot", f"one of {SNAPSHOTS}")
        if self.score not in SCORES:
            bad("score", f"one of {SCORES}")
        v = self.candidate_scale
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)
                              or not 0 < v < math.inf):
            bad("candidate_scale", "None or a finite number > 0")
        for name, low in (("n_patience", 1), ("p_patience", 1), ("max_dendrites", 0),
                          ("max_tries", 1), ("warmup_batches", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                bad(name, f"an int >= {low}")
        if not isinstance(self.stage_epochs, (tuple, list)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1
                for v in self.stage_epochs):
            bad("stage_epochs", "a tuple of ints >= 1")
        object.__setattr__(self, "stage_epochs", tuple(self.stage_epochs))
        for name in ("n_epochs", "p_epochs"):
            v = getattr(self, name)
            if v is None and self.switch_mode == "fixed":
                bad(name, "set (an int >= 1) when switch_mode is 'fixed'")
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(name, "None or an int >= 1")
        for name in ("improvement_threshold", "improvement_threshold_abs", "snapshot_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < math.inf:
                bad(name, "a finite number >= 0")
        m = self.stats_momentum
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0 <= m < 1:
            bad("stats_momentum", "a number in [0, 1)")
