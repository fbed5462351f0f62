"""Datasets as uint8 images (N, H, W, C) and integer labels: local files first (IDX raw or
gzip, keras-style .npz, CIFAR pickles), then a download; every array checked right after
loading. Also the published --n_samples slice and --deformation's distortions.

    x_train, y_train, x_test, y_test = datasets.load_dataset("mn", "../shared/data/mnist")
"""
import gzip
import hashlib
import logging
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

import utils
from utils import BROKEN_FILE_ERRORS, UsageError, describe

log = logging.getLogger("pepita")

DATA_DIR_ENV = "PEPITA_DATA_DIR"


class DatasetError(UsageError):
    """A dataset that is neither local nor downloadable, or a broken dataset file."""


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
EMNIST_FILES = tuple(f"emnist-balanced-{name}" for name in MNIST_FILES)

# code -> name, alias (the published flag --ALIAS, the presets' and results folders' name),
# image shape (H, W, C), classes, npz name, sub-folders searched, IDX names
DATASETS = {
    "mn": dict(name="MNIST", alias="mnist", shape=(28, 28, 1), classes=10, npz="mnist.npz",
               dirs=("mnist", "MNIST/raw"), idx=MNIST_FILES),
    "fmn": dict(name="Fashion-MNIST", alias="fmnist", shape=(28, 28, 1), classes=10,
                npz="fashion_mnist.npz",
                dirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"), idx=MNIST_FILES),
    "emn": dict(name="EMNIST balanced", alias="emnist", shape=(28, 28, 1), classes=47,
                npz="emnist_balanced.npz", dirs=("emnist", "EMNIST/raw", "gzip"),
                idx=EMNIST_FILES),
    "cif": dict(name="CIFAR-10", alias="cifar10", shape=(32, 32, 3), classes=10,
                npz="cifar10.npz", dirs=("cifar-10-batches-py",), idx=None),
    "cif100": dict(name="CIFAR-100", alias="cifar100", shape=(32, 32, 3), classes=100,
                   npz="cifar100.npz", dirs=("cifar-100-python",), idx=None),
}


def read_idx(path):
    """Read an IDX file (raw or gzip) into a uint8 array, checking its declared size."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"{path} is truncated or corrupt ({err}); copy it again") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes; copy it again")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is too short to hold its header: the file is "
                           "truncated; copy it again")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(bytearray(data), np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path} holds {body.size} bytes of data, its header says "
                           f"{int(np.prod(dims))}: the file is truncated; copy it again")
    return body.reshape(dims)


def _find_file(folders, name):
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_set(folders, names):
    paths = [_find_file(folders, name) for name in names]
    if not all(paths):
        return None
    x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    return x_train, y_train, x_test, y_test, paths[0].parent


def _load_npz(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    except BROKEN_FILE_ERRORS as err:
        raise DatasetError(f"{path} is not a readable keras-style .npz with x_train, "
                           f"y_train, x_test, y_test ({describe(err)}); copy it "
                           "again") from None


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold: dicts, lists, bytes, strings, numbers and
    numpy arrays. Any other global (a function to call, a class to build) is refused, so
    a hostile file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how Python 3 pickles bytes for Python 2 readers

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise RefusedPickle(f"{module}.{name}")
        return super().find_class(module, name)


class RefusedPickle(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR batch never holds."""


def _unpickle(path):
    """A CIFAR batch as a dict with str keys: Python 2 pickles (str keys, read as latin1)
    and Python 3 ones (bytes keys) alike, as keras accepts both; read with CifarUnpickler."""
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="latin1").load()
    except RefusedPickle as err:
        raise DatasetError(f"{path} was refused: it asks to load {err}, which no CIFAR batch "
                           "holds (only dicts, lists, bytes, strings, numbers and numpy "
                           "arrays); it is damaged or not a CIFAR file") from None
    except MemoryError:
        raise DatasetError(f"{path} is corrupt: it claims more data than any CIFAR batch "
                           "holds; copy it again") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            ImportError, OverflowError, IndexError, KeyError, struct.error) as err:
        raise DatasetError(f"{path} is truncated or corrupt ({describe(err)}); copy it "
                           "again") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} is not a CIFAR batch (a dict); copy it again")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_field(batch, key, path):
    if key not in batch:
        raise DatasetError(f"{path} holds no {key!r}: not a CIFAR batch of this dataset; "
                           "copy it again")
    return batch[key]


