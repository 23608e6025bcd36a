"""The fused candidate pass and the running statistics against the reference math."""
import pytest
import torch

import pbp_fast
from conftest import needs_cpp
from pbp_fast import functional as Fn
from pbp_fast import reference as R
from test_ops import random_case


def candidate_case(seed, dtype):
    t, conv = random_case(seed, dtype)
    x, w = t["x"], t["d_weight"]
    w = torch.randn(w.shape[1:], dtype=dtype) * 0.5
    y_shape = torch.nn.functional.conv2d(x, w, None, **conv).shape
    d = t["d_scale"].shape[0]
    s = torch.rand((d,) + tuple(y_shape), dtype=dtype) if d else None
    casc = torch.randn(d, w.shape[0], dtype=dtype) if d else None
    e = torch.randn(y_shape, dtype=dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        e = e.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(w.shape[0], dtype=dtype) if seed % 2 else None
    mean_e = torch.randn(w.shape[0], dtype=dtype) * 0.1
    sign = torch.where(torch.rand(w.shape[0]) < 0.5, -1.0, 1.0).to(dtype)
    return (x, w, bias, casc, s, e, mean_e, sign), conv


def assert_cpp_matches_reference(args, conv, tol):
    ref = Fn.candidate_pass(*args, backend="reference", **conv)
    out = Fn.candidate_pass(*args, backend="cpp", **conv)
    for name, a, b in zip(("stats", "grad_weight", "grad_bias", "grad_cascade"), out, ref):
        scale = 1 + b.abs().max().item() if b.numel() else 1
        torch.testing.assert_close(a, b, atol=max(tol, 1e-6) * scale, rtol=tol, msg=name)


@needs_cpp
@pytest.mark.parametrize("seed", range(24))
def test_candidate_pass_matches_reference(seed):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        assert_cpp_matches_reference(*candidate_case(seed, dtype), tol)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride,dilation,k", [(1, 1, 3), (2, 1, 3), (1, 2, 5), (2, 1, 1)])
def test_depthwise_nhwc_candidate_pixel_blocks_and_channel_tails(stride, dilation, k, dtype):
    """The channels_last depthwise candidate pass on wide rows (blocks of pixels and single
    border pixels, runs of partial sums across rows) and 45 channels (vector blocks and single
    channels in both dtypes), two trained dendrites below it."""
    g = torch.Generator().manual_seed(k)
    c, d = 45, 2

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    x = rnd(3, c, 6, 23).contiguous(memory_format=torch.channels_last)
    conv = dict(stride=stride, padding=(k // 2) * dilation, dilation=dilation, groups=c)
    w = rnd(c, 1, k, k) * 0.5
    y_shape = torch.nn.functional.conv2d(x, w, None, **conv).shape
    s = torch.rand((d,) + tuple(y_shape), generator=g, dtype=dtype)
    s = torch.stack([t.contiguous(memory_format=torch.channels_last) for t in s])
    e = rnd(*y_shape).contiguous(memory_format=torch.channels_last)
    args = (x, w, rnd(c), rnd(d, c), s, e, rnd(c) * 0.1, torch.sign(rnd(c)))
    assert_cpp_matches_reference(args, conv, 1e-5 if dtype == torch.float32 else 1e-10)


def test_candidate_gradient_is_the_correlation_objective():
    """grad_v = -sign (e - mean_e) / n, so a step against the gradient raises sign * cov."""
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    mean_e, sign = e.mean((0, 2, 3)), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    v = R.candidate_activation(x, w, None, None, None, 1, 1, 1, 3)
    loss = -(sign.view(1, -1, 1, 1) * (e - mean_e.view(1, -1, 1, 1)) * v).sum() / (4 * 64)
    (gw,) = torch.autograd.grad(loss, w)
    _, gw_ref, _, _ = R.candidate_pass(x, w, None, None, None, e, mean_e, sign, 1, 1, 1, 3)
    torch.testing.assert_close(gw_ref, gw)


def test_running_stats_cumulative_then_ema():
    c = 3
    mean = torch.zeros(4, c, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    batches = torch.zeros((), dtype=torch.float64)
    rows = []
    for i in range(6):
        sums = torch.randn(4, c, dtype=torch.float64) * 10
        n = 5 + i
        rows.append((sums, n))
        mean, count, batches = R.update_running_stats(mean, count, batches, sums, n,
                                                      warmup_batches=3, momentum=0.9)
        if i == 2:  # cumulative: the exact mean of everything seen
            exact = sum(s for s, _ in rows) / sum(n for _, n in rows)
            torch.testing.assert_close(mean, exact)
    expect = sum(s for s, _ in rows[:3]) / sum(n for _, n in rows[:3])
    for sums, n in rows[3:]:
        expect = 0.9 * expect + 0.1 * sums / n
    torch.testing.assert_close(mean, expect)
    assert batches.item() == 6 and count.item() == sum(n for _, n in rows)


def _means(v, e, dims):
    return torch.stack([v.mean(dims), e.mean(dims), (v * e).mean(dims), (e * e).mean(dims),
                        (v * v).mean(dims)])


def test_correlation_is_normalised_covariance_or_pearson():
    v = torch.rand(1000, 2, dtype=torch.float64) * torch.tensor([1.0, 0.1], dtype=torch.float64)
    e = torch.randn(1000, 2, dtype=torch.float64) + 3 * v
    mean = _means(v, e, 0)
    cov = ((v - v.mean(0)) * (e - e.mean(0))).mean(0)
    torch.testing.assert_close(R.correlation(mean), cov / e.std(0, unbiased=False))
    r = torch.stack([torch.corrcoef(torch.stack([v[:, c], e[:, c]]))[0, 1] for c in range(2)])
    torch.testing.assert_close(R.correlation(mean, pearson=True), r)
    # Pearson's r does not grow with v's spread; the covariance does
    scaled = _means(10 * v, e, 0)
    torch.testing.assert_close(R.correlation(scaled, pearson=True), r)
    torch.testing.assert_close(R.correlation(scaled), 10 * R.correlation(mean))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["pointwise", "dense3x3", "depthwise3x3"])
def test_candidate_on_1x1_maps(dtype, kind):
    """A candidate on 1x1 maps (a Linear unit, a squeeze-excitation layer; a 3x3 conv with
    padding 1 on a 1x1 map sees its centre tap only): (N, C, 1, 1) tensors are both NCHW- and
    channels_last-contiguous, and the kernels run their channels_last lines on them."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    cin, cout, k, groups = {"pointwise": (12, 7, 1, 1), "dense3x3": (12, 7, 3, 1),
                            "depthwise3x3": (7, 7, 3, 7)}[kind]
    x, w, e = rnd(9, cin, 1, 1), rnd(cout, cin // groups, k, k) * 0.5, rnd(9, cout, 1, 1)
    s = torch.rand(2, 9, cout, 1, 1, generator=g, dtype=dtype)
    args = (x, w, rnd(cout), rnd(2, cout), s, e, rnd(cout) * 0.1, torch.sign(rnd(cout)))
    conv = dict(padding=k // 2, groups=groups)
    assert_cpp_matches_reference(args, conv, 1e-5 if dtype == torch.float32 else 1e-10)


def candidate_bn_case(seed, dtype):
    """A candidate_case with a BatchNorm: gamma around 1, beta around 0, eps."""
    args, conv = candidate_case(seed, dtype)
    g = torch.Generator().manual_seed(seed)
    c = args[1].shape[0]
    gamma = (0.5 + torch.rand(c, generator=g, dtype=torch.float64)).to(dtype)
    beta = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    return (*args, gamma, beta, 1e-5), conv


BN_OUTPUTS = ("stats", "grad_weight", "grad_bias", "grad_cascade", "grad_bn_weight",
              "grad_bn_bias", "mean", "var")


def assert_bn_pass_matches_reference(args, conv, backend, tol, device="cpu"):
    ref = Fn.candidate_pass_bn(*args, backend="reference", **conv)
    out = Fn.candidate_pass_bn(*(a.to(device) if isinstance(a, torch.Tensor) else a
                                 for a in args), backend=backend, **conv)
    for name, a, b in zip(BN_OUTPUTS, out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = 1 + b.abs().max().item() if b.numel() else 1
        # grad_bias is 0 up to rounding (a bias before a BatchNorm has no effect)
        atol = max(tol, 1e-6) * (scale if name != "grad_bias" else 10 * scale)
        torch.testing.assert_close(a.cpu(), b, atol=atol, rtol=tol, msg=name)


@needs_cpp
@pytest.mark.parametrize("seed", range(16))
def test_candidate_pass_bn_matches_reference(seed):
    """The fused candidate pass of a candidate with a BatchNorm (normalisation, fused epilogue,
    the BatchNorm's backward) against autograd through F.batch_norm."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        assert_bn_pass_matches_reference(*candidate_bn_case(seed, dtype), "cpp", tol)


@needs_cpp
def test_candidate_epilogue_is_the_pass_after_the_conv():
    """candidate_epilogue on z = conv(x) + bias gives candidate_pass's sums and, through the
    conv's weight gradient, its weight gradient; dL/dz in z's layout."""
    for seed in (0, 1, 7, 9):
        (x, w, b, casc, s, e, mean_e, sign), conv = candidate_case(seed, torch.float64)
        ref = Fn.candidate_pass(x, w, b, casc, s, e, mean_e, sign, backend="reference", **conv)
        z = torch.nn.functional.conv2d(x, w, b, **conv)
        sums, g = torch.ops.pbp_fast.candidate_epilogue(z, casc, s, e, mean_e, sign)
        d = 0 if casc is None else casc.shape[0]
        assert sums.shape == (6 + d, w.shape[0]) and sums.dtype == torch.float64
        assert Fn.is_channels_last(g) == Fn.is_channels_last(z)
        torch.testing.assert_close(sums[:5].float(), ref[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sums[5], ref[2], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sums[6:], ref[3], rtol=1e-10, atol=1e-12)
        c = [conv["stride"], conv["padding"], conv["dilation"]]
        gw = torch.ops.aten.convolution_backward(g, x, w, None, *[[v] * 2 for v in c], False,
                                                 [0, 0], conv["groups"],
                                                 [False, True, False])[1]
        torch.testing.assert_close(gw, ref[1], rtol=1e-10, atol=1e-12)


def test_candidate_pass_bn_errors_name_the_argument():
    args, conv = candidate_bn_case(0, torch.float32)
    *head, gamma, beta, eps = args
    with pytest.raises(ValueError, match="bn_weight"):
        Fn.candidate_pass_bn(*head, gamma[:-1], beta, eps, **conv)
    with pytest.raises(TypeError, match="bn_bias"):
        Fn.candidate_pass_bn(*head, gamma, None, eps, **conv)
    with pytest.raises(TypeError, match="bn_bias"):
        Fn.candidate_pass_bn(*head, gamma, beta.double(), eps, **conv)
    for bad, err in ((0.0, ValueError), (-1e-5, ValueError), (float("nan"), ValueError),
                     ("1e-5", TypeError), (True, TypeError)):
        with pytest.raises(err, match="eps"):
            Fn.candidate_pass_bn(*head, gamma, beta, bad, **conv)


@needs_cpp
def test_opcheck_candidate_pass():
    for seed in (0, 1, 2, 5, 7, 9):  # 7, 9: a dense / grouped 3x3 or 5x5 conv, channels_last
        args, conv = candidate_case(seed, torch.float64)
        c = [[conv["stride"]] * 2, [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"]]
        torch.library.opcheck(torch.ops.pbp_fast.candidate_pass.default, (*args, *c))
        z = torch.nn.functional.conv2d(*args[:3], **conv)
        torch.library.opcheck(torch.ops.pbp_fast.candidate_epilogue.default, (z, *args[3:]))


STATE_BACKENDS = pbp_fast.backends()  # "triton" on the CPU interpreter without a GPU


def _candidate_state(seed, c, batches, per_channel=False):
    """Running means of a plausible candidate (v in (0, 1), e ~ N(0, 1)) after ``batches``
    batches, with its count and best score (per channel: some channels above their score, some
    below)."""
    g = torch.Generator().manual_seed(seed)
    v, e = torch.rand(4, 50, c, generator=g, dtype=torch.float64), \
        torch.randn(4, 50, c, generator=g, dtype=torch.float64)
    mean = _means(v, e, (0, 1))
    count = torch.tensor(200.0 * batches, dtype=torch.float64)
    best = torch.tensor(float(R.correlation(mean).abs().sum()) * (0.8 + 0.4 * (seed % 2)),
                        dtype=torch.float64)
    if per_channel:
        best = R.correlation(mean).abs() * (0.8 + 0.4 * (torch.arange(c) % 2))
    return mean, count, torch.tensor(float(batches), dtype=torch.float64), best


def _batch_sums(seed, c, n):
    g = torch.Generator().manual_seed(100 + seed)
    v = torch.rand(n, c, generator=g, dtype=torch.float64)
    e = torch.randn(n, c, generator=g, dtype=torch.float64) + (seed % 3) * v
    return torch.stack([v.sum(0), e.sum(0), (v * e).sum(0), (e * e).sum(0),
                        (v * v).sum(0)]).float()


@pytest.mark.parametrize("backend", STATE_BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["unit", "channel"])
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("pearson", [False, True], ids=["cov", "pearson"])
def test_candidate_update_matches_reference(backend, per_channel, seed, pearson):
    """The fused bookkeeping op against reference.candidate_update, in place: cumulative
    (batches < warmup) and EMA regimes, improving and not, a non-finite batch and an empty one
    (state unchanged), channel counts beyond one Triton block; one score for the unit (0-dim
    best_score) or one per channel; either score."""
    c = (3, 40, 1500)[seed % 3]
    batches = (0, 9, 10, 30)[seed % 4]  # 9, 10: the last cumulative batch, the first EMA one
    sums, n = _batch_sums(seed, c, 64), 64
    state = list(_candidate_state(seed, c, batches, per_channel))
    if pearson:  # best scores on Pearson's scale
        r, cov = (R.correlation(state[0], p).abs() for p in (True, False))
        state[3] = state[3] * (r / cov if per_channel else r.sum() / cov.sum())
    if seed == 5:
        sums[2, c // 2] = float("nan")
    if seed == 6:  # nothing seen yet, after the warm-up: a score of 0 is no improvement on 0
        n = 0
        state = [torch.zeros_like(t) for t in state[:2]] + [state[2], torch.zeros_like(state[3])]
    *want, better_ref = R.candidate_update(*state, sums, n, 10, 0.99, 0.1, pearson)
    got = [t.clone() for t in state]
    better = Fn.candidate_update(*got, sums, n, warmup_batches=10, momentum=0.99,
                                 threshold=0.1, pearson=pearson, backend=backend)
    assert better.dtype == torch.bool and better.shape == state[3].shape
    assert torch.equal(better, better_ref)
    if per_channel and seed not in (5, 6) and batches >= 9:  # some channels improve, not all
        assert 0 < int(better.sum()) < c
    for name, a, b in zip(("mean", "count", "batches", "best_score"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    if seed in (5, 6):  # the state is as it was
        for a, b in zip(got[:3], state[:3]):
            assert torch.equal(a, b)


def test_candidate_update_decides_snapshots():
    """From zero state: no snapshot during the warm-up batches, then one as soon as the score
    beats the best by more than the threshold; the best score follows."""
    c = 5
    state = [torch.zeros(5, c, dtype=torch.float64)] + [torch.zeros((), dtype=torch.float64)
                                                         for _ in range(3)]
    decisions = []
    for i in range(4):
        decisions.append(bool(Fn.candidate_update(*state, _batch_sums(1, c, 32), 32,
                                                  warmup_batches=3, threshold=0.1)))
    assert decisions == [False, False, True, False]  # same batch again: no 10 % gain
    torch.testing.assert_close(state[3], R.correlation(state[0]).abs().sum())


@pytest.mark.parametrize("backend", STATE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_candidate_objective_matches_reference(backend, dtype):
    mean = _candidate_state(3, 40, 5)[0]
    mean[:, 0] = 0.0  # C = 0: sign +1
    mean_e, sign = Fn.candidate_objective(mean, dtype, backend=backend)
    want_e, want_sign = R.candidate_objective(mean, dtype)
    assert mean_e.dtype == sign.dtype == dtype and sign[0] == 1
    assert torch.equal(sign, want_sign)
    # bfloat16: Triton's interpreter rounds float32 -> bfloat16 towards zero (one ulp)
    tol = dict(rtol=2 ** -7, atol=0) if dtype == torch.bfloat16 else dict(rtol=0, atol=0)
    torch.testing.assert_close(mean_e, want_e, **tol)


def test_candidate_state_errors_name_the_argument():
    mean, count, batches, best = _candidate_state(0, 4, 2)
    sums = _batch_sums(0, 4, 8)
    with pytest.raises(ValueError, match="mean must be a contiguous float64"):
        Fn.candidate_update(mean.float(), count, batches, best, sums, 8)
    with pytest.raises(ValueError, match="batches must be"):
        Fn.candidate_update(mean, count, batches.view(1), best, sums, 8)
    with pytest.raises(ValueError, match="sums must have shape"):
        Fn.candidate_update(mean, count, batches, best, sums[:, :3], 8)
    with pytest.raises(ValueError, match="n must be a number or a 0-dim tensor"):
        Fn.candidate_update(mean, count, batches, best, sums, torch.ones(2))
    with pytest.raises(ValueError, match=r"best_score must be .* shape \(4,\)"):
        Fn.candidate_update(mean, count, batches, best.expand(3).contiguous(), sums, 8)
    with pytest.raises(ValueError, match="mean must be a contiguous float64"):
        Fn.candidate_objective(mean.t().contiguous().t(), torch.float32)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        Fn.candidate_objective(mean, torch.int32)


@needs_cpp
def test_opcheck_candidate_state_ops():
    mean, count, batches, best = _candidate_state(1, 6, 12)
    sums = _batch_sums(1, 6, 16)
    n = torch.tensor(16.0, dtype=torch.float64)
    torch.library.opcheck(torch.ops.pbp_fast.candidate_objective.default,
                          (mean, torch.float32))
    for best_score in (best, _candidate_state(1, 6, 12, per_channel=True)[3]):
        for pearson in (False, True):
            torch.library.opcheck(torch.ops.pbp_fast.candidate_update.default,
                                  (mean, count, batches, best_score, sums, n, 10, 0.99, 0.1,
                                   pearson))


@pytest.mark.parametrize("backend", STATE_BACKENDS)
def test_per_channel_snapshots_take_only_the_improved_channels(backend):
    """Candidate(per_channel=True): a channel's weight row, bias and cascade column are
    snapshotted when its own |C_c| improves; the other channels keep their earlier snapshot."""
    from pbp_fast.core.candidate import Candidate
    c = 40
    g = torch.Generator().manual_seed(0)
    w, b, k = (torch.randn(*shape, generator=g) for shape in ((c, 3, 3, 3), (c,), (2, c)))
    cand = Candidate(w.clone(), b.clone(), k.clone(), per_channel=True)
    state = _candidate_state(4, c, 30, per_channel=True)
    for buf, value in zip((cand.stats, cand.count, cand.batches, cand.best_score), state):
        buf.copy_(value)
    with torch.no_grad():
        for p in cand.parameters():
            p.add_(1.0)  # the current weights differ from the snapshot
    cand.update(_batch_sums(4, c, 64), 64, warmup_batches=10, momentum=0.99, threshold=0.1,
                backend=backend)
    improved = cand.best_score != state[3]
    assert 0 < int(improved.sum()) < c
    assert torch.equal(cand.best_weight, torch.where(improved.view(-1, 1, 1, 1), w + 1, w))
    assert torch.equal(cand.best_bias, torch.where(improved, b + 1, b))
    assert torch.equal(cand.best_cascade, torch.where(improved, k + 1, k))
    assert float(cand.score()) == pytest.approx(float(cand.best_score.sum()))
