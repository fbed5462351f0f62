"""Both notebooks run top to bottom (nbclient) with a short parameter cell; the slowness
function reproduces the published fit."""
import re
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from conftest import ROOT
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import main
import main_pytorch
import utils

NOTEBOOKS = ROOT / "notebooks"
TUTORIAL = NOTEBOOKS / "Tutorial_PEPITA_FullyConnectedNets_CIFAR-10.ipynb"
SLOWNESS = NOTEBOOKS / "plot_compute_slowness.ipynb"


def execute(path, cwd=NOTEBOOKS, **parameters):
    """Run the notebook in cwd with the given values after its "parameters" cell's own (as
    papermill does); returns the executed cells."""
    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "".join(f"\n{name} = {value!r}" for name, value in parameters.items())
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook.cells


def text_output(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


def test_notebooks_are_stored_without_outputs():
    for path in (TUTORIAL, SLOWNESS):
        notebook = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


def test_tutorial_runs_on_cifar_shaped_data(cifar_dir):
    cells = execute(TUTORIAL, EPOCHS=2, DATASET="cif", DATA_DIR=str(cifar_dir), DEVICE="cpu",
                    SEED=0, STEP="written")
    assert "slowness" in "".join(text_output(c) for c in cells)
    assert "final test accuracy" in text_output(cells[-1])


def test_tutorial_learns_real_mnist(real_mnist):
    cells = execute(TUTORIAL, EPOCHS=1, DATASET="mn", DATA_DIR=str(real_mnist), DEVICE="cpu",
                    SEED=0, STEP="project")
    accuracy = float(re.search(r"final test accuracy: ([\d.]+)%", text_output(cells[-1]))[1])
    assert accuracy > 80  # chance is 10%
    assert "MNIST: 98.01" in text_output(cells[-1]) and "CIFAR" not in text_output(cells[-1])


def test_slowness_notebook_compares_result_folders(tmp_path, mnist_dir):
    common = ["--data_dir", str(mnist_dir), "--results_dir", str(tmp_path), "--seed", "0"]
    main.main(["--train_epochs", "3", "--validation", "--n_runs", "2", "--start_size", "32",
               "--n_hlayers", "1", *common])
    main_pytorch.main(["--dataset", "mn", "--model", "NetFC1x1024DOcust", "--train_epochs",
                       "3", *common])
    folders = sorted(str(p) for p in tmp_path.iterdir())
    cells = execute(SLOWNESS, RESULT_FOLDERS=folders, FIT_EPOCHS=60, N_CLASSES=10)
    lines = text_output(cells[-1]).strip().splitlines()
    assert len(lines) == 2 and all("slowness" in line for line in lines)


def test_the_tutorial_says_in_notebook_words_where_the_data_is_missing(tmp_path):
    with pytest.raises(CellExecutionError) as error:
        execute(TUTORIAL, EPOCHS=1, DATASET="cif", DATA_DIR=str(tmp_path), DEVICE="cpu")
    message = error.value.evalue  # the exception's own text, without the traceback
    assert "or drop DATA_DIR/$PEPITA_DATA_DIR to download" in message
    assert "--data_dir" not in message


def test_slowness_notebook_reads_sweeps_and_collected_curves_from_the_repository_root(
        tmp_path, mnist_dir):
    common = ["--data_dir", str(mnist_dir), "--seed", "0", "--start_size", "32",
              "--n_hlayers", "1", "--validation"]
    main.main(["--train_epochs", "1", "--results_dir", str(tmp_path / "short"), *common])
    for name in ("a", "b"):
        main.main(["--train_epochs", "3", "--exp_name", name, "--results_dir",
                   str(tmp_path / "sweep" / "runs" / name), *common])
    short = next((tmp_path / "short").iterdir())
    sources = [str(short), str(tmp_path / "sweep"), str(ROOT / "results" / "paper" / "mnist")]
    cells = execute(SLOWNESS, cwd=ROOT, RESULT_FOLDERS=sources, FIT_EPOCHS=60)
    printed = text_output(cells[2])
    assert f"skipped short: {short.name}: 1 epoch, a fit needs at least 2" in printed
    fits = text_output(cells[-1]).strip().splitlines()
    assert [line.split(":")[:2] for line in fits[:2]] == [
        [f"{tmp_path.name}/sweep", " a"], [f"{tmp_path.name}/sweep", " b"]]
    assert any(line.startswith("paper/mnist: PEPITA numpy: slowness 0.05") for line in fits)
    assert len(fits) == 2 + 9  # the sweep's 2 runs and the 9 rows of the MNIST table


def test_slowness_notebook_skips_runs_without_a_curve_and_reads_folders_from_the_root(
        tmp_path, mnist_dir):
    common = ["--data_dir", str(mnist_dir), "--seed", "0", "--start_size", "16",
              "--n_hlayers", "1", "--train_epochs", "2", "--results_dir", str(tmp_path)]
    main.main(["--exp_name", "curve", "--validation", *common])
    main.main(["--exp_name", "nocurve", *common])
    folders = [str(p) for p in sorted(tmp_path.iterdir())] + ["results/paper/mnist"]
    cells = execute(SLOWNESS, cwd=NOTEBOOKS, RESULT_FOLDERS=folders)
    printed = text_output(cells[2])
    assert "skipped" in printed and "nocurve" in printed and "--validation" in printed
    fits = text_output(cells[-1]).strip().splitlines()
    assert sum("curve" in line for line in fits) == 1 and len(fits) == 1 + 9
    with pytest.raises(CellExecutionError) as error:
        execute(SLOWNESS, cwd=NOTEBOOKS, RESULT_FOLDERS=["results/paper/no_such_folder"])
    assert "no_such_folder does not exist" in error.value.evalue


@pytest.mark.parametrize("notebook", [TUTORIAL, SLOWNESS])
def test_notebooks_run_headless_with_papermill_parameters(tmp_path, cifar_dir, notebook):
    out = tmp_path / "out.ipynb"
    parameters = (["-p", "EPOCHS", "2", "-p", "DATA_DIR", str(cifar_dir), "-p", "DEVICE",
                   "cpu"] if notebook == TUTORIAL else
                  ["-y", "RESULT_FOLDERS: [results/paper/mnist]", "-p", "FIT_EPOCHS", "20"])
    done = subprocess.run([sys.executable, "-m", "papermill", str(notebook), str(out),
                           *parameters, "--cwd", str(ROOT)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = nbformat.read(out, as_version=4).cells
    last = text_output(cells[-1])
    if notebook == TUTORIAL:
        assert "after 2 epoch(s) (the paper, 100 epochs, CIFAR-10: 52.57" in last
    else:
        assert "mnist: PEPITA numpy: slowness" in last


def test_slowness_matches_the_published_procedure():
    x = np.arange(1, 61)
    curve = 0.98 * x / (0.7 + x)
    fit = utils.compute_slowness(curve, fit_epochs=60, n_classes=10)
    assert fit["acc_max"] == pytest.approx(0.96851, abs=1e-5)
    assert fit["slowness"] == pytest.approx(0.62214, abs=1e-5)
    assert fit["curve"][0] == 0.1 and len(fit["curve"]) == 60
    in_percent = utils.compute_slowness(curve * 100, fit_epochs=60, in100=True, n_classes=10)
    assert in_percent["slowness"] == pytest.approx(fit["slowness"], rel=1e-6)
    assert in_percent["acc_max"] == pytest.approx(96.851, abs=1e-3)


def test_slowness_with_100_classes_uses_chance_001():
    x = np.arange(1, 31)
    fit = utils.compute_slowness(0.5 * x / (2 + x), n_classes=100)
    assert fit["curve"][0] == 0.01
    assert fit["slowness"] != utils.compute_slowness(0.5 * x / (2 + x),
                                                     n_classes=10)["slowness"]


def test_slowness_of_a_too_short_curve_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 epochs"):
        utils.compute_slowness([0.9], n_classes=10)


def test_slowness_draws_curve_and_fit():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    utils.compute_slowness([0.5, 0.7, 0.8, 0.85], n_classes=10, ax=ax)
    assert len(ax.lines) == 2 and ax.lines[0].get_ydata()[0] == pytest.approx(10.0)
    plt.close(fig)