def _cifar_images(batch, path):
    data = np.asarray(_cifar_field(batch, "data", path))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072); "
                           "copy it again")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _load_cifar(folders, code):
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if code == "cif"
             else ["train", "test"])
    label_key = "labels" if code == "cif" else "fine_labels"
    for folder in folders:
        if all((folder / name).is_file() for name in files):
            paths = [folder / name for name in files]
            batches = [_unpickle(path) for path in paths]
            images = [_cifar_images(b, path) for b, path in zip(batches, paths)]
            labels = [np.asarray(_cifar_field(b, label_key, path))
                      for b, path in zip(batches, paths)]
            return (np.concatenate(images[:-1]), np.concatenate(labels[:-1]), images[-1],
                    labels[-1], folder)
    return None


def _expected_files(code):
    spec = DATASETS[code]
    if spec["idx"]:
        listed = ", ".join(f"{n}[.gz]" for n in spec["idx"])
    elif code == "cif":
        listed = "cifar-10-batches-py/data_batch_1..5 and test_batch"
    else:
        listed = "cifar-100-python/train and test"
    return f"{listed}, or {spec['npz']}"


def load_local(code, data_dir):
    """(arrays, the file or folder they came from) from files under data_dir, or None when
    they are not there."""
    spec = DATASETS[code]
    root = Path(data_dir)
    folders = [root] + [root / d for d in spec["dirs"]]
    for folder in folders:
        if (folder / spec["npz"]).is_file():
            return _load_npz(folder / spec["npz"]), folder / spec["npz"]
    found = (_load_idx_set(folders, spec["idx"]) if spec["idx"] else
             _load_cifar(folders, code))
    return found and (found[:4], found[4])


def _download_keras(code):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    loaders = {"mn": keras.datasets.mnist, "fmn": keras.datasets.fashion_mnist,
               "cif": keras.datasets.cifar10, "cif100": keras.datasets.cifar100}
    if code not in loaders:
        return _download_torchvision(code, Path.home() / ".cache" / "pepita")
    (x_train, y_train), (x_test, y_test) = loaders[code].load_data()
    source = f"keras.datasets.{loaders[code].__name__.split('.')[-1]}"
    return (x_train, y_train, x_test, y_test), source


def _download_torchvision(code, root):
    """Download into root; a failed download leaves no empty folders behind."""
    root = Path(root)
    existed = root.exists()
    try:
        return _torchvision_files(code, root)
    except BaseException:
        if not existed and root.is_dir():
            for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
                if not any(folder.iterdir()):
                    folder.rmdir()
            if not any(root.iterdir()):
                root.rmdir()
        raise


def _torchvision_files(code, root):
    import torchvision.datasets as tvd
    if code == "emn":
        for train in (True, False):
            tvd.EMNIST(root, split="balanced", train=train, download=True)
        root = Path(root) / "EMNIST" / "raw"
    else:
        cls = {"mn": tvd.MNIST, "fmn": tvd.FashionMNIST, "cif": tvd.CIFAR10,
               "cif100": tvd.CIFAR100}[code]
        for train in (True, False):
            cls(root, train=train, download=True)
    return load_local(code, root)


