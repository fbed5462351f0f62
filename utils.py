"""Shared helpers of both entry scripts: activations, initialisers, datasets, the common
command-line flags, run folders, checkpoints and result files.

Nothing here trains a network: main.py/functions.py (numpy) and main_pytorch.py/models.py
(PyTorch) do.
"""
import argparse
import ctypes
import fcntl
import gzip
import json
import logging
import math
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger("pepita")

DATA_DIR_ENV = "PEPITA_DATA_DIR"


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, before any folder is created."""


class DatasetError(UsageError):
    """A dataset that is neither local nor downloadable, or a broken dataset file."""


class DivergenceError(Exception):
    """Weights or outputs became NaN or infinite during training."""


# ------------------------------------------------------------------------------------------
# Activations and their derivatives (numpy path)
# ------------------------------------------------------------------------------------------
CIRESAN_A, CIRESAN_B = 1.7159, 0.6666


def softmax(a):
    """Softmax over the last axis, shifted by the max as published."""
    z = np.exp(a - a.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def relu(a):
    return np.maximum(a, 0)


def sigm(a):
    return 1 / (1 + np.exp(-a))


ACTIVATIONS = {
    "relu": relu,
    "sigm": sigm,
    "Lrelu": lambda a: np.where(a > 0, a, 0.1 * a),
    "tanh": np.tanh,
    "tanh_ciresan": lambda a: CIRESAN_A * np.tanh(CIRESAN_B * a),
    "step_f": lambda a: (a > 0).astype(a.dtype),
    "softmax": softmax,
}

# Derivatives f'(a) as published; step_f and softmax (as a hidden layer) have none.
DERIVATIVES = {
    "relu": lambda a: (a > 0).astype(a.dtype),
    "sigm": lambda a: sigm(a) * (1 - sigm(a)),
    "Lrelu": lambda a: np.where(a > 0, 1.0, 0.1).astype(a.dtype),
    "tanh": lambda a: 1 - np.tanh(a) ** 2,
    "tanh_ciresan": lambda a: CIRESAN_A * CIRESAN_B * (1 - np.tanh(CIRESAN_B * a) ** 2),
}

# ------------------------------------------------------------------------------------------
# Initialisers: values drawn in float32 and stored in the compute dtype, as published
# ------------------------------------------------------------------------------------------
W_INITS = ("rnd", "zero", "ones", "xav", "he", "he_uniform", "nok", "cir")


def uniform(rng, limit, shape, dtype=np.float64):
    return rng.uniform(-limit, limit, shape).astype(np.float32).astype(dtype)


def init_weight(rng, name, n_out, n_in, dtype=np.float64):
    """One layer's weights, shape (n_out, n_in), fan_in = n_in, fan_out = n_out."""
    shape = (n_out, n_in)
    if name == "he_uniform":
        return uniform(rng, np.sqrt(6 / n_in), shape, dtype)
    if name == "he":
        return rng.normal(0, np.sqrt(2 / n_in), shape).astype(np.float32).astype(dtype)
    if name == "xav":
        return uniform(rng, np.sqrt(6 / (n_in + n_out)), shape, dtype)
    if name == "nok":
        return uniform(rng, 1 / np.sqrt(n_in), shape, dtype)
    if name == "cir":
        return uniform(rng, 0.05, shape, dtype)
    if name == "rnd":
        return (rng.uniform(0, 1, shape) / np.sqrt(n_in)).astype(np.float32).astype(dtype)
    if name == "zero":
        return np.zeros(shape, dtype)
    if name == "ones":
        return np.ones(shape, dtype)
    raise UsageError(f"unknown --w_init {name!r}; choose one of {', '.join(W_INITS)}")


# ------------------------------------------------------------------------------------------
# Datasets: local files first (IDX raw/.gz, keras-style .npz, CIFAR pickles), then download
# ------------------------------------------------------------------------------------------
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
EMNIST_FILES = tuple(f"emnist-balanced-{name}" for name in MNIST_FILES)

