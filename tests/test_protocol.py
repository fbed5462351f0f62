"""The run protocol that both entry scripts share (protocol.py): the resume checks (data,
lost checkpoints, finished runs), signals, refusals before anything is created, one
metrics.json schema, and checkpoints written before the protocol still resuming."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import weakref

import numpy as np
import pytest
import torch
from conftest import ROOT, synthetic_images, write_idx
from test_faults import (NUMPY_JOB, TORCH_JOB, exit_status, results_dir, run,
                         same_results, snapshot)

import functions
import main
import main_pytorch
import protocol

ENTRIES = [(main.main, NUMPY_JOB), (main_pytorch.main, TORCH_JOB)]
FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints_5b6b493"


def main_module(entry):
    return main if entry is main.main else main_pytorch


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def other_mnist(tmp_path_factory):
    """MNIST-shaped files of other images than conftest's mnist_dir."""
    folder = tmp_path_factory.mktemp("other_mnist")
    x, y = synthetic_images(np.random.default_rng(7), 640, (28, 28))
    for name, array in (("train-images", x[:512]), ("train-labels", y[:512]),
                        ("t10k-images", x[512:]), ("t10k-labels", y[512:])):
        write_idx(folder / f"{name}-idx{3 if 'images' in name else 1}-ubyte.gz", array)
    return folder


def interrupted(entry, job, data_dir, root, monkeypatch, at_epoch=2):
    """A job ended by Ctrl-C at the at_epoch-th epoch it trains."""
    module = main.fn if entry is main.main else main_pytorch
    real, calls = module.train_epoch, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, "train_epoch", stopping)
        with pytest.raises(SystemExit) as exit_info:
            run(entry, job, data_dir, root)
    assert exit_info.value.code == 130
    return results_dir(root)


@pytest.mark.parametrize("entry,job", ENTRIES)
def test_resume_on_other_data_is_refused_and_on_a_copy_continues(
        tmp_path, mnist_dir, other_mnist, monkeypatch, capsys, entry, job):
    folder = interrupted(entry, job, mnist_dir, tmp_path, monkeypatch)
    before = files(folder)
    code, line = exit_status(entry, [*job, "--resume"], other_mnist, tmp_path, capsys)
    assert code == 2 and "other data" in line and str(mnist_dir) in line
    assert files(folder) == before
    copy = tmp_path.parent / f"{tmp_path.name}_copy"
    shutil.copytree(mnist_dir, copy)  # the same files elsewhere: the same data
    assert run(entry, [*job, "--resume"], copy, tmp_path) == 0


def test_a_lost_checkpoint_after_a_finished_run_keeps_that_run(tmp_path, mnist_dir,
                                                               monkeypatch, capsys):
    seedless = NUMPY_JOB[2:]  # without its --seed 4
    folder = interrupted(main.main, seedless, mnist_dir, tmp_path, monkeypatch, at_epoch=3)
    (folder / "checkpoint.npz").unlink()
    before = files(folder)
    code, line = exit_status(main.main, [*seedless, "--resume"], mnist_dir, tmp_path, capsys)
    assert code == 2 and "checkpoint.npz is missing" in line and "1 run(s)" in line
    assert files(folder) == before


def test_a_lost_checkpoint_before_any_finished_run_starts_again_with_the_seed(
        tmp_path, mnist_dir, monkeypatch):
    seedless = NUMPY_JOB[2:]
    folder = interrupted(main.main, seedless, mnist_dir, tmp_path / "a", monkeypatch)
    seed = json.loads((folder / "metrics.json").read_text())["seed"]
    (folder / "checkpoint.npz").unlink()
    assert run(main.main, [*seedless, "--resume"], mnist_dir, tmp_path / "a") == 0
    assert run(main.main, [*seedless, "--seed", str(seed)], mnist_dir, tmp_path / "b") == 0
    same_results(results_dir(tmp_path / "b"), folder)


