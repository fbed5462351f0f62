"""Both notebooks run top to bottom (nbclient) with a short parameter cell; the slowness
function reproduces the published fit."""
import re

import nbformat
import numpy as np
import pytest
from conftest import ROOT
from nbclient import NotebookClient

import main
import main_pytorch
import utils

NOTEBOOKS = ROOT / "notebooks"
TUTORIAL = NOTEBOOKS / "Tutorial_PEPITA_FullyConnectedNets_CIFAR-10.ipynb"
SLOWNESS = NOTEBOOKS / "plot_compute_slowness.ipynb"


def execute(path, **parameters):
    """Run the notebook with its "parameters" cell replaced; returns the executed cells."""
    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
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


def test_slowness_matches_the_published_procedure():
    x = np.arange(1, 61)
    curve = 0.98 * x / (0.7 + x)
    fit = utils.compute_slowness(curve, fit_epochs=60)
    assert fit["acc_max"] == pytest.approx(0.96851, abs=1e-5)
    assert fit["slowness"] == pytest.approx(0.62214, abs=1e-5)
    assert fit["curve"][0] == 0.1 and len(fit["curve"]) == 60
    in_percent = utils.compute_slowness(curve * 100, fit_epochs=60, in100=True)
    assert in_percent["slowness"] == pytest.approx(fit["slowness"], rel=1e-6)
    assert in_percent["acc_max"] == pytest.approx(96.851, abs=1e-3)


def test_slowness_with_100_classes_uses_chance_001():
    x = np.arange(1, 31)
    fit = utils.compute_slowness(0.5 * x / (2 + x), n_classes=100)
    assert fit["curve"][0] == 0.01
    assert fit["slowness"] != utils.compute_slowness(0.5 * x / (2 + x))["slowness"]


def test_slowness_of_a_too_short_curve_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 epochs"):
        utils.compute_slowness([0.9])


def test_slowness_draws_curve_and_fit():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    utils.compute_slowness([0.5, 0.7, 0.8, 0.85], ax=ax)
    assert len(ax.lines) == 2 and ax.lines[0].get_ydata()[0] == pytest.approx(10.0)
    plt.close(fig)
