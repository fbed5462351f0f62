"""The run protocol that main.py and main_pytorch.py share: the flags of a run, its results
folder and lock, the settings and data check of --resume, seeds, start and epoch
checkpoints, divergence, Ctrl-C and SIGTERM, and the results (metrics.json, one schema).

An entry script keeps only what is its own: its flags, data, model and epoch, and how its
checkpoints and published text files are written. Its train(args) reads top to bottom:

    run = protocol.Run(args, folder, engine)      # --resume: the saved state, checked
    seed, data_seq, run_seqs = run.seeds()
    ... load the data (run.check_data), build and check the model ...
    run.open(history)                              # the folder, locked, first checkpoint
    run.train_runs(lambda r, under_way: ...)       # each run; run.epoch_done(...) each epoch

Exit status: 0 done, 2 bad input (one line; nothing created, nothing earlier changed),
3 divergence, 128 + the signal for Ctrl-C (130) and SIGTERM (143), with one line each.
"""
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import datasets
import utils
from datasets import DATA_DIR_ENV, DATASETS
from utils import DivergenceError, UsageError

log = logging.getLogger("pepita")
ROOT = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------
# Signals: Ctrl-C and SIGTERM alike, one line and the signal's exit status
# ------------------------------------------------------------------------------------------
SIGNALLED = []  # the signals received, for the message and the exit status


