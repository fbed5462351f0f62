"""Faults of every class end with exit 2 (130 for Ctrl-C) and one line, keep earlier files,
and a killed multi-run job resumes to the same files as an uninterrupted one.

A kill is simulated in-process by raising Killed (which nothing catches) at a chosen point:
the files on disk are then what a SIGKILL at that point leaves, since every write is atomic.
tests/test_reliability.py kills real processes at random moments."""
import gzip
import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_images, write_idx

import datasets
import functions as fn
import main
import main_pytorch
import protocol
import utils


class Killed(BaseException):
    """A stand-in for SIGKILL: no handler of the scripts catches it."""


NUMPY_JOB = ["--seed", "4", "--n_runs", "2", "--train_epochs", "2", "--validation",
             "--start_size", "16", "--n_hlayers", "1"]
TORCH_JOB = ["--seed", "4", "--n_runs", "2", "--train_epochs", "2", "--dataset", "mn",
             "--model", "NetFC", "--fc_hidden", "32", "--n_samples", "256"]


def results_dir(root):
    folders = [p for p in root.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def run(entry, argv, data_dir, root):
    return entry([*argv, "--data_dir", str(data_dir), "--results_dir", str(root)])


def exit_status(entry, argv, data_dir, root, capsys):
    """Exit status and the last stderr line of a run that must fail cleanly."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(entry, argv, data_dir, root)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err.strip().splitlines()[-1]


def snapshot(folder):
    """Every file's bytes except those that hold times, or (.pt) their temporary file's
    name: the tests compare their tensors."""
    timed = {"metrics.json", "checkpoint.npz"}
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and p.name not in timed and not p.name.startswith("res_summary")
            and p.suffix not in (".png", ".pt")}


def same_results(a, b):
    assert snapshot(a) == snapshot(b)
    metrics_a, metrics_b = (json.loads((f / "metrics.json").read_text()) for f in (a, b))
    for metrics in (metrics_a, metrics_b):  # where the folder is, and how it was started
        for key in ("results_dir", "resume"):
            metrics["settings"].pop(key)
    for key in metrics_a:
        if key not in ("epoch_time_s", "total_time_s", "date", "command"):
            assert metrics_a[key] == metrics_b[key], key


# ------------------------------------------------------------------------------------------
# Kill at any moment, then --resume
# ------------------------------------------------------------------------------------------
def kill_at_call(monkeypatch, module, name, calls, after=False, when=lambda *a, **k: True):
    """Make module.name raise Killed at its calls-th call where when(...) holds (before
    the real call, or right after it with after=True)."""
    real, seen = getattr(module, name), []

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            seen.append(1)
            if len(seen) == calls and not after:
                raise Killed
            result = real(*args, **kwargs)
            if len(seen) == calls:
                raise Killed
            return result
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def starting(run):
    """Where the protocol saves the checkpoint that starts run `run`."""
    return lambda self, r, epoch, payload=None: r == run and epoch == -1


def finishing(self, status="running"):
    return status == "finished"


NUMPY_KILLS = {
    "before anything was saved": (protocol.Run, "save", 1, False, starting(0)),
    "run 0, epoch 1": (fn, "train_epoch", 1, False, None),
    "run 0, epoch 2": (fn, "train_epoch", 2, False, None),
    "between the runs": (protocol.Run, "save", 1, True, starting(1)),
    "run 1, epoch 1": (fn, "train_epoch", 3, False, None),
    "last writes": (protocol.Run, "write_results", 1, False, finishing),
}


@pytest.fixture(scope="module")
def straight_numpy(tmp_path_factory, mnist_dir):
    root = tmp_path_factory.mktemp("straight")
    run(main.main, NUMPY_JOB, mnist_dir, root)
    return results_dir(root)


@pytest.mark.parametrize("moment", NUMPY_KILLS)
def test_numpy_multi_run_job_killed_anywhere_resumes_exactly(
        tmp_path, mnist_dir, straight_numpy, monkeypatch, capsys, moment):
    module, name, calls, after, when = NUMPY_KILLS[moment]
    with monkeypatch.context() as patch:
        kill_at_call(patch, module, name, calls, after, when or (lambda *a, **k: True))
        with pytest.raises(Killed):
            run(main.main, NUMPY_JOB, mnist_dir, tmp_path)
    code, line = exit_status(main.main, NUMPY_JOB, mnist_dir, tmp_path, capsys)
    assert code == 2 and "--resume" in line  # the plain rerun names the command that works
    assert run(main.main, [*NUMPY_JOB, "--resume"], mnist_dir, tmp_path) == 0
    same_results(straight_numpy, results_dir(tmp_path))


TORCH_KILLS = {
    "before anything was saved": (protocol.Run, "save", 1, False, starting(0)),
    "run 0, epoch 1": (main_pytorch, "train_epoch", 1, False, None),
    "between the runs": (protocol.Run, "save", 1, True, starting(1)),
    "run 1, epoch 2": (main_pytorch, "train_epoch", 4, False, None),
    "last writes": (protocol.Run, "write_results", 1, False, finishing),
}


@pytest.mark.parametrize("moment", TORCH_KILLS)
def test_pytorch_multi_run_job_killed_anywhere_resumes_exactly(
        tmp_path, mnist_dir, monkeypatch, moment):
    run(main_pytorch.main, TORCH_JOB, mnist_dir, tmp_path / "straight")
    module, name, calls, after, when = TORCH_KILLS[moment]
    with monkeypatch.context() as patch:
        kill_at_call(patch, module, name, calls, after, when or (lambda *a, **k: True))
        with pytest.raises(Killed):
            run(main_pytorch.main, TORCH_JOB, mnist_dir, tmp_path / "killed")
    assert run(main_pytorch.main, [*TORCH_JOB, "--resume"], mnist_dir,
               tmp_path / "killed") == 0
    straight, killed = (results_dir(tmp_path / p) for p in ("straight", "killed"))
    for r in range(2):
        a, b = (torch.load(f / f"weights_run{r}.pt", weights_only=True)
                for f in (straight, killed))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    same_results(straight, killed)


@pytest.mark.parametrize("entry,job", [(main.main, NUMPY_JOB), (main_pytorch.main, TORCH_JOB)])
def test_divergence_then_resume_answers_in_one_line(tmp_path, mnist_dir, monkeypatch, capsys,
                                                    entry, job):
    module = fn if entry is main.main else main_pytorch
    real, calls = module.train_epoch, []

    def diverging_in_run_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # main_pytorch's train_epoch names the run and epoch itself
            where = f"{args[-1]}, " if module is main_pytorch else ""
            raise utils.DivergenceError(f"{where}batch 2: NaN or infinite values")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, "train_epoch", diverging_in_run_1)
        code, line = exit_status(entry, job, mnist_dir, tmp_path, capsys)
    assert code == 3
    folder = results_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert any(name.startswith("weights_run0") for name in before)  # run 0 stays usable
    code, line = exit_status(entry, [*job, "--resume"], mnist_dir, tmp_path, capsys)
    assert code == 2 and "diverge" in line and "run 1 epoch 1" in line and "--eta" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("entry,job", [(main.main, NUMPY_JOB), (main_pytorch.main, TORCH_JOB)])
def test_ctrl_c_exits_130_and_resumes(tmp_path, mnist_dir, monkeypatch, capsys, entry, job):
    module = fn if entry is main.main else main_pytorch
    with monkeypatch.context() as patch:
        kill_at_call(patch, module, "train_epoch", 2)
        patch.setattr(module, "train_epoch", _raising(module.train_epoch,
                                                      KeyboardInterrupt))
        code, line = exit_status(entry, job, mnist_dir, tmp_path, capsys)
    assert code == 130 and "interrupted" in line and "--resume" in line
    assert run(entry, [*job, "--resume"], mnist_dir, tmp_path) == 0


def _raising(function, error):
    """function, with Killed turned into error (a Ctrl-C or a full disk at that point)."""
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Killed:
            raise error from None
    return wrapper


@pytest.mark.parametrize("error,status,words", [
    (MemoryError(), 2, "out of memory"),
    (OSError(28, "No space left on device", "metrics.json"), 2, "No space left"),
])
def test_memory_and_disk_errors_exit_2_and_keep_files(tmp_path, mnist_dir, monkeypatch, capsys,
                                                       error, status, words):
    with monkeypatch.context() as patch:
        kill_at_call(patch, fn, "train_epoch", 3)
        patch.setattr(fn, "train_epoch", _raising(fn.train_epoch, error))
        code, line = exit_status(main.main, NUMPY_JOB, mnist_dir, tmp_path, capsys)
    assert code == status and words in line
    folder = results_dir(tmp_path)
    assert (folder / "weights_run0.npz").is_file() and (folder / "checkpoint.npz").is_file()
    assert run(main.main, [*NUMPY_JOB, "--resume"], mnist_dir, tmp_path) == 0


def test_a_failed_write_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "metrics.json"
    utils.write_text(path, "earlier\n")

    def full_disk(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        utils.atomic_write(path, full_disk)
    assert path.read_text() == "earlier\n" and os.listdir(tmp_path) == ["metrics.json"]


# ------------------------------------------------------------------------------------------
# Folders: clashes, unwritable places, permissions
# ------------------------------------------------------------------------------------------
def test_a_second_run_in_the_same_folder_is_refused(tmp_path, mnist_dir, capsys):
    argv = ["--train_epochs", "1", "--start_size", "16", "--n_hlayers", "1"]
    real_train_epoch = fn.train_epoch

    def second_run_meanwhile(*args, **kwargs):  # another process starts the same run now
        for flags in ([], ["--resume"], ["--overwrite"]):
            code, line = exit_status(main.main, [*argv, *flags], mnist_dir, tmp_path, capsys)
            assert code == 2 and ("in use" in line or "already exists" in line), line
        return real_train_epoch(*args, **kwargs)

    fn.train_epoch = second_run_meanwhile
    try:
        assert run(main.main, argv, mnist_dir, tmp_path) == 0
    finally:
        fn.train_epoch = real_train_epoch
    assert json.loads((results_dir(tmp_path) / "metrics.json").read_text())["status"] == \
        "finished"


@pytest.mark.parametrize("entry,job", [(main.main, NUMPY_JOB), (main_pytorch.main, TORCH_JOB)])
def test_results_under_a_plain_file_exit_2(tmp_path, mnist_dir, capsys, entry, job):
    (tmp_path / "plain").write_text("not a folder")
    code, line = exit_status(entry, job, mnist_dir, tmp_path / "plain" / "deeper", capsys)
    assert code == 2 and "is a file" in line


def test_unwritable_results_folder_exits_2(tmp_path, mnist_dir, monkeypatch, capsys):
    def refused(self, *args, **kwargs):  # what a non-root user gets in a read-only folder
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "mkdir", refused)
    code, line = exit_status(main.main, NUMPY_JOB, mnist_dir, tmp_path / "r", capsys)
    assert code == 2 and "Permission denied" in line and str(tmp_path / "r") in line


def test_result_files_follow_the_umask(tmp_path, mnist_dir):
    run(main.main, NUMPY_JOB, mnist_dir, tmp_path)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in results_dir(tmp_path).iterdir()
             if p.is_file() and p.name != ".lock"}
    assert modes == {utils.FILE_MODE} and utils.FILE_MODE & 0o044  # group/others can read


# ------------------------------------------------------------------------------------------
# Damaged checkpoints and weights files
# ------------------------------------------------------------------------------------------
def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x93NUMPY garbage" * 10)
    elif path.suffix == ".npz":  # a readable file without the state
        np.savez(path, W0=np.zeros(3))
    else:
        torch.save({"run": 0, "epoch": 0}, path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing keys"])
@pytest.mark.parametrize("entry,job,name", [(main.main, NUMPY_JOB, "checkpoint.npz"),
                                            (main_pytorch.main, TORCH_JOB, "checkpoint.pt")])
def test_damaged_checkpoint_exits_2(tmp_path, mnist_dir, capsys, entry, job, name, how):
    job = [*job[:job.index("--n_runs")], "--n_runs", "1", *job[job.index("--n_runs") + 2:]]
    run(entry, job, mnist_dir, tmp_path)
    folder = results_dir(tmp_path)
    damage(folder / name, how)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    code, line = exit_status(entry, [*job, "--resume"], mnist_dir, tmp_path, capsys)
    assert code == 2 and "damaged" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_weights_for_continue_training_exit_2(tmp_path, mnist_dir, capsys, how):
    run(main.main, NUMPY_JOB, mnist_dir, tmp_path / "first")
    weights = results_dir(tmp_path / "first") / "weights_run0.npz"
    damage(weights, how)
    code, line = exit_status(main.main, [*NUMPY_JOB, "--continue_training",
                                         "--continue_training_path", str(weights)],
                             mnist_dir, tmp_path / "second", capsys)
    assert code == 2 and "damaged" in line and str(weights) in line
    assert not (tmp_path / "second").exists()


# ------------------------------------------------------------------------------------------
# Bad dataset files
# ------------------------------------------------------------------------------------------
def npz_dataset(folder, x_train, y_train, x_test, y_test, name="mnist.npz"):
    folder.mkdir(exist_ok=True)
    np.savez(folder / name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return folder


@pytest.fixture(scope="module")
def images():
    x, y = synthetic_images(np.random.default_rng(2), 160, (28, 28))
    return x[:128], y[:128], x[128:], y[128:]


def bad_files(tmp_path, images, case):
    x_train, y_train, x_test, y_test = images
    folder = tmp_path / case.replace(" ", "_")
    if case == "header too short":
        folder.mkdir()
        for name, array in zip(datasets.MNIST_FILES, images):
            write_idx(folder / f"{name}.gz", array)
        with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\0\0\x08\x03\0\0")
    elif case == "truncated npz":
        npz_dataset(folder, *images)
        data = (folder / "mnist.npz").read_bytes()
        (folder / "mnist.npz").write_bytes(data[:len(data) // 2])
    elif case == "images of a wrong size":
        npz_dataset(folder, x_train[:, :20, :20], y_train, x_test[:, :20, :20], y_test)
    elif case == "labels outside the classes":
        npz_dataset(folder, x_train, y_train + 5, x_test, y_test)
    elif case == "negative labels":
        npz_dataset(folder, x_train, y_train - 1, x_test, y_test)
    elif case == "fewer labels than images":
        npz_dataset(folder, x_train, y_train[:-3], x_test, y_test)
    elif case == "floats beyond 255":
        npz_dataset(folder, x_train * 2.0, y_train, x_test * 2.0, y_test)
    elif case == "NaN pixels":
        bad = x_train.astype(float)
        bad[0, 0, 0] = np.nan
        npz_dataset(folder, bad, y_train, x_test, y_test)
    elif case == "flipped bytes in a .gz":
        folder.mkdir()
        for name, array in zip(datasets.MNIST_FILES, images):
            write_idx(folder / f"{name}.gz", array)
        path = folder / "train-images-idx3-ubyte.gz"
        data = bytearray(path.read_bytes())
        for i in np.random.default_rng(0).choice(np.arange(20, len(data) - 8), 100, False):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    elif case == "missing arrays":
        folder.mkdir()
        np.savez(folder / "mnist.npz", x_train=x_train)
    return folder


@pytest.mark.parametrize("case,words", [
    ("header too short", "too short"),
    ("truncated npz", "mnist.npz"),
    ("images of a wrong size", "shape"),
    ("labels outside the classes", "outside 0..9"),
    ("negative labels", "outside 0..9"),
    ("fewer labels than images", "labels"),
    ("floats beyond 255", "uint8 in [0, 255] or floats in [0, 1]"),
    ("NaN pixels", "uint8 in [0, 255] or floats in [0, 1]"),
    ("missing arrays", "x_train, y_train"),
    ("flipped bytes in a .gz", "train-images-idx3-ubyte.gz is truncated or corrupt"),
])
@pytest.mark.parametrize("entry", [main.main, main_pytorch.main])
def test_bad_dataset_files_exit_2_before_any_folder(tmp_path, images, capsys, entry, case,
                                                    words):
    folder = bad_files(tmp_path, images, case)
    job = NUMPY_JOB if entry is main.main else TORCH_JOB
    code, line = exit_status(entry, job, folder, tmp_path / "r", capsys)
    assert code == 2 and words in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("case,words", [
    ("labels outside the classes", "outside 0..99"),
    ("images of a wrong size", "expected (N, 32, 32, 3)"),
])
@pytest.mark.parametrize("entry", [main.main, main_pytorch.main])
def test_a_bad_cifar100_npz_stops_in_one_line_naming_the_file(tmp_path, capsys, entry, case,
                                                             words):
    x, y = synthetic_images(np.random.default_rng(3), 80, (32, 32, 3), classes=100)
    if case == "labels outside the classes":
        y[0] = 100
    else:
        x = x[:, :28, :28]
    folder = npz_dataset(tmp_path / "c100", x[:64], y[:64], x[64:], y[64:], "cifar100.npz")
    job = NUMPY_JOB if entry is main.main else TORCH_JOB
    code, line = exit_status(entry, [*job, "--dataset", "cif100"], folder, tmp_path / "r",
                             capsys)
    assert code == 2 and words in line and str(folder / "cifar100.npz") in line, line
    assert not (tmp_path / "r").exists()


def test_a_folder_with_an_archive_names_its_decoder(tmp_path):
    (tmp_path / "cifar100").mkdir()
    (tmp_path / "cifar100" / "make_npz.py").write_text("")
    with pytest.raises(datasets.DatasetError) as err:
        datasets.load_dataset("cif100", tmp_path / "cifar100")
    decoder = tmp_path / "cifar100" / "make_npz.py"
    assert f"decode it with 'python {decoder}'" in str(err.value)
    assert str(Path.home() / ".cache" / "pepita-data" / "cifar100") in str(err.value)


@pytest.mark.parametrize("entry", [main.main, main_pytorch.main])
@pytest.mark.parametrize("where", ["--exp_name", "--results_dir"])
def test_names_that_are_not_utf8_are_refused_before_any_folder(tmp_path, mnist_dir, capsys,
                                                                entry, where):
    job = NUMPY_JOB if entry is main.main else TORCH_JOB
    bad = "run\udcff"  # the byte 0xff as sys.argv holds it
    root = tmp_path / "r"
    argv = [*job, "--data_dir", str(mnist_dir)]
    argv += (["--exp_name", bad, "--results_dir", str(root)] if where == "--exp_name"
             else ["--results_dir", str(root / bad)])
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and f"{where} " in line and "not valid UTF-8" in line
    assert not root.exists()


def test_float_images_in_0_1_train_like_the_uint8_ones(tmp_path, images):
    x_train, y_train, x_test, y_test = images
    as_bytes = npz_dataset(tmp_path / "bytes", *images)
    as_floats = npz_dataset(tmp_path / "floats", x_train / 255, y_train, x_test / 255, y_test)
    a, b = (datasets.load_dataset("mn", folder) for folder in (as_bytes, as_floats))
    assert np.allclose(a[0], b[0], atol=1e-4) and np.array_equal(a[1], b[1])
    for folder, name in ((as_bytes, "bytes"), (as_floats, "floats")):
        run(main.main, [*NUMPY_JOB, "--exp_name", name], folder, tmp_path / "r")
    w_bytes, w_floats = (np.load(next((tmp_path / "r").glob(f"res_{name}_*")) /
                                 "weights_run0.npz")["W0"] for name in ("bytes", "floats"))
    assert np.allclose(w_bytes, w_floats, rtol=0, atol=1e-6)


def cifar_folder(tmp_path, first_batch, protocol=pickle.HIGHEST_PROTOCOL):
    """cifar-10-batches-py/ with small batches; data_batch_1's bytes replaced by first_batch
    (bytes) unless None."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": b"training batch", b"data": rng.integers(
                     0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, 4)],
                 b"filenames": [b"a.png", "b.png", b"c.png", b"d.png"]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    if first_batch is not None:
        (folder / "data_batch_1").write_bytes(first_batch)
    return folder


