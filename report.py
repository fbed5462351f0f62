"""The reports of finished sweeps: each sweep's table, curves and figure, and the paper's
Table 1 from the committed results (results/paper/README.md).

sweep.py reads the runs and calls these (`python sweep.py --collect DIR`, `python sweep.py
--combine`); everything here works on what the runs measured, and on the paper's values.
"""
import csv
import itertools
import json
import os
import re
from pathlib import Path

import numpy as np

import paper
import utils
from datasets import DATASETS
from utils import UsageError

ROOT = Path(__file__).resolve().parent
SLOWNESS_FIT_EPOCHS = 60
ZOOM_POINTS = 3.0

def net_kind(path):
    """The paper's kind of net ("FC" or "conv") of a path label, or None for other nets."""
    if path == "numpy" or path.startswith("NetFC1x1024DOcust"):
        return "FC"
    return "conv" if path.startswith("Net1conv1fcXL") else None


def paper_value(code, path, rule):
    """(mean, std) of the paper's cell for this dataset, net and rule, or None."""
    return paper.TABLE.get(code, {}).get(net_kind(path), {}).get(rule)


def other_std(code, path, rule):
    """The cell's std in another copy of the paper's table, or None."""
    return paper.OTHER_STDS.get((code, net_kind(path), rule))


def distance_text(row):
    """A table row's distance to the paper's value in its std, and in the other copy's std
    when there is one: '-1.7; -2.8 **(> 2)** with std 0.32'."""
    text = format_distance(row["distance"])
    if row.get("other_std"):
        elsewhere = (row["mean"] - row["paper"][0]) / row["other_std"]
        text += f"; {format_distance(elsewhere)} with std {row['other_std']:.2f}"
    return text


# ------------------------------------------------------------------------------------------
# One sweep's collection: table.md, curves.csv, test_curves.png, README.md
# ------------------------------------------------------------------------------------------
def write_collection(out_root, groups, notes, commands):
    """Write table.md, curves.csv, runs.csv, test_curves.png and README.md of the runs in
    groups into out_root/<dataset>/; returns (rows, folder). What the folder already holds
    from earlier sweeps stays: a (rule, net) row of these runs replaces the row of the same
    rule and net, the others are kept with their curves, runs, notes and commands."""
    codes = sorted({run["code"] for runs in groups.values() for run in runs})
    out = Path(out_root) / "_".join(DATASETS[c]["alias"] if c in DATASETS else c for c in codes)
    out.mkdir(parents=True, exist_ok=True)
    return merge_into(out, {"rows": table_rows(groups), "curve_lines": curve_lines(groups),
                            "runs": run_provenance(groups), "notes": notes,
                            "commands": commands}), out


def merge_collection(out, source):
    """Add another collected folder's rows, curves, runs, notes and commands to out (a row
    of the same rule, net and variant replaced), e.g. a settings search's runs that the
    preset now takes; returns the rows."""
    found = read_collection(Path(source))
    if not found["rows"]:
        raise UsageError(f"{source} holds no table.md and curves.csv of sweep.py")
    return merge_into(Path(out), found)


def redraw_collection(out):
    """Rewrite a collected folder from what it holds (the fits from its curves, its
    figure, its README's standard text); returns the rows."""
    return merge_into(Path(out), {"rows": [], "curve_lines": [], "runs": [], "notes": [],
                                  "commands": []})


