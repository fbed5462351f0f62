"""Run a grid of main.py / main_pytorch.py runs as Ray Tune trials, and collect the table.

The paper's MNIST table (numpy PEPITA over 3 seeds, the other rules and the conv nets once):

    python sweep.py --paper mnist --seeds 3 --other_seeds 1 --data_dir ../shared/data/mnist

A grid of your own (flags after -- go to every run):

    python sweep.py --script main.py --grid learn_type=ERIN,BP --grid seed=0,1,2 \
        --epochs 20 -- --n_hlayers 1 --eta 0.1 --validation --data_dir ../shared/data/mnist

Each run is one trial running the entry script in its own results folder
(<sweep_dir>/runs/<name>/), so the scripts' checkpoints are the one resume mechanism: the same
command again skips finished runs and resumes the others from their last epoch. Without
--address, Ray runs embedded on this machine's cores. `python sweep.py --collect DIR` writes
table.md, curves.csv, test_curves.png and README.md of a sweep folder (report.py; see
README.md, "Reproducing the paper").
"""
import contextlib
import ctypes
import fcntl
import fnmatch
import io
import itertools
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import datasets
import paper
import protocol
import report
import utils
from utils import UsageError

log = logging.getLogger("pepita.sweep")
ROOT = Path(__file__).resolve().parent
SCRIPTS = ("main.py", "main_pytorch.py")
POLL_S = 2.0
# tracked: written only by sweeps with their preset's settings
PAPER_RESULTS = ROOT / "results" / "paper"
FOLLOWUP_RESULTS = ROOT / "results" / "followup"
PRESET_AUTHORS = {"paper": "paper", "followup": "follow-up"}

# ------------------------------------------------------------------------------------------
# The grid: one run spec (name, script, flags, labels) per trial
# ------------------------------------------------------------------------------------------
def entry_parser(script):
    import main
    if script == "main.py":
        return main.build_parser()
    import main_pytorch
    return main_pytorch.build_parser()


def grid_flags(script, grid):
    """[(values dict, flags)] for every combination of --grid key=v1,v2 values; keys are the
    entry script's long flag names, on/off for flags without a value, space-separated
    lists for flags that take several ("fc_hidden=1024 1024,512")."""
    actions = {a.dest: a for a in entry_parser(script)._actions}
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        action = actions.get(key)
        if action is None or not values:
            raise UsageError(f"--grid {item!r}: give NAME=V1,V2 with NAME a flag of {script} "
                             "(without dashes)")
        if action.nargs == 0 and not set(values.split(",")) <= {"on", "off"}:
            raise UsageError(f"--grid {item!r}: --{key} takes no value; use {key}=on,off")
        axes.append((key, action, values.split(",")))
    combos = []
    for values in itertools.product(*(axis[2] for axis in axes)):
        flags = []
        for (key, action, _), value in zip(axes, values):
            if action.nargs == 0:
                flags += [f"--{key}"] if value == "on" else []
            else:
                flags += [f"--{key}", *(value.split() if action.nargs in ("+", "*")
                                        else [value])]
        combos.append((dict(zip((axis[0] for axis in axes), values)), flags))
    return combos


def path_label(script, flags):
    """'numpy' for main.py, the model's name for main_pytorch.py (the last --model wins)."""
    if script == "main.py":
        return "numpy"
    return flag_value(flags, ("--model", "-mod"), "Net1conv1fcXL_cif")


def safe_name(text):
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)


def make_spec(script, flags, rule, seed, variant=""):
    path = path_label(script, flags)
    name = safe_name("_".join(filter(None, [path, rule, variant, f"seed{seed}"])))
    return {"name": name, "script": script, "path": path, "rule": rule, "variant": variant,
            "seed": seed, "flags": flags}


def preset_specs(preset, dataset, seeds, other_seeds, common=()):
    """The run specs of a preset ("paper" or "followup") for a dataset, in order."""
    if preset == "paper":
        return [make_spec(script, [*flags, "--seed", str(seed), *common], rule, seed)
                for script, rule, seed, flags in paper.paper_runs(dataset, seeds, other_seeds)]
    return [make_spec("main_pytorch.py", [*flags, "--seed", str(seed), *common], rule, seed,
                      variant)
            for rule, variant, seed, flags in paper.followup_runs(dataset, seeds)]


def preset_of(manifest):
    """(preset, dataset) of a sweep's manifest or of a sweep's arguments, or None (a grid)."""
    return next(((preset, manifest[preset]) for preset in PRESET_AUTHORS
                 if manifest.get(preset)), None)


def tracked_results(preset):
    """The committed results folder of a preset."""
    return {"paper": PAPER_RESULTS, "followup": FOLLOWUP_RESULTS}[preset]


