import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run on the CPU interpreter (tiny grids)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F
from torch import nn

import pbp_fast


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


needs_cpp = pytest.mark.skipif("cpp" not in pbp_fast.backends(),
                               reason="the compiled extension pbp_fast._C is not built")
needs_triton = pytest.mark.skipif("triton" not in pbp_fast.backends(),
                                  reason="Triton is not installed (or torch lacks triton_op)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread (threads only add contention, and the results do
    not depend on the thread count); modules opt in with pytest.mark.usefixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomise_bn(bn):
    """Non-trivial affine and running statistics (in place); returns bn."""
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def add_random_dendrites(unit, d):
    """d dendrites with a random cascade and random alphas (trained-looking, not alpha = 0);
    returns the unit."""
    for _ in range(d):
        unit.add_dendrite(cascade=torch.randn(unit.num_dendrites, unit.out_channels))
    with torch.no_grad():
        for a in unit.dendrite_alpha:
            a.uniform_(-1, 1)
    return unit


def train_candidates_only(model, units):
    """The dendrite phase's trainable set: every parameter frozen but the units' candidates."""
    for p in model.parameters():
        p.requires_grad_(False)
    for unit in units:
        for p in unit.candidate_parameters():
            p.requires_grad_(True)


class DSBlock(nn.Module):
    """Residual depthwise-separable block: x + BN(pw(relu(BN(dw(x)))))."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn2(self.pw(F.relu(self.bn1(self.dw(x)))))