def stop(signum, frame):
    """SIGTERM and Ctrl-C alike: a KeyboardInterrupt (which Ray and Tune pass on; an
    exception of our own would surface there as a SystemError from inside Ray's C code)."""
    SIGNALLED.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_stop():
    """Within: SIGINT and SIGTERM raise KeyboardInterrupt (stop); after: the handlers of
    before, and no signal remembered."""
    handlers = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    earlier_hook = sys.unraisablehook

    def quiet_lost_stop(unraisable):
        # a signal's KeyboardInterrupt raised where Python only reports exceptions (a
        # weakref's callback): no traceback; Run.epoch_done stops at the epoch's end
        if not (SIGNALLED and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            earlier_hook(unraisable)

    sys.unraisablehook = quiet_lost_stop
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        sys.unraisablehook = earlier_hook
        SIGNALLED.clear()


def signal_name():
    """The name of the last signal received (SIGINT for a plain KeyboardInterrupt), and its
    exit status."""
    signum = SIGNALLED[-1] if SIGNALLED else signal.SIGINT
    return signal.Signals(signum).name, 128 + signum


def exit_quietly_on_signals(prog):
    """While the entry script still imports (torch takes seconds): a signal ends it at once
    with one line; run_cli replaces this with its own handlers."""
    def leave(signum, frame):
        sys.stderr.write(f"{prog}: stopped by {signal.Signals(signum).name} while starting; "
                         "nothing was written\n")
        sys.exit(128 + signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, leave)


# ------------------------------------------------------------------------------------------
# The command line: the flags of a run, and how it ends
# ------------------------------------------------------------------------------------------
def add_common_arguments(parser, *, exp_name, learn_types, update_types, train_epochs,
                         batch_size, dataset, eta_decay_help):
    """Flags that main.py and main_pytorch.py share (published names and short forms)."""
    add = parser.add_argument
    add("--exp_name", "-en", type=utils.folder_word, default=exp_name,
        help="experiment name (in the folder name)")
    add("--learn_type", "-lt", default="ERIN", choices=learn_types, type=utils.rule_name,
        help="learning rule (ERIN = PEPITA; PEPITA is accepted as ERIN)")
    add("--n_runs", "-r", type=utils.positive_int, default=1,
        help="repetitions of the whole run")
    add("--train_epochs", "-trep", type=utils.positive_int, default=train_epochs,
        help="epochs")
    add("--eta", "-eta", type=utils.non_negative_float, default=0.01, help="learning rate")
    add("--n_samples", "-ns", type=utils.n_samples_value, default="all",
        help="'all', or N: a random contiguous slice of N training samples, also used as "
             "the test set (an overfitting check, and a quick run)")
    add("--dropout", "-do", type=utils.keep_probability, default=0.9,
        help="dropout KEEP probability (0.9 drops 10%%)")
    add("--check_cos_norm", "-check_cos_norm", action="store_true",
        help="track the angle between F and the weights' product, and the norm of W_1")
    add("--eta_decay", "-eta_d", action="store_true", help=eta_decay_help)
    add("--seed", "-seed", type=utils.non_negative_int, default=None,
        help="fixes weights, F/B, dropout masks and shuffling (random when omitted; "
             "the seed used is saved in metrics.json)")
    add("--update_type", "-ut", default="mom", choices=update_types, help="optimiser")
    add("--batch_size", "-bs", type=utils.positive_int, default=batch_size,
        help="mini-batch size")
    add("--w_init", "-win", default="he_uniform", choices=utils.W_INITS, help="weight init")
    add("--dataset", "-ds", default=None, choices=tuple(DATASETS),
        help=f"dataset (default {dataset})")
    add("--data_dir", default=None,
        help=f"folder with the dataset files (no download); default ${DATA_DIR_ENV}")
    add("--results_dir", default="results", help="where results folders are written")
    add("--nested_folder", "-nf", default="ignore",
        help="parent folder of the results folder inside --results_dir ('ignore' = none)")
    add("--resume", action="store_true",
        help="continue an interrupted run from its last complete epoch")
    add("--overwrite", action="store_true", help="replace an existing results folder")
    add("--VERBOSE", "-V", action="store_true", help="more output")


def run_cli(parser, train, argv=None):
    """Parse the flags and train. Bad input, unwritable files and lack of memory exit with
    status 2, divergence with 3, Ctrl-C and SIGTERM with 128 + the signal, each with one
    line (as argparse does for bad flags)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with signals_stop():
        return _run_cli(parser, train, argv)


def _run_cli(parser, train, argv):
    locks_before, runs_before = len(_FOLDER_LOCKS), len(OPEN_RUNS)
    try:
        args = parser.parse_args(argv)
        if args.resume and args.overwrite:
            parser.error("--resume and --overwrite exclude each other")
        check_utf8(args)
        setup_logging(args.VERBOSE)
        keep_freed_memory()
        args.command = argv
        train(args)
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except DivergenceError as err:
        parser.exit(3, f"{parser.prog}: error: {err}; the last good epoch's results and "
                       "checkpoint are kept\n")
    except OSError as err:  # unwritable folder, full disk, lost mount...
        where = f" {err.filename}" if err.filename else ""
        parser.exit(2, f"{parser.prog}: error: cannot write or read{where} "
                       f"({err.strerror or utils.describe(err)}); fix that, then "
                       f"{rerun_advice()}\n")
    except MemoryError:
        parser.exit(2, f"{parser.prog}: error: out of memory; use --n_samples, a smaller "
                       "network or --dtype float32 (numpy), under another --exp_name or "
                       "with --overwrite\n")
    except KeyboardInterrupt:
        name, status = signal_name()
        parser.exit(status, f"{parser.prog}: interrupted by {name}; {rerun_advice()}\n")
    finally:
        release_folder_locks(locks_before)
        del OPEN_RUNS[runs_before:]
    return 0


def check_utf8(args):
    """Names and paths that are not valid UTF-8 (bytes the shell passed through) cannot be
    written into the results' text files: refused before any folder is made."""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not utils.is_utf8(text):
                raise UsageError(f"--{name} {text.encode('utf-8', 'surrogateescape')!r} is "
                                 "not valid UTF-8; give a name or path in UTF-8")


def rerun_advice():
    """--resume where the run saved a checkpoint to continue from, else the plain rerun."""
    if OPEN_RUNS and OPEN_RUNS[-1].checkpoint.is_file():
        return "rerun the same command with --resume to continue from the last epoch"
    return "rerun the same command (nothing was trained yet)"


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of returning it to the system: the
    training loops allocate the same MB-sized arrays every batch, and each fresh mapping
    costs a page fault per 4 KiB (this almost halves a conv MNIST epoch on our machines).
    Does nothing where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 2**30)


def setup_logging(verbose):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


# ------------------------------------------------------------------------------------------
# Checks before anything is created
# ------------------------------------------------------------------------------------------
def check_batch_size(batch_size, n_train):
    if batch_size > n_train:
        raise UsageError(f"--batch_size {batch_size} is larger than the {n_train} training "
                         f"samples: no batch would be full; use at most {n_train}")


def check_memory(sizes, itemsize):
    """Refuse a fully connected network (layer sizes) whose weights alone exceed this
    machine's memory."""
    n_values = sum(a * b for a, b in zip(sizes, sizes[1:]))
    needed = n_values * itemsize
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if needed > total:
        raise UsageError(f"the network {sizes} holds {n_values:.3g} weights "
                         f"({needed / 2**30:.3g} GiB), more than this machine's "
                         f"{total / 2**30:.3g} GiB of memory; use smaller layers")


