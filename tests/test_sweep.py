"""sweep.py on the embedded Ray: grids, collection, resume after a kill, failing trials."""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, synthetic_images, write_idx

import datasets
import report
import sweep
import trials
import utils

ray = pytest.importorskip("ray")

SMALL = ["--n_hlayers", "1", "--start_size", "32", "--validation", "--n_samples", "300"]


@pytest.fixture(scope="module")
def embedded_ray():
    """One local Ray for the in-process sweeps of this module (each sweep reuses it)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def grid_argv(sweep_dir, data_dir, *extra):
    return ["--script", "main.py", "--grid", "learn_type=ERIN,BP", "--seeds", "2",
            "--epochs", "2", "--sweep_dir", str(sweep_dir), "--data_dir", str(data_dir),
            *extra, "--", *SMALL]


def final_tests(sweep_dir):
    """{run name: final test accuracy in %} from the runs' own metrics.json."""
    finals = {}
    for path in (sweep_dir / "runs").glob("*/res_*/metrics.json"):
        metrics = json.loads(path.read_text())
        finals[path.parent.parent.name] = metrics["final_test"][0]
    return finals


def table_cells(sweep_dir):
    rows = (sweep_dir / "mnist" / "table.md").read_text().splitlines()[2:]
    return {(cells[0], cells[1]): cells for cells in
            ([c.strip() for c in row.strip("|").split("|")] for row in rows)}


def test_two_rules_two_seeds_collect_the_runs_own_numbers(tmp_path, mnist_dir, embedded_ray):
    assert sweep.main(grid_argv(tmp_path, mnist_dir)) == 0
    finals = final_tests(tmp_path)
    assert sorted(finals) == ["numpy_BP_seed0", "numpy_BP_seed1", "numpy_ERIN_seed0",
                              "numpy_ERIN_seed1"]
    cells = table_cells(tmp_path)
    for rule, label in (("ERIN", "PEPITA"), ("BP", "BP")):
        values = [finals[f"numpy_{rule}_seed{s}"] for s in range(2)]
        assert cells[(label, "numpy")][2] == "2"  # seeds
        assert cells[(label, "numpy")][4] == f"{np.mean(values):.2f} ± {np.std(values):.2f}"
    curves = (tmp_path / "mnist" / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("rule,path,variant,seed,epoch") and len(curves) == 1 + 4 * 2
    assert (tmp_path / "mnist" / "test_curves.png").stat().st_size > 1000
    assert "sweep.py --script main.py" in (tmp_path / "mnist" / "README.md").read_text()
    threads = {json.loads(p.read_text())["cpus"] for p in tmp_path.glob("runs/*/trial.json")}
    assert threads == {1}
    assert_provenance(tmp_path, 4)


def assert_provenance(sweep_dir, n_runs):
    """runs.csv: one row per run, each with a commit of this repository, the date, the
    machine and device, and the digest of the data it read (that of its metrics.json)."""
    runs = report.read_runs_csv(sweep_dir / "mnist" / "runs.csv")
    assert len(runs) == n_runs
    digests = {json.loads(p.read_text())["dataset"]["fingerprint"]
               for p in sweep_dir.glob("runs/*/res_*/metrics.json")}
    for run in runs:
        commit = run["commit"].removesuffix("-dirty")
        assert subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"]
                              ).returncode == 0
        assert run["command"].startswith("python main.py") and run["dataset"] == "MNIST"
        assert run["device"] == "cpu" and "core" in run["machine"]
        assert run["data_sha256"] in digests and len(run["data_sha256"]) == 64
        assert run["date"].startswith(time.strftime("%Y-"))
        assert float(run["final_test_percent"]) > 0


def test_a_failing_trial_is_reported_and_the_others_finish(tmp_path, mnist_dir, embedded_ray,
                                                           caplog):
    caplog.set_level(logging.INFO, logger="pepita")
    small = [flag for flag in SMALL if flag not in ("--n_samples", "300")]
    argv = ["--script", "main.py", "--grid", "n_samples=300,100000", "--epochs", "1",
            "--sweep_dir", str(tmp_path), "--data_dir", str(mnist_dir), "--", *small]
    assert sweep.main(argv) == 1  # one run failed: the data has no 100000 images
    record = json.loads((tmp_path / "runs" / "numpy_ERIN_n_samples=100000_seed0" /
                         "trial.json").read_text())
    assert record["returncode"] == 2 and "exceeds" in record["message"]
    assert "FAILED" in caplog.text and "exceeds" in caplog.text
    assert list(final_tests(tmp_path)) == ["numpy_ERIN_n_samples=300_seed0"]
    assert (tmp_path / "mnist" / "table.md").is_file()  # collected from what finished


