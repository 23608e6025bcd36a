"""Bad input raises ValueError / TypeError naming the argument (every backend shares the checks)."""
import pytest
import torch

import pbp_fast
from pbp_fast import functional as Fn


def good():
    return dict(x=torch.randn(2, 4, 6, 6), weight=torch.randn(8, 2, 3, 3), bias=torch.randn(8),
                d_weight=torch.randn(2, 8, 2, 3, 3), d_bias=torch.randn(2, 8),
                d_scale=torch.randn(2, 8), d_cascade=torch.randn(2, 2, 8))


CONV = dict(padding=1, groups=2)


def call(over=None, **conv):
    a = good()
    a.update(over or {})
    return Fn.dendritic_conv2d(a["x"], a["weight"], a["bias"], a["d_weight"], a["d_bias"],
                               a["d_scale"], a["d_cascade"], **{**CONV, **conv})


@pytest.mark.parametrize("backend", pbp_fast.backends()[:2])
def test_good_input_runs(backend):
    assert call(backend=backend).shape == (2, 8, 6, 6)


@pytest.mark.parametrize("over, exc, words", [
    (dict(x=torch.randn(4, 6, 6)), ValueError, "x must have 4 dimensions"),
    (dict(x=torch.randn(2, 4, 6, 6).int()), TypeError, "x must be a floating-point"),
    (dict(x=torch.randn(2, 6, 6, 4).permute(0, 3, 2, 1)), ValueError, "x must be contiguous"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(weight=torch.randn(8, 4, 3, 3)), ValueError, "d_weight must have shape (D, *weight"),
    (dict(d_weight=torch.randn(2, 8, 2, 3)), ValueError, "d_weight must have 5 dimensions"),
    (dict(bias=torch.randn(7)), ValueError, "bias must have shape (8,)"),
    (dict(d_bias=torch.randn(3, 8)), ValueError, "d_bias must have shape (2, 8)"),
    (dict(d_scale=torch.randn(3, 8)), ValueError, "d_scale has 3 dendrites but d_weight has 2"),
    (dict(d_scale=None), TypeError, "d_scale must be a tensor"),
    (dict(d_cascade=torch.randn(2, 8)), ValueError, "d_cascade must have 3 dimensions"),
    (dict(d_cascade=torch.randn(2, 3, 8)), ValueError, "d_cascade must have shape (2, 2, 8)"),
    (dict(weight=torch.randn(8, 2, 3, 3).double()), TypeError, "weight has dtype torch.float64"),
    (dict(d_scale=torch.randn(2, 8).double()), TypeError, "d_scale has dtype"),
    (dict(weight=None), ValueError, "bias is given without weight"),
    (dict(d_bias=torch.randn(2, 8, device="meta")), ValueError, "d_bias is on meta but x is on"),
])
def test_bad_tensors(over, exc, words):
    with pytest.raises(exc) as info:
        call(over)
    assert words in str(info.value)


@pytest.mark.parametrize("conv, exc, words", [
    (dict(groups=3), ValueError, "groups=3 must divide"),
    (dict(groups=0), TypeError, "groups must be a positive int"),
    (dict(stride=0), ValueError, "stride and dilation must be >= 1"),
    (dict(padding=-1), ValueError, "padding >= 0"),
    (dict(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
    (dict(padding=0, dilation=4), ValueError, "too small for kernel"),
    (dict(backend="cuda"), ValueError, "backend must be 'auto', 'reference', 'cpp' or 'triton'"),
    (dict(backend="triton"), ValueError, "not available here"),
])
def test_bad_conv_arguments(conv, exc, words):
    if conv.get("backend") == "triton" and "triton" in pbp_fast.backends():
        pytest.skip("triton is available here")
    with pytest.raises(exc) as info:
        call(**conv)
    assert words in str(info.value)


def test_wrong_in_channels_per_group():
    a = good()
    with pytest.raises(ValueError, match="in_channels / groups = 2"):
        Fn.dendritic_conv2d(a["x"], None, None, torch.randn(1, 8, 4, 3, 3), None,
                            torch.randn(1, 8), padding=1, groups=2)


def test_nothing_to_compute():
    with pytest.raises(ValueError, match="nothing to compute"):
        Fn.dendritic_conv2d(torch.randn(1, 2, 4, 4), None, None, torch.randn(0, 2, 2, 1, 1), None,
                            torch.randn(0, 2))


def test_base_shape_checked():
    a = good()
    with pytest.raises(ValueError, match=r"base must have shape \(2, 8, 6, 6\)"):
        Fn.dendritic_conv2d(a["x"], None, None, a["d_weight"], None, a["d_scale"],
                            base=torch.randn(2, 8, 5, 5), **CONV)


def test_candidate_pass_errors():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3)
    e = torch.randn(2, 4, 6, 6)
    m, s = torch.zeros(4), torch.ones(4)
    conv = dict(padding=1, groups=4)
    with pytest.raises(ValueError, match=r"e must have shape \(2, 4, 6, 6\)"):
        Fn.candidate_pass(x, w, None, None, None, e[:, :, :5], m, s, **conv)
    with pytest.raises(ValueError, match="cascade and s must be given together"):
        Fn.candidate_pass(x, w, None, torch.randn(1, 4), None, e, m, s, **conv)
    with pytest.raises(ValueError, match=r"mean_e must have shape \(4,\)"):
        Fn.candidate_pass(x, w, None, None, None, e, torch.zeros(3), s, **conv)
    with pytest.raises(TypeError, match="sign has dtype"):
        Fn.candidate_pass(x, w, None, None, None, e, m, s.double(), **conv)
    with pytest.raises(ValueError, match=r"s must have shape \(1, 2, 4, 6, 6\)"):
        Fn.candidate_pass(x, w, None, torch.randn(1, 4), torch.rand(1, 2, 4, 5, 6), e, m, s,
                          **conv)