def build_runs(args, common):
    """Every run spec of the sweep, in order; common: flags for every run."""
    preset = preset_of(vars(args))
    if preset:
        specs = preset_specs(*preset, args.seeds, args.other_seeds, common)
    else:
        grid = list(args.grid)
        if not any(item.startswith("seed=") for item in grid):
            grid.append("seed=" + ",".join(map(str, range(args.seeds))))
        specs = []
        for values, flags in grid_flags(args.script, grid):
            rule = utils.rule_name(values.pop("learn_type", None) or flag_value(
                common, ("--learn_type", "-lt"), "ERIN"))
            seed = values.pop("seed")
            variant = "_".join(f"{k}={v}" for k, v in values.items())
            specs.append(make_spec(args.script, [*common, *flags], rule, seed, variant))
    if args.epochs and {"--train_epochs", "-trep"} & set(common):
        raise UsageError("--train_epochs is given twice (--epochs and after --); give it once")
    if args.epochs:  # in place of a preset's epochs, else added
        for spec in specs:
            flags = spec["flags"]
            if "--train_epochs" in flags:
                flags[flags.index("--train_epochs") + 1] = str(args.epochs)
            else:
                flags += ["--train_epochs", str(args.epochs)]
    if args.only:
        specs = only_runs(specs, args.only)
    names = [spec["name"] for spec in specs]
    if len(set(names)) != len(names):
        raise UsageError("two runs of the grid have the same settings; remove the repeated "
                         "--grid values")
    return specs


def only_runs(specs, only):
    """The specs whose names match one of the comma-separated patterns of --only."""
    patterns = [pattern for pattern in only.split(",") if pattern]
    matches = {p: [s for s in specs if fnmatch.fnmatchcase(s["name"], p)] for p in patterns}
    unmatched = [pattern for pattern, found in matches.items() if not found]
    if unmatched or not patterns:
        raise UsageError(f"--only {only}: {', '.join(unmatched) or 'no name'} matches no run "
                         "of the sweep; --dry_run lists their names")
    return [spec for spec in specs if any(spec in found for found in matches.values())]


# ------------------------------------------------------------------------------------------
# One trial: the entry script in a child process, its metrics.json polled and reported
# ------------------------------------------------------------------------------------------
def run_folder(run_dir):
    """The entry script's results folder inside a trial's folder, or None."""
    folders = sorted(p for p in Path(run_dir).glob("res_*") if p.is_dir())
    return folders[0] if folders else None


def read_metrics(run_dir):
    """The metrics.json of a trial's results folder, or None (not written yet)."""
    folder = run_folder(run_dir)
    return protocol.read_metrics(folder) if folder else None


def read_record(run_dir):
    """A trial's trial.json (command, machine, exit status, error line), or {}."""
    path = Path(run_dir) / "trial.json"
    if not path.is_file():
        return {}
    advice = "delete it: the sweep writes it again when it reruns the trial"
    record = read_json(path, advice)
    if not isinstance(record, dict):
        raise UsageError(f"{path} is damaged (not a trial record); {advice}")
    return record


def read_json(path, advice):
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is damaged ({utils.describe(err)}); {advice}") from None


def progress(metrics):
    """(epochs done, latest test accuracy in %) of the run's current curve."""
    if not metrics or not metrics.get("test"):
        return 0, None
    curve = metrics["test"][-1] or (metrics["test"][-2] if len(metrics["test"]) > 1 else [])
    scale = 1 if metrics.get("accuracy_unit") == "percent" else 100
    return len(curve), (curve[-1] * scale if curve else None)


def machine(cpus, gpus):
    if gpus:
        import torch
        return f"{torch.cuda.get_device_name()} (GPU), host {platform.node()}"
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {cpus} core{'s' if cpus > 1 else ''}, host {platform.node()}"