def seed_sequences(seed, n_runs):
    """The seed used (drawn when None), a SeedSequence for the data (sample slices) and one
    independent SeedSequence per run (weights, F/B, masks, shuffling, deformation)."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    data_seq, *run_seqs = np.random.SeedSequence(seed).spawn(n_runs + 1)
    return seed, data_seq, run_seqs


def rng_state(rng):
    return json.dumps(rng.bit_generator.state)


def set_rng_state(rng, state):
    rng.bit_generator.state = json.loads(state)


def dataset_record(code, data_dir, arrays):
    """What metrics.json and the checkpoints say of the data: its code and name, where it
    was read and the fingerprint of its arrays (as loaded, before any slice)."""
    return {"code": code, "name": DATASETS.get(code, {}).get("name", code),
            "source": datasets.data_source(data_dir), "fingerprint": datasets.fingerprint(arrays)}


# ------------------------------------------------------------------------------------------
# Results folders and their locks
# ------------------------------------------------------------------------------------------
def results_folder(args, name):
    root = Path(args.results_dir)
    if args.nested_folder != "ignore":
        root = root / args.nested_folder
    return root / name


_FOLDER_LOCKS = []  # held while a run trains: a second run in its folder is refused


def release_folder_locks(keep=0):
    """Release the locks taken after the first `keep` (those of the run that ends)."""
    while len(_FOLDER_LOCKS) > keep:
        _FOLDER_LOCKS.pop().close()


def lock_folder(folder):
    """Take an exclusive lock on folder/.lock, or refuse when another running process
    holds it."""
    lock = open(folder / ".lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"{folder} is in use by another running process; wait for it to "
                         "end, or choose another --exp_name") from None
    _FOLDER_LOCKS.append(lock)


def check_parents(folder):
    for parent in [folder.parent, *folder.parent.parents]:
        if parent.is_symlink() and not parent.exists():
            raise UsageError(f"{parent} is a link to {os.readlink(parent)}, which does not "
                             "exist; create that folder, or choose another --results_dir")
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{parent} is a file, not a folder; choose another "
                             "--results_dir or --nested_folder")


def prepare_folder(folder, resume, overwrite):
    """Create (or reuse, with resume) and lock the run folder; never mix with or silently
    replace an existing one. Returns whether it was created now. Unwritable places raise
    OSError (one line, from run_cli)."""
    folder = Path(folder)
    check_parents(folder)
    if folder.is_dir() and (resume or overwrite):
        lock_folder(folder)
        if overwrite:
            for path in folder.iterdir():
                if path.name != ".lock":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        for leftover in folder.glob(".*.tmp"):  # a write cut short by the interruption
            leftover.unlink()
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()  # atomic: of two runs started at once, one creates it
    except FileExistsError:
        raise UsageError(f"{folder} already exists; continue it with --resume, choose "
                         "another --exp_name, or replace it with --overwrite") from None
    lock_folder(folder)
    return True


# ------------------------------------------------------------------------------------------
# --resume: what may change, and what was saved
# ------------------------------------------------------------------------------------------
RESUME_FREE_SETTINGS = {"resume", "overwrite", "VERBOSE", "data_dir", "results_dir", "seed",
                        "device", "command"}


def check_resume_settings(saved, args):
    """--resume continues with the interrupted run's settings: any other value is an
    error (the data is checked by its fingerprint, not its folder). Returns the seed the
    run used."""
    changed = [f"--{k} {getattr(args, k)} (was {v})" for k, v in saved.items()
               if k not in RESUME_FREE_SETTINGS and getattr(args, k, v) != v]
    if args.seed is not None and args.seed != saved["seed"]:
        changed.append(f"--seed {args.seed} (was {saved['seed']})")
    if changed:
        raise UsageError("--resume with other settings than the interrupted run: "
                         + ", ".join(changed) + "; resume with the same flags")
    return saved["seed"]


def read_metrics(folder):
    """A results folder's metrics.json, or None (not written yet, being replaced, damaged)."""
    try:
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def checkpoint_error(path, err):
    return UsageError(f"{path} is damaged ({utils.describe(err)}), so the run cannot be "
                      "resumed; start it again with --overwrite, or under another --exp_name")


# ------------------------------------------------------------------------------------------
# The run: a results folder from its first checkpoint to its results
# ------------------------------------------------------------------------------------------
OPEN_RUNS = []  # the run that trains now: run_cli's advice depends on its checkpoint


