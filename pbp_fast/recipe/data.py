"""Data: CIFAR-10 from either of its two on-disk formats, the offline digits set for the demo, a
seeded stratified validation split, and a batch loader for data sets that live on the device.

Images are kept decoded as one uint8 tensor (N, C, H, W) per split: CIFAR-10 is 150 MB, small
enough to sit in GPU memory, so a training epoch never touches the host (see :class:`BatchLoader`
and :mod:`pbp_fast.augment`).

CIFAR-10 formats accepted by :func:`cifar10`:

- the python-batch folder of the official archive (``cifar-10-batches-py/`` with
  ``data_batch_1..5``, ``test_batch``, ``batches.meta``), or a folder containing it;
- the packed-JPEG ``.npz`` (arrays ``jpeg``, ``offsets``, ``labels``, ``classes``; one file per
  split, named ``*train*.npz`` / ``*test*.npz``), or a folder holding such a pair.  JPEGs are
  decoded once with Pillow and the result is cached as a ``.npy`` file in ``cache_dir``.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["ImageDataset", "DataSplits", "BatchLoader", "cifar10", "digits",
           "train_val_split", "stratified_order", "load_packed_jpeg", "save_packed_jpeg",
           "encode_jpegs", "load_python_batches",
           "download_cifar10", "default_cache_dir", "epoch_seed", "CIFAR10_MEAN", "CIFAR10_STD",
           "CIFAR10_CLASSES"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_BATCH_FOLDER = "cifar-10-batches-py"


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------

class ImageDataset(torch.utils.data.Dataset):
    """Decoded images (N, C, H, W) uint8 and labels (N,) int64, with class names and the
    per-channel ``mean`` / ``std`` (in [0, 1] units) used to normalise them.

    Indexing gives ``(image, label)`` like any map-style data set; for training use
    :class:`BatchLoader`, which works on whole batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
                or images.dim() != 4:
            raise TypeError(f"images must be a uint8 tensor (N, C, H, W), got "
                            f"{getattr(images, 'dtype', type(images).__name__)} "
                            f"{tuple(getattr(images, 'shape', ()))}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 \
                or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be a 1-d tensor with one entry per image "
                             f"({images.shape[0]}), got {tuple(getattr(labels, 'shape', ()))}")
        self.images = images
        self.labels = labels.long()
        self.classes = tuple(str(c) for c in classes)
        if self.labels.numel() and (int(self.labels.min()) < 0
                                    or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")
        c = images.shape[1]
        if mean is None or std is None:
            x = images.float() / 255.0
            mean = x.mean(dim=(0, 2, 3)).tolist() if len(x) else [0.5] * c
            std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist() if len(x) > 1 else [0.25] * c
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std need {c} entries (one per channel), got "
                             f"{len(mean)} and {len(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def subset(self, indices) -> "ImageDataset":
        """The images at ``indices``, with the same classes and normalisation."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=self.images.device)
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, self.mean, self.std)

    def to(self, device) -> "ImageDataset":
        """The data set with images and labels on ``device``."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes,
                            self.mean, self.std)

    def __repr__(self) -> str:
        return (f"ImageDataset({len(self)} images {tuple(self.image_shape)}, "
                f"{self.num_classes} classes, device={self.device})")


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test data sets."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------