def test_a_sweep_without_validation_collects_its_final_accuracies(tmp_path, mnist_dir,
                                                                  embedded_ray, caplog):
    caplog.set_level(logging.INFO, logger="pepita")
    small = [flag for flag in SMALL if flag != "--validation"]
    argv = ["--script", "main.py", "--grid", "eta=0.1", "--epochs", "1", "--sweep_dir",
            str(tmp_path), "--data_dir", str(mnist_dir), "--", *small]
    assert sweep.main(argv) == 0
    final = final_tests(tmp_path)["numpy_ERIN_eta=0.1_seed0"]
    assert re.search(rf"finished +1 epochs +test {final:.2f}%", caplog.text)
    cells = table_cells(tmp_path)[("PEPITA", "numpy eta=0.1")]
    assert cells[3] == "1" and cells[4] == f"{final:.2f} (n = 1)"
    assert cells[7] == cells[8] == "–"  # no slowness, no acc_max: no curve to fit
    readme = (tmp_path / "mnist" / "README.md").read_text()
    assert "Not drawn and not fitted (PEPITA numpy eta=0.1): their runs have no per-epoch " \
           "test curve" in readme
    assert not (tmp_path / "mnist" / "test_curves.png").exists()
    assert_provenance(tmp_path, 1)


def run_lines(capsys):
    """The run lines of a dry run's output (name: command)."""
    return [line for line in capsys.readouterr().out.splitlines() if ": python " in line]


def test_dry_run_lists_the_paper_runs(capsys):
    assert sweep.main(["--paper", "mnist", "--seeds", "3", "--other_seeds", "1",
                       "--dry_run"]) == 0
    lines = run_lines(capsys)
    names = [line.split(":")[0] for line in lines]
    assert names == ["Net1conv1fcXL_ERIN_seed0", "Net1conv1fcXL_ERIN_seed1",
                     "Net1conv1fcXL_ERIN_seed2", "numpy_ERIN_seed0", "numpy_ERIN_seed1",
                     "numpy_ERIN_seed2", "Net1conv1fcXL_BP_seed0", "numpy_BP_seed0",
                     "numpy_FA_seed0", "numpy_DRTP_seed0", "numpy_ERINsign_seed0",
                     "numpy_DFA_seed0"]
    assert "--decay_scheme 0" in lines[0] and "main_pytorch.py" in lines[0]
    assert "--eta 0.1" in lines[3] and "--sample_passes 2" in lines[3]
    assert "--sample_passes 1" in lines[7] and "main.py" in lines[-1]


def test_the_cifar10_preset_runs_the_tutorial_net_and_the_conv_net_over_the_seeds(capsys):
    assert sweep.main(["--paper", "cifar10", "--seeds", "3", "--other_seeds", "1",
                       "--dry_run"]) == 0
    lines = run_lines(capsys)
    names = [line.split(":")[0] for line in lines]
    assert names[:7] == [*(f"NetFC1x1024DOcust_cif_ERIN_seed{s}" for s in range(3)),
                         *(f"Net1conv1fcXL_cif_ERIN_seed{s}" for s in range(3)),
                         "numpy_ERIN_seed0"]
    assert "--eta 0.01" in lines[6] and "--eta 0.1 " not in lines[6]  # the tutorial's eta
    fa_line, = (line for line in lines if line.startswith("numpy_FA_seed0:"))
    assert "--eta 0.001 " in fa_line  # the rate that gives the paper's FA number
    assert all("--dataset cif " in line + " " for line in lines)


def test_the_rule_of_a_grid_comes_from_the_common_flags(capsys):
    assert sweep.main(["--grid", "eta=0.1,0.01", "--dry_run", "--", "--learn_type", "DRTP",
                       "--sample_passes", "1"]) == 0
    names = [line.split(":")[0] for line in run_lines(capsys)]
    assert names == ["numpy_DRTP_eta=0.1_seed0", "numpy_DRTP_eta=0.01_seed0"]


@pytest.mark.parametrize("argv,words", [
    (["--grid", "no_such_flag=1,2"], "NAME=V1,V2"),
    (["--grid", "validation=yes"], "on,off"),
    (["--paper", "mnist", "--grid", "seed=1"], "exclude"),
    (["--paper", "mnist", "--gpus_per_trial", "1"], "CPU only"),
    (["--collect", "/nonexistent"], "sweep.json"),
    (["--grid", "eta=abc"], "run numpy_ERIN_eta=abc_seed0: argument --eta"),
    (["--grid", "eta=0.1", "--", "--eta", "0.2"], "--eta is given twice"),
    (["--epochs", "2", "--", "--train_epochs", "3"], "--train_epochs is given twice"),
    (["--", "--results_dir", "x"], "sweep.py gives each run its folder"),
    (["--", "--resume"], "resumes interrupted runs itself"),
    (["--", "--seed", "3"], "--seeds or --grid seed="),
    (["--", "--help"], "see python main.py --help"),
    (["--", "--n_hlayers", "-1"], "argument --n_hlayers"),
])
def test_bad_sweep_flags_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--dry_run", *argv])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


