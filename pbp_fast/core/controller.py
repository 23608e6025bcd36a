"""The Perforated Backpropagation controller: a small state machine driven by one validation
score per epoch (docs/design.md, "The controller").

States: ``neuron`` (the model trains; the newest alpha too), ``dendrite`` (everything is frozen
except one candidate per unit, trained by the correlation objective) and ``done``.

    neuron   -> dendrite  when the score has not improved for ``n_patience`` epochs (or after
                          ``n_epochs``).  The best model is restored first.  If this neuron stage
                          (the one after a new dendrite set) never beat the best score from
                          before, the set failed: the best model (with fewer dendrites) stays and
                          the candidates are retried, ``max_tries`` times in a row at most.
    neuron   -> done      when ``max_dendrites`` are in place, or after ``max_tries`` failures.
    dendrite -> neuron    when no unit's best candidate score improved for ``p_patience`` epochs
                          (or after ``p_epochs``): every unit adopts its best candidate as a new
                          dendrite with alpha = 0.

The controls of ``PBConfig.control`` change only what happens when a neuron stage ends:
"restarts" goes straight into the next neuron stage (a restart counts as a dendrite set
towards ``max_dendrites``), "untrained" adopts fresh candidates at once.  With
``PBConfig.stage_epochs`` the neuron stages have those lengths instead (a replay of another
run's stages), and training ends after the last of them.

Every transition returns ``Decision.restructured = True``: rebuild the optimizer (over
``pb.parameters()``) and the scheduler (and, under DDP, call ``pbp_fast.distributed.wrap`` again).
"""
from __future__ import annotations

import copy
import enum
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, replace

from torch import nn

from pbp_fast.core.config import PBConfig
from pbp_fast.core.conversion import count_parameters
from pbp_fast.core.history import History
from pbp_fast.core.unit import DendriticUnit
from pbp_fast.distributed.group import check_agree


def snapshot_state_dict(state_dict) -> OrderedDict:
    """A CPU copy of a model's ``state_dict`` that loads back like the original: the tensors
    copied, and its ``_metadata`` (each module's version, which load hooks such as
    torchvision's MNASNet and BatchNorm's read) kept."""
    out = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = copy.deepcopy(metadata)
    return out


# What runs whose checkpoints predate these PBConfig fields did (they resume as they ran).
_BEFORE_FIELDS = dict(snapshot="unit", candidate_scale=None, control="none")


class State(str, enum.Enum):
    NEURON = "neuron"
    DENDRITE = "dendrite"
    DONE = "done"


@dataclass(frozen=True)
class Decision:
    """What :meth:`PerforatedBackprop.add_validation_score` decided for the next epoch."""
    phase: str            # "neuron" | "dendrite" (the phase of the next epoch; "neuron" when done)
    restructured: bool    # parameters changed: rebuild the optimizer and the scheduler
    done: bool            # training is over (the best model is in place)
    restored: bool        # the model was reset to the best snapshot
    improved: bool        # this score is a new best
    event: str            # "", "start_dendrite_phase", "add_dendrites", "retry", "restart"
                          # (control="restarts") or "stop"
    num_dendrites: int    # dendrites per unit now
    epoch: int            # epochs seen so far


