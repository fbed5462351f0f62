"""Interrupted runs resume exactly; divergence stops cleanly; checkpoints stay loadable."""
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, synthetic_images, write_idx

import functions as fn
import main
import main_pytorch


@pytest.fixture(scope="module")
def bigger_mnist(tmp_path_factory):
    """4096 training images: long enough epochs for a kill to land inside one."""
    folder = tmp_path_factory.mktemp("mnist4k")
    x, y = synthetic_images(np.random.default_rng(5), 4096 + 256, (28, 28))
    write_idx(folder / "train-images-idx3-ubyte.gz", x[:4096])
    write_idx(folder / "train-labels-idx1-ubyte.gz", y[:4096])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x[4096:])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y[4096:])
    return folder


def kill_repeatedly(script, argv, checkpoint, rng, kills=3):
    """Start the run, SIGKILL it at a random moment after its first checkpoint, check that
    the checkpoint loads, resume; `kills` times."""
    for attempt in range(kills):
        command = [sys.executable, str(ROOT / script), *argv] + (["--resume"] if attempt else [])
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.8))
        process.kill()
        _, err = process.communicate()
        assert process.returncode in (-9, 0), err.decode()
        yield checkpoint


def straight_and_killed(main_function, script, settings, tmp_path, checkpoint_name, check,
                        seed):
    """Run once without interruption, then again killed repeatedly (`check` loads each
    checkpoint left behind) and resumed to the end. Returns the two results folders."""
    main_function([*settings, "--results_dir", str(tmp_path / "straight")])
    interrupted = ["--results_dir", str(tmp_path / "killed"), *settings]
    folder_name = next((tmp_path / "straight").iterdir()).name
    checkpoint = tmp_path / "killed" / folder_name / checkpoint_name
    for path in kill_repeatedly(script, interrupted, checkpoint, np.random.default_rng(seed)):
        check(path)
    main_function([*interrupted, "--resume"])
    return tmp_path / "straight" / folder_name, checkpoint.parent


def test_numpy_kill_and_resume_is_exact(tmp_path, bigger_mnist):
    settings = ["--seed", "3", "--train_epochs", "5", "--n_runs", "2", "--validation",
                "--deformation", "--check_cos_norm", "--n_hlayers", "1", "--data_dir",
                str(bigger_mnist)]

    def check(path):
        with np.load(path, allow_pickle=False) as saved:
            epoch = json.loads(str(saved["state"]))["epoch"]
            assert epoch == -1 or (epoch >= 0 and "W0" in saved)  # epoch -1: run not begun

    straight, killed = straight_and_killed(main.main, "main.py", settings, tmp_path,
                                           "checkpoint.npz", check, seed=0)
    for run in range(2):
        a = np.load(straight / f"weights_run{run}.npz")
        b = np.load(killed / f"weights_run{run}.npz")
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    metrics_a = json.loads((straight / "metrics.json").read_text())
    metrics_b = json.loads((killed / "metrics.json").read_text())
    for key in ("train", "val", "test", "angles", "norms", "final_test", "final_train"):
        assert metrics_a[key] == metrics_b[key], key
    assert (straight / "test_acc_tot.txt").read_text() == (killed / "test_acc_tot.txt").read_text()
    assert not list(killed.glob(".*.tmp"))


def test_pytorch_kill_and_resume_is_exact(tmp_path, bigger_mnist):
    settings = ["--seed", "3", "--train_epochs", "4", "--dataset", "mn", "--model",
                "NetFC1x1024DOcust", "--eta_decay", "--decay_scheme", "1", "--data_dir",
                str(bigger_mnist)]

    def check(path):
        state = torch.load(path, weights_only=True)
        assert state["epoch"] == -1 or "model" in state  # epoch -1: run not begun

    straight, killed = straight_and_killed(main_pytorch.main, "main_pytorch.py", settings,
                                           tmp_path, "checkpoint.pt", check, seed=1)
    a = torch.load(straight / "weights_run0.pt", weights_only=True)
    b = torch.load(killed / "weights_run0.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    metrics_a = json.loads((straight / "metrics.json").read_text())
    metrics_b = json.loads((killed / "metrics.json").read_text())
    assert metrics_a["loss"] == metrics_b["loss"] and metrics_a["test"] == metrics_b["test"]


def test_resume_with_other_settings_is_refused(tmp_path, mnist_dir, capsys):
    argv = ["--seed", "1", "--train_epochs", "1", "--start_size", "16", "--n_hlayers", "1",
            "--data_dir", str(mnist_dir), "--results_dir", str(tmp_path)]
    main.main(argv)
    with pytest.raises(SystemExit) as exit_info:
        main.main([*argv, "--resume", "--eta", "0.5"])
    assert exit_info.value.code == 2 and "--eta 0.5 (was 0.01)" in capsys.readouterr().err


def test_real_divergence_stops_with_a_clear_message(tmp_path, mnist_dir, capsys):
    argv = ["--eta", "1e12", "--learn_type", "BP", "--sample_passes", "1", "--train_epochs",
            "3", "--act_hidden", "Lrelu", "--start_size", "16", "--n_hlayers", "1",
            "--data_dir", str(mnist_dir), "--results_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == 3
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NaN" in message and "--eta 1000000000000.0" in message
    finished = int(re.search(r"epoch (\d+), batch \d+", message).group(1)) - 1
    metrics = json.loads((next(tmp_path.iterdir()) / "metrics.json").read_text())
    assert len(metrics["train"][0]) == finished >= 1


def test_divergence_keeps_the_last_good_epoch(tmp_path, mnist_dir, monkeypatch, capsys):
    real_train_epoch, calls = fn.train_epoch, []

    def diverging_in_epoch_3(model, *args, **kwargs):
        calls.append(1)
        accuracy = real_train_epoch(model, *args, **kwargs)
        if len(calls) == 3:
            model.weights[0][0, 0] = np.inf
        return accuracy

    monkeypatch.setattr(fn, "train_epoch", diverging_in_epoch_3)
    argv = ["--train_epochs", "5", "--validation", "--start_size", "16", "--n_hlayers", "1",
            "--data_dir", str(mnist_dir), "--results_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == 3
    assert "end of run 0 epoch 3" in capsys.readouterr().err
    folder = next(tmp_path.iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["train"][0]) == len(metrics["val"][0]) == 2
    with np.load(folder / "checkpoint.npz", allow_pickle=False) as saved:
        assert json.loads(str(saved["state"]))["epoch"] == 1
        assert np.all(np.isfinite(saved["W0"]))