@pytest.fixture(scope="module")
def mnist_4k(tmp_path_factory):
    """4096 training images: runs long enough for a kill to land between them."""
    folder = tmp_path_factory.mktemp("mnist4k")
    x, y = synthetic_images(np.random.default_rng(7), 4096 + 256, (28, 28))
    for name, array in zip(datasets.MNIST_FILES, (x[:4096], y[:4096], x[4096:], y[4096:])):
        write_idx(folder / f"{name}.gz", array)
    return folder


def long_argv(sweep_dir, data_dir):
    argv = grid_argv(sweep_dir, data_dir)
    argv[argv.index("--epochs") + 1] = "4"
    argv[argv.index("300")] = "4000"
    argv[argv.index("32")] = "256"
    return argv


def test_a_killed_sweep_rerun_retrains_nothing_finished(tmp_path, mnist_4k):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "sweep.py"), *long_argv(tmp_path / "killed", mnist_4k)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.time() + 300
    finished = []
    while not finished and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
        finished = [p.parent for p in (tmp_path / "killed").glob("runs/*/trial.json")
                    if json.loads(p.read_text()).get("returncode") == 0]
    assert finished and process.poll() is None, "no run finished before the sweep ended"
    os.killpg(process.pid, signal.SIGKILL)  # the whole sweep: driver, Ray, trials
    process.wait()
    stamps = {p: p.stat().st_mtime_ns for p in finished[0].rglob("*") if p.is_file()}
    assert sweep.main(long_argv(tmp_path / "killed", mnist_4k)) == 0
    assert {p: p.stat().st_mtime_ns for p in finished[0].rglob("*") if p.is_file()} == stamps
    assert sweep.main(long_argv(tmp_path / "straight", mnist_4k)) == 0
    assert final_tests(tmp_path / "killed") == final_tests(tmp_path / "straight")
    assert ((tmp_path / "killed" / "mnist" / "curves.csv").read_text() ==
            (tmp_path / "straight" / "mnist" / "curves.csv").read_text())


def prepared_sweep(sweep_dir, own, common=(), run="numpy_ERIN_seed0"):
    """A preset's sweep folder as sweep.py writes it, with one run finished (its
    metrics.json as main.py writes it), without running anything."""
    args = sweep.build_parser().parse_args(own)
    args.other_seeds = args.other_seeds or args.seeds
    specs = sweep.build_runs(args, list(common))
    sweep.write_manifest(sweep_dir, specs, args, own, list(common))
    folder = sweep_dir / "runs" / run / "res_paper"
    folder.mkdir(parents=True)
    utils.write_json(folder / "metrics.json", {
        "status": "finished", "test": [[0.9, 0.97]], "train": [[0.8, 0.95]],
        "final_test": [0.97], "epoch_time_s": [[1.0, 1.0]]})


@pytest.fixture
def paper_results(tmp_path, monkeypatch):
    """sweep.PAPER_RESULTS moved to a copy of the committed results/paper."""
    paper = tmp_path / "paper"
    (paper / "mnist").mkdir(parents=True)
    for name in ("table.md", "curves.csv", "README.md"):
        (paper / "mnist" / name).write_bytes((ROOT / "results/paper/mnist" / name).read_bytes())
    monkeypatch.setattr(sweep, "PAPER_RESULTS", paper.resolve())
    return paper


@pytest.fixture
def followup_results(tmp_path, monkeypatch):
    """sweep.FOLLOWUP_RESULTS moved to a copy of the committed results/followup/cifar10."""
    followup = tmp_path / "followup"
    (followup / "cifar10").mkdir(parents=True)
    for name in ("table.md", "curves.csv", "README.md"):
        (followup / "cifar10" / name).write_bytes(
            (ROOT / "results/followup/cifar10" / name).read_bytes())
    monkeypatch.setattr(sweep, "FOLLOWUP_RESULTS", followup.resolve())
    return followup


