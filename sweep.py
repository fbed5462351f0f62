"""Run a grid of main.py / main_pytorch.py runs as Ray Tune trials, and collect the table.

The paper's MNIST table (numpy PEPITA over 3 seeds, the other rules and the conv nets once):

    python sweep.py --paper mnist --seeds 3 --other_seeds 1 --data_dir ../shared/data/mnist

A grid of your own (flags after -- go to every run):

    python sweep.py --script main.py --grid learn_type=ERIN,BP --grid seed=0,1,2 \
        --epochs 20 -- --n_hlayers 1 --eta 0.1 --validation --data_dir ../shared/data/mnist

Each run is one trial (trials.py) running the entry script in its own results folder
(<sweep_dir>/runs/<name>/), so the scripts' checkpoints are the one resume mechanism: the same
command again skips finished runs and resumes the others from their last epoch, and a killed
trial is retried from its last epoch. Without --address, Ray runs embedded on this machine's
cores. `python sweep.py --collect DIR` writes table.md, curves.csv, test_curves.png and
README.md of a sweep folder (report.py). This file: the run specs of a preset (paper.py) or
a grid, their checks, the sweep folder's manifest, which results may go into results/, the
command line; docs/reproducing.md has the commands and what they measured.
"""
import contextlib
import fcntl
import fnmatch
import functools
import io
import itertools
import logging
import re
import sys
import time
from pathlib import Path

import datasets
import paper
import protocol
import report
import trials
import utils
from utils import UsageError

log = logging.getLogger("pepita.sweep")
ROOT = Path(__file__).resolve().parent
SCRIPTS = ("main.py", "main_pytorch.py")
# tracked: written only by sweeps with their preset's settings
PAPER_RESULTS = ROOT / "results" / "paper"
FOLLOWUP_RESULTS = ROOT / "results" / "followup"
PRESET_AUTHORS = {"paper": "paper", "followup": "follow-up"}

# ------------------------------------------------------------------------------------------
# The grid: one run spec (name, script, flags, labels) per trial
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def entry_parser(script):
    import main
    if script == "main.py":
        return main.build_parser()
    import main_pytorch
    return main_pytorch.build_parser()


def settings_of(spec):
    """The settings the run's script reads from its flags (its own parser's Namespace); a
    flag it refuses is a UsageError with the parser's line."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(errors):
            return entry_parser(spec["script"]).parse_args(spec["flags"])
    except SystemExit:
        lines = errors.getvalue().strip().splitlines() or ["not a flag of the script"]
        raise UsageError(f"run {spec['name']}: {lines[-1].split('error: ', 1)[-1]}") \
            from None


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
# Collection: the finished runs of a sweep folder, handed to report.py
# ------------------------------------------------------------------------------------------
def run_results(run_dir):
    """Per run of a finished trial: its curves (test and train, %; only numpy has a train
    curve; empty without --validation), final test accuracy (%), epoch times, final angle,
    and where it came from (command, commit, date, device, data; None where its
    metrics.json, of an older schema, does not say). metrics.json of before the common
    schema held numpy's accuracies as fractions."""
    metrics = trials.read_metrics(run_dir)
    if not metrics or metrics.get("status") != "finished":
        return []
    scale = 1 if metrics.get("accuracy_unit") == "percent" else 100
    alignment = metrics.get("alignment") or []
    trains = metrics.get("train") or []
    dataset = metrics.get("dataset") or {}
    origin = {"command": metrics.get("command"), "commit": metrics.get("commit"),
              "date": metrics.get("date"), "device": metrics.get("device"),
              "dataset": dataset.get("name"), "data_sha256": dataset.get("fingerprint")}
    results = []
    for r, test in enumerate(metrics["test"]):
        results.append({
            "run": r, "test": [a * scale for a in test],
            "train": [a * scale for a in trains[r]] if r < len(trains) else [],
            "final": metrics["final_test"][r] * scale if "final_test" in metrics else test[-1],
            "times": metrics["epoch_time_s"][r],
            "angle": alignment[r][-1]["angle_F"] if r < len(alignment) and alignment[r]
            else None, **origin})
    return results


def flag_value(flags, names, default):
    """The value of the last of names in flags (argparse's rule), or default."""
    values = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag in names]
    return values[-1] if values else default


def code_of(spec):
    """The run's dataset code, as its script resolves it."""
    settings = settings_of(spec)
    if spec["script"] == "main.py":
        import main
        return main.dataset_code(settings)
    return settings.dataset