def merge_into(out, new):
    """Write out's five files from what it holds and new's rows, curve lines, runs, notes
    and commands (read_collection's keys)."""
    earlier = read_collection(out)
    replaced = {row_key(row) for row in new["rows"]}
    rows = [row for row in earlier["rows"] if row_key(row) not in replaced] + new["rows"]
    notes = list(dict.fromkeys([*earlier["notes"], *new["notes"]]))
    kept = [line for line in earlier["curve_lines"]
            if row_key(dict(zip(("rule", "path", "variant"), line.split(",")[:3])))
            not in replaced]
    utils.write_text(out / "curves.csv",
                     "\n".join([CURVES_HEADER, *kept, *new["curve_lines"]]) + "\n")
    curves = read_curves_csv(out / "curves.csv")
    code = dataset_of(out.resolve())
    fit_rows(rows, curves, DATASETS[code]["classes"] if code else None)
    for row in rows:
        row["other_std"] = code and other_std(code, row["path"], "ERIN" if row["rule"] ==
                                              "PEPITA" else row["rule"])
    utils.write_text(out / "table.md", "".join(f"{n}\n\n" for n in notes)
                     + table_markdown(rows))
    write_runs_csv(out / "runs.csv", [run for run in earlier["runs"]
                                      if row_key(run) not in replaced] + new["runs"])
    drawn = {}
    for (rule, path, variant), by_seed in curves.items():
        length = min(map(len, by_seed.values()))
        if length:
            drawn[utils.run_label(rule, path, variant)] = [c[:length] for c in by_seed.values()]
    papers = {utils.run_label(row["rule"], row["path"], row["variant"]): row["paper"]
              for row in rows if row["paper"]}
    names = out.name
    if drawn:
        plot_comparison(out / "test_curves.png", drawn,
                        f"{names}: test accuracy, mean ± std over seeds", papers)
    undrawn = [label for label in (utils.run_label(row["rule"], row["path"], row["variant"])
                                   for row in rows) if label not in drawn]
    missing = (f"Not drawn and not fitted ({', '.join(undrawn)}): their runs have no "
               "per-epoch test curve (main.py without --validation); the table holds their "
               "final test accuracy." if undrawn else None)
    commands = "\n".join(dict.fromkeys([*earlier["commands"], *new["commands"]]))
    utils.write_text(out / "README.md", (
        (earlier["title"] or f"# {names}: collected by sweep.py") + "\n\n"
        + "".join(f"{n}\n\n" for n in [*earlier["intro"], *notes])
        + f"Produced by (in the repository root; each --collect adds its sweep's rows to "
        f"what the folder holds):\n\n```bash\n{commands}\n```\n\n"
        + (f"{missing}\n\n" if missing else "")
        + COLLECTION_FILES))
    return rows


COLLECTION_FILES = (
    "- `table.md`: per rule and path, the final test accuracy (mean ± std over seeds, the "
    "population std, numpy's np.std with ddof 0; one seed: n = 1), the paper's value and the "
    "distance in units of the paper's std (marked beyond 2), the slowness and acc_max of the "
    "mean test curve (fitted to the chance level at epoch 0 and the test accuracy after "
    f"epochs 1 to {SLOWNESS_FIT_EPOCHS - 1}: {SLOWNESS_FIT_EPOCHS} points), the median time "
    "per epoch and the machine.\n"
    "- `curves.csv`: every run's per-epoch accuracies (%).\n"
    "- `runs.csv`: where each run behind a row came from: its seed, final test accuracy, "
    "epochs, command, commit, date, machine, device, dataset and the sha256 of its arrays as "
    "loaded (`datasets.fingerprint`); \"not recorded\" where the run's files no longer "
    "held it when its row was written.\n"
    "- `test_curves.png`: mean test curve per rule, with a band of ± one std, and the "
    "paper's mean with its band of ± 2 std at the right end; the right panel zooms on "
    "the rules near the best.\n")


def dataset_of(folder):
    """The dataset code of a collected folder: the first of its own and its parents' names
    that is a dataset's alias (a settings search's folder lies in its dataset's), or None
    (a folder of several datasets)."""
    aliases = {spec["alias"]: code for code, spec in DATASETS.items()}
    return next((aliases[p.name] for p in (folder, *folder.parents) if p.name in aliases),
                None)


RUNS_FIELDS = ("rule", "path", "variant", "seed", "run", "final_test_percent", "epochs",
               "command", "commit", "date", "machine", "device", "dataset", "data_sha256")