def folder_bytes(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_small_settings_paper_sweep_leaves_the_paper_results_unchanged(tmp_path,
                                                                          paper_results):
    before = folder_bytes(paper_results)
    sweep_dir = tmp_path / "small"
    prepared_sweep(sweep_dir, ["--paper", "mnist", "--epochs", "1"], ["--n_samples", "500"])
    assert sweep.main(["--collect", str(sweep_dir)]) == 0
    assert folder_bytes(paper_results) == before
    note = (sweep_dir / "mnist" / "table.md").read_text().splitlines()[0]
    assert note.startswith("**Not the paper preset's settings**") and "--n_samples 500" in note
    assert "--train_epochs 1" in note
    for argv in (["--collect", str(sweep_dir), "--out", str(paper_results)],
                 ["--paper", "mnist", "--epochs", "1", "--out", str(paper_results), "--dry_run"]):
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(argv)
        assert exit_info.value.code == 2
    assert folder_bytes(paper_results) == before


def test_a_paper_settings_sweep_collects_into_the_paper_results(tmp_path, paper_results):
    sweep_dir = tmp_path / "full"
    prepared_sweep(sweep_dir, ["--paper", "mnist"])
    assert sweep.main(["--collect", str(sweep_dir)]) == 0
    table = (paper_results / "mnist" / "table.md").read_text()
    assert not table.startswith("**Not")
    assert "| PEPITA | numpy | 1 | 2 | 97.00 (n = 1) | 98.01 ± 0.09 | -11.2 **(> 2)** |" in table
    assert not (sweep_dir / "mnist").exists()


def test_a_followup_sweep_with_other_settings_leaves_the_followup_results_unchanged(
        tmp_path, followup_results):
    before = folder_bytes(followup_results)
    sweep_dir = tmp_path / "mirror100"
    run = "NetFC_PEPITA-WD-WM_depth2_seed0"
    prepared_sweep(sweep_dir, ["--followup", "cifar10", "--only", run], ["--mirror_every", "100"],
                   run=run)
    assert sweep.main(["--collect", str(sweep_dir)]) == 0
    assert folder_bytes(followup_results) == before
    note = (sweep_dir / "cifar10" / "table.md").read_text().splitlines()[0]
    assert note == ("**Not the follow-up preset's settings**: --mirror_every 100 (the "
                    "preset's: 1).")
    for argv in (["--collect", str(sweep_dir), "--out", str(followup_results)],
                 ["--paper", "cifar10", "--out", str(followup_results), "--dry_run"]):
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(argv)
        assert exit_info.value.code == 2
    assert folder_bytes(followup_results) == before


def test_a_followup_settings_sweep_replaces_its_row_of_the_followup_results(
        tmp_path, followup_results):
    sweep_dir = tmp_path / "full"
    run = "NetFC_PEPITA_depth1_seed0"
    prepared_sweep(sweep_dir, ["--followup", "cifar10", "--only", run], run=run)
    assert sweep.main(["--collect", str(sweep_dir)]) == 0
    rows = [line for line in (followup_results / "cifar10" / "table.md").read_text()
            .splitlines() if line.startswith("| PEPITA | NetFC depth")]
    assert [row for row in rows if "97.00 (n = 1)" in row] == [
        next(row for row in rows if row.startswith("| PEPITA | NetFC depth1 |"))]
    assert len(rows) == 3  # depths 2 and 3: the committed rows
    assert not (sweep_dir / "cifar10").exists()


def test_a_second_sweep_adds_its_rows_to_the_collected_ones(tmp_path, paper_results):
    committed = (paper_results / "mnist" / "table.md").read_text().splitlines()
    prepared_sweep(tmp_path / "first", ["--paper", "mnist"])
    assert sweep.main(["--collect", str(tmp_path / "first")]) == 0
    prepared_sweep(tmp_path / "second", ["--paper", "mnist", "--only", "numpy_BP_*"],
                   run="numpy_BP_seed0")
    assert sweep.main(["--collect", str(tmp_path / "second")]) == 0
    folder = paper_results / "mnist"
    rows = {tuple(line.split(" | ")[:2]): line for line in
            (folder / "table.md").read_text().splitlines() if line.startswith("| ")}
    assert len(rows) == len([line for line in committed if line.startswith("| ")])
    assert "97.00 (n = 1)" in rows[("| PEPITA", "numpy")]  # the first sweep's
    assert "97.00 (n = 1)" in rows[("| BP", "numpy")]  # the second sweep's
    assert rows[("| FA", "numpy")] in committed  # neither sweep ran FA: the committed row
    curves = report.read_curves_csv(folder / "curves.csv")
    assert curves[("ERIN", "numpy", "")] == {"0": [90.0, 97.0]}  # replaced, not mixed
    assert len(curves[("FA", "numpy", "")]["0"]) == 100
    readme = (folder / "README.md").read_text()
    for words in ("--collect " + report.display_path(str(tmp_path / "first")),
                  "--only 'numpy_BP_*'",
                  "--paper mnist --seeds 3"):  # the commands of both sweeps and the committed
        assert words in readme


def test_only_runs_some_runs_of_a_preset_and_refuses_a_name_of_none(capsys):
    assert sweep.main(["--paper", "cifar10", "--only", "numpy_B*,Net1conv1fcXL_cif_BP_seed0",
                       "--dry_run"]) == 0
    names = [line.split(":")[0] for line in run_lines(capsys)]
    assert names == ["Net1conv1fcXL_cif_BP_seed0", "numpy_BP_seed0"]
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--paper", "cifar10", "--only", "numpy_XX*", "--dry_run"])
    assert exit_info.value.code == 2
    assert "numpy_XX* matches no run" in capsys.readouterr().err


def test_collected_tables_show_the_paper_values_of_the_conv_nets():
    assert report.paper_value("mn", "Net1conv1fcXL", "ERIN") == (98.29, 0.13)
    assert report.paper_value("cif", "Net1conv1fcXL_cif", "BP") == (64.99, 0.32)
    assert report.paper_value("cif", "NetFC1x1024DOcust_cif", "ERIN") == (52.57, 0.36)
    assert report.paper_value("cif100", "numpy", "FA") is None  # not known
    assert report.paper_value("mn", "NetFC", "ERIN") is None  # not the paper's net


def test_the_combined_table_has_every_cell_of_the_paper(tmp_path):
    header = "rule,path,variant,seed,epoch,train_acc_percent,test_acc_percent\n"
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "curves.csv").write_text(
        header + "ERIN,numpy,,0,1,,97.0\nERIN,numpy,,0,2,,98.0\nERIN,numpy,,1,2,,98.2\n")
    (tmp_path / "cifar10" / "conv").mkdir(parents=True)
    (tmp_path / "cifar10" / "conv" / "curves.csv").write_text(
        header + "BP,Net1conv1fcXL_cif,decay_scheme=1,0,1,,65.0\n")
    lines = report.combined_table(tmp_path)
    cells = {row[0]: row for row in (line.strip("| ").split(" | ") for line in lines[2:])}
    assert cells["PEPITA"][1] == "**98.10 ± 0.10** (n = 2), +1.0 std<br>paper 98.01 ± 0.09"
    assert cells["BP"][5] == "**65.00 (n = 1)** decay_scheme=1, +0.0 std<br>paper 64.99 ± 0.32"
    assert cells["BP"][3] == "not run yet<br>paper 27.58 ± 0.09"
    assert cells["FA"][4] == "–"  # the paper has no conv FA
    assert "python sweep.py --combine" in (tmp_path / "README.md").read_text()


