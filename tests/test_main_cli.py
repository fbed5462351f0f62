"""main.py end to end on small synthetic data: outputs, flags, seeds, bad input, real MNIST."""
import json

import numpy as np
import pytest

import datasets
import main

PAPER_COMMAND = ("--exp_name Experiment1 --learn_type ERIN --n_runs 1 --train_epochs 100 "
                 "--sample_passes 2 --n_samples all --eta 0.1 --dropout 0.9 --eta_decay --mnist "
                 "--validation --batch_size 64 --update_type mom --w_init he_uniform --build auto "
                 "--struct uniform --start_size 1024 --n_hlayers 1 --act_hidden relu "
                 "--act_out softmax").split()


def run_main(tmp_path, data_dir, *flags, epochs=1, small=True):
    """Run main.py in-process; defaults first, so the given flags win. Returns the newest
    results folder."""
    defaults = ["--train_epochs", str(epochs)]
    if small:
        defaults += ["--start_size", "32", "--n_hlayers", "1"]
    argv = [*defaults, *flags, "--data_dir", str(data_dir),
            "--results_dir", str(tmp_path / "results")]
    assert main.main(argv) == 0
    folders = [p for p in (tmp_path / "results").rglob("res_*") if p.is_dir()]
    return max(folders, key=lambda p: p.stat().st_mtime_ns)