NOT_RECORDED = "not recorded"


def run_provenance(groups):
    """runs.csv's rows: one per run behind the table's rows."""
    rows = []
    for (path, rule, variant), runs in groups.items():
        for run in runs:
            rows.append({
                "rule": rule, "path": path, "variant": variant, "seed": run["seed"],
                "run": run["run"], "final_test_percent": f"{run['final']:.4f}",
                "epochs": len(run["times"]),
                **{key: run.get(key) or NOT_RECORDED for key in (
                    "command", "commit", "date", "machine", "device", "dataset",
                    "data_sha256")}})
    return rows


def write_runs_csv(path, runs):
    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, RUNS_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(runs)
    utils.atomic_write(path, write)


def read_runs_csv(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def table_rows(groups):
    """One row per (path, rule, variant), with the paper's value where it has one (the
    slowness fit comes later, from curves.csv: fit_rows)."""
    rows = []
    for (path, rule, variant), runs in groups.items():
        finals = np.array([r["final"] for r in runs])
        paper = paper_value(runs[0]["code"], path, rule)
        distance = (np.mean(finals) - paper[0]) / paper[1] if paper else None
        angles = [r["angle"] for r in runs if r["angle"] is not None]
        rows.append({
            "rule": utils.run_label(rule), "path": path, "variant": variant,
            "seeds": len(runs), "mean": float(np.mean(finals)), "std": float(np.std(finals)),
            "paper": paper, "distance": distance, "slowness": None, "acc_max": None,
            "epochs": min(len(r["times"]) for r in runs),
            "epoch_s": float(np.median(np.concatenate([r["times"] for r in runs]))),
            "angle": float(np.mean(angles)) if angles else None,
            "machine": "; ".join(sorted({r["machine"] for r in runs}))})
    return rows


def fit_rows(rows, curves, n_classes):
    """Each row's slowness and acc_max, fitted to the mean of its runs' test curves in
    curves.csv (the committed data, so that a redraw gives the same fit), against the
    dataset's chance level; None for a row without curves of 2 epochs or more."""
    labelled = {(utils.run_label(rule), path, variant): by_seed
                for (rule, path, variant), by_seed in curves.items()}
    for row in rows:
        by_seed = labelled.get(row_key(row))
        length = min(map(len, by_seed.values())) if by_seed else 0
        fit = None
        if length >= 2 and n_classes:
            mean_curve = np.mean([c[:length] for c in by_seed.values()], axis=0) / 100
            fit = utils.compute_slowness(mean_curve, fit_epochs=SLOWNESS_FIT_EPOCHS,
                                         n_classes=n_classes)
        row["slowness"] = fit["slowness"] if fit else None
        row["acc_max"] = fit["acc_max"] * 100 if fit else None
    return rows


def table_markdown(rows):
    """The table; a column of the final angle between F and the forward weights' product
    when some runs logged it (PEPITA in the PyTorch path's fully connected nets)."""
    with_angle = any(row["angle"] is not None for row in rows)
    lines = ["| rule | path | seeds | epochs | test accuracy (%) | paper | distance (paper std) "
             "| slowness | acc_max (%) | s / epoch |" + (" angle F (°) |" if with_angle else "")
             + " machine |", "|---|---|---|---|---|---|---|---|---|---|---|"
             + ("---|" if with_angle else "")]
    for row in rows:
        paper = f"{row['paper'][0]:.2f} ± {row['paper'][1]:.2f}" if row["paper"] else "–"
        distance = "–" if row["distance"] is None else distance_text(row)
        fit = (f"{row['slowness']:.4f} | {row['acc_max']:.2f}" if row["slowness"] is not None
               else "– | –")
        label = row["path"] + (f" {row['variant']}" if row["variant"] else "")
        angle = ""
        if with_angle:
            angle = " – |" if row["angle"] is None else f" {row['angle']:.1f} |"
        lines.append(f"| {row['rule']} | {label} | {row['seeds']} | {row['epochs']} | "
                     f"{format_accuracy(row['mean'], row['std'], row['seeds'])} | {paper} | "
                     f"{distance} | {fit} | "
                     f"{row['epoch_s']:.1f} |{angle} {row['machine']} |")
    return "\n".join(lines) + "\n"


def format_accuracy(mean, std, n):
    """'98.06 ± 0.04' over several seeds; one seed has no spread: '90.50 (n = 1)'."""
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f} (n = 1)"


