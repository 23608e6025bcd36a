"""PB training end to end on the CPU: exact resume from a checkpoint taken at any step, candidate
training that finds the unit's error, and dendrites that take a too-small model below its
plateau.  The user's loop is the ordinary one; only the controller calls are added."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DSBlock

import pbp_fast as pbp
from pbp_fast import reference


pytestmark = pytest.mark.usefixtures("one_thread")



def _conv_net(seed, c=6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                          nn.ReLU(), DSBlock(c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Dropout(0.2), nn.Linear(c, 3))
    pbp.convert(model)
    return model


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = ((x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 1, :, 4:].std((1, 2)) > 1).long())
    return x, y


# -- resume --------------------------------------------------------------------------------------
X, Y = _images(48, 0)
XV, YV = _images(32, 1)
BATCH = 16
CONFIG = dict(maximize=False, n_patience=2, n_epochs=4, p_patience=2, p_epochs=2,
              max_dendrites=2, max_tries=2, warmup_batches=2, improvement_threshold=0.0)


def _optimizer(pb):
    return torch.optim.Adam(pb.parameters(), lr=0.02)


def _checkpoint(model, opt, pb, pos):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pb": pb.state_dict(),
                "rng": torch.get_rng_state(), "pos": pos}, buf)
    return buf.getvalue()


def _loop(model, pb, opt, pos=(0, 0, 0), save_at=(), saved=None, ticks=None):
    """The user's loop: each batch step and each epoch end is a tick; a checkpoint is taken after
    the ticks in ``save_at``.  Data order depends only on the epoch (as with a seeded sampler)."""
    epoch, first_batch, tick = pos
    while True:
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch))
        model.train()
        for b in range(first_batch, len(X) // BATCH):
            idx = order[b * BATCH:(b + 1) * BATCH]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
            tick += 1
            if ticks is not None:
                ticks.append(pb.phase)
            if tick in save_at:
                saved[tick] = _checkpoint(model, opt, pb, (epoch, b + 1, tick))
        first_batch = 0
        model.eval()
        with torch.no_grad():
            decision = pb.add_validation_score(F.cross_entropy(model(XV), YV))
        epoch += 1
        if decision.done:
            return
        if decision.restructured:
            opt = _optimizer(pb)
        tick += 1
        if ticks is not None:
            ticks.append("end:" + decision.event)
        if tick in save_at:
            saved[tick] = _checkpoint(model, opt, pb, (epoch, 0, tick))


def _resume(blob):
    ck = torch.load(io.BytesIO(blob), weights_only=True)
    model = _conv_net(seed=123)  # a fresh model: everything must come from the checkpoint
    model.load_state_dict(ck["model"])
    pb = pbp.PerforatedBackprop(model, **CONFIG)
    pb.load_state_dict(ck["pb"])
    opt = _optimizer(pb)
    opt.load_state_dict(ck["opt"])
    torch.set_rng_state(ck["rng"])
    _loop(model, pb, opt, ck["pos"])
    return model, pb


def test_resume_from_any_step_continues_exactly():
    torch.manual_seed(0)
    model = _conv_net(seed=0)
    pb = pbp.PerforatedBackprop(model, **CONFIG)
    ticks = []
    _loop(model, pb, _optimizer(pb), ticks=ticks)
    events = [t for t in ticks if t.startswith("end:") and t != "end:"]
    assert {"end:start_dendrite_phase", "end:add_dendrites"} <= set(events)
    # kill points: mid neuron stage, mid dendrite phase, right after each kind of transition,
    # and mid second neuron stage
    first_dendrite = ticks.index("dendrite") + 1
    save_at = {2, first_dendrite + 1, ticks.index("end:start_dendrite_phase") + 1,
               ticks.index("end:add_dendrites") + 1, ticks.index("end:add_dendrites") + 3}
    torch.manual_seed(0)
    model = _conv_net(seed=0)
    pb = pbp.PerforatedBackprop(model, **CONFIG)
    saved = {}
    _loop(model, pb, _optimizer(pb), save_at=save_at, saved=saved)
    final = model.state_dict()
    assert set(saved) == save_at and pb.num_dendrites >= 1
    for tick, blob in sorted(saved.items()):
        resumed, resumed_pb = _resume(blob)
        assert resumed_pb.history.rows == pb.history.rows, tick
        assert resumed.state_dict().keys() == final.keys()
        for k, v in resumed.state_dict().items():
            assert torch.equal(v, final[k]), (tick, k)


# -- candidate training --------------------------------------------------------------------------
def _batch_correlation(v, e):
    """sum_c |C_c| over one batch: C_c = mean((v - mean v)(e - mean e)) / std(e)."""
    dims = (0, 2, 3)
    cov = ((v - v.mean(dims, keepdim=True)) * (e - e.mean(dims, keepdim=True))).mean(dims)
    return (cov / e.std(dims, unbiased=False).clamp_min(1e-12)).abs().sum().item()


def _xor_pixels(n, seed):
    """Per-pixel labels sign(x0) == sign(x1): beyond a linear conv, and beyond one sigmoid too,
    but a sigmoid feature can correlate with what the conv gets wrong."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=g)
    return x, (x[:, 0] * x[:, 1] > 0).long()