def test_paper_command_writes_published_files_and_metrics(tmp_path, mnist_dir):
    argv = list(PAPER_COMMAND)
    argv[argv.index("--train_epochs") + 1] = "2"
    folder = run_main(tmp_path, mnist_dir, *argv, "--seed", "0", small=False)
    assert folder.name == ("res_Experiment1_ERIN_mom_64_relu_he_uniform_un_do90_etad_mn_rep1_"
                           "tr2_pass2_tav")
    for name in ("res_summary_Experiment1.txt", "train_acc_run0.txt", "test_acc_run0.txt",
                 "train_acc_tot.txt", "val_acc_tot.txt", "test_acc_tot.txt",
                 "train_acc_tot_rep0.txt", "metrics.json", "learning_curve.png",
                 "weights_run0.npz", "checkpoint.npz"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["seed"] == 0
    assert len(metrics["train"][0]) == len(metrics["test"][0]) == 2
    assert np.loadtxt(folder / "test_acc_tot.txt").shape == (2,)
    assert metrics["accuracy_unit"] == "percent"
    assert metrics["final_test"][0] > 30  # well above chance (10%) on learnable data
    published = np.loadtxt(folder / "test_acc_tot.txt")[-1]  # the text files: fractions
    assert metrics["final_test"][0] == pytest.approx(100 * published, abs=1e-4)
    weights = np.load(folder / "weights_run0.npz")
    assert weights["W0"].shape == (1024, 784) and weights["F"].shape == (784, 10)


@pytest.mark.parametrize("flags", [
    ["--learn_type", "BP", "--sample_passes", "1", "--update_type", "SGD"],
    ["--learn_type", "FA", "--sample_passes", "1", "--w_init", "nok"],
    ["--learn_type", "DFA", "--sample_passes", "1", "--update_type", "Adam"],
    ["--learn_type", "DRTP", "--sample_passes", "1", "--update_type", "rmsprop"],
    ["-lt", "ERINsign", "-sp", "3", "-ut", "NAG", "-win", "xav", "-bs", "50"],
    ["-en", "x", "-nf", "nested", "-r", "2", "-trep", "2", "-ns", "100", "-eta", "0.05",
     "-do", "1", "-no_shuffling", "-zm", "-eta_d", "-V", "-pl", "-val", "-kv", "ul",
     "-struct", "pyramidal", "-nh", "2", "-ss", "64", "-act_h", "tanh_ciresan",
     "-act_o", "softmax", "-seed", "1", "-mn"],
    ["-notav", "-val"],
    ["--build", "custom", "--architecture", "784", "40", "20", "10", "--act_list", "relu",
     "Lrelu", "softmax"],
    ["--check_cos_norm", "--validation"],
    ["--deformation", "--n_samples", "64"],
    ["--dtype", "float32", "--w_init", "he"],
    ["--w_init", "cir", "--act_hidden", "sigm"],
    ["--w_init", "rnd", "--act_hidden", "step_f"],
    ["--w_init", "ones", "--act_hidden", "tanh", "--eta", "0.001"],
    ["--w_init", "zero", "--learn_type", "BP", "--sample_passes", "1"],
])
def test_published_flags_are_accepted(tmp_path, mnist_dir, flags):
    folder = run_main(tmp_path, mnist_dir, *flags)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert all(0 <= a <= 100 for a in metrics["final_test"])


def test_check_cos_norm_writes_angles(tmp_path, mnist_dir):
    folder = run_main(tmp_path, mnist_dir, "--check_cos_norm", epochs=2)
    angles, norms = np.loadtxt(folder / "angles.txt"), np.loadtxt(folder / "Anorm.txt")
    assert angles.shape == norms.shape == (3,)  # before training and after each epoch
    assert np.all((angles > 0) & (angles < 180)) and np.all(norms > 0)


def test_no_test_as_val_uses_the_published_split(tmp_path, mnist_dir):
    train_idx, val_idx = main.validation_split(512)
    assert len(val_idx) == 52 and len(np.intersect1d(train_idx, val_idx)) == 0
    assert sorted(np.concatenate([train_idx, val_idx])) == list(range(512))
    folder = run_main(tmp_path, mnist_dir, "--no_test_as_val", "--validation")
    assert not folder.name.endswith("_tav")


def test_datadebug_trains_the_one_sample(tmp_path, mnist_dir):
    folder = run_main(tmp_path, mnist_dir, "--datadebug", "--batch_size", "1", epochs=20)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["final_test"] == [100.0]


def test_same_seed_same_results_different_seed_differs(tmp_path, mnist_dir):
    def final_weights(seed, name):
        folder = run_main(tmp_path, mnist_dir, "--seed", str(seed), "--exp_name", name,
                          "--deformation", epochs=2)
        metrics = json.loads((folder / "metrics.json").read_text())
        return np.load(folder / "weights_run0.npz")["W0"], metrics["train"]

    w_a, curve_a = final_weights(5, "a")
    w_b, curve_b = final_weights(5, "b")
    w_c, _ = final_weights(6, "c")
    assert np.array_equal(w_a, w_b) and curve_a == curve_b
    assert not np.array_equal(w_a, w_c)


def test_continue_training_starts_from_saved_weights(tmp_path, mnist_dir):
    first = run_main(tmp_path, mnist_dir, "--seed", "1", "--exp_name", "first")
    saved = np.load(first / "weights_run0.npz")
    # zero epochs of change: eta 0 keeps the loaded weights, so they must equal the saved
    second = run_main(tmp_path, mnist_dir, "--seed", "2", "--exp_name", "second", "--eta", "0",
                      "--continue_training", "--continue_training_path", str(first))
    assert second.name.endswith("_ct")
    assert np.array_equal(np.load(second / "weights_run0.npz")["W0"], saved["W0"])
    assert np.array_equal(np.load(second / "weights_run0.npz")["F"], saved["F"])


@pytest.mark.parametrize("flags,message", [
    (["--learn_type", "XYZ"], "invalid choice"),
    (["--update_type", "adam"], "invalid choice"),
    (["--w_init", "glorot"], "invalid choice"),
    (["--act_hidden", "gelu"], "invalid choice"),
    (["--dataset", "svhn"], "invalid choice"),
    (["--mnist", "--cifar10"], "two datasets"),
    (["--dataset", "fmn", "--mnist"], "two datasets"),
    (["--train_epochs", "0"], "positive integer"),
    (["--eta", "-0.1"], ">= 0"),
    (["--eta", "nan"], "finite number >= 0"),
    (["--batch_size", "-3"], "positive integer"),
    (["--n_runs", "0"], "positive integer"),
    (["--dropout", "0"], "KEEP probability"),
    (["--dropout", "1.5"], "KEEP probability"),
    (["--sample_passes", "1"], "sample_passes >= 2"),
    (["--build", "custom", "--architecture", "700", "10", "--act_list", "softmax"],
     "784 inputs"),
    (["--build", "custom", "--architecture", "784", "10", "--act_list", "relu", "softmax"],
     "one per layer"),
    (["--build", "custom", "--architecture", "784", "10", "--act_list", "swish"],
     "unknown activation"),
    (["--learn_type", "BP", "--act_hidden", "step_f"], "no derivative"),
    (["--n_samples", "many"], "n_samples"),
    (["--n_samples", "100000"], "exceeds"),
    (["--check_cos_norm", "--learn_type", "BP"], "angle with F"),
    (["--continue_training"], "go together"),
    (["--continue_training", "--continue_training_path", "/nonexistent"], "does not exist"),
    (["--deformation", "--no_test_as_val"], "test set"),
    (["--resume"], "does not exist"),
    (["--seed", "-1"], "integer >= 0"),
    (["--eta", "inf"], "finite number"),
    (["--n_hlayers", "-1"], "integer >= 0"),
    (["--resume", "--overwrite"], "exclude"),
])
def test_bad_input_is_rejected_before_any_folder(tmp_path, mnist_dir, capsys, flags, message):
    argv = [*flags, "--data_dir", str(mnist_dir), "--results_dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_missing_and_truncated_dataset_files(tmp_path, mnist_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--data_dir", str(tmp_path), "--results_dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte[.gz]" in err and str(tmp_path) in err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in mnist_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2]
                                      if "train-images" in f.name else f.read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--data_dir", str(broken), "--results_dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "truncated" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_existing_results_are_never_overwritten(tmp_path, mnist_dir, capsys):
    folder = run_main(tmp_path, mnist_dir, "--seed", "1")
    before = (folder / "metrics.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_main(tmp_path, mnist_dir, "--seed", "2")
    assert exit_info.value.code == 2 and "--resume" in capsys.readouterr().err
    assert (folder / "metrics.json").read_bytes() == before
    run_main(tmp_path, mnist_dir, "--seed", "2", "--overwrite")
    assert (folder / "metrics.json").read_bytes() != before


def test_local_formats_give_the_same_arrays(tmp_path, mnist_dir):
    from_idx = datasets.load_dataset("mn", mnist_dir)
    np.savez(tmp_path / "mnist.npz", **dict(zip(("x_train", "y_train", "x_test", "y_test"),
                                                  from_idx)))
    from_npz = datasets.load_dataset("mn", tmp_path)
    for a, b in zip(from_idx, from_npz):
        assert np.array_equal(a, b)
    assert from_idx[0].shape == (512, 28, 28, 1) and from_idx[0].dtype == np.uint8


def test_cifar_pickles_are_read(tmp_path):
    import pickle
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, 4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    x_train, y_train, x_test, y_test = datasets.load_dataset("cif", tmp_path)
    assert x_train.shape == (20, 32, 32, 3) and x_test.shape == (4, 32, 32, 3)
    raw = pickle.loads((folder / "data_batch_1").read_bytes())["data"][0]
    assert np.array_equal(x_train[0, :, :, 0].ravel(), raw[:1024])  # red plane first


def test_deformation_distorts_within_range():
    rng = np.random.default_rng(0)
    images = np.zeros((6, 28, 28), np.uint8)
    images[:, 8:20, 12:16] = 255
    out = datasets.deform_images(images, rng)
    assert out.shape == (6, 28, 28) and out.min() == 0 and out.max() == 1
    assert not np.allclose(out, images / 255)
    assert not np.allclose(out[0], out[1])  # a fresh distortion per image


def test_real_mnist_one_epoch_of_the_paper_command(tmp_path, real_mnist):
    argv = list(PAPER_COMMAND)
    argv[argv.index("--train_epochs") + 1] = "1"
    folder = run_main(tmp_path, real_mnist, *argv, "--seed", "0", small=False)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["final_test"][0] >= 93