@pytest.mark.parametrize("entry,job", ENTRIES)
def test_resuming_a_finished_run_changes_nothing(tmp_path, mnist_dir, entry, job):
    assert run(entry, job, mnist_dir, tmp_path) == 0
    folder = results_dir(tmp_path)
    before = files(folder)
    assert run(entry, [*job, "--resume"], mnist_dir, tmp_path) == 0
    assert files(folder) == before
    (folder / main_module(entry).ENGINE.checkpoint).unlink()  # finished: nothing is missing
    del before[main_module(entry).ENGINE.checkpoint]
    assert run(entry, [*job, "--resume"], mnist_dir, tmp_path) == 0
    assert files(folder) == before


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("entry,job", ENTRIES)
def test_a_signal_whose_interrupt_python_lost_stops_at_the_epochs_end(
        tmp_path, mnist_dir, entry, job, monkeypatch, capsys):
    """A SIGTERM that lands in a weakref's callback: Python reports its KeyboardInterrupt
    instead of raising it. No traceback; the run stops after the epoch, which resumes."""
    module = functions if entry is main.main else main_pytorch  # where each epoch runs
    real_epoch = module.train_epoch

    def epoch_with_a_lost_signal(*args, **kwargs):
        result = real_epoch(*args, **kwargs)
        protocol.SIGNALLED.append(signal.SIGTERM)
        victim = type("Victim", (), {})()
        lost = weakref.ref(victim, lambda ref: protocol.stop(signal.SIGTERM, None))
        del victim
        assert lost() is None
        return result

    monkeypatch.setattr(module, "train_epoch", epoch_with_a_lost_signal)
    with pytest.raises(SystemExit) as exit_info:
        run(entry, job, mnist_dir, tmp_path)
    err = capsys.readouterr().err
    assert exit_info.value.code == 143 and "Traceback" not in err
    assert "interrupted by SIGTERM" in err.strip().splitlines()[-1]
    folder = results_dir(tmp_path)
    assert len(json.loads((folder / "metrics.json").read_text())["epoch_time_s"][0]) == 1
    monkeypatch.setattr(module, "train_epoch", real_epoch)
    assert run(entry, [*job, "--resume"], mnist_dir, tmp_path) == 0


@pytest.mark.parametrize("script,job", [("main.py", NUMPY_JOB), ("main_pytorch.py", TORCH_JOB)])
def test_sigterm_ends_in_one_line_with_its_status_and_resumes(tmp_path, mnist_dir, script,
                                                              job):
    job = list(job)
    job[job.index("--train_epochs") + 1] = "400"  # still training when the signal comes
    argv = [sys.executable, str(ROOT / script), *job, "--data_dir", str(mnist_dir),
            "--results_dir", str(tmp_path)]
    process = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*/metrics.json")):
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{script}: interrupted by SIGTERM") and "--resume" in last
    metrics = json.loads(next(tmp_path.glob("*/metrics.json")).read_text())
    assert metrics["status"] == "running"


def test_a_signal_while_torch_loads_is_one_line(tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "main_pytorch.py"), "--results_dir",
                                str(tmp_path)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # importing torch takes seconds
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines() == [
        "main_pytorch.py: stopped by SIGINT while starting; nothing was written"]
    assert not any(tmp_path.iterdir())


def test_a_failing_torch_save_is_one_line(tmp_path, mnist_dir, monkeypatch, capsys):
    def full_disk(obj, path):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    code, line = exit_status(main_pytorch.main, TORCH_JOB, mnist_dir, tmp_path, capsys)
    assert code == 2 and "cannot write or read" in line and "file write failed" in line
    assert "--resume" not in line  # nothing was saved to resume from
    assert not any(tmp_path.iterdir())  # the fresh folder held nothing: removed


@pytest.mark.parametrize("entry,flags,words", [
    (main_pytorch.main, ["--dataset", "mn", "--model", "NetFC", "--fc_hidden", "100000000"],
     "GiB of memory"),
    (main_pytorch.main, ["--dataset", "mn", "--model", "NetFC",
                         "--batch_size", "100000000000000000000000"], "training samples"),
    (main.main, ["--start_size", "100000000000000000"], "GiB of memory"),
    (main.main, ["--batch_size", "100000"], "training samples"),
])
def test_impossible_sizes_are_refused_before_any_folder(tmp_path, mnist_dir, capsys, entry,
                                                        flags, words):
    for attempt in range(2):  # the plain rerun is refused alike, not "already exists"
        code, line = exit_status(entry, flags, mnist_dir, tmp_path, capsys)
        assert code == 2 and words in line
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_dangling_link_as_results_dir_is_named(tmp_path, mnist_dir, capsys):
    link = tmp_path / "results"
    link.symlink_to(tmp_path / "gone")
    code, line = exit_status(main.main, [], mnist_dir, link, capsys)
    assert code == 2 and "link to" in line and "gone" in line


