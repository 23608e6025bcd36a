"""Size and batch-1 latency of a CIFAR MobileNet with 0..3 dendrites per unit, as deployed by
``pbp-fast export`` (fold, ONNX, float16, int8): the numbers that do not depend on training.

Each unit gets D dendrites with small nonzero alphas (so that none is folded away), and the
int8 variant is calibrated on real CIFAR-10 training images when ``--data`` is given (random
inputs otherwise: latency and size do not depend on it).  Accuracy needs a trained checkpoint:
``pbp-fast export CHECKPOINT``.

    python bench/deploy_mobilenet.py --model mobilenet_v3_small --dendrites 0 1 2 3 \\
        --data ../shared/data/cifar10_jpeg_train.npz
"""
import argparse
import tempfile
from pathlib import Path

import torch

import pbp_fast as pbp
from pbp_fast.cli.export import parse_threads
from pbp_fast.deploy import report as export


def dendritic_model(name: str, width: float, d: int, seed: int = 0):
    torch.manual_seed(seed)
    model = pbp.models.create_model(name, width_mult=width, num_classes=10)
    for unit in pbp.convert(model).values():
        for _ in range(d):
            unit.add_dendrite(cascade=0.1 * torch.randn(unit.num_dendrites, unit.out_channels))
        with torch.no_grad():
            for a in unit.dendrite_alpha:
                a.uniform_(-0.1, 0.1)
    return model.eval()


def calibration_batches(data, n: int):
    if data is None:
        return [torch.randn(32, 3, 32, 32) for _ in range(max(1, n // 32))]
    from pbp_fast.recipe import data as data_mod
    train = data_mod.cifar10(data, train=True, download=False)
    subset = train.subset(data_mod.stratified_order(train.labels.numpy(), 0)[:n])
    return list(data_mod.BatchLoader(subset, 32))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v3_small", choices=sorted(pbp.models.MODELS))
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--dendrites", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--data", default=None, help="CIFAR-10 for the int8 calibration images")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--threads", default="1,all")
    args = p.parse_args(argv)
    calib = calibration_batches(args.data, args.calibration_images)
    example = calib[0][0][:1] if isinstance(calib[0], (tuple, list)) else calib[0][:1]
    threads = parse_threads(args.threads)
    print(export.machine())
    for d in args.dendrites:
        model = dendritic_model(args.model, args.width_mult, d)
        count = pbp.count_parameters(model)
        with tempfile.TemporaryDirectory() as tmp:
            paths = export.export_variants(model, Path(tmp), example, calibration=calib,
                                           variants=tuple(export.FILES), check_inputs=example)
            rows = export.report_model(model, paths, example, threads=threads, runs=args.runs)
        print(f"\n{args.model} x{args.width_mult:g}, {d} dendrite(s) per unit: "
              f"{count.total:,} parameters; batch 1, median of {args.runs} runs")
        print(export.format_report(rows))


if __name__ == "__main__":
    main()