def format_distance(distance):
    """The distance to the paper in its std, marked beyond 2: the mark is decided on the
    printed value (-2.0000000000000076 prints as -2.0 and is not beyond 2)."""
    printed = f"{distance:+.1f}"
    return printed + (" **(> 2)**" if abs(float(printed)) > 2 else "")


CURVES_HEADER = "rule,path,variant,seed,epoch,train_acc_percent,test_acc_percent"


def curve_lines(groups):
    """curves.csv's lines of every run's curves."""
    lines = []
    for (path_label_, rule, variant), runs in groups.items():
        for run in runs:
            for epoch, test in enumerate(run["test"], start=1):
                train = run["train"][epoch - 1] if epoch <= len(run["train"]) else ""
                train = f"{train:.4f}" if train != "" else ""
                lines.append(f"{rule},{path_label_},{variant},{run['seed']},{epoch},{train},"
                             f"{test:.4f}")
    return lines


def find_test_curves(sources):
    """({panel: {label: test curves (runs x epochs, fractions)}}, notes): one panel per
    folder (the runs of one results folder share a panel), a results folder (metrics.json),
    a sweep folder (its runs/*/res_*/, the seeds of
    a run averaged under one label) or a collected folder (curves.csv, one label per rule,
    path and variant); notes: the runs skipped, which have no per-epoch test curve."""
    panels, notes = {}, []
    for source in map(Path, sources):
        single = (source / "metrics.json").is_file()  # a run: one panel for its folder's runs
        found = panels.setdefault(source.parent.name if single else
                                  f"{source.parent.name}/{source.name}", {})
        if not source.is_dir():
            raise FileNotFoundError(f"{source} does not exist: give a results, sweep or "
                                    "collected folder")
        if (source / "curves.csv").is_file():
            for (rule, path, variant), by_seed in read_curves_csv(source / "curves.csv").items():
                length = min(map(len, by_seed.values()))
                found[utils.run_label(rule, path, variant)] = np.array(
                    [curve[:length] for curve in by_seed.values()]) / 100
            continue
        folders = ([source] if single else
                   sorted(run for run in (source / "runs").glob("*/res_*")
                          if (run / "metrics.json").is_file()))
        if not folders and not (source / "runs").is_dir():
            raise FileNotFoundError(f"{source} holds no metrics.json, curves.csv or runs/: "
                                    "give a results, sweep or collected folder")
        runs = {}
        for folder in folders:
            curves = load_test_curves(folder)
            if curves is None:
                notes.append(f"skipped {folder}: no per-epoch test accuracy (main.py without "
                             "--validation)")
                continue
            label = (source.name if folder == source else
                     re.sub(r"_seed[^_]*$", "", folder.parent.name))
            runs.setdefault(label, []).extend(curves)
        for label, curves in runs.items():
            length = min(map(len, curves))
            found[label] = np.array([curve[:length] for curve in curves])
    return {panel: found for panel, found in panels.items() if found}, notes


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
    main.py or main_pytorch.py, from its metrics.json; None for a main.py run without
    --validation (no per-epoch test accuracy)."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no metrics.json: give a results folder "
                                "written by main.py or main_pytorch.py")
    metrics = json.loads(path.read_text())
    runs = [run for run in metrics["test"] if run]
    if not runs:
        return None
    length = min(map(len, runs))
    curves = np.array([run[:length] for run in runs], float)
    return curves / 100 if metrics.get("accuracy_unit") == "percent" else curves