def fake_runs(path, rule, variant, finals, code="mn"):
    return {(path, rule, variant): [
        {"seed": seed, "run": 0, "test": [50.0, final], "train": [], "final": final,
         "times": [1.0, 1.0], "angle": None, "machine": "here", "code": code}
        for seed, final in enumerate(finals)]}


def test_a_cifar100_row_is_fitted_against_its_own_chance_level(tmp_path):
    """A curve below 10% keeps its own maximum as acc_max (10% is CIFAR-10's chance), also
    in a settings folder inside the dataset's, and also when the folder is redrawn."""
    runs = fake_runs("numpy", "DRTP", "", [7.4], code="cif100")
    runs[("numpy", "DRTP", "")][0]["test"] = [3.0, 7.4]
    for out in (tmp_path, tmp_path / "cifar100" / "drtp_settings"):
        report.write_collection(out, runs, [], ["python sweep.py"])
        folder = out / "cifar100"
        for rows in (report.read_collection(folder)["rows"],
                     report.redraw_collection(folder)):
            assert rows[0]["acc_max"] == pytest.approx(7.4)
            want = utils.compute_slowness([0.03, 0.074], 60, n_classes=100)["slowness"]
            assert rows[0]["slowness"] == pytest.approx(want, abs=1e-4)


def test_a_cell_with_two_published_stds_is_judged_against_both(tmp_path):
    """BP FC CIFAR-10: 55.27 ± 0.52 in one copy of the paper's table, ± 0.32 in another."""
    report.write_collection(tmp_path, fake_runs("numpy", "BP", "", [54.39], code="cif"), [],
                            ["python sweep.py"])
    for rows in (report.read_collection(tmp_path / "cifar10")["rows"],
                 report.redraw_collection(tmp_path / "cifar10")):
        assert rows[0]["distance"] == pytest.approx(-1.7)
    line = next(line for line in (tmp_path / "cifar10" / "table.md").read_text().splitlines()
                if line.startswith("| BP"))
    assert "| -1.7; -2.8 **(> 2)** with std 0.32 |" in line
    lines = report.combined_table(tmp_path)
    cell = next(line for line in lines if line.startswith("| BP")).split(" | ")[2]
    assert cell == ("**54.39 (n = 1)**, -1.7 std (-2.8 **(> 2)** with the other copy's std)"
                    "<br>paper 55.27 ± 0.52 (0.32 in another copy)")