# code -> name, image shape (H, W, C), classes, npz name, sub-folders searched, IDX names
DATASETS = {
    "mn": dict(name="MNIST", shape=(28, 28, 1), classes=10, npz="mnist.npz",
               dirs=("mnist", "MNIST/raw"), idx=MNIST_FILES),
    "fmn": dict(name="Fashion-MNIST", shape=(28, 28, 1), classes=10, npz="fashion_mnist.npz",
                dirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"), idx=MNIST_FILES),
    "emn": dict(name="EMNIST balanced", shape=(28, 28, 1), classes=47, npz="emnist_balanced.npz",
                dirs=("emnist", "EMNIST/raw", "gzip"), idx=EMNIST_FILES),
    "cif": dict(name="CIFAR-10", shape=(32, 32, 3), classes=10, npz="cifar10.npz",
                dirs=("cifar-10-batches-py",), idx=None),
    "cif100": dict(name="CIFAR-100", shape=(32, 32, 3), classes=100, npz="cifar100.npz",
                   dirs=("cifar-100-python",), idx=None),
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
    return x_train, y_train, x_test, y_test


# What a truncated or garbage .npz/zip file raises on the way through np.load.
BROKEN_FILE_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


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
                    labels[-1])
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
    """The dataset from files under data_dir, or None when they are not there."""
    spec = DATASETS[code]
    root = Path(data_dir)
    folders = [root] + [root / d for d in spec["dirs"]]
    for folder in folders:
        if (folder / spec["npz"]).is_file():
            return _load_npz(folder / spec["npz"])
    if spec["idx"]:
        return _load_idx_set(folders, spec["idx"])
    return _load_cifar(folders, code)


def _download_keras(code):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    loaders = {"mn": keras.datasets.mnist, "fmn": keras.datasets.fashion_mnist,
               "cif": keras.datasets.cifar10, "cif100": keras.datasets.cifar100}
    if code not in loaders:
        return _download_torchvision(code, Path.home() / ".cache" / "pepita")
    (x_train, y_train), (x_test, y_test) = loaders[code].load_data()
    return x_train, y_train, x_test, y_test


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
        arrays = load_local(code, data_dir)
        if arrays is None:
            raise DatasetError(f"{spec['name']} not found in {data_dir}: expected "
                               f"{_expected_files(code)} there or in one of its sub-folders "
                               f"{', '.join(spec['dirs'])}; copy them there, or drop "
                               f"{data_flag}/${DATA_DIR_ENV} to download")
    else:
        try:
            arrays = (_download_keras(code) if downloader == "keras" else
                      _download_torchvision(code, Path.home() / ".cache" / "pepita"))
        except Exception as err:  # any download failure becomes one clear message
            raise DatasetError(f"could not download {spec['name']} ({describe(err)}); "
                               f"offline, put {_expected_files(code)} in a folder and pass "
                               f"it as {data_flag} or ${DATA_DIR_ENV}") from None
    return _check_arrays(code, *arrays)


def _check_arrays(code, x_train, y_train, x_test, y_test):
    """Images as (N, H, W, C) in [0, 255] and labels as int64 (N,), checked right after
    loading: shapes, counts, dtypes, value and label ranges."""
    spec = DATASETS[code]
    checked = []
    for part, images, labels in (("training", x_train, y_train), ("test", x_test, y_test)):
        images = _check_images(spec, part, np.asarray(images))
        labels = _check_labels(spec, part, np.asarray(labels))
        if len(labels) != len(images):
            raise DatasetError(f"{spec['name']}: {len(images)} {part} images but "
                               f"{len(labels)} labels; copy the dataset files again")
        checked += [images, labels]
    return tuple(checked)


def _check_images(spec, part, images):
    h, w, c = spec["shape"]
    name = spec["name"]
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


def _check_labels(spec, part, labels):
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.ndim != 1 or labels.dtype.kind not in "iuf" or (
            labels.dtype.kind == "f" and not np.all(labels == np.round(labels))):
        raise DatasetError(f"{spec['name']}: the {part} labels have shape {labels.shape} "
                           f"and type {labels.dtype}; expected integer class indices")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= spec["classes"]):
        raise DatasetError(f"{spec['name']}: the {part} labels range from {labels.min()} to "
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
    for start in range(0, n, chunk):
        batch = images[start:start + chunk].astype(np.float64)
        m = len(batch)
        angle = np.deg2rad(rng.uniform(-10, 10, m))[:, None, None]
        shear = rng.uniform(-0.15, 0.15, m)[:, None, None]
        zoom_r, zoom_c = rng.uniform(0.85, 1.15, (2, m, 1, 1))
        shift_r, shift_c = rng.uniform(-0.15, 0.15, (2, m, 1, 1)) * np.reshape([h, w], (2, 1, 1, 1))
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


# ------------------------------------------------------------------------------------------
# Command line: the flags both entry scripts share
# ------------------------------------------------------------------------------------------
def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def folder_word(text):
    if not text or "/" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"must be a non-empty name without '/', got {text!r} "
                                         "(use --nested_folder for sub-folders)")
    return text