def die_with_parent():
    """In the child: get SIGKILL when the trial's thread dies, so that a killed sweep
    leaves no training process behind (Linux; elsewhere nothing happens)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_command(spec, run_dir):
    """The command of a trial: a fresh start, or --resume after an interruption (the
    entry script continues from its last epoch, or starts again if it saved none)."""
    command = [sys.executable, str(ROOT / spec["script"]), *spec["flags"],
               "--results_dir", str(run_dir)]
    if run_folder(run_dir) is None:
        return command, "start"
    return command + ["--resume"], "resume"


def trial(config):
    """Ray Tune trainable: run one spec to its end, reporting each epoch."""
    from ray import tune
    spec, cpus, gpus = config["spec"], config["cpus"], config["gpus"]
    run_dir = Path(config["sweep_dir"]) / "runs" / spec["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = read_metrics(run_dir)
    if metrics and metrics.get("status") == "finished":
        epochs, acc = progress(metrics)
        tune.report({"epoch": epochs, "test_acc": acc, "state": "done earlier"})
        return
    command, how = start_command(spec, run_dir)
    earlier = read_record(run_dir)
    threads = str(cpus)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    record = {"name": spec["name"], "command": command, "how": how, "cpus": cpus,
              "gpus": gpus, "machine": machine(cpus, gpus), "started": time.time(),
              # how the earlier tries of this run ended (a retry, or the sweep run again)
              "earlier_ends": [*earlier.get("earlier_ends", []),
                               *([earlier["message"]] if earlier.get("message") else [])]}
    log_path = run_dir / "log.txt"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file,
                                 stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        reported = 0
        while child.poll() is None:
            time.sleep(POLL_S)
            epochs, acc = progress(read_metrics(run_dir))
            if epochs > reported:
                reported = epochs
                tune.report({"epoch": epochs, "test_acc": acc, "state": how})
    record.update(returncode=child.returncode, wall_s=time.time() - record["started"])
    if child.returncode < 0:  # the log's last line is only its progress then
        record["message"] = (f"ended by {signal.Signals(-child.returncode).name} (not by an "
                             "error of its own)")
    elif child.returncode != 0:
        with open(log_path, "rb") as f:
            f.seek(offset)
            lines = [line for line in f.read().decode(errors="replace").splitlines()
                     if line.strip()]
        record["message"] = lines[-1] if lines else f"exit status {child.returncode}"
    utils.write_json(run_dir / "trial.json", record)
    epochs, acc = progress(read_metrics(run_dir))
    if child.returncode < 0:  # killed from outside: raised, so that Tune retries the trial
        raise TrialKilled(record["message"])
    if child.returncode != 0:  # its own error: reported once, not retried
        tune.report({"epoch": epochs, "test_acc": acc, "state": "failed",
                     "message": record["message"]})
    elif epochs > reported:
        tune.report({"epoch": epochs, "test_acc": acc, "state": how})


class TrialKilled(RuntimeError):
    """The run's process was killed (not its own error): Tune retries the trial, whose run
    resumes from its last epoch (--max_failures)."""


def progress_callback():
    from ray import tune

    class Progress(tune.Callback):
        """One log line per trial event: which trials run, their epoch and accuracy."""

        def on_trial_start(self, iteration, trials, trial, **info):
            log.info("start  %s", trial.config["spec"]["name"])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("state") == "failed":
                log.error("failed %s: %s", trial.config["spec"]["name"], result["message"])
                return
            acc = result.get("test_acc")
            running = sum(t.status == "RUNNING" for t in trials)
            log.info("%-40s epoch %3d  test %s  (%s; %d running, %d of %d ended)",
                     trial.config["spec"]["name"], result.get("epoch", 0),
                     "-" if acc is None else f"{acc:.2f}%", result.get("state"), running,
                     sum(t.is_finished() for t in trials), len(trials))

        def on_trial_recover(self, iteration, trials, trial, **info):
            log.warning("retry  %s from its last epoch (%s)", trial.config["spec"]["name"],
                        ended_how(trial))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.error("failed %s (%s; rerun the sweep to resume it)",
                      trial.config["spec"]["name"], ended_how(trial))

    return Progress()


def ended_how(trial):
    """Why a trial ended: its run's record, or its worker lost."""
    record = read_record(Path(trial.config["sweep_dir"]) / "runs" / trial.config["spec"]["name"])
    return record.get("message") or "its worker ended"