def load_dataset(code, data_dir=None, downloader="keras", data_flag="--data_dir"):
    """Load a dataset as uint8 images (N, H, W, C) and integer labels (N,).

    Looks in data_dir (or $PEPITA_DATA_DIR) first and never downloads when one is given;
    otherwise downloads through keras.datasets ("keras") or torchvision ("torchvision").
    data_flag: how the user gives data_dir, for the messages (a notebook: its parameter).
    """
    if code not in DATASETS:
        raise UsageError(f"unknown dataset {code!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[code]
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if data_dir:
        found = load_local(code, data_dir)
        if found is None:
            raise DatasetError(f"{spec['name']} not found in {data_dir}: expected "
                               f"{_expected_files(code)} there or in one of its sub-folders "
                               f"{', '.join(spec['dirs'])}; {_how_to_get(data_dir, data_flag)}")
    else:
        try:
            found = (_download_keras(code) if downloader == "keras" else
                     _download_torchvision(code, Path.home() / ".cache" / "pepita"))
        except Exception as err:  # any download failure becomes one clear message
            raise DatasetError(f"could not download {spec['name']} ({describe(err)}); "
                               f"offline, put {_expected_files(code)} in a folder and pass "
                               f"it as {data_flag} or ${DATA_DIR_ENV}") from None
    arrays, source = found
    return _check_arrays(code, source, *arrays)


def _how_to_get(data_dir, data_flag):
    """What to do when data_dir lacks the files: decode them where the folder holds an
    archive with its make_npz.py (../shared/data/*), else copy them or download."""
    decoder = Path(data_dir) / "make_npz.py"
    if decoder.is_file():
        cache = Path.home() / ".cache" / "pepita-data" / Path(data_dir).resolve().name
        return (f"this folder holds an archive: decode it with 'python {decoder}' and pass "
                f"{data_flag} {cache}")
    return f"copy them there, or drop {data_flag}/${DATA_DIR_ENV} to download"


def _check_arrays(code, source, x_train, y_train, x_test, y_test):
    """Images as (N, H, W, C) in [0, 255] and labels as int64 (N,), checked right after
    loading: shapes, counts, dtypes, value and label ranges; source: the file or folder
    they came from, which each message names."""
    spec = DATASETS[code]
    name = f"{spec['name']} ({source})"
    checked = []
    for part, images, labels in (("training", x_train, y_train), ("test", x_test, y_test)):
        images = _check_images(spec, name, part, np.asarray(images))
        labels = _check_labels(spec, name, part, np.asarray(labels))
        if len(labels) != len(images):
            raise DatasetError(f"{name}: {len(images)} {part} images but "
                               f"{len(labels)} labels; copy the dataset files again")
        checked += [images, labels]
    return tuple(checked)


def _check_images(spec, name, part, images):
    h, w, c = spec["shape"]
    if images.ndim == 0 or len(images) == 0 or images.size != len(images) * h * w * c:
        raise DatasetError(f"{name}: the {part} images have shape {images.shape}, expected "
                           f"(N, {h}, {w}{', ' + str(c) if c > 1 else ''}); "
                           "this is not this dataset's files")
    if images.dtype == np.uint8:
        return images.reshape(len(images), h, w, c)
    if images.dtype.kind not in "iuf":
        raise DatasetError(f"{name}: the {part} images are of type {images.dtype}; "
                           "store them as uint8 in [0, 255] or floats in [0, 1]")
    low, high = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
        raise DatasetError(f"{name}: the {part} images hold values from {low} to {high}; "
                           "store them as uint8 in [0, 255] or floats in [0, 1]")
    if images.dtype.kind == "f" and high <= 1:  # floats in [0, 1]: back to the 0-255 scale
        log.info("%s: %s images are floats in [0, 1]; scaled to [0, 255]", name, part)
        images = images.astype(np.float32) * 255
    elif images.dtype.kind == "f":
        images = images.astype(np.float32)
    else:
        images = images.astype(np.uint8)
    return images.reshape(len(images), h, w, c)


def _check_labels(spec, name, part, labels):
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.ndim != 1 or labels.dtype.kind not in "iuf" or (
            labels.dtype.kind == "f" and not np.all(labels == np.round(labels))):
        raise DatasetError(f"{name}: the {part} labels have shape {labels.shape} "
                           f"and type {labels.dtype}; expected integer class indices")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= spec["classes"]):
        raise DatasetError(f"{name}: the {part} labels range from {labels.min()} to "
                           f"{labels.max()}, outside 0..{spec['classes'] - 1}; this is not "
                           "this dataset's files")
    return labels


