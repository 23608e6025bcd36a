import pytest
import torch

import pbp_fast


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


needs_cpp = pytest.mark.skipif("cpp" not in pbp_fast.backends(),
                               reason="the compiled extension pbp_fast._C is not built")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread (threads only add contention, and the results do
    not depend on the thread count); modules opt in with pytest.mark.usefixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