def n_samples_value(text):
    if text != "all" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"must be 'all' or a positive integer, got {text!r}")
    return text


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help unless the help already says its default, or the
    default is None (nothing to show)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def new_parser(doc, **kwargs):
    """An argparse parser whose --help shows every flag's default once."""
    return argparse.ArgumentParser(description=doc.split("\n")[0],
                                   formatter_class=DefaultsHelpFormatter, **kwargs)


def keep_probability(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"is the KEEP probability and must lie in (0, 1], got {text}")
    return value


def add_common_arguments(parser, *, exp_name, learn_types, update_types, train_epochs,
                         batch_size, dataset, eta_decay_help):
    """Flags that main.py and main_pytorch.py share (published names and short forms)."""
    add = parser.add_argument
    add("--exp_name", "-en", type=folder_word, default=exp_name,
        help="experiment name (in the folder name)")
    add("--learn_type", "-lt", default="ERIN", choices=learn_types,
        help="learning rule (ERIN = PEPITA)")
    add("--n_runs", "-r", type=positive_int, default=1, help="repetitions of the whole run")
    add("--train_epochs", "-trep", type=positive_int, default=train_epochs, help="epochs")
    add("--eta", "-eta", type=non_negative_float, default=0.01, help="learning rate")
    add("--n_samples", "-ns", type=n_samples_value, default="all",
        help="'all', or N: a random contiguous slice of N training samples, also used as "
             "the test set (an overfitting check, and a quick run)")
    add("--dropout", "-do", type=keep_probability, default=0.9,
        help="dropout KEEP probability (0.9 drops 10%%)")
    add("--check_cos_norm", "-check_cos_norm", action="store_true",
        help="track the angle between F and the weights' product, and the norm of W_1")
    add("--eta_decay", "-eta_d", action="store_true", help=eta_decay_help)
    add("--seed", "-seed", type=non_negative_int, default=None,
        help="fixes weights, F/B, dropout masks and shuffling (random when omitted; "
             "the seed used is saved in metrics.json)")
    add("--update_type", "-ut", default="mom", choices=update_types, help="optimiser")
    add("--batch_size", "-bs", type=positive_int, default=batch_size, help="mini-batch size")
    add("--w_init", "-win", default="he_uniform", choices=W_INITS, help="weight init")
    add("--dataset", "-ds", default=None, choices=tuple(DATASETS),
        help=f"dataset (default {dataset})")
    add("--data_dir", default=None,
        help=f"folder with the dataset files (no download); default ${DATA_DIR_ENV}")
    add("--results_dir", default="results", help="where results folders are written")
    add("--nested_folder", "-nf", default="ignore",
        help="parent folder of the results folder inside --results_dir ('ignore' = none)")
    add("--resume", action="store_true",
        help="continue an interrupted run from its last complete epoch")
    add("--overwrite", action="store_true", help="replace an existing results folder")
    add("--VERBOSE", "-V", action="store_true", help="more output")


