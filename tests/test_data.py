"""Data loading (both CIFAR-10 formats, digits), splits, the device batch loader, and the batched
augmentations."""
import pickle
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pbp_fast.recipe import augment, data

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"
CLASSES = [f"class{i}" for i in range(10)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth_images(n, seed):
    """Low-frequency random RGB images: they survive JPEG with small error."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 3, 4, 4)).astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(32, 32), mode="bilinear")
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def python_batches(tmp_path_factory):
    """A cifar-10-batches-py folder with 5 x 40 training and 30 test images."""
    root = tmp_path_factory.mktemp("pyb")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for name, n in [*[(f"data_batch_{i}", 40) for i in range(1, 6)], ("test_batch", 30)]:
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": name.encode()}, f)
        expected[name] = (x, y)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, f)
    return root, expected


@pytest.fixture(scope="module")
def packed_jpeg(tmp_path_factory):
    """A pair of packed-JPEG .npz files (120 train, 50 test images) made with Pillow."""
    root = tmp_path_factory.mktemp("npz")
    out = {}
    for split, n, seed in (("train", 120, 1), ("test", 50, 2)):
        images = _smooth_images(n, seed)
        labels = (np.arange(n) % 10).astype(np.uint8)
        data.save_packed_jpeg(root / f"toy_jpeg_{split}.npz", data.encode_jpegs(images, 95),
                              labels, CLASSES)
        out[split] = (images, labels)
    return root, out


# ------------------------------------------------------------------------------ CIFAR-10 formats

@pytest.mark.parametrize("train", [True, False])
def test_python_batches(python_batches, train):
    root, expected = python_batches
    for path in (root, root / "cifar-10-batches-py"):
        ds = data.cifar10(path, train=train, download=False)
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        x = np.concatenate([expected[n][0] for n in names]).reshape(-1, 3, 32, 32)
        y = sum((expected[n][1] for n in names), [])
        assert ds.images.dtype == torch.uint8 and ds.images.shape == x.shape
        assert np.array_equal(ds.images.numpy(), x)
        assert ds.labels.tolist() == y
        assert ds.classes == tuple(CLASSES) and ds.mean == data.CIFAR10_MEAN


def test_packed_jpeg_decodes_and_caches(packed_jpeg, tmp_path, monkeypatch):
    root, expected = packed_jpeg
    cache = tmp_path / "cache"
    ds = data.cifar10(root / "toy_jpeg_train.npz", train=True, cache_dir=cache)
    images, labels = expected["train"]
    assert ds.images.shape == (120, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == labels.tolist() and ds.classes == tuple(CLASSES)
    assert np.abs(ds.images.numpy().astype(int) - images).mean() < 4   # JPEG error only
    assert len(list(cache.glob("*.npy"))) == 1
    # The second load reads the cache and does not decode.
    from pbp_fast.recipe import cifar10
    monkeypatch.setattr(cifar10, "_decode_jpegs", lambda *a, **k: pytest.fail("decoded again"))
    again = data.cifar10(root / "toy_jpeg_train.npz", cache_dir=cache)
    assert torch.equal(again.images, ds.images)


def test_packed_jpeg_split_resolution(packed_jpeg, tmp_path):
    root, expected = packed_jpeg
    kw = dict(cache_dir=False)
    # The train file names the test split through its sibling, and a folder holds both.
    assert len(data.cifar10(root / "toy_jpeg_train.npz", train=False, **kw)) == 50
    assert len(data.cifar10(root / "toy_jpeg_test.npz", train=True, **kw)) == 120
    assert len(data.cifar10(root, train=False, **kw)) == 50
    assert data.cifar10(root, train=False, **kw).labels.tolist() == \
        expected["test"][1].tolist()


def test_bad_npz_names_the_missing_arrays(tmp_path):
    np.savez(tmp_path / "x_train.npz", images=np.zeros(3))
    with pytest.raises(ValueError, match="jpeg"):
        data.cifar10(tmp_path / "x_train.npz", cache_dir=False)


def test_missing_data_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="Pass the path"):
        data.cifar10(tmp_path / "nothing", download=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.cifar10(tmp_path / "cifar_train.npz")


def test_missing_data_download_failure_is_explained(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="downloading it failed.*unreachable"):
        data.cifar10(tmp_path / "nothing", download=True)


@pytest.mark.skipif(not (REAL / "cifar10_jpeg_test.npz").exists(),
                    reason="the packed CIFAR-10 files are not present")
def test_real_cifar10_test_split(tmp_path):
    ds = data.cifar10(REAL / "cifar10_jpeg_test.npz", train=False, cache_dir=tmp_path)
    assert ds.images.shape == (10_000, 3, 32, 32)
    assert np.bincount(ds.labels.numpy()).tolist() == [1000] * 10
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    mean = (ds.images.float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(data.CIFAR10_MEAN), atol=0.02)


# ------------------------------------------------------------------------------ splits, digits

def _toy(n=200, classes=10):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return data.ImageDataset(images, torch.arange(n) % classes, [str(i) for i in range(classes)])


def test_train_val_split_is_seeded_stratified_and_disjoint():
    ds = _toy()
    ds.images[:, 0, 0, 0] = torch.arange(200, dtype=torch.uint8)   # identify images
    train, val = data.train_val_split(ds, 50, seed=1)
    assert len(train) == 150 and len(val) == 50
    ids = lambda d: set(d.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert ids(train).isdisjoint(ids(val)) and len(ids(train) | ids(val)) == 200
    assert np.bincount(val.labels.numpy()).tolist() == [5] * 10
    same = data.train_val_split(ds, 50, seed=1)[1]
    other = data.train_val_split(ds, 50, seed=2)[1]
    assert ids(same) == ids(val) and ids(other) != ids(val)
    assert len(data.train_val_split(ds, 0.1)[1]) == 20
    for bad in (0, 200, 1.5, "10"):
        with pytest.raises(ValueError, match="val_size"):
            data.train_val_split(ds, bad)


def test_digits_splits():
    s = data.digits(size=16, seed=0)
    sizes = [len(s.train), len(s.val), len(s.test)]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == 359
    for ds in (s.train, s.val, s.test):
        assert ds.images.shape[1:] == (1, 16, 16) and ds.images.dtype == torch.uint8
        assert ds.num_classes == 10 and ds.mean == s.train.mean
    assert min(np.bincount(s.test.labels.numpy())) >= 34
    assert data.digits(size=8).train.images.shape[-1] == 8
    with pytest.raises(ValueError, match="size"):
        data.digits(size=4)
    with pytest.raises(ValueError, match="val_fraction"):
        data.digits(val_fraction=0.0)


def test_dataset_validation():
    with pytest.raises(TypeError, match="images"):
        data.ImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2), ["a"])
    with pytest.raises(ValueError, match="labels"):
        data.ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3), ["a"])
    with pytest.raises(ValueError, match="labels must lie"):
        data.ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]),
                          ["a", "b"])


# ------------------------------------------------------------------------------ batch loader

def test_batch_loader_normalises_and_batches():
    ds = _toy(100)
    loader = data.BatchLoader(ds, 32)
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and batches[-1][0].shape[0] == 4
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.labels)
    assert len(data.BatchLoader(ds, 32, drop_last=True)) == 3
    assert list(data.BatchLoader(ds, 32, channels_last=True))[0][0].is_contiguous(
        memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="batch_size"):
        data.BatchLoader(ds, 0)


def test_batch_loader_epochs_are_reproducible():
    ds = _toy(100)
    loader = data.BatchLoader(ds, 25, shuffle=True, transform=augment.TrainTransform(), seed=3)

    def epoch(e):
        loader.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in loader]

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(ds.labels.tolist())


# ------------------------------------------------------------------------------ augmentation

def _batch(n=16, c=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_crop_flip_shapes_and_special_cases():
    x = _batch()
    y = augment.random_crop_flip(x, padding=4, generator=_gen())
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(augment.random_crop_flip(x, 0, 1.0), x.flip(-1))
    assert torch.equal(augment.random_crop_flip(x, 0, 0.0), x)
    # Every crop is a window of the zero-padded image.
    padded = torch.nn.functional.pad(x, (4,) * 4)
    z = augment.random_crop_flip(x, 4, 0.0, _gen(5))
    for i in range(len(x)):
        assert any(torch.equal(z[i], padded[i, :, r:r + 32, c:c + 32])
                   for r in range(9) for c in range(9))
    with pytest.raises(ValueError, match="padding"):
        augment.random_crop_flip(x, -1)
    with pytest.raises(TypeError, match="uint8"):
        augment.random_crop_flip(x.float())


@pytest.mark.parametrize("name", augment.OPS)
def test_each_op_keeps_shape_and_dtype(name):
    x = _batch(4)
    mag = {"Posterize": 4.0, "Solarize": 128.0, "Rotate": 30.0, "TranslateX": 5.0,
           "TranslateY": -5.0}.get(name, 0.3)
    y = augment.apply_ops(x, torch.full((4,), augment.OPS.index(name)), torch.full((4,), mag))
    assert y.shape == x.shape and y.dtype == torch.uint8
    if name == "Identity":
        assert torch.equal(x, y)
    gray = augment.apply_ops(x[:, :1], torch.full((4,), augment.OPS.index(name)),
                             torch.full((4,), mag))
    assert gray.shape == (4, 1, 32, 32)


def test_geometric_ops_match_exact_transforms():
    x = _batch(2)
    op = lambda name: torch.full((2,), augment.OPS.index(name))  # noqa: E731
    rot = augment.apply_ops(x, op("Rotate"), torch.tensor([90.0, -90.0]))
    assert torch.equal(rot[0], torch.rot90(x[0], 1, (1, 2)))   # counter-clockwise
    assert torch.equal(rot[1], torch.rot90(x[1], -1, (1, 2)))
    tx = augment.apply_ops(x, op("TranslateX"), torch.tensor([3.0, 3.0]))
    assert torch.equal(tx[..., 3:], x[..., :-3]) and not tx[..., :3].any()
    ty = augment.apply_ops(x, op("TranslateY"), torch.tensor([-2.0, -2.0]))
    assert torch.equal(ty[..., :-2, :], x[..., 2:, :])
    assert torch.equal(augment.apply_ops(x, op("ShearX"), torch.zeros(2)), x)


def test_photometric_ops_match_definitions():
    x = _batch(3)
    op = lambda name: torch.full((3,), augment.OPS.index(name))  # noqa: E731
    assert torch.equal(augment.apply_ops(x, op("Solarize"), torch.full((3,), 100.0)),
                       torch.where(x >= 100, 255 - x, x))
    assert torch.equal(augment.apply_ops(x, op("Posterize"), torch.full((3,), 3.0)), x & 0xE0)
    assert torch.equal(augment.apply_ops(x, op("Brightness"), torch.full((3,), -1.0)),
                       torch.zeros_like(x))
    ac = augment.apply_ops(x // 2 + 10, op("AutoContrast"), torch.zeros(3))
    assert ac.amin(dim=(2, 3)).eq(0).all() and ac.amax(dim=(2, 3)).eq(255).all()


def test_equalize_matches_reference_rule():
    x = _batch(2, c=1, size=32) // 4          # a narrow histogram
    out = augment.equalize(x)
    for i in range(2):                         # torchvision's per-channel lookup table
        img = x[i, 0].flatten().long()
        hist = torch.bincount(img, minlength=256)
        step = (hist.sum() - hist[img.max()]) // 255
        lut = (torch.cumsum(hist, 0) + step // 2) // step
        lut = torch.nn.functional.pad(lut, [1, 0])[:-1].clamp(0, 255)
        assert torch.equal(out[i, 0].flatten(), lut[img].to(torch.uint8))


@pytest.mark.parametrize("aug", [augment.RandAugment(), augment.TrivialAugmentWide(),
                                 augment.TrainTransform(auto_augment="ra"),
                                 augment.TrainTransform(auto_augment="ta_wide")],
                         ids=repr)
def test_auto_augment_is_deterministic_under_a_seed(aug):
    x = _batch(32)
    a, b, c = aug(x, _gen(1)), aug(x, _gen(1)), aug(x, _gen(2))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_auto_augment_arguments():
    with pytest.raises(ValueError, match="magnitude"):
        augment.RandAugment(magnitude=31)
    with pytest.raises(ValueError, match="num_ops"):
        augment.RandAugment(num_ops=0)
    with pytest.raises(ValueError, match="auto_augment"):
        augment.build_auto_augment("autoaugment")
    assert augment.build_auto_augment("none") is None


def test_mixup_cutmix_soft_targets():
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8) % 10
    x0, t0 = augment.mixup_cutmix(x, y, 10, label_smoothing=0.1)
    assert x0 is x and torch.allclose(t0.sum(1), torch.ones(8))
    assert torch.allclose(t0.max(1).values, torch.full((8,), 0.91))
    for kw in ({"mixup_alpha": 0.2}, {"cutmix_alpha": 1.0},
               {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}):
        xm, tm = augment.mixup_cutmix(x, y, 10, label_smoothing=0.1, generator=_gen(4), **kw)
        xm2, tm2 = augment.mixup_cutmix(x, y, 10, label_smoothing=0.1, generator=_gen(4), **kw)
        assert xm.shape == x.shape and tm.shape == (8, 10)
        assert torch.equal(xm, xm2) and torch.equal(tm, tm2)
        assert torch.allclose(tm.sum(1), torch.ones(8))
    # CutMix: the target weight of the pasted image is the pasted area.
    xc, tc = augment.mixup_cutmix(x, y, 10, cutmix_alpha=1.0, generator=_gen(0))
    pasted = (xc != x).any(1).float().mean(dim=(1, 2))
    assert torch.allclose(tc[1, y[0]], pasted[1], atol=1e-6)
    with pytest.raises(ValueError, match="mixup_alpha"):
        augment.mixup_cutmix(x, y, 10, mixup_alpha=-1.0)
