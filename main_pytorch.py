"""Convolutional and fully connected networks trained with PEPITA (ERIN) or BP (PyTorch).

The published MNIST conv command (seed 0: 93.76% test accuracy after 1 epoch, 97.44% after
100; 98.24 +- 0.10 over three seeds with --decay_scheme 0, as the paper preset runs it;
results/paper/mnist/):

    python main_pytorch.py --exp_name Experiment2 --learn_type ERIN --n_runs 1 \
        --train_epochs 100 --eta 0.01 --dropout 0.9 --Bstd 0.05 --eta_decay --dataset mn \
        --batch_size 50 --update_type mom --w_init he_uniform --model Net1conv1fcXL

The tutorial's fully connected CIFAR-10 net: --model NetFC1x1024DOcust_cif --dataset cif
--batch_size 64 --decay_scheme 0. Add --data_dir DIR to read local dataset files.

PEPITA trains through pepita.PEPITA (the one torch engine), BP through autograd.
"""
import sys

import protocol

if __name__ == "__main__":  # a signal while torch loads (seconds): one line, not a traceback
    protocol.exit_quietly_on_signals("main_pytorch.py")

import argparse  # noqa: E402
import errno  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import datasets  # noqa: E402
import models  # noqa: E402
import pepita  # noqa: E402
import utils  # noqa: E402
from datasets import DATASETS  # noqa: E402
from utils import UsageError  # noqa: E402

log = logging.getLogger("pepita")
LEARN_TYPES = ("BP", "ERIN")
UPDATE_TYPES = ("SGD", "mom", "adam")


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def build_parser():
    parser = utils.new_parser(__doc__)
    protocol.add_common_arguments(
        parser, exp_name="exptorch", learn_types=LEARN_TYPES, update_types=UPDATE_TYPES,
        train_epochs=100, batch_size=50, dataset="cif",
        eta_decay_help="learning rate x 0.1 at the epochs of --decay_scheme")
    add = parser.add_argument
    add("--model", "-mod", default="Net1conv1fcXL_cif",
        choices=(*models.MODELS, "NetFC"), help="network (NetFC: fully connected, any depth)")
    add("--fc_hidden", type=utils.positive_int, nargs="+", default=None,
        help="hidden layer sizes of --model NetFC; None: one layer of 1024")
    add("--Bstd", "-Bstd", type=utils.positive_float, default=0.05,
        help="scale of the projection B (= F)")
    add("--B_mean_zero", "-Bmz", action=argparse.BooleanOptionalAction, default=True,
        help="B uniform around zero (on, as the published code forces); "
             "--no-B_mean_zero draws it from U(0, s)")
    add("--freeze_conv", action="store_true", help="keep the conv layer fixed")
    add("--sqrt_conv", action="store_true",
        help="divide the conv update by sqrt(positions) instead of the positions")
    add("--decay_scheme", "-decs", type=int, default=1, choices=(0, 1, 2),
        help="with --eta_decay, the epochs (counted from 0) of the decays: 0 = 60 on MNIST, "
             "60 and 90 otherwise; 1 = 10, 30 and 60; 2 = 60 and 90 on every dataset (the "
             "follow-up's)")
    add("--is_pool", action="store_true",
        help="kept for the published commands: the fc update of conv models always uses "
             "the pooled features (the published code crashes without this flag)")
    add("--is_fc", action="store_true",
        help="refused: the published code parses it but never uses it")
    add("--freeze_bn", action="store_true",
        help="refused: the published code parses it but no model here has batch norm")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"),
        help="where to train: auto = cuda when available, else cpu")
    add("--weight_decay", type=utils.non_negative_float, default=0.0,
        help="L2 weight decay wd of every rule: the gradient gains wd * W (torch's form)")
    followup = parser.add_argument_group(
        "the follow-up's rules (Srinivasan et al., ICLR 2024), for ERIN and NetFC models")
    add = followup.add_argument
    add("--pepita_mode", default="published", choices=models.PEPITA_MODES,
        help="published: the ICML update; modulated, forward, mixed, time_local: the "
             "follow-up's (README, 'The follow-up's rules')")
    add("--feedback", default="uniform", choices=("uniform", "normal"),
        help="uniform: the ICML F; normal: one Gaussian B_l per layer, F = B_1 ... B_L")
    add("--normalize", default="none", choices=("none", *models.NORMALIZATIONS),
        help="divide each hidden block's output by its norm over the batch (batch) or per "
             "sample (sample)")
    add("--mirror", action="store_true",
        help="train the B_l by weight mirroring (needs --feedback normal)")
    add("--followup_loop", action="store_true",
        help="train with the follow-up's loop: drop the last partial batch, each decay one "
             "epoch later (at the end of the epoch), and in time_local the clean-pass step "
             "also in the pre-mirror epochs")
    for name, value, text in MIRROR_SETTINGS:
        add(f"--{name}", type=utils.non_negative_int if isinstance(value, int)
            else utils.non_negative_float, default=argparse.SUPPRESS,  # set by --mirror
            help=f"{text} (default with --mirror: {value})")
    return parser


