"""Fully connected networks trained with PEPITA (ERIN), ERINsign, BP, FA, DFA or DRTP (numpy).

The paper's MNIST command (98.01% after 100 epochs; about 6.6 s per epoch on 2 cores):

    python main.py --exp_name Experiment1 --learn_type ERIN --n_runs 1 --train_epochs 100 \
        --sample_passes 2 --n_samples all --eta 0.1 --dropout 0.9 --eta_decay --mnist \
        --validation --batch_size 64 --update_type mom --w_init he_uniform --build auto \
        --struct uniform --start_size 1024 --n_hlayers 1 --act_hidden relu --act_out softmax

Add --data_dir ../shared/data/mnist to read local files instead of downloading.
Results go to results/res_<settings>/ (see README.md, "Outputs").
"""
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import functions as fn
import utils
from utils import DATASETS, DivergenceError, UsageError

log = logging.getLogger("pepita")
DATASET_ALIASES = {"mnist": "mn", "emnist": "emn", "fmnist": "fmn", "cifar10": "cif",
                   "cifar100": "cif100"}
SHORT_ALIASES = {"mnist": "-mn", "emnist": "-emn", "fmnist": "-fmn", "cifar10": "-cif",
                 "cifar100": "-cif100"}
DECAY_EPOCHS = (60, 90)
MIN_ETA = 1e-6


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def build_parser():
    parser = utils.new_parser(__doc__)
    utils.add_common_arguments(
        parser, exp_name="expPEPITA", learn_types=fn.LEARN_TYPES,
        update_types=fn.UPDATE_TYPES, train_epochs=3, batch_size=64, dataset="mn",
        eta_decay_help="eta x 0.1 at epochs 60 and 90 (counted from 0), never below 1e-6")
    add = parser.add_argument
    add("--sample_passes", "-sp", type=utils.positive_int, default=2,
        help="forward passes per sample (2 for ERIN, 1 for the other rules)")
    add("--no_shuffling", "-no_shuffling", action="store_true", help="do not shuffle")
    add("--zeromean", "-zm", action="store_true", help="inputs in [-1, 1] instead of [0, 1]")
    add("--deformation", "-def", action="store_true",
        help="fresh elastic/affine distortion of the training images each epoch")
    add("--no_test_as_val", "-notav", action="store_true",
        help="validate on a 10%% split of the training set instead of the test set")
    add("--continue_training", "-ct", action="store_true",
        help="start from the weights (and F) saved in --continue_training_path")
    add("--continue_training_path", "-ct_path", default=None,
        help="a results folder (its weights_run0.npz) or a weights .npz file")
    for name, code in DATASET_ALIASES.items():
        add(f"--{name}", SHORT_ALIASES[name], dest="alias_" + code, action="store_true",
            help=f"same as --dataset {code}")
    add("--datadebug", "-datadebug", action="store_true",
        help="one sample x = [1, 0, 0, 0], t = [0, 0.5]")
    add("--plots", "-pl", action="store_true",
        help="also save one learning-curve figure per run")
    add("--validation", "-val", action="store_true", help="validate every epoch")
    add("--keep_variants", "-kv", default="un", choices=("ul", "ue", "un"),
        help="kept for the folder name only")
    add("--build", "-build", default="auto", choices=("auto", "custom"),
        help="auto: sizes from --struct, --start_size, --n_hlayers and the dataset; "
             "custom: --architecture and --act_list")
    add("--architecture", "-arch", type=utils.positive_int, nargs="+",
        default=[784, 2000, 1500, 1000, 500, 10], help="layer sizes with --build custom")
    add("--act_list", "-act", nargs="+", default=["tanh_ciresan"] * 4 + ["softmax"],
        help="one activation per layer with --build custom")
    add("--struct", "-struct", default="uniform", choices=("uniform", "pyramidal"),
        help="hidden layers all of --start_size units, or halving at each layer")
    add("--start_size", "-ss", type=utils.positive_int, default=1024,
        help="size of the first hidden layer")
    add("--n_hlayers", "-nh", type=utils.non_negative_int, default=2,
        help="number of hidden layers")
    add("--act_hidden", "-act_h", default="relu", choices=tuple(utils.ACTIVATIONS),
        help="activation of the hidden layers (Lrelu: slope 0.1; tanh_ciresan: "
             "1.7159 tanh(0.6666 a))")
    add("--act_out", "-act_o", default="softmax", choices=tuple(utils.ACTIVATIONS),
        help="activation of the output layer")
    add("--dtype", default="float64", choices=("float64", "float32"),
        help="compute precision (float64 as published)")
    return parser