def stratified_order(labels, seed: int = 0) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` whose every prefix holds the classes in
    (nearly) their overall proportions: take the first k indices for a stratified sample of k."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    grouped = perm[np.argsort(labels[perm], kind="stable")]       # by class, random within
    _, start, counts = np.unique(labels[grouped], return_index=True, return_counts=True)
    rank = np.arange(len(grouped)) - np.repeat(start, counts)
    position = (rank + rng.random(len(grouped))) / np.repeat(counts, counts)
    return grouped[np.argsort(position, kind="stable")]


def train_val_split(dataset: ImageDataset, val_size: int | float,
                    seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Carve a stratified validation set of ``val_size`` images (an int) or of that fraction of
    the data (a float in (0, 1)) out of ``dataset``; seeded.  Returns ``(train, val)``."""
    n = len(dataset)
    if isinstance(val_size, float) and not isinstance(val_size, bool):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size as a fraction must be in (0, 1), got {val_size!r}")
        val_size = int(round(val_size * n))
    if not isinstance(val_size, int) or isinstance(val_size, bool) or not 0 < val_size < n:
        raise ValueError(f"val_size must be an int in [1, {n - 1}] or a fraction, got "
                         f"{val_size!r}")
    order = stratified_order(dataset.labels.cpu().numpy(), seed)
    return dataset.subset(np.sort(order[val_size:])), dataset.subset(np.sort(order[:val_size]))


# ----------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$PBP_FAST_CACHE``, else ``$XDG_CACHE_HOME/pbp_fast``, else ``~/.cache/pbp_fast``."""
    if os.environ.get("PBP_FAST_CACHE"):
        return Path(os.environ["PBP_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pbp_fast"


def _decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, workers: int) -> np.ndarray:
    from PIL import Image

    n = len(offsets) - 1
    if n == 0:
        return np.zeros((0, 3, 32, 32), np.uint8)
    first = np.asarray(Image.open(io.BytesIO(jpeg[offsets[0]:offsets[1]].tobytes())).convert("RGB"))
    out = np.empty((n, *first.shape), np.uint8)                     # (N, H, W, 3)

    def decode(lo_hi):
        for i in range(*lo_hi):
            with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())) as im:
                img = np.asarray(im.convert("RGB"))
            if img.shape != first.shape:
                raise ValueError(f"image {i} has shape {img.shape}, image 0 has {first.shape}")
            out[i] = img

    chunk = max(1, -(-n // max(1, workers)))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(decode, [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def load_packed_jpeg(path, cache_dir=None) -> ImageDataset:
    """One split from a packed-JPEG ``.npz``; the decoded uint8 images are cached in
    ``cache_dir`` (default :func:`default_cache_dir`; ``False`` disables the cache) under a name
    derived from the file's path, size and modification time."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        missing = {"jpeg", "offsets", "labels"} - set(z.files)
        if missing:
            raise ValueError(f"{path} is not a packed-JPEG .npz: arrays {sorted(missing)} are "
                             f"missing (it has {z.files})")
        jpeg, offsets, labels = z["jpeg"], z["offsets"].astype(np.int64), z["labels"]
        classes = [str(c) for c in z["classes"]] if "classes" in z.files else \
            list(CIFAR10_CLASSES)
    if len(offsets) != len(labels) + 1:
        raise ValueError(f"{path}: offsets must have len(labels) + 1 = {len(labels) + 1} "
                         f"entries, got {len(offsets)}")
    images = None
    cache_file = None
    if cache_dir is not False:
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        cache_file = Path(cache_dir or default_cache_dir()) / f"{path.stem}-{key[:16]}.npy"
        if cache_file.exists():
            try:
                images = np.load(cache_file)
                if images.shape[0] != len(labels) or images.dtype != np.uint8:
                    images = None
            except (OSError, ValueError):
                images = None
    if images is None:
        images = _decode_jpegs(jpeg, offsets, workers=min(8, os.cpu_count() or 1))
        if cache_file is not None:
            _save_cache(cache_file, images)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if len(classes) == 10 and images.shape[1:] == \
        (3, 32, 32) else (None, None)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                        classes, mean, std)


def encode_jpegs(images, quality: int = 75) -> list[np.ndarray]:
    """uint8 RGB images (N, 3, H, W) as JPEG files (one uint8 array each)."""
    from PIL import Image

    out = []
    for img in np.asarray(images, np.uint8):
        buf = io.BytesIO()
        Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="JPEG", quality=quality)
        out.append(np.frombuffer(buf.getvalue(), np.uint8))
    return out


def save_packed_jpeg(path, jpegs, labels, classes=CIFAR10_CLASSES) -> Path:
    """Write JPEG files (byte arrays, e.g. from :func:`encode_jpegs` or slices of another packed
    file) and their labels as a packed-JPEG ``.npz``, the format :func:`load_packed_jpeg` reads."""
    blobs = [np.asarray(b, np.uint8).reshape(-1) for b in jpegs]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs], dtype=np.int64)])
    np.savez(path, jpeg=np.concatenate(blobs) if blobs else np.zeros(0, np.uint8),
             offsets=offsets.astype(np.int64), labels=np.asarray(labels, np.uint8),
             classes=np.asarray([str(c) for c in classes]))
    return Path(path)


def _save_cache(cache_file: Path, images: np.ndarray) -> None:
    """Write atomically; a cache that cannot be written is only a warning."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, images)
        os.replace(tmp, cache_file)
    except OSError as exc:
        warnings.warn(f"could not write the decoded-image cache {cache_file}: {exc}",
                      stacklevel=3)


def load_python_batches(folder, train: bool = True) -> ImageDataset:
    """One split from the official python-batch folder (``cifar-10-batches-py``)."""
    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        file = folder / name
        if not file.exists():
            raise FileNotFoundError(f"{file} is missing: {folder} is not a complete "
                                    f"{_BATCH_FOLDER} folder")
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch.get(b"labels", batch.get(b"fine_labels")), np.int64))
    classes = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as f:
            classes = [c.decode() for c in pickle.load(f, encoding="bytes")[b"label_names"]]
    return ImageDataset(torch.from_numpy(np.concatenate(images)),
                        torch.from_numpy(np.concatenate(labels)), classes, CIFAR10_MEAN,
                        CIFAR10_STD)


def download_cifar10(root, url: str = CIFAR10_URL, timeout: float = 30.0) -> Path:
    """Download and unpack the official python-version archive into ``root``; returns the
    ``cifar-10-batches-py`` folder.  Raises ``OSError`` when the network does not allow it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    tmp = archive.with_suffix(".part")
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
        while chunk := response.read(1 << 20):
            md5.update(chunk)
            f.write(chunk)
    if md5.hexdigest() != CIFAR10_MD5:
        tmp.unlink()
        raise OSError(f"the download from {url} has MD5 {md5.hexdigest()}, expected "
                      f"{CIFAR10_MD5}")
    os.replace(tmp, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    archive.unlink()
    return root / _BATCH_FOLDER


def _npz_for_split(path: Path, train: bool) -> Path:
    """The ``.npz`` of the wanted split: the file itself, or its sibling with train <-> test."""
    want, other = ("train", "test") if train else ("test", "train")
    name = path.name
    if want in name:
        return path
    if other in name:
        sibling = path.with_name(name.replace(other, want))
        if sibling.exists():
            return sibling
        raise FileNotFoundError(f"{path} holds the {other} split; the {want} split was looked "
                                f"for at {sibling}, which does not exist")
    return path


def cifar10(root_or_file, train: bool = True, *, cache_dir=None,
            download: bool = True) -> ImageDataset:
    """CIFAR-10's training (``train=True``, 50,000 images) or test split (10,000).

    ``root_or_file``: a packed-JPEG ``.npz`` (its sibling with ``train`` <-> ``test`` in the name
    serves the other split), a folder holding ``*train*.npz`` / ``*test*.npz``, a
    ``cifar-10-batches-py`` folder, or a folder containing one.  When nothing is found there and
    ``download`` is true, the official archive is downloaded into the folder; if that fails, a
    ``FileNotFoundError`` says what to pass.  ``cache_dir`` is where decoded JPEGs are cached (see
    :func:`load_packed_jpeg`)."""
    if root_or_file is None or str(root_or_file) == "":
        raise ValueError("root_or_file must name a CIFAR-10 .npz file or folder")
    path = Path(root_or_file).expanduser()
    if path.suffix == ".npz":
        if not path.exists() and not _npz_for_split(path, train).exists():
            raise FileNotFoundError(f"{path} does not exist; pass a packed-JPEG CIFAR-10 .npz "
                                    f"(e.g. cifar10_jpeg_train.npz) or a cifar-10-batches-py "
                                    f"folder")
        return load_packed_jpeg(_npz_for_split(path, train), cache_dir)
    if path.is_dir():
        if (path / "data_batch_1").exists() or (path / "test_batch").exists():
            return load_python_batches(path, train)
        if (path / _BATCH_FOLDER).is_dir():
            return load_python_batches(path / _BATCH_FOLDER, train)
        split = "train" if train else "test"
        npz = sorted(p for p in path.glob("*.npz") if split in p.name)
        if len(npz) == 1:
            return load_packed_jpeg(npz[0], cache_dir)
        if len(npz) > 1:
            raise ValueError(f"{path} holds several {split} .npz files "
                             f"({[p.name for p in npz]}); pass one of them")
    elif path.exists():
        raise ValueError(f"{path} is neither a .npz file nor a folder")
    hint = (f"CIFAR-10 was not found at {path}. Pass the path of a packed-JPEG .npz "
            f"(cifar10_jpeg_train.npz), a folder holding one, or a {_BATCH_FOLDER} folder "
            f"(from {CIFAR10_URL})")
    if not download:
        raise FileNotFoundError(hint + "; downloading is switched off.")
    try:
        folder = download_cifar10(path)
    except (OSError, tarfile.TarError) as exc:   # URLError is an OSError
        raise FileNotFoundError(f"{hint}; downloading it failed: {exc}") from exc
    return load_python_batches(folder, train)


# ----------------------------------------------------------------------------------------------
# Digits (the offline demo data set)
# ----------------------------------------------------------------------------------------------

def digits(size: int = 16, val_fraction: float = 0.2, test_fraction: float = 0.2,
           seed: int = 0) -> DataSplits:
    """scikit-learn's 8x8 handwritten digits (1,797 grayscale images, 10 classes; shipped inside
    scikit-learn, so no download), upsampled bilinearly to ``size`` x ``size`` and split into
    stratified train / validation / test sets (seeded).  Images are (1, size, size) uint8."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a demo/test dependency
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") \
            from exc
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 0.9:
        raise ValueError(f"val_fraction + test_fraction must leave room for training, got "
                         f"{val_fraction} + {test_fraction}")
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)   # (N, 1, 8, 8)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    classes = [str(c) for c in bunch.target_names]
    n = len(labels)
    n_test, n_val = int(round(test_fraction * n)), int(round(val_fraction * n))
    order = stratified_order(labels.numpy(), seed)
    test_idx, val_idx, train_idx = (np.sort(order[:n_test]), np.sort(order[n_test:n_test + n_val]),
                                    np.sort(order[n_test + n_val:]))
    train = ImageDataset(images[train_idx], labels[train_idx], classes)
    return DataSplits(train, *(ImageDataset(images[i], labels[i], classes, train.mean, train.std)
                               for i in (val_idx, test_idx)))


# ----------------------------------------------------------------------------------------------
# Batches on the device
# ----------------------------------------------------------------------------------------------

def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, epoch, *more)``: each epoch's randomness (and, with
    ``more``, e.g. each rank's) on its own."""
    words = [seed, epoch, *more]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


class BatchLoader:
    """Iterates over an :class:`ImageDataset` in batches of normalised float tensors, entirely on
    the data set's device: index with a (seeded) permutation, apply ``transform`` to the uint8
    batch, convert to float and normalise.

    Randomness (order and augmentation) comes from a generator seeded with ``(seed, epoch)``, so
    an epoch is reproducible on its own: call :meth:`set_epoch` before iterating, as with a
    ``DistributedSampler``.  ``transform(x_uint8, generator) -> x_uint8`` is e.g. a
    :class:`pbp_fast.augment.TrainTransform`."""

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False,
                 transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 seed: int = 0, channels_last: bool = False, dtype: torch.dtype = torch.float32):
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"batch_size ({batch_size}) is larger than the data set "
                             f"({len(dataset)} images) and drop_last drops every batch")
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.drop_last, self.transform = shuffle, drop_last, transform
        self.seed, self.channels_last, self.dtype = seed, channels_last, dtype
        self.epoch = 0
        dev = dataset.device
        self._mean = torch.tensor(dataset.mean, device=dev).view(1, -1, 1, 1) * 255.0
        self._inv_std = 1.0 / (torch.tensor(dataset.std, device=dev).view(1, -1, 1, 1) * 255.0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalised float."""
        x = ((x.float() - self._mean) * self._inv_std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def epoch_order(self) -> tuple[torch.Generator, torch.Tensor | None]:
        """The epoch's generator, seeded with ``(seed, epoch)``, and the permutation drawn from
        it first (None without ``shuffle``: the data set's order)."""
        dev = self.dataset.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.dataset), generator=gen, device=dev) \
            if self.shuffle else None
        return gen, order

    def batches(self, indices, generator: torch.Generator):
        """The normalised ``(x, y)`` of each batch of ``indices`` (index tensors or slices),
        augmented by ``transform`` with ``generator``."""
        for idx in indices:
            x, y = self.dataset.images[idx], self.dataset.labels[idx]
            if self.transform is not None:
                x = self.transform(x, generator)
            yield self.normalize(x), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen, order = self.epoch_order()
        b = self.batch_size
        spans = [slice(i * b, min((i + 1) * b, len(self.dataset))) for i in range(len(self))]
        yield from self.batches(spans if order is None else [order[s] for s in spans], gen)