def check_address(address):
    """A HOST:PORT that no Ray cluster answers: one line within seconds (ray.init would
    retry for minutes)."""
    if address in (None, "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except (OSError, ValueError) as err:
        raise UsageError(f"--address {address}: no Ray cluster answers there "
                         f"({getattr(err, 'strerror', None) or utils.describe(err)}); start one "
                         "with 'ray start --head', or leave out --address to run on this "
                         "machine") from None


def check_resources(ray, args):
    """Trials that no node of the cluster can hold would wait forever: refuse them."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for flag, name, wanted in (("--cpus_per_trial", "CPU", args.cpus_per_trial),
                               ("--gpus_per_trial", "GPU", args.gpus_per_trial)):
        largest = max((node.get(name, 0) for node in nodes), default=0)
        if wanted > largest:
            raise UsageError(f"{flag} {wanted:g}: no machine of the Ray cluster has that many "
                             f"{name}s (at most {largest:g}); ask for at most {largest:g}")


def start_ray(ray, args):
    check_address(args.address)
    if not args.address and args.cpus_per_trial > os.cpu_count():
        raise UsageError(f"--cpus_per_trial {args.cpus_per_trial}: this machine has "
                         f"{os.cpu_count()} cores; ask for at most {os.cpu_count()}")
    local = {} if args.address else {"num_cpus": os.cpu_count(), "include_dashboard": False}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's banners and tables: none
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C is ours (main)
    logging.getLogger("ray").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        ray.init(address=args.address, log_to_driver=False,
                 logging_level=logging.INFO if args.verbose else logging.ERROR,
                 configure_logging=False, **local)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UsageError(f"--address {args.address}: cannot connect to a Ray cluster "
                         f"({utils.describe(err)}); start one with 'ray start --head', or "
                         "leave out --address to run on this machine") from None


def run_sweep(specs, sweep_dir, args):
    import ray
    from ray import tune
    started_ray = not ray.is_initialized()
    if started_ray:
        start_ray(ray, args)
        for signum in (signal.SIGINT, signal.SIGTERM):  # ray.init installs its own
            signal.signal(signum, interrupt)
    try:
        check_resources(ray, args)
        space = {"spec": tune.grid_search(specs), "sweep_dir": str(sweep_dir.resolve()),
                 "cpus": args.cpus_per_trial, "gpus": args.gpus_per_trial}
        resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
        tuner = tune.Tuner(
            tune.with_resources(trial, resources), param_space=space,
            tune_config=tune.TuneConfig(
                trial_name_creator=lambda t: t.config["spec"]["name"],
                trial_dirname_creator=lambda t: t.config["spec"]["name"]),
            run_config=tune.RunConfig(
                name=time.strftime("tune_%Y%m%d_%H%M%S"), verbose=0,
                storage_path=str((sweep_dir / "ray").resolve()),
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                callbacks=[progress_callback()]))
        tuner.fit()
    finally:
        if started_ray:
            ray.shutdown()


def summarize(specs, sweep_dir):
    """One line per run: state, epochs, final test accuracy, wall time, the error line."""
    failed = 0
    for spec in specs:
        run_dir = sweep_dir / "runs" / spec["name"]
        metrics = read_metrics(run_dir)
        epochs, acc = progress(metrics)
        record = read_record(run_dir)
        finished = bool(metrics) and metrics.get("status") == "finished"
        failed += not finished
        log.info("%-40s %-8s %3d epochs  test %s  %s", spec["name"],
                 "finished" if finished else "FAILED", epochs,
                 "-" if acc is None else f"{acc:.2f}%",
                 "" if finished else record.get("message", "did not run to its end"))
    return failed


# ------------------------------------------------------------------------------------------
# Collection: the finished runs of a sweep folder, handed to report.py
# ------------------------------------------------------------------------------------------
def run_results(run_dir):
    """Per run of a finished trial: (test curve %, train curve %, final test %, epoch
    times, final angle). Only numpy has a train curve; metrics.json of before the common
    schema held numpy's accuracies as fractions."""
    metrics = read_metrics(run_dir)
    if not metrics or metrics.get("status") != "finished":
        return []
    scale = 1 if metrics.get("accuracy_unit") == "percent" else 100
    alignment = metrics.get("alignment") or []
    trains = metrics.get("train") or []
    results = []
    for r, test in enumerate(metrics["test"]):
        train = [a * scale for a in trains[r]] if r < len(trains) else []
        final = metrics["final_test"][r] * scale if "final_test" in metrics else test[-1]
        angle = alignment[r][-1]["angle_F"] if r < len(alignment) and alignment[r] else None
        results.append(([a * scale for a in test], train, final, metrics["epoch_time_s"][r],
                        angle))
    return results


def flag_value(flags, names, default):
    """The value of the last of names in flags (argparse's rule), or default."""
    values = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag in names]
    return values[-1] if values else default


def code_of(spec):
    default = "mn" if spec["script"] == "main.py" else "cif"
    return flag_value(spec["flags"], ("--dataset", "-ds"), default)


def group_runs(manifest, sweep_dir):
    groups = {}
    for spec in manifest["runs"]:
        key = (spec["path"], spec["rule"], spec["variant"])
        run_dir = sweep_dir / "runs" / spec["name"]
        record = read_record(run_dir)
        for test, train, final, times, angle in run_results(run_dir):
            groups.setdefault(key, []).append({
                "seed": spec["seed"], "test": test, "train": train, "final": final,
                "times": times, "angle": angle, "machine": record.get("machine", "?"),
                "code": code_of(spec)})
    return groups


SPEC_KEYS = {"name": str, "script": str, "path": str, "rule": str, "variant": str,
             "seed": (int, str), "flags": list}  # a grid's seeds are its --grid values