@dataclass(frozen=True)
class Engine:
    """What an entry script gives the run protocol: its file name, its checkpoint's file
    name, and four functions:
    save_checkpoint(path, contents) and load_checkpoint(path) -> contents, a dict with
    "run", "epoch", "settings", "history" (and "data", "payload" where saved);
    write_files(folder, args, history, status, elapsed_s): the published text files and
    plots; metrics(history, runs_finished): its curves for metrics.json, accuracies in
    percent, with "final_test" (and "final_train", "final_val" where it has them) per
    finished run (METRICS_KEYS: the keys it may give)."""
    script: str
    checkpoint: str
    save_checkpoint: Callable[[Path, dict], None]
    load_checkpoint: Callable[[Path], dict]
    write_files: Callable[..., None]
    metrics: Callable[[dict, int], dict]


class Run:
    """One results folder, trained by an Engine."""

    def __init__(self, args, folder, engine):
        self.args, self.folder, self.engine = args, Path(folder), engine
        self.checkpoint = self.folder / engine.checkpoint
        self.state = None  # the saved state that --resume continues
        self.data = None
        self.device = "cpu"  # where the arithmetic runs (metrics.json); the script sets it
        self.finished = False
        if args.resume:
            self.read_saved()

    # --- before anything is written -------------------------------------------------------
    def read_saved(self):
        """The state that --resume continues, checked; a finished run is left as it is."""
        if not self.folder.is_dir():
            raise UsageError(f"--resume: {self.folder} does not exist (were the flags the "
                             "same as the interrupted run's?); start the run without --resume")
        metrics = read_metrics(self.folder) or {}
        if metrics.get("status") == "diverged":
            raise UsageError(f"{self.folder} stopped because {metrics.get('divergence')}: "
                             "resuming would diverge again; its files are kept; start again "
                             "with a lower --eta under another --exp_name (or --overwrite)")
        if self.checkpoint.is_file():
            try:
                self.state = self.engine.load_checkpoint(self.checkpoint)
                missing = [k for k in ("run", "epoch", "settings", "history")
                           if k not in self.state]
                if missing:
                    raise KeyError(f"no {', '.join(missing)} in its state")
            except (*utils.BROKEN_FILE_ERRORS, RuntimeError, AttributeError,
                    TypeError) as err:
                raise checkpoint_error(self.checkpoint, err) from None
            self.args.seed = check_resume_settings(self.state["settings"], self.args)
        elif metrics.get("settings"):  # the checkpoint was lost: the run's seed is here
            self.args.seed = check_resume_settings(metrics["settings"], self.args)
            if metrics.get("runs_finished") and metrics.get("status") != "finished":
                raise UsageError(
                    f"{self.checkpoint} is missing, and {metrics['runs_finished']} run(s) "
                    f"of {self.folder} had finished: their results are kept; restore the "
                    "checkpoint to resume, or start again with --overwrite")
            elif metrics.get("status") != "finished":
                log.info("%s holds no checkpoint: starting again with the run's seed %s",
                         self.folder, self.args.seed)
        else:
            log.info("%s holds no checkpoint (no epoch had finished): starting from the "
                     "beginning", self.folder)
        self.finished = metrics.get("status") == "finished"
        if self.finished:
            log.info("%s has finished all its %d run(s): nothing to train, its results are "
                     "kept", self.folder, self.args.n_runs)

    def seeds(self):
        """(seed, data SeedSequence, per-run SeedSequences); the seed is recorded with the
        settings, so that a run can be repeated exactly."""
        seed, data_seq, run_seqs = seed_sequences(self.args.seed, self.args.n_runs)
        self.args.seed = seed
        return seed, data_seq, run_seqs

    def check_data(self, record):
        """The data's record (dataset_record); a resume on other data is refused."""
        saved = (self.state or {}).get("data")
        if saved and saved["fingerprint"] != record["fingerprint"]:
            raise UsageError(f"--resume with other data than the interrupted run: "
                             f"{record['name']} from {record['source']} is not the data it "
                             f"trained on (from {saved['source']}); resume with the same "
                             f"dataset files (--data_dir or ${DATA_DIR_ENV})")
        self.data = record

    # --- the folder, the runs, the results -------------------------------------------------
    def open(self, history):
        """Create (or reuse) and lock the folder; a fresh run saves its first checkpoint
        (run 0 next, epoch -1: each run starts from its own seeded state, so the settings
        and the curves so far are all a resume needs)."""
        created = prepare_folder(self.folder, self.args.resume, self.args.overwrite)
        OPEN_RUNS.append(self)
        self.history = history
        self.runs_finished = self.state["run"] if self.state else 0
        self.start_time = time.time() - sum(map(sum, history.get("epoch_time_s", [])))
        if self.state is None:
            try:
                self.save(0, -1)
            except OSError:
                if created:  # nothing of value in it: the plain rerun starts afresh
                    shutil.rmtree(self.folder, ignore_errors=True)
                raise
        log.info("results in %s", self.folder)

    def save(self, run, epoch, payload=None):
        contents = {"run": run, "epoch": epoch, "settings": vars(self.args),
                    "history": self.history, "data": self.data}
        if payload is not None:
            contents["payload"] = payload
        self.engine.save_checkpoint(self.checkpoint, contents)

    def under_way(self, run):
        """The saved state of run `run` when it was interrupted after an epoch, else None."""
        state = self.state
        return state if state and state["run"] == run and state["epoch"] >= 0 else None

    def train_runs(self, train_run):
        """train_run(run, under_way) for every run not finished yet; the results at the
        end, or with the divergence recorded (so that --resume can say what happened)."""
        try:
            for run in range(self.runs_finished, self.args.n_runs):
                train_run(run, self.under_way(run))
        except DivergenceError as err:
            self.history["divergence"] = str(err)
            self.write_results("diverged")
            raise
        self.write_results("finished")

    def epoch_done(self, run, epoch, payload):
        """After each epoch: the checkpoint (everything an exact resume needs), then the
        results so far; then the stop of a signal whose KeyboardInterrupt was lost (raised
        inside a callback that Python ignores exceptions of, such as a weakref's)."""
        self.save(run, epoch, payload)
        self.write_results()
        if SIGNALLED:
            raise KeyboardInterrupt

    def run_done(self, run):
        """After run `run`: its results, and the checkpoint that starts the next one."""
        self.runs_finished = run + 1
        self.write_results()
        self.save(run + 1, -1)

    def write_results(self, status="running"):
        """The engine's published files and plots, and metrics.json (status: running,
        finished or diverged)."""
        elapsed = time.time() - self.start_time
        self.engine.write_files(self.folder, self.args, self.history, status, elapsed)
        # one schema for both scripts: a key that the script does not measure is null
        fields = {**dict.fromkeys(METRICS_KEYS), **self.engine.metrics(self.history,
                                                                         self.runs_finished)}
        summary = {}
        for key in ("train", "val", "test"):
            values = fields.get(f"final_{key}")
            summary[f"{key}_mean"] = float(np.mean(values)) if values else None
            summary[f"{key}_std"] = float(np.std(values)) if values else None
        settings = {k: v for k, v in vars(self.args).items() if k != "command"}
        divergence = self.history.get("divergence")
        utils.write_json(self.folder / "metrics.json", {
            "script": self.engine.script,
            "command": shlex.join(["python", self.engine.script,
                                   *getattr(self.args, "command", [])]),
            "commit": git_commit(), "date": utc_now(), "host": platform.node(),
            "device": self.device, "versions": versions(), "dataset": self.data,
            "settings": settings, "seed": self.args.seed, "status": status,
            "runs_finished": self.runs_finished, "accuracy_unit": "percent",
            "summary": summary, "total_time_s": elapsed,
            **({"divergence": divergence} if divergence else {}), **fields})


METRICS_KEYS = ("loss", "train", "val", "test", "final_train", "final_val", "final_test",
                "angles", "norms", "alignment", "epoch_time_s")


def git_commit():
    """The commit of the code that runs: in a copy made by `git archive` (a sweep's code,
    README), the commit that git wrote into .git_archival.txt (first: such a copy may lie
    inside another repository's folder); else the checkout's (with "-dirty" for uncommitted
    changes); else None."""
    if not hasattr(git_commit, "value"):
        git_commit.value = archived_commit() or checkout_commit()
    return git_commit.value


def checkout_commit():
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def archived_commit():
    """The node line of .git_archival.txt once `git archive` has filled it in (export-subst
    in .gitattributes); in the repository itself it still holds the placeholder."""
    path = ROOT / ".git_archival.txt"
    text = path.read_text() if path.is_file() else ""
    node = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("node:")), "")
    return node if len(node) == 40 and all(c in "0123456789abcdef" for c in node) else None


def utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def versions():
    torch = sys.modules.get("torch")
    return {"python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__ if torch else None}