class RunsACommand:
    """Unpickling this calls os.system: what a hostile 'CIFAR batch' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def damaged_pickle(case, tmp_path):
    good = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4})
    if case == "runs a command":
        return pickle.dumps({b"data": RunsACommand(tmp_path / "ran")})
    if case == "names a missing module":
        return b"\x80\x02cno_such_thing\nx\nq\x00."  # protocol 2: GLOBAL no_such_thing.x
    if case == "a frame claiming a huge length":
        return b"\x80\x04\x95" + (2 ** 62).to_bytes(8, "little") + b"}" * 19
    if case == "cut in half":
        return good[:len(good) // 2]
    if case == "garbage":
        return bytes(np.random.default_rng(3).integers(0, 256, 200, dtype=np.uint8))
    raise ValueError(case)


@pytest.mark.parametrize("case,words", [
    ("runs a command", "refused: it asks to load posix.system"),
    ("names a missing module", "refused: it asks to load no_such_thing.x"),
    ("a frame claiming a huge length", "data_batch_1 is"),
    ("cut in half", "truncated or corrupt"),
    ("garbage", "data_batch_1"),
])
@pytest.mark.parametrize("entry", [main.main, main_pytorch.main])
def test_damaged_or_hostile_cifar_pickles_exit_2_in_one_line(tmp_path, capsys, entry, case,
                                                              words):
    folder = cifar_folder(tmp_path, damaged_pickle(case, tmp_path))
    job = [*(NUMPY_JOB if entry is main.main else TORCH_JOB), "--dataset", "cif"]
    code, line = exit_status(entry, job, folder.parent, tmp_path / "r", capsys)
    assert code == 2 and words in line and "data_batch_1" in line, line
    assert "\n" not in line.strip() and "out of memory" not in line
    assert not (tmp_path / "ran").exists()  # the command did not run
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_pickles_of_every_protocol_are_read(tmp_path, protocol):
    cifar_folder(tmp_path, None, protocol)
    x_train, y_train, x_test, y_test = datasets.load_dataset("cif", tmp_path)
    assert x_train.shape == (20, 32, 32, 3) and y_test.shape == (4,)


# ------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,words", [
    (["--Bstd", "nan"], "finite number > 0"),
    (["--Bstd", "inf"], "finite number > 0"),
    (["--Bstd", "0"], "finite number > 0"),
    (["--eta", "inf"], "finite number >= 0"),
    (["--seed", "-2"], "integer >= 0"),
    (["--n_samples", "0"], "positive integer"),
    (["--n_samples", "100000"], "exceeds"),
    (["--fc_hidden", "0"], "positive integer"),
    (["--exp_name", "a/b"], "without '/'"),
])
def test_pytorch_flags_out_of_range_exit_2(tmp_path, mnist_dir, capsys, flags, words):
    code, line = exit_status(main_pytorch.main, [*TORCH_JOB, *flags], mnist_dir,
                             tmp_path / "r", capsys)
    assert code == 2 and words in line
    assert not (tmp_path / "r").exists()


def test_help_shows_defaults_and_every_flag_has_help():
    for parser in (main.build_parser(), main_pytorch.build_parser()):
        text = " ".join(parser.format_help().split())
        assert "(default: " in text and "--n_samples" in text
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, undocumented
    import sweep
    for parser in (main.build_parser(), main_pytorch.build_parser(), sweep.build_parser()):
        for action in parser._actions:
            text = " ".join(parser._get_formatter()._expand_help(action).split()) \
                if action.help else ""
            assert text.count("default") <= 1, text  # no doubled default
            assert "(default: None)" not in text
    assert "epochs 60 and 90" in " ".join(main.build_parser().format_help().split())
    assert "10, 30 and 60" in " ".join(main_pytorch.build_parser().format_help().split())


def test_a_failed_download_names_its_cause(tmp_path, monkeypatch, capsys):
    def offline(code):
        raise ConnectionError("Temporary failure in name resolution")

    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "_download_keras", offline)
    code, line = exit_status(main.main, NUMPY_JOB, "", tmp_path / "r", capsys)
    assert code == 2 and "name resolution" in line and "--data_dir" in line


def test_a_failed_torchvision_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(root, train, download):  # torchvision makes its folders, then fails
        (Path(root) / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
        raise ConnectionError("Temporary failure in name resolution")

    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(datasets.DatasetError, match="pass it as DATA_DIR or"):
        datasets.load_dataset("cif", None, "torchvision", data_flag="DATA_DIR")
    assert not (tmp_path / ".cache" / "pepita").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(ConnectionError):
        datasets._download_torchvision("cif", tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()  # a folder that was there before stays