def read_manifest(sweep_dir):
    """sweep.json of a sweep folder, checked: every run spec with its keys."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        raise UsageError(f"{sweep_dir} holds no sweep.json: give a folder written by "
                         "sweep.py (its --sweep_dir)")
    advice = "it lists the sweep's runs: restore it, or start the sweep in a new --sweep_dir"
    manifest = read_json(path, advice)
    runs = manifest.get("runs") if isinstance(manifest, dict) else None
    problem = None
    if not isinstance(runs, list) or not isinstance(manifest.get("commands"), list):
        problem = "no list of runs and commands"
    else:
        for spec in runs:
            bad = [key for key, kind in SPEC_KEYS.items()
                   if not isinstance(spec, dict) or not isinstance(spec.get(key), kind)]
            if bad:
                problem = f"a run without {', '.join(bad)}"
                break
    if problem:
        raise UsageError(f"{path} is damaged ({problem}); {advice}")
    return manifest


def collect(sweep_dir, out_root=None):
    """Write the table, curves, figure and README of the sweep in sweep_dir into
    out_root/<dataset>/ (default: the preset's committed results for a sweep with its
    settings, else the sweep folder); returns (rows, folder). Only finished runs count; what
    the folder holds from earlier sweeps stays (report.write_collection)."""
    sweep_dir = Path(sweep_dir)
    manifest = read_manifest(sweep_dir)
    differences = differences_from_preset(manifest)
    out_given = out_root is not None
    out_root = collection_root(out_root, preset_of(manifest), differences, sweep_dir)
    groups = group_runs(manifest, sweep_dir)
    if not groups:
        raise UsageError(f"{sweep_dir}: no run has finished yet; run the sweep first")
    shown = report.display_path
    commands = [*(f"python {report.display_command(c)}" for c in manifest["commands"]),
                f"python sweep.py --collect {shown(str(sweep_dir.resolve()))}"
                + (f" --out {shown(str(Path(out_root).resolve()))}" if out_given else "")]
    return report.write_collection(out_root, groups, collection_notes(manifest, differences),
                                   commands)


def collection_root(out, preset, differences, sweep_dir):
    """Where a sweep's tables go: --out when given (never a preset's committed results for
    a sweep without its settings), else the committed results of a preset-settings sweep
    (results/paper, results/followup), else its folder."""
    if out:
        refuse_tracked_results(out, preset, differences)
        return Path(out)
    return tracked_results(preset[0]) if preset and not differences else Path(sweep_dir)


def collection_notes(manifest, differences):
    """Lines that a table must carry: how its settings differ from its preset's, and which
    copy of a dataset it ran on (KNOWN_COPIES)."""
    notes = []
    preset = preset_of(manifest)
    if preset and differences:
        notes.append(f"**Not the {PRESET_AUTHORS[preset[0]]} preset's settings**: "
                     + "; ".join(differences) + ".")
    files = {(code_of(spec), flag_value(spec["flags"], ("--data_dir",), None))
             for spec in manifest["runs"]}
    copies = {known_copy(code, data_dir) for code, data_dir in files if data_dir}
    notes += [KNOWN_COPIES[digest] for digest in KNOWN_COPIES if digest in copies]
    return notes


# The sha256 of the .npz files that ../shared/data/*/make_npz.py write, and what a table that
# ran on them must say.
KNOWN_COPIES = {
    "8258534be228bdab841bfbb1d4fe686dea0a6fd61952329e0f040908948043c0":
        "CIFAR-10 ran on the JPEG copy of `../shared/data/cifar10` (lossy: results are close "
        "to, not identical with, the original CIFAR-10's).",
    "10835a0108963ab2de621dad113bdbd29695f57555fcf87cfb24fbce1d58c0d4":
        "CIFAR-100 ran on the lossless copy of `../shared/data/cifar100` (the official "
        "60,000 images bit for bit, the official train/test split; shuffled within each set).",
}


def known_copy(code, data_dir):
    """The sha256 of data_dir's .npz of the dataset when it is one of KNOWN_COPIES, else
    None."""
    if code not in datasets.DATASETS:
        return None
    path = Path(data_dir) / datasets.DATASETS[code]["npz"]
    digest = utils.sha256_of(path) if path.is_file() else None
    return digest if digest in KNOWN_COPIES else None


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def build_parser():
    parser = utils.new_parser(__doc__, usage="%(prog)s [options] [-- flags for every run]")
    add = parser.add_argument
    add("--paper", choices=tuple(paper.PRESETS),
        help="the paper's runs for this dataset (the README's commands)")
    add("--followup", choices=tuple(paper.PRESETS),
        help="the follow-up paper's runs for this dataset: depth 1-3 x (PEPITA, + weight "
             "decay, + weight decay and mirroring), and PEPITA-TL")
    add("--script", choices=SCRIPTS, default="main.py", help="entry script of a --grid sweep")
    add("--grid", action="append", default=[], metavar="FLAG=V1,V2",
        help="values of one flag of the script (repeat for more flags; on,off for switches)")
    add("--seeds", type=utils.positive_int, default=1,
        help="seeds 0..N-1 (with --paper: of PEPITA's conv net, and of numpy PEPITA on "
             "MNIST or the tutorial's net on CIFAR)")
    add("--other_seeds", type=utils.positive_int, default=None,
        help="with --paper: seeds of the other runs (default: --seeds)")
    add("--only", default=None, metavar="NAME,...",
        help="run only these runs of the sweep (names as --dry_run lists them; shell "
             "patterns such as 'numpy_*' allowed)")
    add("--epochs", type=utils.positive_int, default=None,
        help="training epochs of every run (default: the preset's or the script's)")
    add("--data_dir", default=None, help="dataset folder, passed to every run")
    add("--sweep_dir", default=None,
        help="folder of the sweep's runs (default: results/sweeps/<paper_DATASET or grid>)")
    add("--out", default=None,
        help="collected outputs go to OUT/<dataset>/ (default: results/paper with --paper, "
             "else the sweep folder)")
    add("--address", default=None,
        help="an existing Ray cluster (auto or HOST:PORT); default: an embedded local Ray")
    add("--cpus_per_trial", type=utils.positive_int, default=1,
        help="CPU cores per run (also its BLAS and torch threads)")
    add("--gpus_per_trial", type=utils.non_negative_float, default=0,
        help="GPUs per run; > 0 adds --device cuda to main_pytorch.py runs")
    add("--max_failures", type=utils.non_negative_int, default=2,
        help="retries of a trial whose run was killed or whose node was lost (it resumes "
             "from its last epoch); a run's own error is not retried; 0: no retries")
    add("--dry_run", action="store_true",
        help="print the runs, their commands, where the outputs go and an estimate of the "
             "time; run none")
    add("--verbose", action="store_true", help="Ray's and Tune's own messages too")
    add("--collect", metavar="DIR", default=None,
        help="only collect the table of the sweep folder DIR")
    add("--combine", action="store_true",
        help="only write results/paper/README.md, the paper's table, from the committed "
             "per-dataset results")
    return parser


SIGNALLED = []  # the signals received, for the exit status and the message


def interrupt(signum, frame):
    """SIGTERM and Ctrl-C alike: a KeyboardInterrupt, which Ray and Tune pass on (an
    exception of our own would surface as a SystemError from inside Ray's C code)."""
    SIGNALLED.append(signum)
    raise KeyboardInterrupt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, common = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = build_parser()
    args = parser.parse_args(own)
    bad = next((word for word in argv if not utils.is_utf8(word)), None)
    if bad is not None:
        parser.error(f"{bad.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8; give "
                     "names and paths in UTF-8")
    protocol.setup_logging(args.verbose)
    handlers = {signum: signal.signal(signum, interrupt)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return sweep(args, common, own)
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        parser.exit(2, f"{parser.prog}: error: cannot write or read{where} "
                       f"({err.strerror or utils.describe(err)}); choose another folder\n")
    except KeyboardInterrupt:
        signum = SIGNALLED[-1] if SIGNALLED else signal.SIGINT
        name = signal.Signals(signum).name
        parser.exit(128 + signum, f"{parser.prog}: stopped by {name}, its trials ended; "
                                       "rerun the same command to resume (finished runs are "
                                       "kept, the others continue from their last epoch)\n")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def sweep(args, common, own):
    if args.combine:
        lines = report.combined_table(PAPER_RESULTS)
        log.info("wrote %s (%d rules)", report.display_path(str(PAPER_RESULTS / "README.md")),
                 len(lines) - 2)
        return 0
    if args.collect:
        rows, out = collect(args.collect, args.out)
        log.info("collected %d rows into %s", len(rows), out)
        return 0
    if sum(map(bool, (args.paper, args.followup, args.grid))) > 1:
        raise UsageError("--paper, --followup and --grid exclude each other: a preset is a "
                         "grid")
    if args.other_seeds and not args.paper:
        raise UsageError("--other_seeds goes with --paper; use --seeds")
    args.other_seeds = args.other_seeds or args.seeds
    data_flags = ["--data_dir", str(Path(args.data_dir).resolve())] if args.data_dir else []
    specs = build_runs(args, [*absolute_paths(common), *data_flags])
    if args.gpus_per_trial:
        if any(spec["script"] == "main.py" for spec in specs):
            raise UsageError("--gpus_per_trial: main.py runs on the CPU only; sweep "
                             "main_pytorch.py runs alone, or leave it out")
        for spec in specs:
            spec["flags"] += ["--device", "cuda"]
    sweep_dir = Path(args.sweep_dir or "results/sweeps/" + (
        f"paper_{args.paper}" if args.paper else
        f"followup_{args.followup}" if args.followup else "grid"))
    preset = preset_of(vars(args))
    differences = differences_from_preset({**vars(args), "runs": specs})
    out_root = collection_root(args.out, preset, differences, sweep_dir)
    check_flags(specs, common)
    if args.dry_run:
        for spec in specs:
            print(f"{spec['name']}: python {spec['script']} {' '.join(spec['flags'])}")
        print(f"{len(specs)} runs, each in {sweep_dir}/runs/<run>/; the table, curves and "
              f"figure collected into {out_root}/<dataset>/")
        print(time_estimate(specs, sweep_dir, args))
        return 0
    for spec in specs:
        read_record(sweep_dir / "runs" / spec["name"])  # a damaged record: now, not after
    write_manifest(sweep_dir, specs, args, own, common)
    tic = time.time()
    run_sweep(specs, sweep_dir, args)
    failed = summarize(specs, sweep_dir)
    log.info("sweep took %.1f min; %d of %d runs finished", (time.time() - tic) / 60,
             len(specs) - failed, len(specs))
    if failed < len(specs):
        _, out = collect(sweep_dir, args.out)
        if preset and differences and not args.out:
            log.info("not the %s's settings (%s): collected into the sweep's folder, not "
                     "into %s", PRESET_AUTHORS[preset[0]], "; ".join(differences),
                     report.display_path(str(tracked_results(preset[0]))))
        log.info("table, curves and figure in %s", out)
    return 1 if failed else 0


OWN_FLAGS = {"--results_dir": "sweep.py gives each run its folder",
             "--resume": "sweep.py resumes interrupted runs itself",
             "--overwrite": "sweep.py never replaces a run's results",
             "--nested_folder": "sweep.py gives each run its folder",
             "--seed": "give seeds with --seeds or --grid seed=..."}


PATH_FLAGS = {"--data_dir", "--continue_training_path", "-ct_path"}


def absolute_paths(flags):
    """The path values of the flags after --, resolved from the folder the sweep was started
    in: its trials run in the repository root."""
    flags = list(flags)
    for i, flag in enumerate(flags):
        name, eq, value = flag.partition("=")
        if name in PATH_FLAGS and eq:
            flags[i] = f"{name}={Path(value).expanduser().resolve()}"
        elif flag in PATH_FLAGS and i + 1 < len(flags):
            flags[i + 1] = str(Path(flags[i + 1]).expanduser().resolve())
    return flags


def check_flags(specs, common):
    """Every run's flags as its script reads them: a value it would refuse, a flag that
    sweep.py sets itself or a flag given twice (in --grid and after --) is refused now, in
    one line, instead of failing every trial."""
    for flag in common:
        name = flag.split("=")[0]
        if name in OWN_FLAGS:
            raise UsageError(f"{name} after --: {OWN_FLAGS[name]}")
        if name in ("-h", "--help"):
            raise UsageError(f"{name} after --: see python {specs[0]['script']} --help")
    parsers = {}
    for spec in specs:
        parser = parsers.setdefault(spec["script"], entry_parser(spec["script"]))
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(errors):
                parser.parse_args(spec["flags"])
        except SystemExit:
            lines = errors.getvalue().strip().splitlines() or ["not a flag of the script"]
            raise UsageError(f"run {spec['name']}: {lines[-1].split('error: ', 1)[-1]}") \
                from None
        dests = {}
        for flag in spec["flags"]:
            action = parser._option_string_actions.get(flag)
            if action and action.dest in dests:
                raise UsageError(f"run {spec['name']}: {flag} is given twice (in --grid, "
                                 "after -- or by --epochs / --data_dir); give it once")
            if action:
                dests[action.dest] = flag


# Seconds per epoch measured here, one core per run, two runs at a time (on CIFAR-10 up to
# four runs shared the two cores: the times there are high), the medians of the tables in
# results/paper and results/followup (keyed by depth there): the estimate of a dry run for
# runs that have not started.
MEASURED_EPOCH_S = {
    ("numpy", "ERIN", "mn"): 14.6, ("numpy", "BP", "mn"): 13.7, ("numpy", "FA", "mn"): 12.7,
    ("numpy", "DRTP", "mn"): 10.6, ("numpy", "ERINsign", "mn"): 12.8,
    ("numpy", "DFA", "mn"): 11.3, ("Net1conv1fcXL", "ERIN", "mn"): 11.4,
    ("Net1conv1fcXL", "BP", "mn"): 16.8,
    ("NetFC1x1024DOcust_cif", "ERIN", "cif"): 15.2, ("Net1conv1fcXL_cif", "ERIN", "cif"): 21.6,
    ("numpy", "ERIN", "cif"): 33.1, ("Net1conv1fcXL_cif", "BP", "cif"): 48.3,
    ("numpy", "BP", "cif"): 35.0, ("numpy", "FA", "cif"): 21.5, ("numpy", "DRTP", "cif"): 16.5,
    ("NetFC", "PEPITA", "cif", "depth1"): 15.9, ("NetFC", "PEPITA", "cif", "depth2"): 21.6,
    ("NetFC", "PEPITA", "cif", "depth3"): 55.2, ("NetFC", "PEPITA+WD", "cif", "depth1"): 22.2,
    ("NetFC", "PEPITA+WD", "cif", "depth2"): 24.0, ("NetFC", "PEPITA+WD", "cif", "depth3"): 30.3,
    ("NetFC", "PEPITA+WD+WM", "cif", "depth1"): 28.0,
    ("NetFC", "PEPITA+WD+WM", "cif", "depth2"): 100.4,
    ("NetFC", "PEPITA+WD+WM", "cif", "depth3"): 67.4,
    ("NetFC", "PEPITA-TL", "cif", "depth1"): 57.8,  # the 5-epoch probes of claims.md
}


def measured_epoch_s(spec):
    """MEASURED_EPOCH_S of a run: its variant's entry (the follow-up's depths), else its
    rule's on the dataset (a grid run of the same rule and net); None when not measured."""
    key = (spec["path"], spec["rule"], code_of(spec))
    return MEASURED_EPOCH_S.get((*key, spec["variant"]), MEASURED_EPOCH_S.get(key))


def time_estimate(specs, sweep_dir, args):
    """The line a dry run ends with: the wall time left, from the epochs still to train and
    the time per epoch (the run's own when it has started, else MEASURED_EPOCH_S)."""
    left, unknown = [], []
    for spec in specs:
        epochs = int(flag_value(spec["flags"], ("--train_epochs", "-trep"),
                                3 if spec["script"] == "main.py" else 100))
        metrics = read_metrics(sweep_dir / "runs" / spec["name"])
        done, _ = progress(metrics)
        times = [t for run in (metrics or {}).get("epoch_time_s", []) for t in run]
        per_epoch = float(np.median(times)) if times else measured_epoch_s(spec)
        if per_epoch is None:
            unknown.append(spec["name"])
        elif (metrics or {}).get("status") != "finished":
            left.append(per_epoch * max(epochs - done, 0))
    if len(unknown) == len(specs):
        return "estimated time: unknown (no run of this sweep has a measured time per epoch)"
    slots = max(1, (os.cpu_count() or 1) // args.cpus_per_trial) if not args.address else 1
    parallel = min(slots, max(1, len(left)))
    wall = max(sum(left) / parallel, max(left, default=0.0))  # no faster than its longest run
    cores = f"{args.cpus_per_trial} core{'s' if args.cpus_per_trial > 1 else ''} each"
    text = (f"estimated time: {format_duration(wall)} with {parallel} "
            f"trial{'s' if parallel > 1 else ''} at once ({cores}, measured times per epoch)")
    if unknown:
        text += f"; {len(unknown)} run(s) have no measured time per epoch and are not counted"
    return text


def format_duration(seconds):
    return f"about {seconds / 3600:.1f} h" if seconds >= 3600 else \
        f"about {seconds / 60:.0f} min"


def differences_from_preset(manifest):
    """How the runs of a --paper or --followup sweep differ from the preset's settings ([]
    when they are the preset's: 100 epochs, the full data, nothing added); --data_dir and
    --device aside. Settings are compared as the scripts read them, so "--eta 0.1 --eta
    0.01" is --eta 0.01."""
    preset = preset_of(manifest)
    if not preset:
        return []
    seeds = 1 + max(spec["seed"] for spec in manifest["runs"])
    expected = {spec["name"]: spec["flags"] for spec in preset_specs(*preset, seeds, seeds)}
    found, parsers = set(), {}
    for spec in manifest["runs"]:
        if spec["name"] not in expected:
            found.add(f"{spec['name']} is not a run of the preset")
            continue
        parser = parsers.setdefault(spec["script"], entry_parser(spec["script"]))
        ours, theirs = (read_settings(parser, spec["script"], flags)
                        for flags in (spec["flags"], expected[spec["name"]]))
        found.update(f"--{key} {ours.get(key)} (the preset's: {theirs.get(key)})"
                     for key in {**ours, **theirs} if ours.get(key) != theirs.get(key))
    return sorted(found)


def read_settings(parser, script, flags):
    """The settings a script reads from flags, --data_dir and --device aside; with --mirror,
    main_pytorch.py's mirroring settings as it fills them in."""
    settings = vars(parser.parse_args(without_flags(flags, ("--data_dir", "--device"))))
    if script == "main_pytorch.py" and settings["mirror"]:
        import main_pytorch
        settings = {**{name: value for name, value, _ in main_pytorch.MIRROR_SETTINGS},
                    **settings}
    return settings


def without_flags(flags, names):
    """flags without the given flags and their values."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        else:
            kept.append(flag)
    return kept


def refuse_tracked_results(out_root, preset, differences):
    """results/paper and results/followup are the repository's measured tables: only
    sweeps with their preset's settings may write there."""
    out_root = Path(out_root).resolve()
    for name, author in PRESET_AUTHORS.items():
        tracked = tracked_results(name)
        inside = out_root == tracked or tracked in out_root.parents
        own = preset is not None and preset[0] == name
        if inside and (not own or differences):
            why = "; ".join(differences) if own else f"not a --{name} sweep"
            raise UsageError(f"{report.display_path(str(tracked))} holds the {author}'s measured "
                             f"results; this sweep differs from its settings ({why}): leave "
                             "out --out (it then collects into its own --sweep_dir) or "
                             "choose another")


def write_manifest(sweep_dir, specs, args, own, common):
    """sweep.json: every run spec this folder has seen and the commands that made them.
    Locked while read and rewritten: two sweeps started into one folder both stay in it."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".sweep.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        add_to_manifest(sweep_dir / "sweep.json", specs, args, own, common)


def add_to_manifest(path, specs, args, own, common):
    manifest = read_manifest(path.parent) if path.is_file() else {"runs": [], "commands": []}
    known = {spec["name"]: spec for spec in manifest["runs"]}
    for spec in specs:
        if spec["name"] in known and known[spec["name"]]["flags"] != spec["flags"]:
            raise UsageError(f"{path.parent} already holds run {spec['name']} with other "
                             "flags; use another --sweep_dir")
        known[spec["name"]] = spec
    command = " ".join(["sweep.py", *own] + (["--", *common] if common else []))
    manifest.update(runs=list(known.values()), paper=manifest.get("paper") or args.paper,
                    followup=manifest.get("followup") or args.followup,
                    commands=list(dict.fromkeys([*manifest["commands"], command])))
    utils.write_json(path, manifest)


if __name__ == "__main__":
    sys.exit(main())
