"""pbp_fast.kernels: Triton kernels for CUDA devices (installed from the repository's kernels/).

Each kernel module registers its launchers behind the ``torch.ops.pbp_fast`` schemas of
csrc/ops.cpp; until a CUDA kernel exists for an op, CUDA tensors run the reference path.
"""