def test_metrics_json_is_alike_for_both_scripts(tmp_path, mnist_dir):
    found = {}
    for entry, job in ENTRIES:
        root = tmp_path / entry.__module__
        assert run(entry, job, mnist_dir, root) == 0
        found[entry.__module__] = json.loads((results_dir(root) / "metrics.json").read_text())
    numpy_metrics, torch_metrics = found["main"], found["main_pytorch"]
    common = {"script", "command", "commit", "date", "host", "device", "versions", "dataset",
              "settings", "seed", "status", "runs_finished", "accuracy_unit", "summary",
              "total_time_s", "test", "final_test", "epoch_time_s"}
    for metrics, script in ((numpy_metrics, "main.py"), (torch_metrics, "main_pytorch.py")):
        assert common <= set(metrics)
        assert metrics["script"] == script and metrics["command"].startswith(f"python {script}")
        assert metrics["accuracy_unit"] == "percent" and metrics["runs_finished"] == 2
        assert metrics["dataset"]["code"] == "mn" and metrics["dataset"]["name"] == "MNIST"
        assert metrics["dataset"]["source"] == str(mnist_dir.resolve())
        assert len(metrics["dataset"]["fingerprint"]) == 64
        assert {"test_mean", "test_std"} <= set(metrics["summary"])
        assert metrics["summary"]["test_mean"] == pytest.approx(np.mean(metrics["final_test"]))
        assert all(1 < a <= 100 for a in metrics["final_test"])  # percent, not fractions
        assert metrics["versions"]["python"] and metrics["versions"]["numpy"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", metrics["date"])
    assert numpy_metrics["device"] == "cpu"
    assert torch_metrics["device"] == ("cuda (" + torch.cuda.get_device_name() + ")"
                                       if torch.cuda.is_available() else "cpu")
    assert numpy_metrics["dataset"]["fingerprint"] == torch_metrics["dataset"]["fingerprint"]
    assert torch_metrics["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("entry,job,kind", [(*ENTRIES[0], "numpy"), (*ENTRIES[1], "torch")])
def test_a_checkpoint_of_the_code_before_the_protocol_still_resumes(tmp_path, mnist_dir,
                                                                    entry, job, kind):
    for folder in (FIXTURES / kind).iterdir():
        shutil.copytree(folder, tmp_path / "resumed" / folder.name)
    os.utime(tmp_path / "resumed")
    assert run(entry, [*job, "--resume"], mnist_dir, tmp_path / "resumed") == 0
    assert run(entry, job, mnist_dir, tmp_path / "straight") == 0
    straight, resumed = (results_dir(tmp_path / p) for p in ("straight", "resumed"))
    # the fixture's run 0 and epoch 1 were computed on another machine, and BLAS and torch's
    # kernels round differently on other processors (OpenBLAS picks its kernels by CPU, torch
    # has AVX2 and AVX-512 paths): equal to rounding here (bit for bit on the fixture's CPU)
    for r in range(2):
        if kind == "numpy":
            a, b = (np.load(f / f"weights_run{r}.npz") for f in (straight, resumed))
            assert a.files == b.files
            assert all(np.allclose(a[k], b[k], rtol=1e-9, atol=1e-12) for k in a.files)
            continue
        a, b = (torch.load(f / f"weights_run{r}.pt", weights_only=True)
                for f in (straight, resumed))
        # run 0's file was written by the earlier code, in the nets' layout of then
        # (layers.<i>.weight): the weights in order
        assert len(a["model"]) == len(b["model"])
        assert all(torch.allclose(wa, wb, rtol=1e-5, atol=1e-6)
                   for wa, wb in zip(a["model"].values(), b["model"].values()))
    files, resumed_files = snapshot(straight), snapshot(resumed)
    files, resumed_files = ({k: v for k, v in f.items() if not k.endswith(".npz")}
                            for f in (files, resumed_files))
    assert files.keys() == resumed_files.keys()
    for name in files:
        if name.endswith(".txt"):
            assert np.allclose(np.loadtxt(straight / name), np.loadtxt(resumed / name),
                               rtol=1e-5, atol=1e-6), name
        else:
            assert files[name] == resumed_files[name], name
    a, b = (json.loads((f / "metrics.json").read_text()) for f in (straight, resumed))
    assert a["test"] == b["test"] and a["final_test"] == b["final_test"]
    if kind == "numpy":
        return
    assert np.allclose(a["loss"], b["loss"], rtol=1e-5)
    # run 0's angles were measured by the earlier code's formula: equal to rounding
    angles = [[[e["angle_F"] for e in run] for run in m["alignment"]] for m in (a, b)]
    assert np.allclose(angles[0], angles[1], rtol=0, atol=1e-4)


def test_a_copy_made_by_git_archive_names_its_commit(tmp_path, monkeypatch):
    """A sweep's code is a `git archive` copy without .git: its runs still record their
    commit, from .git_archival.txt (export-subst); the repository's own copy holds only
    the placeholder."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", ".git_archival.txt"],
                             capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(tmp_path, filter="data")
    assert protocol.archived_commit() is None
    monkeypatch.setattr(protocol, "ROOT", tmp_path)
    assert protocol.checkout_commit() is None
    assert protocol.archived_commit() == head.stdout.strip()
