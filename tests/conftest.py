import pytest
import torch

import pbp_fast


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


needs_cpp = pytest.mark.skipif("cpp" not in pbp_fast.backends(),
                               reason="the compiled extension pbp_fast._C is not built")