def test_candidate_training_finds_the_units_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1))  # per-pixel logits
    pbp.convert(model)
    pb = pbp.PerforatedBackprop(model, switch_mode="fixed", n_epochs=1, p_epochs=50,
                                warmup_batches=5)
    xs, ys = _xor_pixels(1024, 2)

    def epoch(lr):
        opt = torch.optim.Adam(pb.parameters(), lr=lr)
        for idx in torch.arange(1024).split(32):
            opt.zero_grad()
            F.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()

    epoch(0.05)  # the neuron phase: the conv learns what it can
    assert pb.add_validation_score(0.0).phase == "dendrite"
    unit = pb.units["0"]
    random_w = [p.detach().clone() for p in unit.candidate_parameters()]
    for _ in range(3):
        epoch(0.05)
    # a fresh batch: the unit's input x and its error e = dL/dy
    x_test, y_test = _xor_pixels(256, 3)
    x_test.requires_grad_()  # every parameter is frozen: let the backward reach the unit
    seen = {}
    unit.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    model.eval()
    out = model(x_test)
    seen["y"].register_hook(lambda g: seen.update(e=g))
    F.cross_entropy(out, y_test).backward()

    def score(w, b):
        v = reference.candidate_activation(seen["x"], w, b, None, None, **unit._conv_kw)
        return _batch_correlation(v, seen["e"])

    trained = score(unit.candidate.weight.detach(), unit.candidate.bias.detach())
    random = score(*random_w[:2])
    print(f"sum_c |C_c| on a fresh batch: trained candidate {trained:.4f}, random {random:.4f}")
    assert trained > 0.1 and trained > 10 * random


# -- end to end ----------------------------------------------------------------------------------
def _disc_model():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2))
    pbp.convert(model)
    return model


def _disc_epoch(model, opt, x, y):
    for idx in torch.randperm(len(x)).split(64):
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_dendrites_take_a_too_small_model_below_its_plateau():
    """Two tanh hidden units cannot draw a disc: the model plateaus.  Dendrites (sigmoids of the
    units' inputs, trained to match each unit's error) add the missing capacity: the training
    loss ends below 0.6 x the plateau, and below 0.6 x what the plateaued model reaches when it
    simply trains on for as many epochs."""
    torch.manual_seed(0)
    x = torch.rand(512, 2) * 2 - 1
    y = ((x ** 2).sum(1) < 0.5).long()
    model = _disc_model()
    pb = pbp.PerforatedBackprop(model, maximize=False, n_patience=10, n_epochs=100,
                                p_patience=100, p_epochs=15, max_dendrites=2,
                                improvement_threshold=2e-3)

    def optimizer():  # the candidates get a larger step than the neurons
        return torch.optim.Adam(pb.parameters(), lr=0.2 if pb.phase == "dendrite" else 0.03)

    opt, plateau_state = optimizer(), None
    for _ in range(1000):
        decision = pb.add_validation_score(_disc_epoch(model, opt, x, y))
        if decision.event == "start_dendrite_phase" and plateau_state is None:
            plateau, plateau_state = pb.best_score, pb.best_model
            plateau_epoch = decision.epoch
        if decision.done:
            break
        if decision.restructured:
            opt = optimizer()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    # the control: the plateaued model trains on, without dendrites, for as many epochs
    control = _disc_model()
    control.load_state_dict(plateau_state)
    opt = torch.optim.Adam(control.parameters(), lr=0.03)
    control_best = min(_disc_epoch(control, opt, x, y)
                       for _ in range(decision.epoch - plateau_epoch))
    print(f"plateau {plateau:.4f}; PB {final:.4f} with {pb.num_dendrites} dendrites after "
          f"{decision.epoch} epochs; without dendrites {control_best:.4f}")
    assert decision.done and pb.num_dendrites >= 1
    assert final == pytest.approx(pb.best_score)  # the best model is in place
    assert final < 0.6 * plateau and final < 0.6 * control_best