def row_key(row):
    """A table row's rule (as the paper names it) and net: what a later sweep replaces."""
    return utils.run_label(row["rule"]), row["path"], row["variant"]


def read_collection(out):
    """What an earlier collect wrote into out: its notes and rows (table.md), its curves'
    lines (curves.csv), its runs (runs.csv), and its README's title, the words added to it
    by hand before its commands, and its commands; empty where there is none."""
    found = {"notes": [], "rows": [], "curve_lines": [], "runs": [], "commands": [],
             "title": None, "intro": []}
    if not (out / "table.md").is_file() or not (out / "curves.csv").is_file():
        return found
    advice = "restore it from git, or collect into another --out"
    lines = (out / "table.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    found["notes"] = [line for line in lines if line.strip() and not line.startswith("|")]
    try:
        found["rows"] = [parse_table_row(line, "angle F" in table[0]) for line in table[2:]]
    except (ValueError, IndexError):
        raise UsageError(f"{out / 'table.md'} is damaged (not a table of sweep.py); "
                         f"{advice}") from None
    found["curve_lines"] = (out / "curves.csv").read_text().splitlines()[1:]
    found["runs"] = (read_runs_csv(out / "runs.csv") if (out / "runs.csv").is_file() else
                     runs_before_provenance(out, found["rows"]))
    readme = out / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    if text.startswith("# ") and "Produced by" in text:  # its title and its own words
        head = text.split("Produced by", 1)[0].splitlines()
        found["title"] = head[0]
        found["intro"] = [line for line in head[1:] if line.strip()
                          and line not in found["notes"]]
    if "```bash\n" in text:
        block = text.split("```bash\n", 1)[1].split("```", 1)[0]
        found["commands"] = [line for line in block.splitlines() if line.strip()]
    return found


def runs_before_provenance(out, rows):
    """runs.csv's rows for a folder collected before runs.csv existed: what its curves.csv
    and table.md hold (each run's final accuracy and epochs, its row's machine, the
    dataset), "not recorded" for the rest."""
    machines = {row_key(row): row["machine"] for row in rows}
    code = dataset_of(out.resolve())
    runs = []
    for (rule, path, variant), by_seed in read_curves_csv(out / "curves.csv").items():
        for seed, curve in by_seed.items():
            runs.append({**dict.fromkeys(RUNS_FIELDS, NOT_RECORDED),
                         "rule": rule, "path": path, "variant": variant, "seed": seed,
                         "final_test_percent": f"{curve[-1]:.4f}", "epochs": len(curve),
                         "machine": machines.get(row_key({"rule": rule, "path": path,
                                                          "variant": variant}), NOT_RECORDED),
                         "dataset": DATASETS[code]["name"] if code else NOT_RECORDED})
    return runs


def parse_table_row(line, with_angle):
    """A row of table_markdown back as table_rows' dict (to the printed precision)."""
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    rule, label, seeds, epochs, accuracy, paper, distance, slowness, acc_max, epoch_s = \
        cells[:10]
    angle = cells[10] if with_angle else "–"
    mean, _, std = accuracy.partition(" ± ")
    path, _, variant = label.partition(" ")

    def number(text):  # the cell's first number: '-1.7; -2.8 **(> 2)** with std 0.32'
        return None if text == "–" else float(re.match(r"[-+]?[0-9.]+", text).group())

    return {"rule": rule, "path": path, "variant": variant, "seeds": int(seeds),
            "mean": float(mean.split()[0]), "std": float(std) if std else 0.0,
            "paper": None if paper == "–" else tuple(map(float, paper.split(" ± "))),
            "distance": number(distance), "slowness": number(slowness),
            "acc_max": number(acc_max), "epochs": int(epochs), "epoch_s": float(epoch_s),
            "angle": number(angle), "machine": cells[-1]}


def plot_comparison(path, curves, title, papers=None):
    """Mean ± std test curves {label: runs x epochs}: every rule on the left, and on the
    right a zoom on the rules whose final accuracy is within ZOOM_POINTS of the best; the
    paper's mean ± 2 std ({label: (mean, std)}) as a bar right of each curve's end, in its
    colour; a curve equal to an earlier one is dashed and says so; the legend beside the
    panels, integer epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    papers = papers or {}
    means = {label: np.asarray(runs, float).mean(0) for label, runs in curves.items()}
    best = max(mean[-1] for mean in means.values())
    top = [label for label, mean in means.items() if mean[-1] >= best - ZOOM_POINTS]
    colors = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    drawn = {}
    for (label, runs), color in zip(curves.items(), itertools.cycle(colors)):
        runs = np.asarray(runs, float)
        epochs = np.arange(1, runs.shape[1] + 1)
        mean, std = runs.mean(0), runs.std(0)
        twin = next((other for other, curve in drawn.items() if np.array_equal(curve, mean)),
                    None)
        drawn[label] = mean
        shown = f"{label} (the same curve as {twin}: dashed)" if twin else label
        paper = papers.get(label)
        for ax in axes if label in top else axes[:1]:
            ax.plot(epochs, mean, color=color, marker="." if len(epochs) < 30 else None,
                    linestyle="--" if twin else "-", label=shown if ax is axes[0] else None)
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
            if paper:
                ax.errorbar(epochs[-1] * 1.03 + 1, paper[0], yerr=2 * paper[1], color=color,
                            marker="D", markersize=5, capsize=4)
    if papers:
        axes[0].errorbar([], [], yerr=[], color="black", marker="D", linestyle="none",
                         capsize=4, label="the paper's mean ± 2 std (at the right end)")
    high = max(max(means[label].max(), papers.get(label, (0, 0))[0]) for label in top) + 0.3
    low = min(min(means[label][-1] for label in top) - 1.0, high - ZOOM_POINTS,
              *(papers[label][0] - 2 * papers[label][1] - 0.3 for label in top
                if label in papers))
    axes[1].set_ylim(low, high)
    axes[0].set_title(title)
    axes[1].set_title(f"zoom: the rules within {ZOOM_POINTS:g} points of the best")
    for ax in axes:
        ax.set(xlabel="epoch", ylabel="test accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.tight_layout()
    utils.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                                     bbox_inches="tight"))
    plt.close(fig)


def display_path(text):
    """A path as a reader can use it: ~/... under the home folder, relative to the
    repository root beside it, else as given."""
    home = str(Path.home())
    if text.startswith(home + os.sep):
        return "~" + text[len(home):]
    if text.startswith(str(ROOT.parent) + os.sep):
        return os.path.relpath(text, ROOT)
    return text


def display_command(command):
    """A recorded command as a reader can paste it: paths as display_path gives them, and
    the shell patterns of --only quoted."""
    return " ".join(f"'{word}'" if set(word) & set("*?[") and word[0] not in "'\"" else
                    display_path(word) for word in command.split())


# ------------------------------------------------------------------------------------------
# The paper's Table 1 from the committed per-dataset results (results/paper/README.md)
# ------------------------------------------------------------------------------------------
TABLE_COLUMNS = [(kind, code) for kind in ("FC", "conv") for code in paper.PRESET_CODES]


def final_accuracies(folder):
    """{(dataset code, rule, path, variant): {seed: final test %}} from every curves.csv
    under folder/<dataset>/ (the last epoch of each run's curve)."""
    codes = {spec["alias"]: code for code, spec in DATASETS.items()}
    finals = {}
    for csv_path in sorted(Path(folder).glob("*/**/curves.csv")):
        code = codes.get(csv_path.relative_to(folder).parts[0])
        if code is None:
            continue
        for (rule, path, variant), by_seed in read_curves_csv(csv_path).items():
            finals.setdefault((code, rule, path, variant), {}).update(
                (seed, curve[-1]) for seed, curve in by_seed.items())
    return finals


def table_cell(entries, paper, std_elsewhere=None):
    """A cell of the combined table: each measured setting, then the paper's value (and the
    std another copy gives)."""
    lines = []
    for (path, variant), values in entries:
        n = len(values)
        label = ", ".join(filter(None, [path if len(entries) > 1 else "", variant]))
        text = f"**{format_accuracy(np.mean(values), np.std(values), n)}**"
        text += f" (n = {n})" if n > 1 else ""
        text += f" {label}" if label else ""
        if paper:
            text += f", {format_distance((np.mean(values) - paper[0]) / paper[1])} std"
        if paper and std_elsewhere:
            text += (f" ({format_distance((np.mean(values) - paper[0]) / std_elsewhere)} "
                     f"with the other copy's std)")
        lines.append(text)
    if not lines:
        lines.append("not run yet" if paper else "–")
    if paper:
        lines.append(f"paper {paper[0]:.2f} ± {paper[1]:.2f}"
                     + (f" ({std_elsewhere:.2f} in another copy)" if std_elsewhere else ""))
    return "<br>".join(lines)


def combined_table(folder):
    """results/paper/README.md: the paper's Table 1 layout, each cell ours (mean ± std over
    n seeds, and the distance in the paper's std), then the paper's value."""
    finals = final_accuracies(folder)
    rules = [*paper.RULES, *sorted({key[1] for key in finals} - set(paper.RULES))]
    header = ["rule", *(f"{kind} {DATASETS[code]['name']}" for kind, code in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rule in rules:
        cells = []
        for kind, code in TABLE_COLUMNS:
            entries = [((path, variant), list(values.values()))
                       for (c, r, path, variant), values in finals.items()
                       if c == code and r == rule and net_kind(path) == kind]
            cells.append(table_cell(entries, paper.TABLE[code][kind].get(rule),
                                    paper.OTHER_STDS.get((code, kind, rule))))
        lines.append(f"| {utils.run_label(rule)} | " + " | ".join(cells) + " |")
    folders = sorted({p.parent.relative_to(folder).as_posix()
                      for p in Path(folder).glob("*/**/curves.csv")})
    text = (
        "# The paper's Table 1, measured here\n\n"
        "Test accuracy (%) after the runs' last epoch (100 for the paper's settings), mean ± "
        "std over n seeds (the population std, numpy's np.std with ddof 0; one seed: n = 1), "
        "the distance to the paper in units of the paper's std (marked beyond 2), and the "
        "paper's value (`../shared/pepita-reference.md`, section 5; where another copy of the "
        "table gives another std, the distance in it too). FC: one hidden layer of 1024 ReLU "
        "units (the numpy path; on CIFAR PEPITA also the tutorial's net "
        "`NetFC1x1024DOcust_cif`, which the paper's number comes from); conv: "
        "`Net1conv1fcXL` (MNIST), `Net1conv1fcXL_cif` (CIFAR). A label names the net when a "
        "cell holds several, and the settings that differ from the preset's.\n\n"
        + "\n".join(lines) + "\n\n"
        "CIFAR-10 ran on the JPEG copy of `../shared/data/cifar10` (lossy: results are close "
        "to, not identical with, the original CIFAR-10's); CIFAR-100 on the lossless copy of "
        "`../shared/data/cifar100` (the official images and split, bit for bit). The paper's "
        "CIFAR-100 values for FA and DRTP are not known here (the reference does not give "
        "them); the paper has none for ERINsign and DFA. Each dataset's folder has its table "
        "(with the machine and time per epoch of every row), curves, `runs.csv` (each run's "
        "command, commit, date, machine, device and data digest), figure and the commands: " + ", ".join(f"`{f}/`" for f in folders) + ".\n\n"
        "Regenerate this file from those folders (in the repository root):\n\n"
        "```bash\npython sweep.py --combine\n```\n")
    utils.write_text(Path(folder) / "README.md", text)
    return lines