def dataset_code(args):
    """The one dataset asked for, by --dataset, a published alias or --datadebug."""
    chosen = [code for code in DATASETS if getattr(args, "alias_" + code, False)]
    if args.dataset:
        chosen.append(args.dataset)
    if args.datadebug:
        chosen.append("datadebug")
    if len(set(chosen)) > 1:
        raise UsageError(f"two datasets at once ({', '.join(sorted(set(chosen)))}); "
                         "give only one")
    return chosen[0] if chosen else "mn"


def architecture(args, n_in, n_out):
    if args.build == "custom":
        sizes, acts = list(args.architecture), list(args.act_list)
        if sizes[0] != n_in or sizes[-1] != n_out:
            raise UsageError(f"--architecture {' '.join(map(str, sizes))} does not fit the "
                             f"dataset: it needs {n_in} inputs and {n_out} outputs")
    else:
        hidden = [args.start_size // (2 ** i if args.struct == "pyramidal" else 1)
                  for i in range(args.n_hlayers)]
        if min(hidden, default=1) < 1:
            raise UsageError("--struct pyramidal halves --start_size below 1 unit; use "
                             "fewer --n_hlayers")
        sizes = [n_in] + hidden + [n_out]
        acts = [args.act_hidden] * args.n_hlayers + [args.act_out]
    fn.check_architecture(sizes, acts, args.learn_type)
    return sizes, acts


def check_settings(args):
    if args.learn_type in fn.PEPITA_RULES and args.sample_passes < 2:
        raise UsageError(f"{args.learn_type} needs --sample_passes >= 2 (a second, "
                         f"modulated pass), got {args.sample_passes}")
    if args.check_cos_norm and args.learn_type not in fn.PEPITA_RULES:
        raise UsageError("--check_cos_norm measures the angle with F: use it with ERIN")
    if args.continue_training != bool(args.continue_training_path):
        raise UsageError("--continue_training and --continue_training_path go together")


def folder_name(args, code):
    name = (f"res_{args.exp_name}_{args.learn_type}_{args.update_type}_{args.batch_size}_"
            f"{args.act_hidden}_{args.w_init}_{args.keep_variants}_do{round(args.dropout * 100)}")
    name += "_etad" if args.eta_decay else ""
    name += f"_{code}_rep{args.n_runs}_tr{args.train_epochs}_pass{args.sample_passes}"
    name += "_def" if args.deformation else ""
    name += "" if args.no_test_as_val else "_tav"
    name += "_ct" if args.continue_training else ""
    return name