def sample_slice(data_rng, n_samples, train, test):
    """--n_samples N: a contiguous slice of N training samples at a random start (fixed by
    the seed), also used as the test set (the published overfitting check)."""
    if n_samples == "all":
        return train, test
    n = int(n_samples)
    if n > len(train[0]):
        raise UsageError(f"--n_samples {n} exceeds the {len(train[0])} training samples")
    start = int(data_rng.integers(0, len(train[0]) - n + 1))
    sliced = tuple(a[start:start + n] for a in train)
    return sliced, sliced


def one_hot(labels, n_classes, dtype=np.float64):
    return np.eye(n_classes, dtype=dtype)[labels]


def fingerprint(arrays):
    """The data's identity: sha256 of the arrays' shapes, types and bytes (a resume on other
    data is refused by it, whatever folder the files came from)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape} {array.dtype.str};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


# The sha256 of the .npz files that ../shared/data/*/make_npz.py write, and what a table that
# ran on them must say.
KNOWN_COPIES = {
    "8258534be228bdab841bfbb1d4fe686dea0a6fd61952329e0f040908948043c0":
        "CIFAR-10 ran on the JPEG copy of `../shared/data/cifar10` (lossy: results are close "
        "to, not identical with, the original CIFAR-10's).",
    "10835a0108963ab2de621dad113bdbd29695f57555fcf87cfb24fbce1d58c0d4":
        "CIFAR-100 ran on the lossless copy of `../shared/data/cifar100` (the official "
        "60,000 images bit for bit, the official train/test split; shuffled within each set).",
}


def known_copy(code, data_dir):
    """The sha256 of data_dir's .npz of the dataset when it is one of KNOWN_COPIES, else
    None."""
    if code not in DATASETS:
        return None
    path = Path(data_dir) / DATASETS[code]["npz"]
    digest = utils.sha256_of(path) if path.is_file() else None
    return digest if digest in KNOWN_COPIES else None


def data_source(data_dir):
    """Where load_dataset reads: the resolved local folder, or "download"."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    return str(Path(data_dir).resolve()) if data_dir else "download"


# ------------------------------------------------------------------------------------------
# --deformation: random affine + elastic distortion of 28x28 grey images (scipy.ndimage)
# ------------------------------------------------------------------------------------------
def deform_images(images, rng, chunk=5000):
    """A fresh distorted copy of (N, 28, 28) images in [0, 1]: rotation up to 10 degrees,
    shifts of 15%, shear 0.15, zoom 15%, elastic (alpha 34, sigma 6), constant fill, then
    min-max scaled to [0, 1] per image. Vectorised over images with map_coordinates."""
    from scipy.ndimage import gaussian_filter, map_coordinates
    n, h, w = images.shape
    out = np.empty((n, h, w), np.float64)
    rows, cols = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2,
                             indexing="ij")
    size = np.reshape([h, w], (2, 1, 1, 1))
    for start in range(0, n, chunk):
        batch = images[start:start + chunk].astype(np.float64)
        m = len(batch)
        angle = np.deg2rad(rng.uniform(-10, 10, m))[:, None, None]
        shear = rng.uniform(-0.15, 0.15, m)[:, None, None]
        zoom_r, zoom_c = rng.uniform(0.85, 1.15, (2, m, 1, 1))
        shift_r, shift_c = rng.uniform(-0.15, 0.15, (2, m, 1, 1)) * size
        # Output pixel -> source pixel: inverse rotation, shear and zoom about the centre.
        r = (np.cos(angle) * rows - np.sin(angle) * cols) / zoom_r
        c = (np.sin(angle) * rows + np.cos(angle) * cols + shear * rows) / zoom_c
        fields = rng.uniform(-1, 1, (2, m, h, w))
        dr, dc = (34 * gaussian_filter(f, sigma=(0, 6, 6), mode="constant") for f in fields)
        coords = [np.broadcast_to(np.arange(m)[:, None, None], (m, h, w)),
                  r + (h - 1) / 2 - shift_r + dr, c + (w - 1) / 2 - shift_c + dc]
        warped = map_coordinates(batch, coords, order=1, mode="constant", cval=0.0)
        lo = warped.min(axis=(1, 2), keepdims=True)
        hi = warped.max(axis=(1, 2), keepdims=True)
        out[start:start + m] = (warped - lo) / np.where(hi > lo, hi - lo, 1)
    return out