def describe(err, limit=120):
    """An exception as a short phrase: the first line of its message (cut at limit
    characters), or its type when it has none."""
    text = str(err).strip().splitlines()
    if not text:
        return type(err).__name__
    return text[0] if len(text[0]) <= limit else text[0][:limit - 1].rstrip(" .,;:") + "…"


def run_cli(parser, train, argv=None):
    """Parse the flags and train. Bad input, unwritable files and lack of memory exit with
    status 2, divergence with status 3, Ctrl-C with 130, each with one line (as argparse
    does for bad flags)."""
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    setup_logging(args.VERBOSE)
    keep_freed_memory()
    resume_hint = "rerun the same command with --resume to continue from the last epoch"
    locks_before = len(_FOLDER_LOCKS)
    try:
        train(args)
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except DivergenceError as err:
        parser.exit(3, f"{parser.prog}: error: {err}; the last good epoch's results and "
                       "checkpoint are kept\n")
    except OSError as err:  # unwritable folder, full disk, lost mount...
        where = f" {err.filename}" if err.filename else ""
        parser.exit(2, f"{parser.prog}: error: cannot write or read{where} "
                       f"({err.strerror or describe(err)}); fix that, then {resume_hint}\n")
    except MemoryError:
        parser.exit(2, f"{parser.prog}: error: out of memory; use --n_samples, a smaller "
                       "network or --dtype float32 (numpy), under another --exp_name or "
                       "with --overwrite\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted; {resume_hint}\n")
    finally:
        release_folder_locks(locks_before)
    return 0


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of returning it to the system: the
    training loops allocate the same MB-sized arrays every batch, and each fresh mapping
    costs a page fault per 4 KiB (this almost halves a conv MNIST epoch on our machines).
    Does nothing where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 2**30)


def setup_logging(verbose):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def seed_sequences(seed, n_runs):
    """The seed used (drawn when None), a SeedSequence for the data (sample slices) and one
    independent SeedSequence per run (weights, F/B, masks, shuffling, deformation)."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    data_seq, *run_seqs = np.random.SeedSequence(seed).spawn(n_runs + 1)
    return seed, data_seq, run_seqs


def rng_state(rng):
    return json.dumps(rng.bit_generator.state)


def set_rng_state(rng, state):
    rng.bit_generator.state = json.loads(state)


# ------------------------------------------------------------------------------------------
# Results folders, atomic writes, metrics and plots
# ------------------------------------------------------------------------------------------
RESUME_FREE_SETTINGS = {"resume", "overwrite", "VERBOSE", "data_dir", "results_dir", "seed",
                        "device"}


def check_resume_settings(saved, args):
    """--resume continues with the interrupted run's settings: any other value is an
    error. Returns the seed the run used."""
    changed = [f"--{k} {getattr(args, k)} (was {v})" for k, v in saved.items()
               if k not in RESUME_FREE_SETTINGS and getattr(args, k, v) != v]
    if args.seed is not None and args.seed != saved["seed"]:
        changed.append(f"--seed {args.seed} (was {saved['seed']})")
    if changed:
        raise UsageError("--resume with other settings than the interrupted run: "
                         + ", ".join(changed) + "; resume with the same flags")
    return saved["seed"]


def results_folder(args, name):
    root = Path(args.results_dir)
    if args.nested_folder != "ignore":
        root = root / args.nested_folder
    return root / name


def resume_checkpoint(folder, name):
    """The checkpoint file `name` of an interrupted run in folder, for --resume, or None
    when the run never saved one (it ended before its first epoch: start it again)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--resume: {folder} does not exist (were the flags the same as "
                         "the interrupted run's?); start the run without --resume")
    check_not_diverged(folder)
    path = folder / name
    if not path.is_file():
        log.info("%s holds no checkpoint (no epoch had finished): starting from the "
                 "beginning", folder)
        return None
    return path