# ------------------------------------------------------------------------------------------
# Data: inputs scaled to [0, 1] (or [-1, 1]), flattened, one-hot targets
# ------------------------------------------------------------------------------------------
def load_data(args, code, data_rng, dtype):
    """Train, validation and test sets as (x, t) pairs, and the raw train images when
    --deformation distorts them afresh each epoch."""
    if code == "datadebug":
        x = np.array([[1, 0, 0, 0]], dtype)
        t = np.array([[0, 0.5]], dtype)
        return (x, t), (x, t), (x, t), None
    if args.deformation and DATASETS[code]["shape"] != (28, 28, 1):
        raise UsageError("--deformation distorts 28x28 grey images: use it with mn, fmn "
                         "or emn")
    if args.deformation and args.no_test_as_val:
        raise UsageError("--deformation validates on the test set, as published: drop "
                         "--no_test_as_val")
    x_train, y_train, x_test, y_test = utils.load_dataset(code, args.data_dir, "keras")
    classes = DATASETS[code]["classes"]
    (x_train, y_train), (x_test, y_test) = utils.sample_slice(
        data_rng, args.n_samples, (x_train, y_train), (x_test, y_test))
    if args.no_test_as_val:
        train_idx, val_idx = validation_split(len(x_train))
        x_val, y_val = x_train[val_idx], y_train[val_idx]
        x_train, y_train = x_train[train_idx], y_train[train_idx]
    else:
        x_val, y_val = x_test, y_test

    def prepare(images, labels):  # in place: one float copy of the dataset at a time
        x = images.reshape(len(images), -1).astype(dtype)
        x /= 255
        if args.zeromean:
            x *= 2
            x -= 1
        return x, utils.one_hot(labels, classes, dtype)

    raw = x_train[..., 0] if args.deformation else None
    test_set = prepare(x_test, y_test)
    val_set = prepare(x_val, y_val) if args.no_test_as_val else test_set
    return prepare(x_train, y_train), val_set, test_set, raw


def validation_split(n, test_size=0.1, random_state=1):
    """The indices of sklearn's train_test_split(test_size=0.1, random_state=1), as
    published, without depending on sklearn."""
    n_test = int(np.ceil(test_size * n))
    permutation = np.random.RandomState(random_state).permutation(n)
    return permutation[n_test:], permutation[:n_test]


def deformed(raw, rng, zeromean, dtype):
    x = utils.deform_images(raw, rng).reshape(len(raw), -1).astype(dtype)
    return 2 * x - 1 if zeromean else x


# ------------------------------------------------------------------------------------------
# Weights and checkpoints (numpy .npz, loaded with allow_pickle=False)
# ------------------------------------------------------------------------------------------
def model_arrays(model):
    arrays = {f"W{layer}": w for layer, w in enumerate(model.weights)}
    arrays.update({f"B{layer}": b for layer, b in enumerate(model.feedback)})
    if model.F is not None:
        arrays["F"] = model.F
    return arrays


def save_npz(path, arrays):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
            np.savez(f, **arrays)
    utils.atomic_write(path, write)


def load_npz(path):
    """The arrays of an .npz file; OSError and friends when it is unreadable or damaged."""
    with np.load(path, allow_pickle=False) as f:
        return dict(f)


def continue_from(args, model):
    """Replace model's weights (and F) with those saved by an earlier run."""
    path = Path(args.continue_training_path)
    if path.is_dir():
        path = path / "weights_run0.npz"
    if not path.is_file():
        raise UsageError(f"--continue_training_path: {path} does not exist; give a results "
                         "folder holding weights_run0.npz, or a weights .npz file")
    try:
        saved = load_npz(path)
    except utils.BROKEN_FILE_ERRORS as err:
        raise UsageError(f"--continue_training_path: {path} is damaged or not a weights file "
                         f"({utils.describe(err)}); give another") from None
    for layer, w in enumerate(model.weights):
        stored = saved.get(f"W{layer}")
        if stored is None or stored.shape != w.shape:
            raise UsageError(f"--continue_training_path: {path} holds no weights W{layer} of "
                             f"shape {w.shape}; it comes from another architecture")
        w[...] = stored
    if model.F is not None and saved.get("F") is not None and saved["F"].shape == model.F.shape:
        model.F[...] = saved["F"]


def checkpoint_state(args, run, epoch, history, **extra):
    return np.array(json.dumps({"run": run, "epoch": epoch, "settings": vars(args),
                                "history": history, **extra}))


def save_start_checkpoint(folder, args, run, history):
    """Run `run` is next and has not started (epoch -1): the settings and the curves so
    far are all a resume needs, since each run starts from its own seeded state."""
    save_npz(Path(folder) / "checkpoint.npz", {"state": checkpoint_state(args, run, -1,
                                                                          history)})


