"""pbp_fast.kernels: the Triton backend (installed from the repository's kernels/).

``dendritic`` holds the @triton.jit kernels, ``ops`` their launchers, registered as the ops
``torch.ops.pbp_fast.triton_*`` (``torch.library.triton_op``: torch.compile traces into them) and
as the CUDA kernels of the C++ ops of csrc/ops.cpp.  ``import pbp_fast.kernels.ops`` registers
them; ``pbp_fast.functional`` does so on first use of ``backend="triton"``.
"""