def check_not_diverged(folder):
    """--resume after a divergence stop: refuse with the run and epoch that diverged."""
    try:
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    except (OSError, ValueError):
        return
    if metrics.get("status") == "diverged":
        raise UsageError(f"{folder} stopped because {metrics.get('divergence')}: resuming "
                         "would diverge again; its files are kept; start again with a "
                         "lower --eta under another --exp_name (or --overwrite)")


def checkpoint_error(path, err):
    return UsageError(f"{path} is damaged ({describe(err)}), so the run cannot be resumed; "
                      "start it again with --overwrite, or under another --exp_name")


# Held while a run trains: a second run in the same folder is refused, not mixed in.
_FOLDER_LOCKS = []


def release_folder_locks(keep=0):
    """Release the locks taken after the first `keep` (those of the run that ends)."""
    while len(_FOLDER_LOCKS) > keep:
        _FOLDER_LOCKS.pop().close()


def lock_folder(folder):
    """Take an exclusive lock on folder/.lock, or refuse when another running process
    holds it."""
    lock = open(folder / ".lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"{folder} is in use by another running process; wait for it to "
                         "end, or choose another --exp_name") from None
    _FOLDER_LOCKS.append(lock)


def prepare_folder(folder, resume, overwrite):
    """Create (or reuse, with resume) and lock the run folder; never mix with or silently
    replace an existing one. Unwritable places raise OSError (one line, from run_cli)."""
    folder = Path(folder)
    for parent in [folder.parent, *folder.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{parent} is a file, not a folder; choose another "
                             "--results_dir or --nested_folder")
    if folder.is_dir() and (resume or overwrite):
        lock_folder(folder)
        if overwrite:
            for path in folder.iterdir():
                if path.name != ".lock":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        for leftover in folder.glob(".*.tmp"):  # a write cut short by the interruption
            leftover.unlink()
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()  # atomic: of two runs started at once, one creates it
    except FileExistsError:
        raise UsageError(f"{folder} already exists; continue it with --resume, choose "
                         "another --exp_name, or replace it with --overwrite") from None
    lock_folder(folder)
    return folder


def _file_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # what open() would give, instead of mkstemp's 0600


def atomic_write(path, write):
    """Write through write(temporary_path), then rename: a reader never sees half a file,
    and a failed write (full disk) leaves the earlier file as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, FILE_MODE)
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, data):
    write_text(path, json.dumps(data, indent=1, default=float) + "\n")


def write_table(path, rows):
    """Rows of numbers as a whitespace-separated text file (the published format)."""
    write_text(path, "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in rows))


def plot_curves(path, curves, title, ylabel="accuracy", first_epoch=1):
    """Learning curves {label: (runs x epochs) array}: mean over runs, with the std band;
    the first column is epoch first_epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in curves.items():
        runs = np.atleast_2d(np.asarray(runs, float))
        if runs.size == 0:
            continue
        epochs = np.arange(first_epoch, first_epoch + runs.shape[1])
        mean, std = runs.mean(0), runs.std(0)
        ax.plot(epochs, mean, marker="." if len(epochs) < 30 else None, label=label)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def check_finite(values, where, eta):
    """Raise DivergenceError (with the likely cause) when values hold NaN or inf."""
    if not np.all(np.isfinite(values)):
        raise DivergenceError(f"{where}: NaN or infinite values, training diverged; "
                              f"the learning rate (--eta {eta}) is likely too high")