def save_checkpoint(folder, args, run, epoch, model, optimizer, carry, rngs, history):
    """Everything an exact resume in the middle of run `run` needs, after `epoch`."""
    arrays = model_arrays(model)
    arrays.update({f"opt{k}_{layer}": b
                   for k, buffers in enumerate(optimizer.saved_buffers())
                   for layer, b in enumerate(buffers)})
    if carry.factors is not None:
        arrays.update({f"carry{k}_{layer}": f for layer, pair in enumerate(carry.factors)
                       for k, f in enumerate(pair)})
    arrays["state"] = checkpoint_state(
        args, run, epoch, history, opt_steps=optimizer.step_count,
        rngs={name: utils.rng_state(rng) for name, rng in rngs.items()})
    save_npz(Path(folder) / "checkpoint.npz", arrays)


def restore_checkpoint(folder, model, optimizer, carry, rngs):
    """Load the interrupted run's state in place; returns its last complete epoch."""
    path = Path(folder) / "checkpoint.npz"
    try:
        saved = load_npz(path)
        state = json.loads(str(saved["state"]))
        for name, array in model_arrays(model).items():
            array[...] = saved[name]
        for k, buffers in enumerate(optimizer.buffers):
            for layer, b in enumerate(buffers):
                b[...] = saved[f"opt{k}_{layer}"]
        optimizer.step_count = state["opt_steps"]
        carry.factors = ([(saved[f"carry0_{layer}"], saved[f"carry1_{layer}"])
                          for layer in range(len(model.weights))]
                         if "carry0_0" in saved else None)
        for name, rng in rngs.items():
            utils.set_rng_state(rng, state["rngs"][name])
    except (*utils.BROKEN_FILE_ERRORS, TypeError) as err:
        raise utils.checkpoint_error(path, err) from None
    return state["epoch"]


# ------------------------------------------------------------------------------------------
# Result files: the published text files, metrics.json and learning-curve plots
# ------------------------------------------------------------------------------------------
def write_results(folder, args, history, seed, total_time, status="running"):
    """The published text files, metrics.json (status: running, finished or diverged) and
    the learning-curve plots."""
    folder = Path(folder)
    final = status == "finished"
    done = len(history["final_test"])
    for r in range(done):
        utils.write_table(folder / f"train_acc_run{r}.txt", [[a] for a in history["train"][r]])
        test_curve = history["test"][r] if args.validation else [history["final_test"][r]]
        utils.write_table(folder / f"test_acc_run{r}.txt", [[a] for a in test_curve])
    if done:
        suffix = "" if final else f"_rep{done - 1}"
        for key in ("train", "val", "test"):
            rows = [row for row in history[key][:done] if row]
            utils.write_table(folder / f"{key}_acc_tot{suffix}.txt", rows)
    if args.check_cos_norm:
        utils.write_table(folder / "angles.txt", history["angles"])
        utils.write_table(folder / "Anorm.txt", history["norms"])
    finals = {key: history[f"final_{key}"] for key in ("train", "val", "test")}
    summary = {key: (float(np.mean(v)), float(np.std(v))) for key, v in finals.items() if v}
    lines = [f"{k}: {v}" for k, v in sorted(vars(args).items())]
    lines += [f"seed used: {seed}"]
    lines += [f"final {k} accuracy: mean {m:.4f} std {s:.4f}" for k, (m, s) in summary.items()]
    lines += [f"total time: {total_time:.1f} s"]
    utils.write_text(folder / f"res_summary_{args.exp_name}.txt", "\n".join(lines) + "\n")
    utils.write_json(folder / "metrics.json", {
        "settings": vars(args), "seed": seed, "status": status,
        "runs_finished": done, "summary": summary, "total_time_s": total_time, **history})
    labels = {"train": "training accuracy", "val": "validation accuracy"}
    curves = {label: history[k][:max(done, 1)] for k, label in labels.items()
              if history[k] and history[k][0]}
    utils.plot_curves(folder / "learning_curve.png", curves, f"{args.learn_type}, "
                      f"{args.exp_name}")
    if args.plots:
        for r in range(done):
            utils.plot_curves(folder / f"learning_curve_run{r}.png",
                              {label: [history[k][r]] for k, label in labels.items()
                               if history[k][r]}, f"{args.learn_type}, run {r}")


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def epoch_eta(args, epoch):
    decays = sum(epoch >= e for e in DECAY_EPOCHS) if args.eta_decay else 0
    return max(args.eta * 0.1 ** decays, MIN_ETA) if decays else args.eta


