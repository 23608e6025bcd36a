"""pbp_fast.kernels: the Triton backend (installed from the repository's kernels/).

One file per op family, each reading top to bottom (@triton.jit kernels, then their launchers,
registered with ``torch.library.triton_op`` as ``torch.ops.pbp_fast.triton_*`` and, on a CUDA
machine, as the CUDA kernels of the C++ ops of csrc/ops.cpp):

    dendritic_conv2d.py   the dendritic conv's forward and backward
    candidate.py          the candidate pass and its bookkeeping
    common.py             what both share: tile addressing, the conv tiles, launch helpers

Importing a family registers its ops; ``pbp_fast.ops.triton_ops()`` imports both.
"""
