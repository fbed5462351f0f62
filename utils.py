"""Small helpers that both paths share: errors, weight initialisers, flag types, atomic
file writes, plots, the learning-rate schedule, the alignment angle, and the slowness fit of
test curves (with the readers of collected curves that the notebooks use).

Datasets are in datasets.py, the run protocol (folders, resume, checkpoints, metrics.json,
signals) in protocol.py; nothing here trains a network.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger("pepita")


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, before any folder is created."""


class DivergenceError(Exception):
    """Weights or outputs became NaN or infinite during training."""


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


# What a truncated or garbage .npz/zip file raises on the way through np.load.
BROKEN_FILE_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)

# ------------------------------------------------------------------------------------------
# Flag types of the command lines
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


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the line that matters and where to look, not the
    usage block first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def new_parser(doc, **kwargs):
    """A Parser whose --help shows every flag's default once."""
    return Parser(description=doc.split("\n")[0], formatter_class=DefaultsHelpFormatter,
                  **kwargs)


def rule_name(text):
    """--learn_type: PEPITA, the paper's name, is the published flag value ERIN."""
    return "ERIN" if text == "PEPITA" else text


def keep_probability(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"is the KEEP probability and must lie in (0, 1], got {text}")
    return value


def describe(err, limit=120):
    """An exception as a short phrase: the first line of its message (cut at limit
    characters), or its type when it has none."""
    text = str(err).strip().splitlines()
    if not text:
        return type(err).__name__
    return text[0] if len(text[0]) <= limit else text[0][:limit - 1].rstrip(" .,;:") + "…"


# ------------------------------------------------------------------------------------------
# Atomic file writes, published text tables, plots
# ------------------------------------------------------------------------------------------
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


def is_utf8(text):
    """False for a str that holds undecodable bytes (surrogate escapes, as os.fsdecode and
    sys.argv keep them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sha256_of(path):
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
# The learning-rate schedule, accuracy and the alignment angle (both engines)
# ------------------------------------------------------------------------------------------
def decay_epochs(scheme, code="cif", delay=0):
    """The epochs (counted from 0) at whose start the learning rate is multiplied by 0.1:
    scheme 0 = 60 on MNIST, 60 and 90 otherwise; 1 = 10, 30 and 60 (the published conv
    default); 2 = 60 and 90 (main.py's, the tutorial's and the follow-up's). delay: the
    follow-up's scheduler steps at the end of an epoch, so its decays apply one epoch later."""
    epochs = {0: (60,) if code == "mn" else (60, 90), 1: (10, 30, 60), 2: (60, 90)}[scheme]
    return tuple(e + delay for e in epochs)


def decayed_eta(eta, epoch, epochs, floor=0.0):
    """eta x 0.1 for each decay epoch reached, never below floor (main.py's 1e-6), as
    main.py and the tutorial compute it; main_pytorch.py multiplies the optimiser's rate by
    0.1 at each decay epoch, as torch's schedulers do (the same up to rounding)."""
    decays = sum(epoch >= e for e in epochs)
    return max(eta * 0.1 ** decays, floor) if decays else eta


def accuracy(predict, x, labels, chunk=None):
    """The fraction of samples (rows of x) whose largest output is their label, for numpy
    arrays and torch tensors alike; chunk: samples per call of predict (None: all)."""
    chunk = chunk or len(x)
    correct = sum(int((predict(x[i:i + chunk]).argmax(1) == labels[i:i + chunk]).sum())
                  for i in range(0, len(x), chunk))
    return correct / len(x)


def angle_degrees(a, b):
    """The angle in degrees between two arrays (numpy or torch) of the same size, flattened."""
    a, b = a.reshape(-1), b.reshape(-1)
    cosine = float((a * b).sum()) / (float((a * a).sum()) ** 0.5 * float((b * b).sum()) ** 0.5)
    return math.degrees(math.acos(min(1.0, max(-1.0, cosine))))


# ------------------------------------------------------------------------------------------
# Slowness (convergence rate) of a test-accuracy curve
# ------------------------------------------------------------------------------------------
def compute_slowness(test_curve, fit_epochs=None, in100=False, *, n_classes, ax=None,
                     label=None):
    """Fit acc(x) = acc_max * x / (a + x) to a test-accuracy curve; the slowness is a.

    As the published notebook: the chance level (1 / n_classes, times 100 with in100; no
    default, so that no caller fits CIFAR-100 against 10%) is prepended at x = 0, the first
    fit_epochs points are kept (all when None: the chance level and epochs 1 to
    fit_epochs - 1), acc_max is their maximum, and a is fitted by least squares from
    a = 0.5 (scipy's curve_fit).
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