def new_history():
    keys = ("train", "val", "test", "angles", "norms", "epoch_time_s")
    return {**{k: [] for k in keys}, "final_train": [], "final_val": [], "final_test": []}


def train(args):
    code = dataset_code(args)
    check_settings(args)
    dtype = np.dtype(args.dtype).type
    folder = utils.results_folder(args, folder_name(args, code))
    resumed = read_resume_state(folder) if args.resume else None
    if resumed:  # the interrupted run's seed, so that the data slice matches it too
        args.seed = utils.check_resume_settings(resumed["settings"], args)
    seed, data_seq, run_seqs = utils.seed_sequences(args.seed, args.n_runs)
    args.seed = seed  # recorded with the settings, so that a run can be repeated exactly
    train_set, val_set, test_set, raw_train = load_data(
        args, code, np.random.default_rng(data_seq), dtype)
    sizes, acts = architecture(args, train_set[0].shape[1], train_set[1].shape[1])
    log.debug("training set %s, validation set %s, test set %s", train_set[0].shape,
              val_set[0].shape, test_set[0].shape)
    log.debug("weight updates by %s", "the gemm of numpy's OpenBLAS" if fn.BLAS
              else "numpy expressions (this numpy does not bundle scipy-openblas)")
    if args.continue_training:  # check the saved weights before creating the folder
        continue_from(args, fn.init_model(np.random.default_rng(0), args.learn_type, sizes,
                                          acts, args.w_init, args.dropout, dtype))
    utils.prepare_folder(folder, args.resume, args.overwrite)
    log.info("%s on %s, layers %s, results in %s", args.learn_type, code, sizes, folder)

    history = resumed["history"] if resumed else {**new_history(), "seed": seed}
    if not resumed:
        save_start_checkpoint(folder, args, 0, history)
    start_time = time.time() - sum(map(sum, history["epoch_time_s"]))
    try:
        for run in range(len(history["final_test"]), args.n_runs):
            train_run(args, folder, run, resumed, history, sizes, acts, run_seqs[run],
                      (train_set, val_set, test_set, raw_train), dtype, start_time)
    except DivergenceError as err:  # recorded, so that --resume can say what happened
        history["divergence"] = str(err)
        write_results(folder, args, history, seed, time.time() - start_time, "diverged")
        raise
    write_results(folder, args, history, seed, time.time() - start_time, "finished")
    log.info("test accuracy %.4f +- %.4f over %d run(s), %.1f s; results in %s",
             np.mean(history["final_test"]), np.std(history["final_test"]), args.n_runs,
             time.time() - start_time, folder)
    return history


def train_run(args, folder, run, resumed, history, sizes, acts, run_seq, data, dtype,
              start_time):
    """Run `run` from its own seeded state, or from the checkpoint when it was under way."""
    train_set, val_set, test_set, raw_train = data
    init_rng, mask_rng, shuffle_rng, deform_rng = (
        np.random.default_rng(s) for s in run_seq.spawn(4))
    rngs = {"mask": mask_rng, "shuffle": shuffle_rng, "deform": deform_rng}
    model = fn.init_model(init_rng, args.learn_type, sizes, acts, args.w_init, args.dropout,
                          dtype)
    if args.continue_training:
        continue_from(args, model)
    optimizer = fn.Optimizer(args.update_type, model.weights)
    carry = fn.Carry()
    first_epoch = 0
    if resumed and resumed["run"] == run and resumed["epoch"] >= 0:  # under way: continue
        first_epoch = restore_checkpoint(folder, model, optimizer, carry, rngs) + 1
    else:
        for key in ("train", "val", "test", "angles", "norms", "epoch_time_s"):
            history[key].append([])
        if args.check_cos_norm:
            record_angle(history, model)
    run_epochs(args, folder, run, first_epoch, model, optimizer, carry, rngs, history,
               train_set, val_set, test_set, raw_train, dtype, start_time)
    history["final_train"].append(history["train"][run][-1])
    final_val, final_test = evaluate(model, val_set, test_set)
    history["final_val"].append(final_val)
    history["final_test"].append(final_test)
    save_npz(folder / f"weights_run{run}.npz", model_arrays(model))
    log.info("run %d: final test accuracy %.4f", run, history["final_test"][-1])
    write_results(folder, args, history, history["seed"], time.time() - start_time)
    save_start_checkpoint(folder, args, run + 1, history)


