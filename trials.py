"""One trial per run, run by Ray Tune: the entry script in a child process in its own folder,
its metrics.json polled and reported each epoch, its record (trial.json), retries of a killed
run (which resumes from its last epoch), and the embedded or remote Ray that runs them.

    trials.run_sweep(specs, sweep_dir, args)   # args: sweep.py's (cores, GPUs, retries...)
"""
import ctypes
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import protocol
import utils
from utils import UsageError

log = logging.getLogger("pepita.sweep")
ROOT = Path(__file__).resolve().parent
POLL_S = 2.0


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
    """(epochs done, latest test accuracy in %) of the run under way (else the last one):
    its epochs from the epoch times, its accuracy from the per-epoch test curve, or, for a
    run without one (main.py without --validation), its final test accuracy."""
    times = (metrics or {}).get("epoch_time_s") or []
    if not times:
        return 0, None
    index = len(times) - 1 if times[-1] or len(times) == 1 else len(times) - 2
    scale = 1 if metrics.get("accuracy_unit") == "percent" else 100
    curves, finals = metrics.get("test") or [], metrics.get("final_test") or []
    curve = curves[index] if index < len(curves) else []
    accuracy = curve[-1] if curve else (finals[index] if index < len(finals) else None)
    return len(times[index]), (None if accuracy is None else accuracy * scale)


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
              "earlier_ends": [*earlier.get("earlier_ends", []), *earlier_end(earlier)]}
    utils.write_json(run_dir / "trial.json", record)  # a start without an end: a lost worker
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


def earlier_end(record):
    """How the try of a trial.json ended, as a list of its line (none for a clean end)."""
    if record and "returncode" not in record:
        return ["its worker or node was lost while it ran"]
    return [record["message"]] if record.get("message") else []


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
            signal.signal(signum, protocol.stop)
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
# How long the trials will take
# ------------------------------------------------------------------------------------------
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


def measured_epoch_s(spec, code):
    """MEASURED_EPOCH_S of a run on dataset code: its variant's entry (the follow-up's
    depths), else its rule's on the dataset (a grid run of the same rule and net); None when
    not measured."""
    key = (spec["path"], spec["rule"], code)
    return MEASURED_EPOCH_S.get((*key, spec["variant"]), MEASURED_EPOCH_S.get(key))


def time_estimate(specs, sweep_dir, args, code_of, settings_of):
    """The line a dry run ends with: the wall time left, from the epochs still to train and
    the time per epoch (the run's own when it has started, else MEASURED_EPOCH_S); code_of,
    settings_of: a spec's dataset code and settings (sweep.py's)."""
    left, unknown = [], []
    for spec in specs:
        epochs = settings_of(spec).train_epochs
        metrics = read_metrics(sweep_dir / "runs" / spec["name"])
        done, _ = progress(metrics)
        times = [t for run in (metrics or {}).get("epoch_time_s", []) for t in run]
        per_epoch = float(np.median(times)) if times else measured_epoch_s(spec, code_of(spec))
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
