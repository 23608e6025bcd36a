"""The fused candidate pass and the running statistics against the reference math."""
import pytest
import torch

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


@needs_cpp
@pytest.mark.parametrize("seed", range(24))
def test_candidate_pass_matches_reference(seed):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        args, conv = candidate_case(seed, dtype)
        ref = Fn.candidate_pass(*args, backend="reference", **conv)
        out = Fn.candidate_pass(*args, backend="cpp", **conv)
        for name, a, b in zip(("stats", "grad_weight", "grad_bias", "grad_cascade"), out, ref):
            scale = 1 + b.abs().max().item() if b.numel() else 1
            torch.testing.assert_close(a, b, atol=max(tol, 1e-6) * scale, rtol=tol, msg=name)


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


def test_correlation_is_pearson_like_covariance():
    v = torch.rand(1000, 2, dtype=torch.float64)
    e = torch.randn(1000, 2, dtype=torch.float64) + 3 * v
    mean = torch.stack([v.mean(0), e.mean(0), (v * e).mean(0), (e * e).mean(0)])
    cov = ((v - v.mean(0)) * (e - e.mean(0))).mean(0)
    torch.testing.assert_close(R.correlation(mean), cov / e.std(0, unbiased=False))


@needs_cpp
def test_opcheck_candidate_pass():
    for seed in (0, 1, 2, 5, 7, 9):  # 7, 9: a dense / grouped 3x3 or 5x5 conv, channels_last
        args, conv = candidate_case(seed, torch.float64)
        c = [[conv["stride"]] * 2, [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"]]
        torch.library.opcheck(torch.ops.pbp_fast.candidate_pass.default, (*args, *c))
