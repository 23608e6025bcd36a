"""The PB controller on scripted score sequences: every switching rule, restore-best, retries,
max_dendrites, fixed-epoch mode, configuration checks, history output and checkpoints."""
import csv
import io
import math

import pytest
import torch
from torch import nn

import pbp_fast as pbp
from pbp_fast.core import PBConfig


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    pbp.convert(model)
    return model


def _feed(pb, scores, candidate=None):
    """Feed validation scores; in the dendrite phase ``candidate(epoch_in_phase)`` gives the
    best candidate score every unit reports (spread over its channels' per-channel scores)."""
    out = []
    for s in scores:
        if pb.phase == "dendrite" and candidate is not None:
            for u in pb.units.values():
                best = u.candidate.best_score
                best.fill_(candidate(pb.phase_epoch + 1) / best.numel())
        out.append(pb.add_validation_score(s))
    return out


def _events(decisions):
    return [(d.epoch, d.event) for d in decisions if d.event]


def test_neuron_patience_switches_to_the_dendrite_phase():
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=3, p_patience=2)
    assert pb.phase == "neuron" and pb.num_dendrites == 0
    ds = _feed(pb, [0.5, 0.6, 0.7, 0.69, 0.7, 0.65])
    assert [d.improved for d in ds] == [True, True, True, False, False, False]
    assert [d.phase for d in ds] == ["neuron"] * 5 + ["dendrite"]
    assert [d.restructured for d in ds] == [False] * 5 + [True]
    assert ds[-1].event == "start_dendrite_phase" and ds[-1].restored
    # dendrite phase: only the candidates train; BatchNorm statistics are frozen
    assert all(u.has_candidate for u in pb.units.values())
    cand = {id(p) for u in pb.units.values() for p in u.candidate_parameters()}
    assert {id(p) for p in pb.parameters()} == cand
    assert model[0].bn.momentum == 0.0