def group_runs(manifest, sweep_dir):
    groups = {}
    for spec in manifest["runs"]:
        key = (spec["path"], spec["rule"], spec["variant"])
        run_dir = sweep_dir / "runs" / spec["name"]
        record = trials.read_record(run_dir)
        for result in run_results(run_dir):
            groups.setdefault(key, []).append({
                **result, "seed": spec["seed"], "machine": record.get("machine", "?"),
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
    manifest = trials.read_json(path, advice)
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
    copy of a dataset it ran on (datasets.KNOWN_COPIES)."""
    notes = []
    preset = preset_of(manifest)
    if preset and differences:
        notes.append(f"**Not the {PRESET_AUTHORS[preset[0]]} preset's settings**: "
                     + "; ".join(differences) + ".")
    files = {(code_of(spec), settings_of(spec).data_dir) for spec in manifest["runs"]}
    copies = {datasets.known_copy(code, data_dir) for code, data_dir in files if data_dir}
    notes += [datasets.KNOWN_COPIES[digest] for digest in datasets.KNOWN_COPIES
              if digest in copies]
    return notes


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
        help="only redraw the committed collections under results/paper and "
             "results/followup from what they hold (fits from their curves, figures, "
             "runs.csv) and write results/paper/README.md, the paper's table")
    return parser


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
    with protocol.signals_stop():
        return run_main(parser, args, common, own)


def run_main(parser, args, common, own):
    try:
        return sweep(args, common, own)
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        parser.exit(2, f"{parser.prog}: error: cannot write or read{where} "
                       f"({err.strerror or utils.describe(err)}); choose another folder\n")
    except KeyboardInterrupt:
        name, status = protocol.signal_name()
        parser.exit(status, f"{parser.prog}: stopped by {name}, its trials ended; rerun the "
                            "same command to resume (finished runs are kept, the others "
                            "continue from their last epoch)\n")


def sweep(args, common, own):
    if args.combine:
        for results in (PAPER_RESULTS, FOLLOWUP_RESULTS):
            for table in sorted(results.glob("**/table.md")):
                report.redraw_collection(table.parent)
        lines = report.combined_table(PAPER_RESULTS)
        log.info("redrew the collections under %s and %s; wrote %s (%d rules)",
                 *(report.display_path(str(p)) for p in (PAPER_RESULTS, FOLLOWUP_RESULTS,
                                                         PAPER_RESULTS / "README.md")),
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
        print(trials.time_estimate(specs, sweep_dir, args, code_of, settings_of))
        return 0
    for spec in specs:
        trials.read_record(sweep_dir / "runs" / spec["name"])  # damaged: now, not after
    write_manifest(sweep_dir, specs, args, own, common)
    tic = time.time()
    trials.run_sweep(specs, sweep_dir, args)
    failed = trials.summarize(specs, sweep_dir)
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
    for spec in specs:
        settings_of(spec)
        parser = entry_parser(spec["script"])
        dests = {}
        for flag in spec["flags"]:
            action = parser._option_string_actions.get(flag)
            if action and action.dest in dests:
                raise UsageError(f"run {spec['name']}: {flag} is given twice (in --grid, "
                                 "after -- or by --epochs / --data_dir); give it once")
            if action:
                dests[action.dest] = flag


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
    found = set()
    for spec in manifest["runs"]:
        if spec["name"] not in expected:
            found.add(f"{spec['name']} is not a run of the preset")
            continue
        ours, theirs = (compared_settings({**spec, "flags": flags})
                        for flags in (spec["flags"], expected[spec["name"]]))
        found.update(f"--{key} {ours.get(key)} (the preset's: {theirs.get(key)})"
                     for key in {**ours, **theirs} if ours.get(key) != theirs.get(key))
    return sorted(found)


def compared_settings(spec):
    """The run's settings but --data_dir and --device (where the data is and what computes
    do not change the results); with --mirror, main_pytorch.py's mirroring settings as it
    fills them in."""
    settings = {key: value for key, value in vars(settings_of(spec)).items()
                if key not in ("data_dir", "device")}
    if spec["script"] == "main_pytorch.py" and settings["mirror"]:
        import main_pytorch
        settings = {**{name: value for name, value, _ in main_pytorch.MIRROR_SETTINGS},
                    **settings}
    return settings


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