def test_a_folder_collected_before_runs_csv_gets_one_with_what_it_holds(tmp_path):
    report.write_collection(tmp_path, fake_runs("numpy", "FA", "", [98.0, 97.0]), [],
                            ["python sweep.py"])
    folder = tmp_path / "mnist"
    (folder / "runs.csv").unlink()
    report.redraw_collection(folder)
    runs = report.read_runs_csv(folder / "runs.csv")
    assert [(r["rule"], r["seed"], r["final_test_percent"], r["epochs"], r["machine"])
            for r in runs] == [("FA", "0", "98.0000", "2", "here"),
                               ("FA", "1", "97.0000", "2", "here")]
    assert {r["commit"] for r in runs} == {r["command"] for r in runs} == {"not recorded"}


def test_a_settings_folder_merges_into_its_dataset_table_and_figure(tmp_path):
    report.write_collection(tmp_path, {**fake_runs("numpy", "FA", "", [98.0]),
                                       **fake_runs("numpy", "DFA", "", [98.0]),
                                       **fake_runs("Net1conv1fcXL", "ERIN", "a=1", [97.0])},
                            ["a note"], ["python sweep.py --paper mnist"])
    report.write_collection(tmp_path / "search", fake_runs("Net1conv1fcXL", "ERIN", "a=0",
                                                           [98.2, 98.4]), [],
                            ["python sweep.py --grid a=0"])
    readme = tmp_path / "mnist" / "README.md"
    readme.write_text(readme.read_text().replace("sweep.py\n\n",
                                                 "sweep.py\n\nWords by hand.\n\n", 1))
    rows = report.merge_collection(tmp_path / "mnist", tmp_path / "search" / "mnist")
    assert [(row["rule"], row["variant"], row["seeds"]) for row in rows] == [
        ("FA", "", 1), ("DFA", "", 1), ("PEPITA", "a=1", 1), ("PEPITA", "a=0", 2)]
    table = (tmp_path / "mnist" / "table.md").read_text()
    assert table.startswith("a note") and "| 98.30 ± 0.10 | 98.29 ± 0.13 |" in table
    assert len((tmp_path / "mnist" / "curves.csv").read_text().splitlines()) == 1 + 2 * 5
    text = readme.read_text()
    assert "--paper mnist" in text and "--grid a=0" in text
    assert text.startswith("# mnist: collected by sweep.py\n\nWords by hand.\n\na note\n")
    assert (tmp_path / "mnist" / "test_curves.png").stat().st_size > 10000


def test_the_figure_marks_the_paper_and_says_which_curves_coincide(tmp_path, monkeypatch):
    import matplotlib.axes
    labels, bars = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, x, y, **kw:
                        bars.append((y, kw.get("yerr"))))
    original = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    report.plot_comparison(tmp_path / "f.png", {"FA numpy": [[90, 98]], "DFA numpy": [[90, 98]]},
                           "t", {"FA numpy": (98.42, 0.07)})
    assert "DFA numpy (the same curve as FA numpy: dashed)" in labels
    assert (98.42, 2 * 0.07) in bars


