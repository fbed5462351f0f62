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

import datasets
import functions as fn
import protocol
import utils
from datasets import DATASETS
from utils import DivergenceError, UsageError

log = logging.getLogger("pepita")
MIN_ETA = 1e-6


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def build_parser():
    parser = utils.new_parser(__doc__)
    protocol.add_common_arguments(
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
    for code, spec in DATASETS.items():  # the published --mnist, -mn, ...
        add(f"--{spec['alias']}", f"-{code}", dest="alias_" + code, action="store_true",
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
    add("--act_hidden", "-act_h", default="relu", choices=tuple(fn.ACTIVATIONS),
        help="activation of the hidden layers (Lrelu: slope 0.1; tanh_ciresan: "
             "1.7159 tanh(0.6666 a))")
    add("--act_out", "-act_o", default="softmax", choices=tuple(fn.ACTIVATIONS),
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


def check_settings(args, code):
    if args.learn_type in fn.PEPITA_RULES and args.sample_passes < 2:
        raise UsageError(f"{args.learn_type} needs --sample_passes >= 2 (a second, "
                         f"modulated pass), got {args.sample_passes}")
    if args.check_cos_norm and args.learn_type not in fn.PEPITA_RULES:
        raise UsageError("--check_cos_norm measures the angle with F: use it with ERIN")
    if args.continue_training != bool(args.continue_training_path):
        raise UsageError("--continue_training and --continue_training_path go together")
    if args.deformation and DATASETS.get(code, {}).get("shape") != (28, 28, 1):
        raise UsageError("--deformation distorts 28x28 grey images: use it with mn, fmn "
                         "or emn")
    if args.deformation and args.no_test_as_val:
        raise UsageError("--deformation validates on the test set, as published: drop "
                         "--no_test_as_val")


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
def read_data(args, code):
    """The dataset's arrays as loaded (uint8 images, integer labels), or --datadebug's."""
    if code == "datadebug":
        return np.array([[1, 0, 0, 0]], float), np.array([[0, 0.5]], float)
    return datasets.load_dataset(code, args.data_dir, "keras")


def prepare_data(args, code, arrays, data_rng, dtype):
    """Train, validation and test sets as (x, t) pairs, and the raw train images when
    --deformation distorts them afresh each epoch."""
    if code == "datadebug":
        x, t = (a.astype(dtype) for a in arrays)
        return (x, t), (x, t), (x, t), None
    x_train, y_train, x_test, y_test = arrays
    classes = DATASETS[code]["classes"]
    (x_train, y_train), (x_test, y_test) = datasets.sample_slice(
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
        return x, datasets.one_hot(labels, classes, dtype)

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
    x = datasets.deform_images(raw, rng).reshape(len(raw), -1).astype(dtype)
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


def save_checkpoint(path, contents):
    """The protocol's checkpoint as one .npz: the arrays of the payload (weights, optimizer
    buffers, carried factors) and the rest as JSON in "state"."""
    payload = contents.get("payload") or {}
    state = {key: value for key, value in contents.items() if key != "payload"}
    state.update((key, value) for key, value in payload.items() if key != "arrays")
    save_npz(path, {**payload.get("arrays", {}), "state": np.array(json.dumps(state))})


def load_checkpoint(path):
    saved = load_npz(path)
    state = json.loads(str(saved.pop("state")))
    state["payload"] = {"arrays": saved, "opt_steps": state.pop("opt_steps", None),
                        "rngs": state.pop("rngs", None)}
    return state


def payload(model, optimizer, carry, rngs):
    """Everything an exact resume in the middle of a run needs, after an epoch."""
    arrays = model_arrays(model)
    optimizer_state = optimizer.state_dict()
    arrays.update(optimizer_state["buffers"])
    if carry.factors is not None:
        arrays.update({f"carry{k}_{layer}": f for layer, pair in enumerate(carry.factors)
                       for k, f in enumerate(pair)})
    return {"arrays": arrays, "opt_steps": optimizer_state["steps"],
            "rngs": {name: protocol.rng_state(rng) for name, rng in rngs.items()}}


def restore(path, saved, model, optimizer, carry, rngs):
    """Load the interrupted run's state (a payload) in place."""
    try:
        arrays = saved["arrays"]
        for name, array in model_arrays(model).items():
            array[...] = arrays[name]
        optimizer.load_state_dict({"buffers": arrays, "steps": saved["opt_steps"]})
        carry.factors = ([(arrays[f"carry0_{layer}"], arrays[f"carry1_{layer}"])
                          for layer in range(len(model.weights))]
                         if "carry0_0" in arrays else None)
        for name, rng in rngs.items():
            protocol.set_rng_state(rng, saved["rngs"][name])
    except (*utils.BROKEN_FILE_ERRORS, TypeError) as err:
        raise protocol.checkpoint_error(path, err) from None


# ------------------------------------------------------------------------------------------
# Result files: the published text files, learning-curve plots, metrics.json's curves
# ------------------------------------------------------------------------------------------
def write_files(folder, args, history, status, elapsed):
    """The published text files (accuracies as fractions) and the learning-curve plots."""
    folder = Path(folder)
    done = len(history["final_test"])
    for r in range(done):
        utils.write_table(folder / f"train_acc_run{r}.txt", [[a] for a in history["train"][r]])
        test_curve = history["test"][r] if args.validation else [history["final_test"][r]]
        utils.write_table(folder / f"test_acc_run{r}.txt", [[a] for a in test_curve])
    if done:
        suffix = "" if status == "finished" else f"_rep{done - 1}"
        for key in ("train", "val", "test"):
            rows = [row for row in history[key][:done] if row]
            utils.write_table(folder / f"{key}_acc_tot{suffix}.txt", rows)
    if args.check_cos_norm:
        utils.write_table(folder / "angles.txt", history["angles"])
        utils.write_table(folder / "Anorm.txt", history["norms"])
    lines = [f"{k}: {v}" for k, v in sorted(vars(args).items()) if k != "command"]
    lines += [f"seed used: {history['seed']}"]
    lines += [f"final {key} accuracy: mean {np.mean(v):.4f} std {np.std(v):.4f}"
              for key in ("train", "val", "test") if (v := history[f"final_{key}"])]
    lines += [f"total time: {elapsed:.1f} s"]
    utils.write_text(folder / f"res_summary_{args.exp_name}.txt", "\n".join(lines) + "\n")
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


def metrics(history, runs_finished):
    """metrics.json's curves: accuracies in percent (the text files keep fractions)."""
    def percent(values):
        return [percent(v) if isinstance(v, list) else 100 * v for v in values]
    validated = any(history["val"])  # else the final "validation" is the test set's
    return {"train": percent(history["train"]), "val": percent(history["val"]),
            "test": percent(history["test"]),
            **{f"final_{k}": percent(history[f"final_{k}"][:runs_finished])
               for k in ("train", "val", "test") if k != "val" or validated},
            "angles": history["angles"], "norms": history["norms"],
            "epoch_time_s": history["epoch_time_s"]}


ENGINE = protocol.Engine(script="main.py", checkpoint="checkpoint.npz",
                         save_checkpoint=save_checkpoint, load_checkpoint=load_checkpoint,
                         write_files=write_files, metrics=metrics)


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def epoch_eta(args, epoch):
    epochs = utils.decay_epochs(2) if args.eta_decay else ()
    return utils.decayed_eta(args.eta, epoch, epochs, floor=MIN_ETA)


def new_history(seed):
    keys = ("train", "val", "test", "angles", "norms", "epoch_time_s")
    return {**{k: [] for k in keys}, "final_train": [], "final_val": [], "final_test": [],
            "seed": seed}


def train(args):
    code = dataset_code(args)
    check_settings(args, code)
    dtype = np.dtype(args.dtype).type
    run = protocol.Run(args, protocol.results_folder(args, folder_name(args, code)), ENGINE)
    if run.finished:
        return
    seed, data_seq, run_seqs = run.seeds()  # the resumed run's seed: the same data slice
    arrays = read_data(args, code)
    run.check_data(protocol.dataset_record(code, args.data_dir, arrays))
    data = prepare_data(args, code, arrays, np.random.default_rng(data_seq), dtype)
    train_set, val_set, test_set, _ = data
    sizes, acts = architecture(args, train_set[0].shape[1], train_set[1].shape[1])
    protocol.check_memory(sizes, np.dtype(dtype).itemsize)
    if code != "datadebug":
        protocol.check_batch_size(args.batch_size, len(train_set[0]))
    log.debug("training set %s, validation set %s, test set %s", train_set[0].shape,
              val_set[0].shape, test_set[0].shape)
    log.debug("weight updates by %s", "the gemm of numpy's OpenBLAS" if fn.BLAS
              else "numpy expressions (this numpy does not bundle scipy-openblas)")
    if args.continue_training:  # check the saved weights before creating the folder
        continue_from(args, fn.init_model(np.random.default_rng(0), args.learn_type, sizes,
                                          acts, args.w_init, args.dropout, dtype))
    history = run.state["history"] if run.state else new_history(seed)
    run.open(history)
    log.info("%s on %s, layers %s", args.learn_type, code, sizes)
    run.train_runs(lambda r, under_way: train_run(args, run, r, under_way, sizes, acts,
                                                  run_seqs[r], data, dtype))
    log.info("test accuracy %.2f%% +- %.2f over %d run(s), %.1f s; results in %s",
             100 * np.mean(history["final_test"]), 100 * np.std(history["final_test"]),
             args.n_runs,
             time.time() - run.start_time, run.folder)


def train_run(args, run, r, under_way, sizes, acts, run_seq, data, dtype):
    """Run r from its own seeded state, or from the checkpoint when it was under way."""
    history = run.history
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
    if under_way:
        restore(run.checkpoint, under_way["payload"], model, optimizer, carry, rngs)
        first_epoch = under_way["epoch"] + 1
    else:
        for key in ("train", "val", "test", "angles", "norms", "epoch_time_s"):
            history[key].append([])
        if args.check_cos_norm:
            record_angle(history, model)
    run_epochs(args, run, r, first_epoch, model, optimizer, carry, rngs, data, dtype)
    history["final_train"].append(history["train"][r][-1])
    final_val, final_test = evaluate(model, data[1], data[2])
    history["final_val"].append(final_val)
    history["final_test"].append(final_test)
    save_npz(run.folder / f"weights_run{r}.npz", model_arrays(model))
    log.info("run %d: final test accuracy %.2f%%", r, 100 * history["final_test"][-1])
    run.run_done(r)


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


def run_epochs(args, run, r, first_epoch, model, optimizer, carry, rngs, data, dtype):
    history = run.history
    (x_train, t_train), val_set, test_set, raw_train = data
    for epoch in range(first_epoch, args.train_epochs):
        tic = time.perf_counter()
        eta = epoch_eta(args, epoch)
        log.debug("run %d epoch %d: eta %g", r, epoch + 1, eta)
        if raw_train is not None:
            x_train = deformed(raw_train, rngs["deform"], args.zeromean, dtype)
        order = (np.arange(len(x_train)) if args.no_shuffling
                 else rngs["shuffle"].permutation(len(x_train)))
        with tqdm(total=len(order), desc=f"run {r} epoch {epoch + 1}", leave=False,
                  disable=None) as progress:
            try:  # overflow is reported once, as divergence, not as numpy warnings
                with np.errstate(over="ignore", invalid="ignore"):
                    train_acc = fn.train_epoch(model, optimizer, args.learn_type, x_train,
                                               t_train, order, args.batch_size,
                                               args.sample_passes, eta, rngs["mask"], carry,
                                               progress)
            except DivergenceError as err:
                raise DivergenceError(f"run {r} epoch {epoch + 1}, {err}") from None
        utils.check_finite(np.concatenate([w.ravel() for w in model.weights]),
                           f"the end of run {r} epoch {epoch + 1}", eta)
        history["train"][r].append(train_acc)
        message = f"run {r} epoch {epoch + 1}: train {100 * train_acc:.2f}%"
        if args.validation:
            val_acc, test_acc = evaluate(model, val_set, test_set)
            history["val"][r].append(val_acc)
            history["test"][r].append(test_acc)
            message += f", validation {100 * val_acc:.2f}%, test {100 * test_acc:.2f}%"
        if args.check_cos_norm:
            record_angle(history, model)
        history["epoch_time_s"][r].append(time.perf_counter() - tic)
        log.info("%s (%.1f s)", message, history["epoch_time_s"][r][-1])
        run.epoch_done(r, epoch, payload(model, optimizer, carry, rngs))


def main(argv=None):
    return protocol.run_cli(build_parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