# lr and wd: the follow-up's command-line values; pre_mirror: its config file's; mirror_every
# 1 (its files say 100 and 200: at most one more mirroring epoch in a 100-epoch run), so
# that the B_l follow the W_l as they train (README, "The follow-up's rules").
MIRROR_SETTINGS = (
    ("mirror_lr", 0.1, "learning rate of the B_l"),
    ("mirror_wd", 0.5, "weight decay of the B_l"),
    ("pre_mirror", 2, "first epochs of mirroring only, the forward weights not trained"),
    ("mirror_every", 1, "later, mirror every batch of each epoch e with (e + 1) %% this == 0"),
)


def check_settings(args):
    for flag in ("is_fc", "freeze_bn"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} has no effect (the published code never uses it and "
                             "no model here has one); remove it")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    is_conv = not args.model.startswith("NetFC")
    if args.fc_hidden and args.model != "NetFC":
        raise UsageError(f"--fc_hidden sets the layers of --model NetFC; {args.model} has "
                         "fixed layers")
    if args.check_cos_norm and (is_conv or args.learn_type != "ERIN"):
        raise UsageError("--check_cos_norm measures the angle between B and the product of "
                         "the fc weights: use it with ERIN and a NetFC model")
    if (args.freeze_conv or args.sqrt_conv) and not is_conv:
        raise UsageError("--freeze_conv and --sqrt_conv act on the conv layer: use a conv "
                         "model (Net1conv1fcXL, Net1conv1fcXL_cif)")
    check_followup_settings(args, is_conv)


def check_followup_settings(args, is_conv):
    """The follow-up's flags: only where they make sense; mirroring settings filled in."""
    chosen = [f"--{flag} {value}" for flag, value, default in (
        ("pepita_mode", args.pepita_mode, "published"), ("feedback", args.feedback, "uniform"),
        ("normalize", args.normalize, "none")) if value != default]
    chosen += ["--mirror"] if args.mirror else []
    if chosen and is_conv:
        raise UsageError(f"{' '.join(chosen)}: the follow-up's rules act on fully connected "
                         "models; use --model NetFC or NetFC1x1024DOcust")
    not_bp = [flag for flag in chosen if not flag.startswith("--normalize")]
    if not_bp and args.learn_type == "BP":
        raise UsageError(f"{' '.join(not_bp)}: a PEPITA setting; use it with --learn_type ERIN")
    given = [name for name, _, _ in MIRROR_SETTINGS if hasattr(args, name)]
    if given and not args.mirror:
        raise UsageError(f"--{given[0]} sets weight mirroring: add --mirror, or drop it")
    if args.mirror and args.feedback != "normal":
        raise UsageError("--mirror trains one B_l per layer: add --feedback normal")
    if args.mirror and args.pepita_mode == "published":
        raise UsageError("--mirror aligns F with the forward weights, as the follow-up's modes "
                         "(x' = x - e F^T) need; the published mode adds F e and aligns them "
                         "with -F: add --pepita_mode modulated (or another follow-up mode)")
    if args.mirror and getattr(args, "mirror_every", 1) == 0:
        raise UsageError("--mirror_every must be a positive number of epochs")
    for name, value, _ in MIRROR_SETTINGS:
        if args.mirror and not hasattr(args, name):
            setattr(args, name, value)


