"""Shared fixtures: synthetic datasets in the on-disk formats people have, so the tests
exercise the real loaders without a network; the real MNIST in ../shared when present."""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_MNIST = ROOT.parent / "shared" / "data" / "mnist"
JPEG_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic_images(rng, n, shape, classes=10):
    """Images of class prototypes plus noise: learnable, so accuracy can rise above chance."""
    prototypes = rng.integers(0, 256, (classes,) + shape)
    labels = rng.integers(0, classes, n)
    noise = rng.integers(-60, 60, (n,) + shape)
    return np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """A small MNIST-shaped dataset as gzip IDX files (512 train, 128 test images)."""
    folder = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    x, y = synthetic_images(rng, 640, (28, 28))
    write_idx(folder / "train-images-idx3-ubyte.gz", x[:512])
    write_idx(folder / "train-labels-idx1-ubyte.gz", y[:512])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x[512:])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y[512:])
    return folder


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A small CIFAR-10-shaped dataset as a keras-style cifar10.npz (256 train, 64 test)."""
    folder = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(1)
    x, y = synthetic_images(rng, 320, (32, 32, 3))
    np.savez(folder / "cifar10.npz", x_train=x[:256], y_train=y[:256], x_test=x[256:],
             y_test=y[256:])
    return folder


@pytest.fixture
def real_mnist():
    if not (REAL_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the real MNIST is not in {REAL_MNIST}")
    return REAL_MNIST


@pytest.fixture(scope="session")
def real_cifar10():
    """The folder of the cifar10.npz decoded from ../shared/data/cifar10's JPEG copy by its
    make_npz.py (decoded once, about a minute, into the user's cache, where it stays)."""
    if not (JPEG_CIFAR10 / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip(f"the CIFAR-10 JPEG copy is not in {JPEG_CIFAR10}")
    done = subprocess.run([sys.executable, str(JPEG_CIFAR10 / "make_npz.py")],
                          capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        pytest.fail(f"make_npz.py failed: {done.stderr.strip().splitlines()[-1]}")
    return Path(done.stdout.strip().splitlines()[-1]).parent