def test_relative_paths_after_the_double_dash_are_read_from_the_users_folder(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["--script", "main.py", "--dry_run", "--", "--data_dir", "data/x",
                       "--continue_training_path=w"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"--data_dir {tmp_path / 'data' / 'x'} " in first
    assert f"--continue_training_path={tmp_path / 'w'} " in first


def test_a_sweep_refuses_names_that_are_not_utf8(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--script", "main.py", "--dry_run", "--", "--exp_name", "x\udcfe"])
    assert exit_info.value.code == 2 and "not valid UTF-8" in capsys.readouterr().err


def test_a_distance_is_marked_beyond_2_std_by_its_printed_value():
    assert report.format_distance((98.57 - 98.63) / 0.03) == "-2.0"  # -2.0000000000000076
    assert report.format_distance(-2.06) == "-2.1 **(> 2)**"
    assert report.format_distance(2.04) == "+2.0"


def test_a_table_says_which_known_copy_of_a_dataset_it_ran_on(tmp_path, monkeypatch):
    x, y = synthetic_images(np.random.default_rng(5), 20, (32, 32, 3), classes=100)
    for name in ("known", "other"):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "cifar100.npz", x_train=x, y_train=y, x_test=x,
                 y_test=y + (name == "other"))
    digest = utils.sha256_of(tmp_path / "known" / "cifar100.npz")
    monkeypatch.setattr(datasets, "KNOWN_COPIES", {digest: "ran on the known copy"})

    def notes(folder):
        spec = sweep.make_spec("main.py", ["--dataset", "cif100", "--data_dir",
                                           str(tmp_path / folder)], "ERIN", 0)
        return sweep.collection_notes({"runs": [spec]}, [])
    assert notes("known") == ["ran on the known copy"]
    assert notes("other") == []


def test_the_followup_preset_lists_depths_configurations_and_time_local(capsys):
    assert sweep.main(["--followup", "cifar10", "--dry_run"]) == 0
    lines = run_lines(capsys)
    names = [line.split(":")[0] for line in lines]
    assert names == [f"NetFC_{label}_depth{d}_seed0" for label in
                     ("PEPITA-WD-WM", "PEPITA-WD", "PEPITA") for d in (3, 2, 1)] + \
        ["NetFC_PEPITA-TL_depth1_seed0"]
    for line in lines:
        assert "--followup_loop" in line and "--feedback normal" in line
        assert "--w_init he " in line and "--decay_scheme 2" in line and "--dataset cif" in line
    assert "--fc_hidden 1024 1024 1024 --dataset" in lines[0] and "--mirror" in lines[0]
    assert "--weight_decay 1e-4" in lines[3] and "--mirror" not in lines[3]
    assert "--weight_decay" not in lines[6] and "--pepita_mode modulated" in lines[6]
    assert "--pepita_mode time_local" in lines[-1]


def test_a_dry_run_says_where_the_outputs_go_and_how_long_it_takes(tmp_path, capsys):
    assert sweep.main(["--paper", "mnist", "--seeds", "3", "--other_seeds", "1",
                       "--sweep_dir", str(tmp_path), "--dry_run"]) == 0
    tail = capsys.readouterr().out.splitlines()[-2:]
    assert tail[0] == (f"12 runs, each in {tmp_path}/runs/<run>/; the table, curves and figure "
                       f"collected into {sweep.PAPER_RESULTS}/<dataset>/")
    seconds = 100 * (3 * 11.4 + 3 * 14.6 + 16.8 + 13.7 + 12.7 + 10.6 + 12.8 + 11.3)
    parallel = min(os.cpu_count(), 12)
    wall = max(seconds / parallel, 100 * 16.8)  # the longest run: conv BP
    duration = f"{wall / 3600:.1f} h" if wall >= 3600 else f"{wall / 60:.0f} min"
    assert tail[1] == (f"estimated time: about {duration} with {parallel} trials at once "
                       "(1 core each, measured times per epoch)")


def test_a_dry_run_of_one_short_run_estimates_its_minutes(tmp_path, capsys):
    assert sweep.main(["--script", "main.py", "--grid", "eta=0.001", "--epochs", "20",
                       "--sweep_dir", str(tmp_path), "--dry_run", "--", "--learn_type", "DRTP",
                       "--dataset", "cif"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (  # 20 epochs of 16.5 s, one at a time
        "estimated time: about 6 min with 1 trial at once (1 core each, measured times per "
        "epoch)")


def test_a_dry_run_estimates_the_followup_depths_and_says_when_it_cannot(tmp_path, capsys):
    assert sweep.main(["--followup", "cifar10", "--sweep_dir", str(tmp_path), "--dry_run",
                       "--only", "NetFC_PEPITA_depth1_seed0,NetFC_PEPITA-WD-WM_depth1_seed0",
                       "--cpus_per_trial", "2"]) == 0
    parallel = max(1, os.cpu_count() // 2)
    runs = [100 * trials.MEASURED_EPOCH_S[("NetFC", "PEPITA", "cif", "depth1")],
            100 * trials.MEASURED_EPOCH_S[("NetFC", "PEPITA+WD+WM", "cif", "depth1")]]
    parallel = min(parallel, 2)
    wall = max(sum(runs) / parallel, max(runs))
    duration = f"{wall / 3600:.1f} h" if wall >= 3600 else f"{wall / 60:.0f} min"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"estimated time: about {duration} with {parallel} "
        f"trial{'s' if parallel > 1 else ''} at once (2 cores each, measured times per epoch)")
    assert sweep.main(["--script", "main_pytorch.py", "--grid", "eta=0.1,0.2", "--sweep_dir",
                       str(tmp_path), "--dry_run", "--", "--model", "NetFC"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "estimated time: unknown (no run of this sweep has a measured time per epoch)")


def damaged_sweep_folder(tmp_path, case):
    folder = tmp_path / case.replace(" ", "_")
    prepared_sweep(folder, ["--paper", "mnist", "--epochs", "1"])
    manifest = folder / "sweep.json"
    if case == "cut manifest":
        manifest.write_text(manifest.read_text()[:40])
    elif case == "a list as manifest":
        manifest.write_text("[1, 2]")
    elif case == "runs without keys":
        manifest.write_text(json.dumps({"runs": [{"name": "x"}], "commands": []}))
    elif case == "cut trial record":
        (folder / "runs" / "numpy_ERIN_seed0" / "trial.json").write_text('{"name": ')
    return folder


@pytest.mark.parametrize("case,words", [
    ("cut manifest", "sweep.json is damaged"),
    ("a list as manifest", "sweep.json is damaged (no list of runs and commands)"),
    ("runs without keys", "sweep.json is damaged (a run without script"),
    ("cut trial record", "trial.json is damaged"),
])
def test_damaged_sweep_records_are_one_line(tmp_path, capsys, paper_results, case, words):
    folder = damaged_sweep_folder(tmp_path, case)
    for argv in (["--collect", str(folder)],
                 ["--paper", "mnist", "--epochs", "1", "--sweep_dir", str(folder)]):
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err and err.count("\n") == 1, err


def test_folders_under_a_plain_file_are_one_line(tmp_path, capsys, paper_results):
    (tmp_path / "file").write_text("")
    sweep_dir = tmp_path / "sweep"
    prepared_sweep(sweep_dir, ["--paper", "mnist", "--epochs", "1"])
    for argv in (["--collect", str(sweep_dir), "--out", str(tmp_path / "file" / "x")],
                 ["--grid", "eta=0.1", "--sweep_dir", str(tmp_path / "file" / "x"), "--",
                  *SMALL]):
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Not a directory" in err and \
            err.count("\n") == 1, err


def run_sweep_process(argv, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "sweep.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_an_unreachable_address_fails_fast_in_one_line(tmp_path, mnist_dir):
    tic = time.time()
    done = run_sweep_process(grid_argv(tmp_path, mnist_dir, "--address", "127.0.0.1:1"))
    assert done.returncode == 2 and time.time() - tic < 30
    assert done.stderr.strip().splitlines() == [
        "sweep.py: error: --address 127.0.0.1:1: no Ray cluster answers there (Connection "
        "refused); start one with 'ray start --head', or leave out --address to run on this "
        "machine"]


def test_more_cores_per_trial_than_the_machine_has_are_refused(tmp_path, mnist_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(grid_argv(tmp_path, mnist_dir, "--cpus_per_trial", str(os.cpu_count() + 1)))
    assert exit_info.value.code == 2 and "ask for at most" in capsys.readouterr().err


def wait_for(condition, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("timed out")


def training_processes(sweep_dir):
    found = subprocess.run(["pgrep", "-f", f"results_dir {sweep_dir.resolve()}/runs"],
                           capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_sweep_ends_its_trials_and_gives_our_advice(tmp_path, mnist_4k, signum):
    argv = long_argv(tmp_path / "s", mnist_4k)
    process = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *argv], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: training_processes(tmp_path / "s"))
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert err.strip().splitlines()[-1].startswith(
        f"sweep.py: stopped by {signal.Signals(signum).name}, its trials ended; rerun the "
        "same command to resume")
    assert "Traceback" not in err and "Tuner.restore" not in err + out
    assert "Token authentication" not in err and "View detailed results" not in err + out
    wait_for(lambda: not training_processes(tmp_path / "s"), 20)


def test_a_trial_ended_by_a_signal_says_so(tmp_path, mnist_4k):
    argv = ["--max_failures", "0", *long_argv(tmp_path / "s", mnist_4k)]
    process = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *argv], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = wait_for(lambda: training_processes(tmp_path / "s"))[0]
    os.kill(pid, signal.SIGKILL)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    records = [json.loads(p.read_text()) for p in (tmp_path / "s").glob("runs/*/trial.json")]
    killed = [r for r in records if r.get("returncode") == -signal.SIGKILL]
    assert len(killed) == 1 and killed[0]["message"].startswith("ended by SIGKILL")
    assert err.strip().splitlines()[-1].endswith(
        f"table, curves and figure in {tmp_path / 's' / 'mnist'}")


def test_a_killed_trial_is_retried_and_resumes_to_the_uninterrupted_results(tmp_path,
                                                                            mnist_4k):
    process = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"),
                                *long_argv(tmp_path / "s", mnist_4k)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = lambda: list((tmp_path / "s").glob("runs/*/res_*/metrics.json"))  # noqa: E731
    pid = wait_for(lambda: started() and training_processes(tmp_path / "s"))[0]
    os.kill(pid, signal.SIGKILL)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "retry  " in err and "from its last epoch (ended by SIGKILL" in err
    records = [json.loads(p.read_text()) for p in (tmp_path / "s").glob("runs/*/trial.json")]
    retried = [r for r in records if r["earlier_ends"]]
    assert len(retried) == 1 and retried[0]["how"] == "resume"
    assert retried[0]["earlier_ends"][0].startswith("ended by SIGKILL")
    assert sweep.main(long_argv(tmp_path / "straight", mnist_4k)) == 0
    assert final_tests(tmp_path / "s") == final_tests(tmp_path / "straight")
    assert ((tmp_path / "s" / "mnist" / "curves.csv").read_text() ==
            (tmp_path / "straight" / "mnist" / "curves.csv").read_text())