# ------------------------------------------------------------------------------------------
# Slowness (convergence rate) of a test-accuracy curve
# ------------------------------------------------------------------------------------------
def compute_slowness(test_curve, fit_epochs=None, in100=False, n_classes=10, ax=None,
                     label=None):
    """Fit acc(x) = acc_max * x / (a + x) to a test-accuracy curve; the slowness is a.

    As the published notebook: the chance level (1 / n_classes, times 100 with in100) is
    prepended at x = 0, the first fit_epochs points are kept (all when None), acc_max is
    their maximum, and a is fitted by least squares from a = 0.5 (scipy's curve_fit).
    Smaller a means faster convergence. test_curve holds fractions, or percent with in100.
    With ax (a matplotlib Axes), the curve and the fit are drawn there, in percent.

    Returns {"slowness": a, "acc_max": acc_max, "epochs": x, "curve": y, "fit": fitted y}.
    """
    from scipy.optimize import curve_fit
    curve = np.asarray(test_curve, float).ravel()
    if curve.size < 2:
        raise ValueError(f"a slowness fit needs a test curve of at least 2 epochs, got "
                         f"{curve.size}")
    chance = (100.0 if in100 else 1.0) / n_classes
    points = np.concatenate([[chance], curve])[:fit_epochs]
    epochs = np.arange(len(points), dtype=float)
    acc_max = float(points.max())

    def model(x, a):
        return acc_max * x / (a + x)

    (slowness,), _ = curve_fit(model, epochs, points, p0=[0.5])
    fitted = model(epochs, slowness)
    if ax is not None:
        to_percent = 1.0 if in100 else 100.0
        line, = ax.plot(epochs, points * to_percent, ".", label=f"{label or 'test'} accuracy")
        ax.plot(epochs, fitted * to_percent, "-", color=line.get_color(),
                label=f"fit: slowness {slowness:.4f}")
        ax.set(xlabel="epoch", ylabel="test accuracy (%)")
        ax.legend()
    return {"slowness": float(slowness), "acc_max": acc_max, "epochs": epochs,
            "curve": points, "fit": fitted}


def run_label(rule, *parts):
    """A curve's label: the rule by the paper's name (PEPITA for ERIN), then path, variant."""
    return " ".join(filter(None, ["PEPITA" if rule == "ERIN" else rule, *parts]))


def find_test_curves(sources):
    """{label: test curves (runs x epochs, fractions)} from each source: a results folder
    (metrics.json), a sweep folder (its runs/*/res_*/), or a collected folder (curves.csv,
    one label per rule, path and variant)."""
    found = {}
    for source in map(Path, sources):
        if (source / "metrics.json").is_file():
            found[source.name] = load_test_curves(source)
        elif (source / "curves.csv").is_file():
            for (rule, path, variant), by_seed in read_curves_csv(source / "curves.csv").items():
                label = run_label(rule, path, variant)
                length = min(map(len, by_seed.values()))
                found[f"{source.name}: {label}"] = np.array(
                    [curve[:length] for curve in by_seed.values()]) / 100
        elif (source / "runs").is_dir():
            found.update((f"{source.name}: {run.parent.name}", load_test_curves(run))
                         for run in sorted((source / "runs").glob("*/res_*"))
                         if (run / "metrics.json").is_file())
        else:
            raise FileNotFoundError(f"{source} holds no metrics.json, curves.csv or runs/: "
                                    "give a results, sweep or collected folder")
    return found


def read_curves_csv(path):
    """A curves.csv collected by sweep.py as {(rule, path, variant): {seed: test curve
    (%)}}."""
    curves = {}
    for line in Path(path).read_text().splitlines()[1:]:
        rule, path_label, variant, seed, _, _, test = line.split(",")
        curves.setdefault((rule, path_label, variant), {}).setdefault(seed, []).append(
            float(test))
    return curves


def load_test_curves(folder):
    """Test-accuracy curves (runs x epochs, fractions) of a results folder written by
    main.py (validated runs) or main_pytorch.py, from its metrics.json."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no metrics.json: give a results folder "
                                "written by main.py or main_pytorch.py")
    metrics = json.loads(path.read_text())
    runs = [run for run in metrics["test"] if run]
    if not runs:
        raise ValueError(f"{folder} has no per-epoch test accuracy: run main.py with "
                         "--validation")
    length = min(map(len, runs))
    curves = np.array([run[:length] for run in runs], float)
    return curves / 100 if metrics.get("accuracy_unit") == "percent" else curves