class _Versioned(nn.Module):
    """A block whose load hook reads its state_dict version, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_restoring_the_best_model_keeps_the_state_dict_metadata():
    """The best-model snapshot loads back through load hooks that read the modules' versions,
    after a checkpoint round trip too."""
    model = nn.Sequential(_Versioned(), nn.Flatten(), nn.Linear(12, 2))
    pbp.convert(model)
    pb = pbp.PerforatedBackprop(model, n_patience=1)
    decisions = _feed(pb, [0.5, 0.4])
    assert decisions[-1].restored and pb.phase == "dendrite"
    assert pb.best_model._metadata["0"]["version"] == 2
    buf = io.BytesIO()
    torch.save(pb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model.load_state_dict(state["best_model"])  # raised before the metadata was kept
    twin = pbp.PerforatedBackprop(model, n_patience=1)
    twin.load_state_dict(state)
    twin.model.load_state_dict(twin.best_model)


def test_best_model_is_restored_before_candidates():
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=2)
    pb.add_validation_score(1.0)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].linear.weight.add_(1.0)  # later epochs change the model but never beat 1.0
    _feed(pb, [0.9, 0.8])
    assert pb.phase == "dendrite"
    for k, v in best.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_dendrite_phase_patience_and_adoption():
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=1, p_patience=2)
    _feed(pb, [0.5, 0.5])
    assert pb.phase == "dendrite"
    x = torch.randn(5, 3)
    model.eval()
    before = model(x)
    # candidate scores improve at phase epochs 1..3, then stall for 2 epochs
    ds = _feed(pb, [0.5] * 5, candidate=lambda e: min(e, 3) / 10)
    assert [d.phase for d in ds] == ["dendrite"] * 4 + ["neuron"]
    assert ds[-1].event == "add_dendrites" and ds[-1].restructured and ds[-1].num_dendrites == 1
    assert pb.history[-1]["candidate_score"] == pytest.approx(2 * 0.3)
    assert all(u.num_dendrites == 1 and not u.has_candidate for u in pb.units.values())
    assert torch.equal(model(x), before)  # alpha = 0
    trainable = {id(p) for p in pb.parameters()}
    unit = pb.units["0"]
    assert id(unit.dendrite_alpha[0]) in trainable and id(unit.dendrite_weight) not in trainable
    assert id(unit.linear.weight) in trainable and model[0].bn.momentum == 0.1


def test_failed_dendrite_set_restores_and_retries_then_stops():
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=2, p_patience=1, max_tries=2)
    ds = _feed(pb, [0.8, 0.7, 0.7])  # best 0.8 at epoch 1, restored; candidates started
    best = {k: v.clone() for k, v in model.state_dict().items() if "candidate" not in k}
    first_candidate = model[0].candidate.weight.detach().clone()
    ds += _feed(pb, [0.8])  # dendrite phase: no candidate improves, ends after 1 epoch
    assert pb.num_dendrites == 1 and pb.phase == "neuron"
    ds += _feed(pb, [0.75, 0.79, 0.78, 0.77])  # improves within the stage, never beats 0.8
    assert ds[-1].event == "retry" and ds[-1].restored and ds[-1].phase == "dendrite"
    assert pb.num_dendrites == 0  # the best model had no dendrites
    assert all(u.has_candidate for u in pb.units.values())
    assert not torch.equal(model[0].candidate.weight, first_candidate)  # fresh candidates
    for k, v in best.items():
        assert torch.equal(model.state_dict()[k], v), k
    ds += _feed(pb, [0.8, 0.8, 0.7, 0.7])  # 0.8 does not beat 0.8: second failure, stop
    assert _events(ds) == [(3, "start_dendrite_phase"), (4, "add_dendrites"), (8, "retry"),
                           (9, "add_dendrites"), (12, "stop")]
    assert ds[-1].done and ds[-1].restored and pb.num_dendrites == 0 and pb.phase == "done"
    with pytest.raises(RuntimeError, match="done"):
        pb.add_validation_score(1.0)


def test_success_resets_tries_and_max_dendrites_stops():
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=1, p_patience=1, max_dendrites=2,
                                max_tries=1)
    scores = [0.5, 0.5,        # baseline
              0.5,             # dendrite phase -> 1 dendrite
              0.6, 0.6,        # beats 0.5: accepted
              0.6,             # dendrite phase -> 2 dendrites
              0.7, 0.65]       # accepted, and max_dendrites reached
    ds = _feed(pb, scores)
    assert _events(ds) == [(2, "start_dendrite_phase"), (3, "add_dendrites"),
                           (5, "start_dendrite_phase"), (6, "add_dendrites"), (8, "stop")]
    assert ds[-1].done and pb.num_dendrites == 2 and pb.best_score == 0.7


def test_minimize_and_improvement_thresholds():
    pb = pbp.PerforatedBackprop(_model(), maximize=False, n_patience=2,
                                improvement_threshold=0.01, improvement_threshold_abs=0.05)
    ds = _feed(pb, [1.0, 0.96, 0.9, 0.89])
    # 0.96 is not 0.05 below 1.0; 0.9 is; 0.89 is not 0.05 below 0.9
    assert [d.improved for d in ds] == [True, False, True, False]
    assert pb.phase == "neuron"
    assert pb.add_validation_score(0.88).phase == "dendrite"
    pb = pbp.PerforatedBackprop(_model(), improvement_threshold=0.1, n_patience=1)
    assert [d.improved for d in _feed(pb, [10.0, 10.5])] == [True, False]


def test_fixed_epoch_mode_ignores_scores():
    pb = pbp.PerforatedBackprop(_model(), switch_mode="fixed", n_epochs=3, p_epochs=2,
                                max_dendrites=1)
    ds = _feed(pb, [0.1, 0.2, 0.3,  0.3, 0.3,  0.4, 0.5, 0.6], candidate=lambda e: e)
    assert _events(ds) == [(3, "start_dendrite_phase"), (5, "add_dendrites"), (8, "stop")]
    # patience mode with caps: the cap ends a still-improving phase
    pb = pbp.PerforatedBackprop(_model(), n_epochs=2, p_epochs=1)
    ds = _feed(pb, [0.1, 0.2, 0.3], candidate=lambda e: e)
    assert _events(ds) == [(2, "start_dendrite_phase"), (3, "add_dendrites")]


def test_train_old_alphas_and_max_dendrites_zero():
    pb = pbp.PerforatedBackprop(_model(), n_patience=1, p_patience=1, train_old_alphas=True)
    _feed(pb, [0.5, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6, 0.6])
    assert pb.num_dendrites == 2 and pb.phase == "neuron"
    assert all(a.requires_grad for u in pb.units.values() for a in u.dendrite_alpha)
    pb = pbp.PerforatedBackprop(_model(), n_patience=1, max_dendrites=0)
    assert _feed(pb, [0.5, 0.5])[-1].done  # plain early stopping


@pytest.mark.parametrize("field,value", [
    ("n_patience", 0), ("p_patience", 1.5), ("max_dendrites", -1), ("max_tries", 0),
    ("switch_mode", "sometimes"), ("n_epochs", 0), ("p_epochs", True), ("maximize", 1),
    ("improvement_threshold", -0.1), ("improvement_threshold_abs", math.inf),
    ("stats_momentum", 1.0), ("snapshot_threshold", "0.1"), ("warmup_batches", -1),
    ("train_old_alphas", None), ("control", "alpha0"), ("snapshot", "layer"),
    ("candidate_scale", 0.0), ("candidate_scale", math.nan), ("score", "r"), ("candidate_bn", 1),
    ("stage_epochs", (3, 0)), ("stage_epochs", 4)])
def test_config_is_validated(field, value):
    with pytest.raises(ValueError, match=field):
        PBConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        pbp.PerforatedBackprop(_model(), **{field: value})


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_epochs"):
        PBConfig(switch_mode="fixed", p_epochs=2)
    with pytest.raises(ValueError, match="unknown PBConfig field"):
        pbp.PerforatedBackprop(_model(), patience=3)
    with pytest.raises(ValueError, match="convert"):
        pbp.PerforatedBackprop(nn.Linear(2, 2))
    pb = pbp.PerforatedBackprop(_model(), config=PBConfig(n_patience=7), p_patience=3)
    assert (pb.config.n_patience, pb.config.p_patience) == (7, 3)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            pb.add_validation_score(bad)
    assert pb.epoch == 0


def test_history_csv_and_figure(tmp_path):
    pb = pbp.PerforatedBackprop(_model(), n_patience=1, p_patience=1)
    _feed(pb, [0.5, 0.5, 0.5, 0.5, 0.6], candidate=lambda e: 0.2)
    pb.add_validation_score(0.6, train_loss=0.25)
    rows = list(csv.DictReader(io.StringIO(pb.history.to_csv(tmp_path / "h.csv").read_text())))
    assert [r["phase"] for r in rows] == ["neuron", "neuron", "dendrite", "dendrite", "neuron",
                                          "neuron"]
    assert rows[1]["event"] == "start_dendrite_phase" and rows[-1]["train_loss"] == "0.25"
    assert rows[2]["params_candidates"] != "0" and rows[4]["num_dendrites"] == "1"
    assert float(rows[3]["candidate_score"]) == pytest.approx(0.4)
    pytest.importorskip("matplotlib")
    png = pb.history.plot(tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_state_dict_is_plain_and_round_trips(tmp_path):
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=1, p_patience=3)
    _feed(pb, [0.5, 0.5, 0.5])
    assert pb.phase == "dendrite"
    torch.save({"model": model.state_dict(), "pb": pb.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    fresh_model = _model(seed=3)
    fresh_model.load_state_dict(ck["model"])
    fresh = pbp.PerforatedBackprop(fresh_model)
    fresh.load_state_dict(ck["pb"])
    assert fresh.phase == "dendrite" and fresh.config == pb.config
    assert fresh.history.rows == pb.history.rows and fresh.best_score == pb.best_score
    assert {id(p) for p in fresh.parameters()} == {
        id(p) for u in fresh.units.values() for p in u.candidate_parameters()}
    assert fresh_model[0].bn.momentum == 0.0
    a, b = _feed(pb, [0.5, 0.5]), _feed(fresh, [0.5, 0.5])
    assert a == b


def test_restarts_control_runs_the_stages_without_dendrites():
    """control="restarts": the same stages, restores and retries, with no dendrite phase and no
    dendrite; a restart counts towards max_dendrites and is undone with a failed stage."""
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=1, max_dendrites=2, max_tries=1,
                                control="restarts")
    before = pbp.count_parameters(model).total
    ds = _feed(pb, [0.5, 0.5,       # stage 0 ends: restart
                    0.6, 0.6,       # beats 0.5: accepted, restart 2
                    0.6, 0.55])     # stage 2 never beats 0.6: failed, stop
    assert _events(ds) == [(2, "restart"), (4, "restart"), (6, "stop")]
    assert all(d.restructured for d in ds if d.event)
    assert [d.phase for d in ds] == ["neuron"] * 6 and pb.num_dendrites == 0
    assert pb.restarts == 1 and pb.stages == 1  # the failed stage's restart was undone
    count = pbp.count_parameters(model).total
    assert count == before and not any(u.has_candidate for u in pb.units.values())
    pb = pbp.PerforatedBackprop(_model(), n_patience=1, max_dendrites=1, control="restarts")
    ds = _feed(pb, [0.5, 0.5, 0.6, 0.6])
    assert _events(ds) == [(2, "restart"), (4, "stop")] and pb.stages == 1


def test_stage_epochs_replay_the_stage_lengths():
    """stage_epochs: each neuron stage lasts exactly its listed length, whatever the scores (no
    plateau, no retry limit), and training ends after the last; a resumed controller keeps
    its place in the list."""
    pb = pbp.PerforatedBackprop(_model(), n_patience=1, max_tries=1, control="restarts",
                                stage_epochs=(3, 2, 4))
    ds = _feed(pb, [0.5, 0.6, 0.7, 0.5, 0.5])
    assert _events(ds) == [(3, "restart"), (5, "restart")] and pb.neuron_stages == 2
    fresh = pbp.PerforatedBackprop(_model(), control="restarts")
    fresh.load_state_dict(pb.state_dict())
    ds = _feed(fresh, [0.5, 0.8, 0.5, 0.5])
    assert _events(ds) == [(9, "stop")] and ds[-1].done and fresh.best_score == 0.8
    assert fresh.config.stage_epochs == (3, 2, 4)


def test_untrained_control_adopts_fresh_candidates():
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=1, control="untrained", candidate_scale=0.5)
    ds = _feed(pb, [0.5, 0.5])
    assert ds[-1].event == "add_dendrites" and ds[-1].phase == "neuron"
    assert pb.num_dendrites == 1 and not model[0].has_candidate
    w = model[0].dendrite_weight[0]
    assert 0.2 < float(w.std()) < 1.0  # drawn N(0, 1) x 0.5, not the layer's init
    assert all(float(a.detach().abs().max()) == 0 for u in pb.units.values()
               for a in u.dendrite_alpha)


def test_candidate_settings_reach_the_units():
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=1)
    _feed(pb, [0.5, 0.5])
    cand = model[0].candidate
    assert cand.per_channel and cand.best_score.shape == (4,)
    assert float(cand.weight.abs().max()) < 0.1  # N(0, 1) x 0.01
    assert model[0].warmup_batches == 100
    pb = pbp.PerforatedBackprop(_model(), n_patience=1, snapshot="unit", candidate_scale=None)
    _feed(pb, [0.5, 0.5])
    cand = pb.model[0].candidate
    assert not cand.per_channel and cand.best_score.shape == ()
    assert float(cand.weight.abs().max()) > 0.1  # kaiming-uniform, bound 1/sqrt(3)
    assert not pb.model[0].pearson_score
    pb = pbp.PerforatedBackprop(_model(), n_patience=1, score="pearson")
    _feed(pb, [0.5, 0.5])
    unit = pb.model[0]
    assert unit.pearson_score and not unit.candidate.bn
    pb = pbp.PerforatedBackprop(_model(), n_patience=1, candidate_bn=True)
    _feed(pb, [0.5, 0.5])
    assert pb.model[0].candidate.bn and pb.model[0].candidate_bn
    unit.candidate.stats.copy_(torch.tensor([[0.5], [0.1], [0.2], [1.0], [0.5]],
                                            dtype=torch.float64).expand(5, 4))
    want = (0.2 - 0.05) / (0.99 ** 0.5 * 0.25 ** 0.5)  # cov / (std e std v)
    torch.testing.assert_close(unit.candidate_correlation(),
                               torch.full((4,), want, dtype=torch.float64))


def test_candidate_statistics_saved_with_four_rows_load():
    """A candidate saved before its statistics had the running mean of v v (4 rows) loads with
    that row filled so that v's variance is 0."""
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=1)
    _feed(pb, [0.5, 0.5])
    model[0].candidate.stats.copy_(torch.rand(5, 4, dtype=torch.float64))
    state = model.state_dict()
    state["0.candidate.stats"] = state["0.candidate.stats"][:4].clone()
    fresh = _model(seed=3)
    pbp.PerforatedBackprop(fresh, n_patience=1)
    fresh.load_state_dict(state)
    stats = fresh[0].candidate.stats
    torch.testing.assert_close(stats[:4], state["0.candidate.stats"])
    torch.testing.assert_close(stats[4], stats[0] ** 2)


def test_checkpoints_from_before_the_new_fields_resume_as_they_ran():
    model = _model()
    pb = pbp.PerforatedBackprop(model, n_patience=1)
    state = pb.state_dict()
    for k in ("snapshot", "candidate_scale", "control"):
        del state["config"][k]
    del state["restarts"], state["best_restarts"]
    fresh = pbp.PerforatedBackprop(_model())
    fresh.load_state_dict(state)
    assert (fresh.config.snapshot, fresh.config.candidate_scale, fresh.config.control) == \
        ("unit", None, "none")
    assert fresh.restarts == 0
