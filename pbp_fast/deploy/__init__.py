"""Deployment: a trained (dendritic) model to plain, small, fast inference files.

    fold.py       fold(model): BatchNorms into the weights, units into plain layers
    onnx.py       export_onnx, verify_onnx (against PyTorch with ONNX Runtime), onnx_session
    quantize.py   float16, dynamic int8 and static int8 (calibrated) ONNX files
    distill.py    knowledge distillation from a trained teacher (a training loss)
    report.py     export_variants + report_model: the files and their size / latency / accuracy

    folded = pbp.deploy.fold(model)                 # nn.Module: conv, sigmoid, mul, add only
    path = pbp.deploy.export_onnx(model, "model.onnx", torch.randn(1, 3, 32, 32))
    pbp.deploy.verify_onnx(path, model, images)     # ONNX Runtime vs PyTorch, raises if apart

``pbp-fast export`` (:mod:`pbp_fast.cli.export`) runs all of it on a checkpoint.
"""
from pbp_fast.deploy.fold import FoldedDendriticUnit, fold
from pbp_fast.deploy.onnx import (DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, export_onnx,
                                  onnx_session, verify_onnx)

__all__ = ["fold", "FoldedDendriticUnit", "export_onnx", "onnx_session", "verify_onnx",
           "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME"]
