"""Dendritic units (pbp_fast.nn): exactness at alpha = 0, the math of docs/design.md against a plain
re-implementation, perforated gradients, the candidate's backward against the reference
candidate pass, BatchNorm folding and state_dict round trips that rebuild dendrites and
candidates, and the dendrite phase under torch.compile."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import add_random_dendrites, randomise_bn, train_candidates_only
import pbp_fast
from pbp_fast import reference
from pbp_fast.core import DendriticConv2d, DendriticLinear

BACKENDS = pbp_fast.backends()  # "triton" runs on the CPU interpreter without a GPU

CONVS = {  # (conv, input shape)
    "dense3x3": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 7, 7)),
    "depthwise_s2": (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False),
                     (2, 6, 9, 9)),
    "pointwise": (lambda: nn.Conv2d(5, 3, 1, bias=False), (3, 5, 4, 4)),
    "dilated_grouped": (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2), (2, 4, 6, 6)),
}


def _unit(kind, bn=True, seed=0, backend="auto"):
    torch.manual_seed(seed)
    make, shape = CONVS[kind]
    conv = make()
    norm = randomise_bn(nn.BatchNorm2d(conv.out_channels)) if bn else None
    return conv, norm, torch.randn(shape)


def _make(conv, bn, backend):
    unit = DendriticConv2d(conv, bn)
    unit.backend = backend
    return unit


def _manual(unit, x):
    """y = BN(conv(x)) + sum_k alpha_k s_k written out with F.conv2d
    (docs/design.md, "The math")."""
    z = unit._main(x)
    kw = unit._conv_kw
    s = []
    for k in range(unit.num_dendrites):
        a = F.conv2d(x.detach(), unit.dendrite_weight[k], unit.dendrite_bias[k], **kw)
        for j in range(k):
            a = a + unit.dendrite_cascade[k, j].view(1, -1, 1, 1) * s[j]
        s.append(torch.sigmoid(a))
    return z + sum(unit.dendrite_alpha[k].view(1, -1, 1, 1) * s[k] for k in range(len(s)))


@pytest.mark.parametrize("kind", sorted(CONVS))
@pytest.mark.parametrize("train", [True, False])
def test_no_dendrites_computes_the_original(kind, train):
    conv, bn, x = _unit(kind)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    unit = DendriticConv2d(conv, bn).train(train)
    ref_bn.train(train)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = unit(x1)
    y_ref = ref_bn(ref_conv(x2))
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(conv.weight.grad, ref_conv.weight.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(CONVS))
@pytest.mark.parametrize("train", [True, False])
def test_add_dendrite_leaves_output_unchanged_bit_for_bit(kind, train, backend):
    conv, bn, x = _unit(kind)
    unit = _make(conv, bn, backend).train(train)
    bn.momentum = 0.0  # keep the running statistics fixed across the repeated train forwards
    before = unit(x)
    for d in range(1, 4):
        unit.add_dendrite(cascade=torch.randn(d - 1, unit.out_channels))
        assert unit.num_dendrites == d
        assert torch.equal(unit(x), before)


def test_linear_add_dendrite_exact_with_leading_dims():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    unit = DendriticLinear(lin)
    x = torch.randn(2, 4, 5)
    before = unit(x)
    assert torch.equal(before, lin(x))
    unit.add_dendrite()
    unit.add_dendrite()
    after = unit(x)
    assert after.shape == (2, 4, 3) and torch.equal(after, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(CONVS))
def test_forward_matches_the_math(kind, backend):
    conv, bn, x = _unit(kind)
    unit = _make(conv, bn, backend).eval()
    add_random_dendrites(unit, 3)
    torch.testing.assert_close(unit(x), _manual(unit, x), rtol=1e-5, atol=1e-5)


def test_linear_with_batchnorm_matches_the_math():
    torch.manual_seed(1)
    unit = DendriticLinear(nn.Linear(6, 4), nn.BatchNorm1d(4)).train()
    unit.bn.momentum = 0.0
    add_random_dendrites(unit, 2)
    x = torch.randn(8, 6)
    z = unit.bn(unit.linear(x))
    s0 = torch.sigmoid(x @ unit.dendrite_weight[0, :, :, 0, 0].T + unit.dendrite_bias[0])
    s1 = torch.sigmoid(x @ unit.dendrite_weight[1, :, :, 0, 0].T + unit.dendrite_bias[1]
                       + unit.dendrite_cascade[1, 0] * s0)
    want = z + unit.dendrite_alpha[0] * s0 + unit.dendrite_alpha[1] * s1
    torch.testing.assert_close(unit(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_perforated_and_alpha_trains(backend):
    conv, bn, x = _unit("dense3x3")
    unit = _make(conv, bn, backend).train()
    bn.momentum = 0.0
    add_random_dendrites(unit, 2)
    assert [a.requires_grad for a in unit.dendrite_alpha] == [False, True]
    assert not unit.dendrite_weight.requires_grad and not unit.dendrite_cascade.requires_grad
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = unit(xa)
    g = torch.randn_like(y)
    y.backward(g)
    grad_alpha = unit.dendrite_alpha[1].grad.clone()
    unit.zero_grad()
    # the input gradient is that of the main path alone; alpha's is the reference one
    unit._main(xb).backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    y_ref = _manual(unit, x)
    want = torch.autograd.grad(y_ref, unit.dendrite_alpha[1], g)[0]
    torch.testing.assert_close(grad_alpha, want, rtol=1e-4, atol=1e-5)


def test_fold_bn_in_eval_matches_unfolded():
    conv, bn, x = _unit("depthwise_s2")
    unit = DendriticConv2d(conv, bn).eval()
    add_random_dendrites(unit, 2)
    want = unit(x)
    unit.fold_bn = True
    torch.testing.assert_close(unit(x), want, rtol=1e-5, atol=1e-5)
    w, b = unit.folded_weight_bias()
    torch.testing.assert_close(F.conv2d(x, w, b, **unit._conv_kw), unit._main(x),
                               rtol=1e-5, atol=1e-5)


def _candidate_unit(d=2, backend="auto"):
    conv, bn, x = _unit("dense3x3")
    unit = _make(conv, bn, backend).train()
    bn.momentum = 0.0
    add_random_dendrites(unit, d)
    unit.start_candidate()
    for p in unit.parameters():
        p.requires_grad_(False)
    for p in unit.candidate_parameters():
        p.requires_grad_(True)
    return unit, x


@pytest.mark.parametrize("d", [0, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_candidate_backward_matches_the_reference_candidate_pass(backend, d):
    unit, x = _candidate_unit(d, backend)
    unit.warmup_batches = 1
    with torch.no_grad():  # a non-trivial running state before the batch
        unit.candidate.stats.copy_(torch.rand(5, unit.out_channels, dtype=torch.float64))
        unit.candidate.stats[3:] += 1.0
        unit.candidate.count.fill_(100)
        unit.candidate.batches.fill_(5)
    state = [t.clone() for t in (unit.candidate.stats, unit.candidate.count,
                                 unit.candidate.batches)]
    w0 = [p.detach().clone() for p in unit.candidate_parameters()]
    target = torch.randn(2, 6, 7, 7)
    errors = []
    y = unit(x)
    assert y.requires_grad  # every parameter but the candidate's is frozen
    y.register_hook(errors.append)
    F.mse_loss(y, target).backward()
    e = errors[0]
    # the reference: s from the trained dendrites, sign and mean_e from the state before the batch
    s = reference.dendrite_activations(x, unit.dendrite_weight, unit.dendrite_bias,
                                       unit.dendrite_cascade, **unit._conv_kw)
    s, cascade = (torch.stack(s), w0[2]) if d else (None, None)
    corr = reference.correlation(state[0])
    sign = torch.where(corr >= 0, 1.0, -1.0)
    stats, gw, gb, gc = reference.candidate_pass(x, *w0[:2], cascade, s, e, state[0][1].float(),
                                                 sign, **unit._conv_kw)
    torch.testing.assert_close(unit.candidate.weight.grad, gw, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(unit.candidate.bias.grad, gb, rtol=1e-4, atol=1e-7)
    if d:
        torch.testing.assert_close(unit.candidate.cascade.grad, gc, rtol=1e-4, atol=1e-7)
    else:
        assert unit.candidate.cascade.grad is None and unit.candidate.cascade.shape == (0, 6)
    n = e.numel() // e.shape[1]
    mean, count, batches = reference.update_running_stats(*state, stats, n, 1, 0.99)
    torch.testing.assert_close(unit.candidate.stats, mean, rtol=1e-5, atol=1e-9)
    assert float(unit.candidate.count) == float(count) and float(unit.candidate.batches) == 6
    # the score rose from 0, so the snapshot holds the weights that produced this batch
    score = reference.correlation(mean).abs().sum()
    torch.testing.assert_close(unit.candidate.best_score, score)
    assert torch.equal(unit.candidate.best_weight, w0[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_alphas_that_train_beside_a_candidate_get_their_gradient(backend):
    """PerforatedBackprop freezes everything but the candidates; a loop that leaves the alphas
    trainable still gets their gradient (the dendrites' own op) and the same candidate step."""
    grads = []
    for train_alpha in (False, True):
        unit, x = _candidate_unit(d=2, backend=backend)
        for a in unit.dendrite_alpha:
            a.requires_grad_(train_alpha)
        y = unit(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append([p.grad for p in unit.candidate_parameters()] +
                     [a.grad for a in unit.dendrite_alpha])
    (*cand, a0, a1), (*cand_t, a0_t, a1_t) = grads
    assert a0 is None and a1 is None
    for g, g_t in zip(cand, cand_t):
        torch.testing.assert_close(g_t, g)
    w = torch.linspace(-1, 1, y.numel()).view_as(y)
    s = torch.stack(reference.dendrite_activations(x, unit.dendrite_weight, unit.dendrite_bias,
                                                   unit.dendrite_cascade, **unit._conv_kw))
    for k, g in enumerate((a0_t, a1_t)):
        torch.testing.assert_close(g, (w * s[k]).sum((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_candidate_grads_accumulate_and_stay_off_without_grad():
    unit, x = _candidate_unit(d=0)
    target = torch.randn(2, 6, 7, 7)
    grads = []
    for _ in range(2):  # the same batch from the same (zero) running state: twice the gradient
        for t in (unit.candidate.stats, unit.candidate.count, unit.candidate.batches):
            t.zero_()
        F.mse_loss(unit(x), target).backward()
        grads.append(unit.candidate.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], 2 * grads[0], rtol=1e-5, atol=1e-7)
    batches = float(unit.candidate.batches)
    with torch.no_grad():
        unit(x)
    unit.eval()
    unit(x)
    assert float(unit.candidate.batches) == batches == 1


def test_adopt_candidate_becomes_dendrite_with_alpha_zero():
    unit, x = _candidate_unit(d=1)
    unit.warmup_batches = 0
    unit.eval()
    before = unit(x)
    unit.train()
    unit(x).square().sum().backward()  # takes a snapshot
    best = unit.candidate.best_weight.clone()
    with torch.no_grad():
        unit.candidate.weight.add_(1.0)  # the current weights differ from the snapshot
    unit.adopt_candidate()
    assert unit.num_dendrites == 2 and not unit.has_candidate
    assert torch.equal(unit.dendrite_weight[1], best)
    assert unit.dendrite_cascade.shape == (2, 2, unit.out_channels)
    assert torch.equal(unit.dendrite_alpha[1], torch.zeros(unit.out_channels))
    assert torch.equal(unit.eval()(x), before)


def test_state_dict_round_trip_rebuilds_dendrites_and_candidate():
    unit, x = _candidate_unit(d=3)
    unit(x).sum().backward()
    state = copy.deepcopy(unit.state_dict())
    conv, bn, _ = _unit("dense3x3", seed=5)
    fresh = DendriticConv2d(conv, bn)
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.num_dendrites == 3 and fresh.has_candidate
    for k, v in unit.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    fresh.eval(), unit.eval()
    assert torch.equal(fresh(x), unit(x))
    # a checkpoint with fewer dendrites and no candidate shrinks the unit again
    conv, bn, _ = _unit("dense3x3", seed=6)
    small = DendriticConv2d(conv, bn)
    small.add_dendrite()
    fresh.load_state_dict(small.state_dict())
    assert fresh.num_dendrites == 1 and not fresh.has_candidate


def test_state_dict_with_the_flat_candidate_keys_of_older_checkpoints_loads():
    """Checkpoints written before the candidate was a module of its own hold its state under
    ``candidate_weight``, ``candidate_stats``, ...: they load into ``unit.candidate``."""
    unit, x = _candidate_unit(d=2)
    unit(x).sum().backward()
    state = unit.state_dict()
    flat = {k.replace("candidate.", "candidate_"): v.clone() for k, v in state.items()}
    assert "candidate_best_score" in flat and not any("candidate." in k for k in flat)
    conv, bn, _ = _unit("dense3x3", seed=7)
    fresh = DendriticConv2d(conv, bn)
    result = fresh.load_state_dict(flat)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.has_candidate and fresh.num_dendrites == 2
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_double_precision_and_errors():
    conv, bn, x = _unit("pointwise")
    unit = DendriticConv2d(conv, bn).double()
    unit.add_dendrite()
    assert unit(x.double()).dtype == torch.float64
    with pytest.raises(TypeError, match="conv"):
        DendriticConv2d(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="bn"):
        DendriticConv2d(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match="linear"):
        DendriticLinear(nn.Conv2d(2, 3, 1))
    with pytest.raises(ValueError, match="padding_mode"):
        DendriticConv2d(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="cascade"):
        unit.add_dendrite(cascade=torch.zeros(3, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_input_gives_the_same_unit(backend):
    unit, x = _candidate_unit(d=2, backend=backend)
    target = torch.randn(2, 6, 7, 7)
    results = []
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        for t in (unit.candidate.stats, unit.candidate.count, unit.candidate.batches):
            t.zero_()
        unit.zero_grad()
        y = unit(xin)
        F.mse_loss(y, target).backward()
        results.append((y.detach(), unit.candidate.weight.grad.clone(),
                        unit.candidate.stats.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_to_channels_last_after_convert(backend):
    """model.to(memory_format=torch.channels_last) after pbp.convert: the 5-D dendrite weights
    (which channels_last alone cannot take) become D channels_last conv weights in place, and
    the unit computes what it did, candidate pass included."""
    unit, x = _candidate_unit(d=2, backend=backend)
    cl = copy.deepcopy(unit)
    before = {n: (p, p.shape) for n, p in cl.named_parameters()}
    assert cl.to(memory_format=torch.channels_last) is cl
    assert {n: (p, p.shape) for n, p in cl.named_parameters()} == before
    for k in range(2):
        assert cl.dendrite_weight[k].is_contiguous(memory_format=torch.channels_last)
    assert cl.conv.weight.is_contiguous(memory_format=torch.channels_last)
    target = torch.randn(2, 6, 7, 7)
    results = []
    for u, xin in ((unit, x), (cl, x.contiguous(memory_format=torch.channels_last))):
        y = u(xin)
        F.mse_loss(y, target).backward()
        results.append((y.detach(), u.candidate.weight.grad, u.candidate.stats))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    pbp_fast.convert(net)
    net.to(memory_format=torch.channels_last)  # no dendrites: 0 x 5-D
    for u in (net[0], net[3]):
        add_random_dendrites(u, 1)
    xn = torch.randn(2, 3, 6, 6)
    y = net.eval()(xn)
    torch.testing.assert_close(net.to(memory_format=torch.channels_last)(xn), y)
    torch.testing.assert_close(net.to(memory_format=torch.contiguous_format)(xn), y)
    assert net[0].dendrite_weight.is_contiguous()
    assert net[3].dendrite_weight.shape == (1, 2, 64, 1, 1)


def test_linear_candidate_on_leading_dims_matches_the_reference():
    torch.manual_seed(2)
    unit = DendriticLinear(nn.Linear(5, 3))
    unit.add_dendrite()
    unit.start_candidate()
    x = torch.randn(2, 4, 5)
    errors = []
    y = unit(x)
    y.register_hook(errors.append)
    y.square().sum().backward()
    x4, e4 = x.reshape(8, 5, 1, 1), errors[0].reshape(8, 3, 1, 1)
    s = torch.stack(reference.dendrite_activations(x4, unit.dendrite_weight, unit.dendrite_bias,
                                                   unit.dendrite_cascade, 1, 0, 1, 1))
    zeros = torch.zeros(3)
    _, gw, gb, gc = reference.candidate_pass(x4, unit.candidate.weight.detach(),
                                             unit.candidate.bias.detach(),
                                             unit.candidate.cascade.detach(), s, e4, zeros,
                                             zeros + 1)
    torch.testing.assert_close(unit.candidate.weight.grad, gw, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(unit.candidate.cascade.grad, gc, rtol=1e-4, atol=1e-7)


def test_same_padding_and_non_finite_error_batches():
    torch.manual_seed(3)
    unit = DendriticConv2d(nn.Conv2d(3, 4, 5, padding="same", dilation=2))
    add_random_dendrites(unit, 1)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(unit(x), _manual(unit, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="asymmetric"):
        DendriticConv2d(nn.Conv2d(3, 4, 4, padding="same"))
    unit.start_candidate()
    unit(x).sum().backward()
    state = unit.candidate.stats.clone()
    (unit(x) * float("inf")).sum().backward()  # e = inf: the running state is kept
    assert torch.equal(unit.candidate.stats, state) and float(unit.candidate.batches) == 1


def test_dendrite_phase_with_frozen_input_and_inplace_activation():
    torch.manual_seed(4)
    first = DendriticConv2d(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    second = DendriticConv2d(nn.Conv2d(4, 2, 1))
    model = nn.Sequential(first, nn.ReLU(inplace=True), second, nn.Hardswish(inplace=True))
    for unit in (first, second):
        unit.add_dendrite()
        unit.start_candidate()
    train_candidates_only(model, (first, second))
    model(torch.randn(2, 3, 5, 5)).square().mean().backward()
    for unit in (first, second):
        assert unit.candidate.weight.grad.abs().sum() > 0
        assert float(unit.candidate.batches) == 1


def test_linear_candidate_trains_behind_an_inplace_activation():
    """The candidate's backward node produces the tensor the unit returns, so an in-place op on
    a Linear's (..., Cout) output does not cut it off (MobileNetV3's classifier: Linear ->
    Hardswish(inplace))."""
    torch.manual_seed(5)
    first = DendriticLinear(nn.Linear(6, 5))
    second = DendriticLinear(nn.Linear(5, 3))
    model = nn.Sequential(first, nn.Hardswish(inplace=True), second, nn.ReLU(inplace=True))
    for unit in (first, second):
        unit.start_candidate()
    train_candidates_only(model, (first, second))
    model(torch.randn(4, 2, 6)).square().mean().backward()
    for unit in (first, second):
        assert unit.candidate.weight.grad is not None and unit.candidate.weight.grad.abs().sum() > 0
        assert float(unit.candidate.batches) == 1


def _dendrite_phase_net(backend, candidate_bn=False):
    """conv+BN, depthwise+BN and a Linear head, converted, with 0 or 1 trained dendrites and a
    candidate per unit (with ``candidate_bn`` a BatchNorm in each), everything else frozen (the
    controller's dendrite phase)."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
        nn.Hardswish(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    units = list(pbp_fast.convert(model).values())
    for i, unit in enumerate(units):
        unit.backend = backend
        unit.warmup_batches, unit.candidate_bn = 2, candidate_bn
        add_random_dendrites(unit, i % 2)
        unit.start_candidate()
    train_candidates_only(model, units)
    return model.train(), units


@pytest.mark.parametrize("backend,compiler", [
    # the fused ops (the reference's candidate pass calls torch.autograd.grad, which Dynamo
    # does not trace); Inductor's Triton path needs a GPU
    (b, c) for b in BACKENDS if b != "reference" for c in ("aot_eager", "inductor")
    if b != "triton" or c == "aot_eager"])
@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="tested from torch 2.13; torch 2.4's Dynamo refuses is_contiguous "
                           "inside an autograd.Function's backward (strict mode)")
@pytest.mark.parametrize("candidate_bn", [False, True])
def test_dendrite_phase_compiles_fullgraph_and_matches_eager(backend, compiler, candidate_bn):
    """torch.compile(fullgraph=True) traces a dendrite-phase step (the candidate pass and the
    running-statistics and snapshot updates run in the backward graph): three SGD steps give
    the candidates' weights, statistics and snapshots, and the BatchNorm statistics, of eager;
    with ``candidate_bn`` too (the fused pass around a BatchNorm)."""
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 5, (4,))
    states = []
    for compiled in (False, True):
        model, units = _dendrite_phase_net(backend, candidate_bn)
        net = torch.compile(model, fullgraph=True, backend=compiler) if compiled else model
        opt = torch.optim.SGD([p for u in units for p in u.candidate_parameters()], lr=0.5)
        losses = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert all(float(u.candidate.batches) == 3 for u in units)
        assert all(float(u.candidate.best_score) > 0 for u in units)
        states.append((torch.stack(losses), {k: v.clone() for k, v in model.state_dict().items()}))
    (loss_e, eager), (loss_c, comp) = states
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert eager.keys() == comp.keys()
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-6, msg=k)


# -- a BatchNorm inside the candidate (PBConfig.candidate_bn) ----------------------------------
def test_candidate_pass_bn_is_the_gradient_through_a_training_batchnorm():
    """reference.candidate_pass_bn against nn.BatchNorm2d in training mode written out: the
    gradients of every parameter (through the batch statistics) and the batch statistics that
    the running ones average."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    x, e = torch.randn(3, 4, 6, 6, **f64), torch.randn(3, 5, 6, 6, **f64)
    w, b = torch.randn(5, 4, 3, 3, **f64), torch.randn(5, **f64)
    casc, s = torch.randn(1, 5, **f64), torch.rand(1, 3, 5, 6, 6, **f64)
    mean_e, sign = e.mean((0, 2, 3)), torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], **f64)
    bn = nn.BatchNorm2d(5, momentum=1.0).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    params = [t.clone().requires_grad_() for t in (w, b, casc)]
    v = torch.sigmoid(bn(F.conv2d(x, params[0], params[1], padding=1))
                      + params[2].view(1, 5, 1, 1) * s[0])
    n = 3 * 36
    (-(sign.view(1, -1, 1, 1) * (e - mean_e.view(1, -1, 1, 1)) * v).sum() / n).backward()
    out = reference.candidate_pass_bn(x, w, b, casc, s, e, mean_e, sign, bn.weight.detach(),
                                      bn.bias.detach(), bn.eps, padding=1)
    stats, gw, gb, gc, gg, gbeta, mean, var = out
    for got, want in zip((gw, gb, gc, gg, gbeta), (*[p.grad for p in params], bn.weight.grad,
                                                   bn.bias.grad)):
        torch.testing.assert_close(got, want)
    assert gb.abs().max() < 1e-12  # a bias before a BatchNorm has no effect
    torch.testing.assert_close(mean, bn.running_mean)  # momentum 1: the batch's own
    torch.testing.assert_close(var, bn.running_var)
    torch.testing.assert_close(stats[0].double(), v.detach().sum((0, 2, 3)))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_candidate_with_batchnorm_fused_matches_reference_backend(backend, layout):
    """A dendrite-phase step of a unit whose candidate has a BatchNorm: the fused backend's
    gradients, running statistics and scores are the reference backend's."""
    units = []
    for b in ("reference", backend):
        unit, x = _candidate_unit(d=1, backend=b)
        unit.candidate_bn, unit.warmup_batches = True, 0
        unit.start_candidate()
        for p in unit.candidate_parameters():
            p.requires_grad_(True)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        for _ in range(2):
            unit(x).square().sum().backward()
        units.append(unit.candidate)
    ref, got = units
    for name in ("weight", "bias", "cascade", "bn_weight", "bn_bias"):
        torch.testing.assert_close(getattr(got, name).grad, getattr(ref, name).grad,
                                   rtol=1e-4, atol=1e-6, msg=name)
    for name in ("bn_mean", "bn_var", "stats", "best_score"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-4,
                                   atol=1e-6, msg=name)


def test_candidate_with_batchnorm_trains_and_is_adopted_folded():
    """A unit whose candidate has a BatchNorm: its parameters train, its running statistics
    follow the batches, the snapshot includes them, and the adopted dendrite is the candidate
    with its BatchNorm in eval mode, folded into the conv; checkpoints keep all of it."""
    unit, x = _candidate_unit(d=1)
    unit.candidate_bn, unit.warmup_batches = True, 0
    unit.start_candidate()
    cand = unit.candidate
    assert cand.bn and {"bn_weight", "bn_bias"} <= {n for n, _ in cand.named_parameters()}
    for p in unit.candidate_parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(unit.candidate_parameters(), lr=10.0)
    for _ in range(3):
        opt.zero_grad()
        unit(x).square().sum().backward()
        assert cand.bn_weight.grad is not None and cand.bn_weight.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(cand.bn_mean, torch.zeros_like(cand.bn_mean))
    assert float(cand.best_score) > 0  # a snapshot, of the BatchNorm's statistics too
    assert not torch.equal(cand.best_bn_var, torch.ones_like(cand.best_bn_var))
    state = copy.deepcopy(unit.state_dict())
    conv, bn, _ = _unit("dense3x3", seed=5)
    fresh = DendriticConv2d(conv, bn)
    assert not fresh.load_state_dict(state).missing_keys and fresh.candidate.bn
    w, b, c, g, beta, mean, var = (getattr(cand, "best_" + n) for n in
                                   ("weight", "bias", "cascade", "bn_weight", "bn_bias",
                                    "bn_mean", "bn_var"))
    unit.adopt_candidate()
    s_prev = reference.dendrite_activations(x, unit.dendrite_weight[:1], unit.dendrite_bias[:1],
                                            None, **unit._conv_kw)[0]
    want = torch.sigmoid(F.batch_norm(F.conv2d(x, w, b, **unit._conv_kw), mean, var, g, beta,
                                      False, 0.0, 1e-5) + c.view(1, -1, 1, 1) * s_prev)
    got = reference.dendrite_activations(x, unit.dendrite_weight, unit.dendrite_bias,
                                         unit.dendrite_cascade, **unit._conv_kw)[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