def folder_name(args, code):
    """The published name, then the follow-up's settings that differ from the defaults."""
    name = (f"res_{args.exp_name}_{code}_{args.model}{args.learn_type}_{args.update_type}_"
            f"{args.batch_size}_{args.w_init}__rep{args.n_runs}_tr{args.train_epochs}")
    name += f"etad{args.decay_scheme}" if args.eta_decay else ""
    name += f"_{args.pepita_mode}" if args.pepita_mode != "published" else ""
    name += "_fbnormal" if args.feedback == "normal" else ""
    name += "_mirror" if args.mirror else ""
    name += "_followuploop" if args.followup_loop else ""
    name += f"_wd{args.weight_decay:g}" if args.weight_decay else ""
    return name + (f"_norm{args.normalize}" if args.normalize != "none" else "")


def decay_epochs(args, code):
    """The epochs (from 0) at whose start the learning rate is multiplied by 0.1. The
    follow-up's scheduler steps at the end of the epoch, so with --followup_loop each decay
    first applies one epoch later."""
    return utils.decay_epochs(args.decay_scheme, code, args.followup_loop) if args.eta_decay \
        else ()


# ------------------------------------------------------------------------------------------
# Data: each dataset held in memory as one float tensor scaled like ToTensor
# ------------------------------------------------------------------------------------------
def load_tensors(code, data_dir, device, n_samples="all", data_rng=None,
                 data_flag="--data_dir"):
    """Train and test images (N, C, H, W) in [0, 1] and labels, on device; n_samples: see
    datasets.sample_slice (data_rng picks the slice); data_flag: see datasets.load_dataset."""
    arrays = datasets.load_dataset(code, data_dir, "torchvision", data_flag)
    return to_tensors(arrays, device, n_samples, data_rng)


def to_tensors(arrays, device, n_samples="all", data_rng=None):
    x_train, y_train, x_test, y_test = arrays
    (x_train, y_train), (x_test, y_test) = datasets.sample_slice(
        data_rng, n_samples, (x_train, y_train), (x_test, y_test))

    def to_tensor(images):  # uint8 NHWC -> float NCHW in [0, 1], once
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255).contiguous()

    return (to_tensor(x_train).to(device), torch.from_numpy(y_train).to(device),
            to_tensor(x_test).to(device), torch.from_numpy(y_test).to(device))


@torch.no_grad()
def accuracy(model, x, y, chunk=250):  # small chunks stay in the CPU's caches
    """Test accuracy in percent, with dropout off."""
    model.eval()
    try:
        return 100 * utils.accuracy(model, x, y, chunk)
    finally:
        model.train()


# ------------------------------------------------------------------------------------------
# One epoch
# ------------------------------------------------------------------------------------------
def train_epoch(args, model, rule, optimizer, feedback, data, shuffle_gen, epoch, progress,
                where):
    """One pass over the shuffled training set; returns the mean training loss (the
    cross-entropy of the logits, of the first pass for PEPITA). rule: the pepita.PEPITA of
    the run, None for BP. With --mirror, the B_l are mirrored after each batch's step in the
    mirroring epochs; during the first --pre_mirror epochs the forward weights are not
    trained."""
    x_train, y_train = data
    order = torch.randperm(len(x_train), generator=shuffle_gen).to(x_train.device)
    train_forward = not (args.mirror and epoch < args.pre_mirror)
    mirror_now = args.mirror and (not train_forward or (epoch + 1) % args.mirror_every == 0)
    # the follow-up's trainer takes time_local's clean-pass step before it checks pre-mirroring
    clean_step_only = (not train_forward and args.followup_loop
                       and args.pepita_mode == "time_local")
    # the follow-up's loader drops the last partial batch (drop_last=True)
    n_used = len(order) - (len(order) % args.batch_size if args.followup_loop else 0)
    total_loss = 0.0
    for batch, start in enumerate(range(0, n_used, args.batch_size), start=1):
        idx = order[start:start + args.batch_size]
        x, y = x_train[idx], y_train[idx]
        if rule is None:  # BP
            logits = model(x)
            optimizer.zero_grad()
            F.cross_entropy(logits, y).backward()
            optimizer.step()
        elif clean_step_only:
            logits = rule.clean_step(x, y, optimizer)
        elif train_forward:
            logits = rule.step(x, y, optimizer)
        else:
            logits = rule.logits(x)
        if mirror_now:
            models.mirror_feedback(model, feedback, rule.generator, args.batch_size,
                                   args.dropout, args.mirror_lr, args.mirror_wd,
                                   models.feedback_sd(x[0].numel(), args.Bstd))
            rule.set_B(feedback.B)
        loss = float(F.cross_entropy(logits.detach(), y))
        utils.check_finite(loss, f"{where}, batch {batch}", args.eta)
        total_loss += loss * len(idx)
        progress.update(len(idx))
    return total_loss / n_used