class PerforatedBackprop:
    """Drive PB training of a converted ``model`` (see :func:`pbp_fast.convert`).

    ``config`` a :class:`PBConfig`; keyword arguments override its fields.  Per epoch::

        train_one_epoch(model, optimizer)          # the usual loop, unchanged
        decision = pb.add_validation_score(score)
        if decision.done: break
        if decision.restructured: optimizer = make_optimizer(pb.parameters())
    """

    def __init__(self, model: nn.Module, config: PBConfig | None = None, **overrides):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if config is not None and not isinstance(config, PBConfig):
            raise TypeError(f"config must be a PBConfig, got {type(config).__name__}")
        names = {f.name for f in fields(PBConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown PBConfig field(s) {unknown}; known: {sorted(names)}")
        self.config = replace(config or PBConfig(), **overrides)
        self.model = model
        self.units = {n: m for n, m in model.named_modules() if isinstance(m, DendriticUnit)}
        if not self.units:
            raise ValueError("model has no dendritic units; call pbp_fast.convert(model) first")
        pb_params = {id(p) for u in self.units.values()
                     for p in u.dendrite_parameters() + u.candidate_parameters()}
        self._trainable = sorted(n for n, p in model.named_parameters()
                                 if p.requires_grad and id(p) not in pb_params)
        self.state = State.NEURON
        self.epoch = 0            # epochs seen
        self.phase_epoch = 0      # epochs in the current phase
        self.stall = 0            # epochs without improvement in the current phase
        self.stage_best = None    # best score of the current neuron stage
        self.stage_beat_best = False  # this neuron stage improved the overall best
        self.best_score = None
        self.best_model = None    # state_dict (CPU) of the model at best_score
        self.tries = 0            # consecutive failed dendrite sets
        self.restarts = 0         # control="restarts": the stages that stand in for dendrite sets
        self.best_restarts = 0    # ... in the best model
        self.neuron_stages = 0    # neuron stages ended
        self.candidate_scores = [0.0] * len(self.units)
        self.bn_momentum = {}     # BatchNorm momenta, held at 0 during the dendrite phase
        self.history = History()
        self._apply_state()

    # -- queries -------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self.state.value

    @property
    def num_dendrites(self) -> int:
        return max(u.num_dendrites for u in self.units.values())

    @property
    def stages(self) -> int:
        """Dendrite sets in place (restarts standing in for them under control="restarts")."""
        return self.num_dendrites + self.restarts

    def parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise in the current phase (requires_grad ones)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- the state machine ---------------------------------------------------------------------
    def add_validation_score(self, score: float, **metrics) -> Decision:
        """Record the validation score of the epoch that just ended and advance the state
        machine.  Extra keyword ``metrics`` (numbers) go into the history only."""
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise TypeError(f"score must be a number, got {score!r}") from None
        if not math.isfinite(score):
            raise ValueError(f"score must be finite, got {score}")
        if self.state is State.DONE:
            raise RuntimeError("add_validation_score: training is done (decision.done was True)")
        self._check_ranks_agree(score)
        self.epoch += 1
        self.phase_epoch += 1
        phase = self.state
        improved = self._better(score, self.best_score) and phase is State.NEURON
        cand_score = None
        if phase is State.NEURON:
            stage_improved = self._better(score, self.stage_best)
            self._count(stage_improved)
            if stage_improved:
                self.stage_best = score
            if improved:
                self.best_score, self.stage_beat_best = score, True
                self.best_model = snapshot_state_dict(self.model.state_dict())
                self.best_restarts = self.restarts
        else:
            scores = [float(u.candidate.score()) for u in self.units.values()]
            self._count(any(s > old for s, old in zip(scores, self.candidate_scores)))
            self.candidate_scores = scores
            cand_score = sum(scores)
        row = self._row(phase, score, cand_score, metrics)
        event, restored = "", False
        if phase is State.NEURON and self._neuron_stage_over():
            event, restored = self._end_neuron_stage()
        elif phase is State.DENDRITE and self._phase_over(self.config.p_patience,
                                                          self.config.p_epochs):
            event = self._end_dendrite_phase()
        row["event"] = event
        self.history.append(row)
        return Decision(phase=State.NEURON.value if self.state is State.DONE else self.phase,
                        restructured=bool(event), done=self.state is State.DONE,
                        restored=restored, improved=improved, event=event,
                        num_dendrites=self.num_dendrites, epoch=self.epoch)

    def _check_ranks_agree(self, score):
        """Under pbp_fast.distributed.wrap every rank must take the same decision: check (one
        small collective per epoch) that the ranks passed the same score and hold the same
        candidate scores."""
        sync = next((u.candidate_sync for u in self.units.values()
                     if u.candidate_sync is not None), None)
        if sync is None:
            return
        values = [score] + [float(u.candidate.score()) for u in self.units.values()
                            if u.has_candidate]
        check_agree(values, "the score given to add_validation_score (all-reduce the validation "
                    "metrics first, e.g. with pbp_fast.distributed.all_reduce_sum) or the "
                    "candidate scores", sync.group)

    def _better(self, score, ref):
        if ref is None:
            return True
        margin = max(self.config.improvement_threshold * abs(ref),
                     self.config.improvement_threshold_abs)
        return score > ref + margin if self.config.maximize else score < ref - margin

    def _count(self, improved):
        self.stall = 0 if improved else self.stall + 1

    def _phase_over(self, patience, cap):
        if cap is not None and self.phase_epoch >= cap:
            return True
        return self.config.switch_mode == "patience" and self.stall >= patience

    def _neuron_stage_over(self):
        replay = self.config.stage_epochs
        if replay:
            return self.phase_epoch >= replay[min(self.neuron_stages, len(replay) - 1)]
        return self._phase_over(self.config.n_patience, self.config.n_epochs)

    def _end_neuron_stage(self):
        cfg, accepted = self.config, self.stage_beat_best
        self.model.load_state_dict(self.best_model)
        self.restarts = self.best_restarts
        self.neuron_stages += 1
        self.tries = 0 if accepted else self.tries + 1
        if cfg.stage_epochs:
            stop = self.neuron_stages >= len(cfg.stage_epochs)
        else:
            stop = (self.tries >= cfg.max_tries if not accepted
                    else self.stages >= cfg.max_dendrites)
        if stop:
            return self._enter(State.DONE, "stop"), True
        if self.config.control == "restarts":
            self.restarts += 1
            return self._new_stage("restart"), True
        for u in self.units.values():
            u.start_candidate()
        if self.config.control == "untrained":
            return self._end_dendrite_phase(), True
        self.candidate_scores = [0.0] * len(self.units)
        return self._enter(State.DENDRITE, "start_dendrite_phase" if accepted else "retry"), True

    def _end_dendrite_phase(self):
        for u in self.units.values():
            u.adopt_candidate()
        return self._new_stage("add_dendrites")

    def _new_stage(self, event):
        self.stage_best, self.stage_beat_best = None, False
        return self._enter(State.NEURON, event)

    def _enter(self, state, event):
        self.state, self.phase_epoch, self.stall = state, 0, 0
        self._apply_state()
        return event

    def _apply_state(self):
        """requires_grad, the candidates' statistics settings and BatchNorm momenta for the
        current state."""
        cfg, dendrite = self.config, self.state is State.DENDRITE
        trainable = set(self._trainable)
        for name, p in self.model.named_parameters():
            p.requires_grad_(not dendrite and name in trainable)
        for u in self.units.values():
            u.warmup_batches, u.stats_momentum = cfg.warmup_batches, cfg.stats_momentum
            u.snapshot_threshold = cfg.snapshot_threshold
            u.per_channel_snapshots = cfg.snapshot == "channel"
            u.pearson_score = cfg.score == "pearson"
            u.candidate_bn = cfg.candidate_bn
            u.candidate_scale = cfg.candidate_scale
            alphas = list(u.dendrite_alpha)
            for i, a in enumerate(alphas):
                a.requires_grad_(not dendrite and (i == len(alphas) - 1 or cfg.train_old_alphas))
            for p in u.dendrite_parameters()[:3]:
                p.requires_grad_(False)
            for p in u.candidate_parameters():
                p.requires_grad_(dendrite)
        bns = {n: m for n, m in self.model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        if dendrite:  # "everything frozen": the running statistics too
            for n, m in bns.items():
                self.bn_momentum.setdefault(n, m.momentum)
                m.momentum = 0.0
        else:
            for n, mom in self.bn_momentum.items():
                bns[n].momentum = mom
            self.bn_momentum = {}

    def _row(self, phase, score, cand_score, metrics):
        count = count_parameters(self.model)
        row = dict(epoch=self.epoch, phase=phase.value, score=score, best_score=self.best_score,
                   num_dendrites=self.num_dendrites, params_total=count.total,
                   params_main=count.main, params_dendrites=count.dendrites,
                   params_candidates=count.candidates, candidate_score=cand_score)
        for k, v in metrics.items():
            row[k] = float(v)
        return row

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume (the model's own state_dict carries the dendrites, the
        candidates and their running statistics): plain numbers, strings, lists and tensors."""
        return dict(version=1, config=asdict(self.config), state=self.state.value,
                    epoch=self.epoch, phase_epoch=self.phase_epoch, stall=self.stall,
                    stage_best=self.stage_best, stage_beat_best=self.stage_beat_best,
                    best_score=self.best_score, best_model=self.best_model, tries=self.tries,
                    restarts=self.restarts, best_restarts=self.best_restarts,
                    neuron_stages=self.neuron_stages, candidate_scores=list(self.candidate_scores),
                    trainable=list(self._trainable), bn_momentum=dict(self.bn_momentum),
                    history=[dict(r) for r in self.history.rows])

    def load_state_dict(self, state: dict) -> None:
        """Restore the controller (config included).  Load the model's state_dict first: it
        rebuilds the dendrites and candidates; this then sets requires_grad for the phase."""
        if state.get("version") != 1:
            raise ValueError(f"unsupported PerforatedBackprop state version "
                             f"{state.get('version')!r}")
        if len(state["candidate_scores"]) != len(self.units):
            raise ValueError(f"the checkpoint has {len(state['candidate_scores'])} units, the "
                             f"model has {len(self.units)}")
        self.config = PBConfig(**{**_BEFORE_FIELDS, **state["config"]})
        self.state = State(state["state"])
        for k in ("epoch", "phase_epoch", "stall", "stage_best", "stage_beat_best", "best_score",
                  "best_model", "tries"):
            setattr(self, k, state[k])
        self.restarts = state.get("restarts", 0)
        self.best_restarts = state.get("best_restarts", 0)
        self.neuron_stages = state.get("neuron_stages", 0)
        self.candidate_scores = list(state["candidate_scores"])
        self._trainable = list(state["trainable"])
        self.history = History(state["history"])
        for n, mom in self.bn_momentum.items():  # undo this object's own dendrite-phase setting
            self.model.get_submodule(n).momentum = mom
        self.bn_momentum = dict(state["bn_momentum"])
        self._apply_state()