def read_resume_state(folder):
    """The state saved in folder's checkpoint, or None when the run never saved one."""
    path = utils.resume_checkpoint(folder, "checkpoint.npz")
    if path is None:
        return None
    try:
        state = json.loads(str(load_npz(path)["state"]))
        missing = [k for k in ("run", "epoch", "settings", "history") if k not in state]
        if missing:
            raise KeyError(f"no {', '.join(missing)} in its state")
    except (*utils.BROKEN_FILE_ERRORS, TypeError) as err:
        raise utils.checkpoint_error(path, err) from None
    return state


def evaluate(model, val_set, test_set):
    """Validation and test accuracy; computed once when the test set is the validation set."""
    val_acc = fn.accuracy(model, val_set[0], val_set[1].argmax(1))
    if val_set is test_set:
        return val_acc, val_acc
    return val_acc, fn.accuracy(model, test_set[0], test_set[1].argmax(1))


def record_angle(history, model):
    angle, norm = fn.angle_with_F(model)
    history["angles"][-1].append(angle)
    history["norms"][-1].append(norm)


def run_epochs(args, folder, run, first_epoch, model, optimizer, carry, rngs, history,
               train_set, val_set, test_set, raw_train, dtype, start_time):
    x_train, t_train = train_set
    for epoch in range(first_epoch, args.train_epochs):
        tic = time.perf_counter()
        eta = epoch_eta(args, epoch)
        log.debug("run %d epoch %d: eta %g", run, epoch + 1, eta)
        if raw_train is not None:
            x_train = deformed(raw_train, rngs["deform"], args.zeromean, dtype)
        order = (np.arange(len(x_train)) if args.no_shuffling
                 else rngs["shuffle"].permutation(len(x_train)))
        with tqdm(total=len(order), desc=f"run {run} epoch {epoch + 1}", leave=False,
                  disable=None) as progress:
            try:  # overflow is reported once, as divergence, not as numpy warnings
                with np.errstate(over="ignore", invalid="ignore"):
                    train_acc = fn.train_epoch(model, optimizer, args.learn_type, x_train,
                                               t_train, order, args.batch_size,
                                               args.sample_passes, eta, rngs["mask"], carry,
                                               progress)
            except DivergenceError as err:
                raise DivergenceError(f"run {run} epoch {epoch + 1}, {err}") from None
        utils.check_finite(np.concatenate([w.ravel() for w in model.weights]),
                           f"the end of run {run} epoch {epoch + 1}", eta)
        history["train"][run].append(train_acc)
        message = f"run {run} epoch {epoch + 1}: train {train_acc:.4f}"
        if args.validation:
            val_acc, test_acc = evaluate(model, val_set, test_set)
            history["val"][run].append(val_acc)
            history["test"][run].append(test_acc)
            message += f", validation {val_acc:.4f}, test {test_acc:.4f}"
        if args.check_cos_norm:
            record_angle(history, model)
        history["epoch_time_s"][run].append(time.perf_counter() - tic)
        log.info("%s (%.1f s)", message, history["epoch_time_s"][run][-1])
        save_checkpoint(folder, args, run, epoch, model, optimizer, carry, rngs, history)
        write_results(folder, args, history, history["seed"], time.time() - start_time)


def main(argv=None):
    return utils.run_cli(build_parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