# ------------------------------------------------------------------------------------------
# Checkpoints and results
# ------------------------------------------------------------------------------------------
def on_cpu(obj):
    """obj with every tensor in it copied to the CPU: saved files load on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: on_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(value) for value in obj)
    return obj


def save_torch(path, obj):
    """torch.save through an atomic write; its failures (a full disk) as OSError."""
    def write(tmp):
        try:
            torch.save(on_cpu(obj), tmp)
        except RuntimeError as err:  # torch's stream writer reports write errors so
            raise OSError(errno.EIO, utils.describe(err), str(path)) from None
    utils.atomic_write(path, write)


def load_torch(path):
    """A file written by save_torch; torch's long message about any other becomes short."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ValueError("not a file saved by main_pytorch.py") from None


PROTOCOL_KEYS = ("run", "epoch", "settings", "history", "data")
UNDER_WAY_KEYS = ("model", "B", "optimizer", "generators")
# torch's own generators, which BP's dropout draws from (PEPITA's masks come from the run's)
TORCH_RNG_KEY = "torch_rng"


def save_checkpoint(path, contents):
    """The protocol's checkpoint as one torch file: its keys and the payload's side by side."""
    state = {key: value for key, value in contents.items() if key != "payload"}
    save_torch(path, {**state, **(contents.get("payload") or {})})


def load_checkpoint(path):
    saved = load_torch(path)
    if saved.get("epoch", -1) >= 0:
        missing = [k for k in UNDER_WAY_KEYS if k not in saved]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
    state = {key: saved.pop(key) for key in PROTOCOL_KEYS if key in saved}
    state["payload"] = saved
    return state


def feedback_state(feedback):
    """B (= F) as published, and the per-layer B_l when there are several (with mirroring
    they change during training: they are state)."""
    state = {"B": feedback.B}
    if feedback.per_layer:
        state["B_layers"] = feedback.matrices
    return state


def payload(model, optimizer, feedback, generators):
    """Everything an exact resume in the middle of a run needs, after an epoch."""
    return {"model": model.state_dict(), **feedback_state(feedback),
            "optimizer": optimizer.state_dict(),
            "generators": [g.get_state() for g in generators],
            TORCH_RNG_KEY: torch_rng_states(generators[1].device)}


def torch_rng_states(device):
    states = [torch.get_rng_state()]
    return states + [torch.cuda.get_rng_state(device)] if device.type == "cuda" else states


