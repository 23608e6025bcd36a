"""CIFAR-10 from either of its two on-disk formats (:func:`cifar10`):

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
from pathlib import Path

import numpy as np
import torch

from pbp_fast.recipe.datasets import ImageDataset

__all__ = ["cifar10", "load_packed_jpeg", "save_packed_jpeg", "encode_jpegs",
           "load_python_batches", "download_cifar10", "default_cache_dir", "CIFAR10_MEAN",
           "CIFAR10_STD", "CIFAR10_CLASSES"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_BATCH_FOLDER = "cifar-10-batches-py"


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