def restore(path, saved, model, optimizer, generators, device):
    """Load a run under way (a payload) in place; returns its feedback. A checkpoint of the
    nets' layout before they were nn.Sequentials loads too (models.load_weights)."""
    try:
        models.load_weights(model, saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        for g, g_state in zip(generators, saved["generators"]):
            g.set_state(g_state)
        torch_states = saved.get(TORCH_RNG_KEY, [])
        if torch_states:
            torch.set_rng_state(torch_states[0])
        if len(torch_states) > 1:
            torch.cuda.set_rng_state(torch_states[1], device)
        matrices = saved.get("B_layers", [saved["B"]])
        return models.Feedback([B.to(device) for B in matrices])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
        raise protocol.checkpoint_error(path, err) from None


def write_files(folder, args, history, status, elapsed):
    """The published text files (test accuracy in percent, as published) and the plots."""
    folder = Path(folder)
    for r, (losses, test) in enumerate(zip(history["loss"], history["test"])):
        utils.write_table(folder / f"losses_run{r}.txt", [[v] for v in losses])
        utils.write_table(folder / f"test_acc_run{r}.txt", [[v] for v in test])
    if args.check_cos_norm:
        utils.write_table(folder / "angles.txt", history["angles"])
        utils.write_table(folder / "Anorm.txt", history["norms"])
    done = [run for run in history["test"] if len(run) == len(history["test"][0])]
    utils.plot_curves(folder / "learning_curve.png", {"test accuracy": done},
                      f"{args.model} {args.learn_type}", ylabel="test accuracy (%)")
    if history["alignment"] and history["alignment"][0]:
        plot_alignment(folder / "alignment.png", history["alignment"], args)


def metrics(history, runs_finished):
    """metrics.json's curves (percent, as recorded)."""
    return {"loss": history["loss"], "test": history["test"],
            "final_test": [run[-1] for run in history["test"][:runs_finished]],
            "angles": history["angles"], "norms": history["norms"],
            "alignment": history["alignment"], "epoch_time_s": history["epoch_time_s"]}


ENGINE = protocol.Engine(script="main_pytorch.py", checkpoint="checkpoint.pt",
                         save_checkpoint=save_checkpoint, load_checkpoint=load_checkpoint,
                         write_files=write_files, metrics=metrics)


def plot_alignment(path, alignment, args):
    """Angles (epoch 0 = before training) of F with the forward weights' product, and of
    each W_l^T with B_l, as the mean over the runs so far."""
    length = min(map(len, alignment))
    curves = {"F vs (W_L ... W_1)^T": [[e["angle_F"] for e in run[:length]]
                                       for run in alignment]}
    for layer in range(len(alignment[0][0].get("angle_layers", []))):
        curves[f"W_{layer + 1}^T vs B_{layer + 1}"] = [
            [e["angle_layers"][layer] for e in run[:length]] for run in alignment]
    utils.plot_curves(path, curves, f"{args.model} ERIN {args.pepita_mode}: alignment",
                      ylabel="angle (degrees)", first_epoch=0)


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def train(args):
    code = args.dataset or "cif"
    check_settings(args)
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    run = protocol.Run(args, protocol.results_folder(args, folder_name(args, code)), ENGINE)
    if run.finished:
        return
    if device.type == "cuda":
        run.device = f"cuda ({torch.cuda.get_device_name(device)})"
    seed, data_seq, run_seqs = run.seeds()
    arrays = datasets.load_dataset(code, args.data_dir, "torchvision")
    run.check_data(protocol.dataset_record(code, args.data_dir, arrays))
    data = to_tensors(arrays, device, args.n_samples, np.random.default_rng(data_seq))
    del arrays
    n_classes = DATASETS[code]["classes"]
    check_fits(args, data, n_classes)
    log.debug("training set %s, test set %s", tuple(data[0].shape), tuple(data[2].shape))
    history = run.state["history"] if run.state else {
        "seed": seed, "loss": [], "test": [], "angles": [], "norms": [], "alignment": [],
        "epoch_time_s": []}
    history.setdefault("alignment", [[] for _ in history["test"]])  # older checkpoints
    run.open(history)
    log.info("%s %s on %s (%s)", args.model, args.learn_type, code, device)
    run.train_runs(lambda r, under_way: train_run(args, run, r, under_way, run_seqs[r], data,
                                                  n_classes, code, device))
    finals = [test[-1] for test in history["test"]]
    log.info("test accuracy %.2f%% +- %.2f over %d run(s); results in %s", np.mean(finals),
             np.std(finals), args.n_runs, run.folder)
    return history


def check_fits(args, data, n_classes):
    """The batch size and the model against the data, before any folder is created."""
    n_train = len(data[0])
    protocol.check_batch_size(args.batch_size, n_train)  # so --followup_loop has a full batch
    if args.model == "NetFC":
        protocol.check_memory([data[0][0].numel(), *(args.fc_hidden or [1024]), n_classes], 4)
    try:
        models.build_model(args.model, data[0].shape[1:], n_classes, args.w_init,
                           hidden=args.fc_hidden)  # does it fit the data?
    except RuntimeError as err:  # torch's allocator: "can't allocate memory"
        raise UsageError(f"{args.model} does not fit in this machine's memory "
                         f"({utils.describe(err)}); use smaller layers") from None


def train_run(args, run, r, under_way, run_seq, data, n_classes, code, device):
    """Run r from its own seeded state, or from the checkpoint when it was under way."""
    history = run.history
    x_train, y_train, x_test, y_test = data
    init_seed, cpu_seed, device_seed = run_seq.generate_state(3)
    torch.manual_seed(int(init_seed))
    model = models.build_model(
        args.model, x_train.shape[1:], n_classes, args.w_init,
        np.random.default_rng(int(init_seed)), hidden=args.fc_hidden, keep=args.dropout,
        normalize=None if args.normalize == "none" else args.normalize).to(device)
    generators = (torch.Generator().manual_seed(int(cpu_seed)),
                  torch.Generator(device).manual_seed(int(device_seed)))
    if args.feedback == "normal":
        feedback = models.normal_feedback(generators[1], models.layer_sizes(model), args.Bstd,
                                          device)
    else:
        feedback = models.Feedback([pepita.projection_matrix(
            generators[1], x_train[0].numel(), n_classes, args.Bstd, args.B_mean_zero,
            device)])
    if args.freeze_conv:
        model[0].weight.requires_grad_(False)
    params = [layer.weight for layer in models.weight_layers(model)
              if layer.weight.requires_grad]
    optimizer = models.make_optimizer(args.update_type, args.learn_type, params, args.eta,
                                      args.weight_decay, args.pepita_mode)
    first_epoch = 0
    if under_way:
        check_resumable(args, run.checkpoint, under_way["payload"])
        feedback = restore(run.checkpoint, under_way["payload"], model, optimizer,
                           generators, device)
        first_epoch = under_way["epoch"] + 1
    else:
        for key in ("loss", "test", "angles", "norms", "alignment", "epoch_time_s"):
            history[key].append([])
        record_alignment(args, history, model, feedback)
    rule = None if args.learn_type == "BP" else build_rule(
        args, model, feedback, generators[1], n_classes, tuple(x_train.shape[1:]))
    for epoch in range(first_epoch, args.train_epochs):
        tic = time.perf_counter()
        if epoch in decay_epochs(args, code):
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        log.debug("run %d epoch %d: learning rate %g", r, epoch + 1,
                  optimizer.param_groups[0]["lr"])
        with tqdm(total=len(x_train), desc=f"run {r} epoch {epoch + 1}", leave=False,
                  disable=None) as progress:
            loss = train_epoch(args, model, rule, optimizer, feedback, (x_train, y_train),
                               generators[0], epoch, progress, f"run {r} epoch {epoch + 1}")
        test_acc = accuracy(model, x_test, y_test)
        history["loss"][r].append(loss)
        history["test"][r].append(test_acc)
        record_alignment(args, history, model, feedback)
        history["epoch_time_s"][r].append(time.perf_counter() - tic)
        log.info("run %d epoch %d: loss %.4f, test accuracy %.2f%% (%.1f s)", r,
                 epoch + 1, loss, test_acc, history["epoch_time_s"][r][-1])
        run.epoch_done(r, epoch, payload(model, optimizer, feedback, generators))
    save_torch(run.folder / f"weights_run{r}.pt", {"model": model.state_dict(),
                                                   **feedback_state(feedback)})
    run.run_done(r)


def build_rule(args, model, feedback, generator, n_classes, input_shape):
    """The run's pepita.PEPITA: its B and masks from the run's generator, every update
    divided by the nominal --batch_size (as published, a last partial batch too); the conv
    nets with the published conv update and first-error last layer. The labels were checked
    when the data was loaded (no read from the device per step)."""
    conv = {} if args.model.startswith("NetFC") else dict(
        last_error="first", conv_update="published", sqrt_conv=args.sqrt_conv)
    return pepita.PEPITA(model, n_classes, input_shape, B=feedback.B, generator=generator,
                         mode=args.pepita_mode, batch_size=args.batch_size,
                         check_labels=False, **conv)


def check_resumable(args, path, saved):
    """A checkpoint of a version whose BP drew its dropout masks from the run's generator
    (it holds no torch generator state) cannot resume a BP run with dropout exactly."""
    if TORCH_RNG_KEY not in saved and args.learn_type == "BP" and args.dropout < 1 \
            and args.model.startswith("NetFC"):
        raise UsageError(f"{path} was written by an earlier version, whose BP drew its "
                         "dropout masks from the run's generator (this one draws them from "
                         "torch's): it cannot resume exactly; start again with --overwrite")


def record_alignment(args, history, model, feedback):
    """--check_cos_norm's published angles file (the angle between F and the forward
    weights' product, and ||W_1||), and the follow-up's logs of ERIN with a fully connected
    model (before training and after every epoch)."""
    if args.check_cos_norm:
        history["angles"][-1].append(models.alignment_angle(model, feedback.B))
        first = models.weight_layers(model)[0].weight
        history["norms"][-1].append(float(first.detach().norm()))
    if args.learn_type == "ERIN" and args.model.startswith("NetFC"):
        history["alignment"][-1].append(models.alignment(model, feedback))


def main(argv=None):
    return protocol.run_cli(build_parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
