"""Speed benchmark: this project against the published loop structures, side by side, in one
run on this machine. Not a test (pytest does not collect it); run it as

    python tests/bench_speed.py            # about 3 minutes on 2 cores
    python tests/bench_speed.py --repeats 1
    python tests/bench_speed.py --tiny     # seconds: that it runs (tests/test_bench.py)
    git worktree add /tmp/before <commit>     # an earlier checkout, then:
    python tests/bench_speed.py --baseline /tmp/before   # its epochs against this one's

It prints one table: the median of --repeats timings of each figure (the figures of a
comparison timed in turns), the speed-ups, and the fraction of the arithmetic floor (the
published epoch's FLOPs / the rate of a large matrix product timed here); for the tutorial,
also our matrix products alone, a bound on our epoch. Data are random arrays of the real
shapes (MNIST 60000 x 784, CIFAR-10 50000 x 3x32x32). The per-sample loop runs in float64, as
the published code stores its arrays; both dtypes of this project's engine are compared with
it.

With --baseline DIR it prints instead, side by side in one run and in turns, the conv MNIST
epoch (5,000 images, batch 50) and the tutorial's CIFAR-10-shaped epoch (50,000 images, batch
64) of main_pytorch.py in this checkout and in DIR (each in a process of its own, on the same
random data, the second training epoch alone: the test accuracy is not computed), and the
ratios.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import functions as fn  # noqa: E402
import main_pytorch  # noqa: E402
import models  # noqa: E402
import pepita  # noqa: E402
import protocol  # noqa: E402
import utils  # noqa: E402

SIZES = [784, 1024, 10]
N_TRAIN, N_TEST, BATCH = 60000, 10000, 64


def in_turns(runs, repeats):
    """{name: median seconds} of runs ({name: callable}), timed in turns: this machine's
    throughput drifts, and a slow spell then hits every figure of a comparison alike."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            tic = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


# ---- a. numpy PEPITA epoch ---------------------------------------------------------------
def mnist_like(dtype, rng):
    x = rng.random((N_TRAIN + N_TEST, 784)).astype(dtype)
    t = np.eye(10, dtype=dtype)[rng.integers(0, 10, N_TRAIN + N_TEST)]
    return x[:N_TRAIN], t[:N_TRAIN], x[N_TRAIN:], t[N_TRAIN:]


def published_style_loop(n_samples):
    """The published structure in float64: one sample and one pass at a time, outer products
    summed per sample, the weights changed every BATCH samples. The returned run trains on
    n_samples and validates on n_samples / 6, per sample: N_TRAIN / n_samples of it is an
    epoch of 60000 with a validation of 10000."""
    dtype = np.float64
    rng = np.random.default_rng(0)
    x, t, x_test, _ = mnist_like(dtype, rng)
    model = fn.init_model(rng, "ERIN", SIZES, ["relu", "softmax"], "he_uniform", 0.9, dtype)
    W1, W2 = model.weights
    G1, G2, V1, V2 = (np.zeros_like(w) for w in (W1, W2, W1, W2))

    def softmax(a):
        z = np.exp(a - a.max())
        return z / z.sum()

    def train():
        for i in range(n_samples):
            mask = (rng.random(1024) < 0.9) / dtype(0.9)
            h = np.maximum(W1 @ x[i], 0) * mask
            e = softmax(W2 @ h) - t[i]
            x_mod = x[i] + model.F @ e
            h_mod = np.maximum(W1 @ x_mod, 0) * mask
            e_mod = softmax(W2 @ h_mod) - t[i]
            G1[...] += np.outer((h - h_mod) * mask, x_mod)
            G2[...] += np.outer(e_mod, h_mod)
            if (i + 1) % BATCH == 0:
                for W, G, V in ((W1, G1, V1), (W2, G2, V2)):
                    V *= 0.9
                    V += 0.1 * G / BATCH
                    W -= V
                    G[...] = 0

    def validate():
        for i in range(n_samples * N_TEST // N_TRAIN):
            softmax(W2 @ np.maximum(W1 @ x_test[i], 0))

    return lambda: (train(), validate())


def engine_epoch(dtype):
    rng = np.random.default_rng(0)
    x, t, x_test, t_test = mnist_like(dtype, rng)
    model = fn.init_model(rng, "ERIN", SIZES, ["relu", "softmax"], "he_uniform", 0.9, dtype)
    optimizer, carry = fn.Optimizer("mom", model.weights), fn.Carry()

    def epoch():
        fn.train_epoch(model, optimizer, "ERIN", x, t, rng.permutation(N_TRAIN), BATCH, 2, 0.1,
                       rng, carry)
        fn.accuracy(model, x_test, t_test.argmax(1))

    return epoch


MATMUL_FLOPS = 10 * 2 * 4096 * 784 * 1024
# The published PEPITA epoch: two full passes, the outer products, validation. (This project
# skips most of the second pass's first-layer product: it does about 3/4 of these FLOPs.)
def epoch_flops():
    return (N_TRAIN * (3 * 2 * (784 * 1024 + 1024 * 10) + 2 * 784 * 10)
            + N_TEST * 2 * (784 * 1024 + 1024 * 10))


def large_matmuls(dtype):
    """Ten products of MATMUL_FLOPS / 10: the rate of BLAS, for the arithmetic floor."""
    rng = np.random.default_rng(0)
    a, b = rng.random((4096, 784)).astype(dtype), rng.random((784, 1024)).astype(dtype)
    return lambda: [a @ b for _ in range(10)]


def epoch_peak_memory_mb():
    """Peak resident memory of main.py running the paper's MNIST command for one epoch on
    the real MNIST in ../shared, measured inside that process (None when absent)."""
    data = ROOT.parent / "shared" / "data" / "mnist"
    if not data.is_dir():
        return None
    with tempfile.TemporaryDirectory() as results:
        argv = ["main.py", "--train_epochs", "1", "--n_hlayers", "1", "--eta", "0.1",
                "--eta_decay", "--validation", "--data_dir", str(data), "--results_dir", results]
        code = (f"import resource, runpy, sys; sys.argv = {argv!r}\n"
                "try:\n    runpy.run_path('main.py', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                             capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


# ---- b. PyTorch tutorial epoch (3072-1024-10, CIFAR-shaped) --------------------------------
class PerImageDataset(torch.utils.data.Dataset):
    """As torchvision's CIFAR10: each item converted from a PIL image with ToTensor."""

    def __init__(self, images, labels):
        from torchvision import transforms
        self.images, self.labels, self.to_tensor = images, labels, transforms.ToTensor()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.to_tensor(Image.fromarray(self.images[i])), int(self.labels[i])


class HookedNet(nn.Module):
    """The published tutorial's net: activations collected by forward hooks."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3072, 1024, bias=False)
        self.fc2 = nn.Linear(1024, 10, bias=False)
        self.activations = {}
        for name, module in (("fc1", self.fc1), ("fc2", self.fc2)):
            module.register_forward_hook(self.keeper(name))

    def keeper(self, name):
        def hook(module, inputs, output):
            self.activations[name] = (inputs[0], output)
        return hook

    def forward(self, x, mask=None):
        h = F.relu(self.fc1(x.view(-1, 3072)))
        return F.softmax(self.fc2(h * mask if mask is not None else h), dim=1)


def published_tutorial(images, labels, test_images, test_labels, batches):
    """Runs `batches` training batches and batches / 5 test batches: about batches / 782 of
    an epoch (50000 / 64 training and 10000 / 64 test batches)."""
    net = HookedNet()
    B = pepita.projection_matrix(torch.Generator().manual_seed(0), 3072, 10)
    velocity = [torch.zeros_like(net.fc1.weight), torch.zeros_like(net.fc2.weight)]
    train_loader = torch.utils.data.DataLoader(PerImageDataset(images, labels),
                                               batch_size=BATCH, shuffle=True)
    test_loader = torch.utils.data.DataLoader(PerImageDataset(test_images, test_labels),
                                              batch_size=BATCH)

    @torch.no_grad()
    def train():
        for i, (x, y) in enumerate(train_loader):
            if i == batches:
                break
            t = F.one_hot(y, 10).float()
            mask = (torch.rand(len(x), 1024) < 0.9).float() / 0.9
            e = net(x, mask) - t
            h1 = F.relu(net.activations["fc1"][1]) * mask
            x_mod = x.view(-1, 3072) + e @ B.T
            e_mod = net(x_mod, mask) - t
            h1_mod = F.relu(net.activations["fc1"][1]) * mask
            for W, dW, V in ((net.fc1.weight, (h1 - h1_mod).T @ x_mod, velocity[0]),
                             (net.fc2.weight, e_mod.T @ h1_mod, velocity[1])):
                V.mul_(0.9).add_(dW, alpha=0.01 / BATCH)
                W.sub_(V)

    @torch.no_grad()
    def test():
        for i, (x, y) in enumerate(test_loader):
            if i == batches // 5:
                break
            net(x).argmax(1).eq(y).sum()

    return lambda: (train(), test())


def tutorial_products_only(n_train, n_test):
    """Only the three weight-sized operations of each batch of our tutorial epoch
    (W_1 [x^T, B], the velocity's addmm_, W_1 -= s U) and the validation products: a bound
    on our epoch, whatever the rest of the code does."""
    W, X = torch.rand(1024, 3072), torch.rand(BATCH, 3072)
    velocity, stacked = torch.zeros_like(W), torch.rand(BATCH + 10, 3072)
    delta, x_test = torch.rand(BATCH, 1024), torch.rand(n_test, 3072)

    @torch.no_grad()
    def epoch():
        for _ in range(-(-n_train // BATCH)):
            W @ stacked.T
            velocity.addmm_(delta.T, X, alpha=1e-6)
            W.add_(velocity, alpha=-1e-6)
        for start in range(0, len(x_test), 250):
            x_test[start:start + 250] @ W.T

    return epoch


def project_epoch(model_name, x, y, x_test, y_test, batch_size):
    """An epoch of main_pytorch.py's training loop and its test accuracy."""
    model = models.build_model(model_name, x.shape[1:], 10, "he_uniform",
                               np.random.default_rng(0), keep=0.9)
    args = SimpleNamespace(learn_type="ERIN", model=model_name, batch_size=batch_size,
                           dropout=0.9, eta=0.01, sqrt_conv=False, mirror=False,
                           pepita_mode="published", followup_loop=False)
    feedback = models.Feedback([pepita.projection_matrix(torch.Generator().manual_seed(0),
                                                         x[0].numel(), 10)])
    rule = main_pytorch.build_rule(args, model, feedback, torch.Generator().manual_seed(1), 10,
                                   tuple(x.shape[1:]))
    optimizer = models.make_optimizer("mom", "ERIN", list(model.parameters()), 0.01)
    shuffle_gen = torch.Generator().manual_seed(0)
    progress = SimpleNamespace(update=lambda n: None)

    def epoch():
        main_pytorch.train_epoch(args, model, rule, optimizer, feedback, (x, y), shuffle_gen, 0,
                                 progress, "bench")
        main_pytorch.accuracy(model, x_test, y_test)

    return epoch


def pepita_rule_epoch(x, y, x_test, y_test, batch_size):
    """The tutorial's net as a user writes it, trained through pepita.PEPITA's .grad with
    torch's SGD (momentum 0.9; fused: one pass over each weight): what a user's own model
    and optimizer pay against main_pytorch.py's factored published momentum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 1024, bias=False), nn.ReLU(),
                          nn.Dropout(0.1), nn.Linear(1024, 10, bias=False))
    rule = pepita.PEPITA(model, 10, tuple(x.shape[1:]), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    order_gen = torch.Generator().manual_seed(0)

    def epoch():
        model.train()
        order = torch.randperm(len(x), generator=order_gen)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            rule.step(x[idx], y[idx])
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for start in range(0, len(x_test), 250):
                model(x_test[start:start + 250]).argmax(1)

    return epoch


# ---- c. the conv update of Net1conv1fcXL for one batch of 50 -----------------------------
def conv_updates():
    """The published loop's update and ours (run 20 times), checked equal."""
    torch.manual_seed(0)
    weight = models.build_model("Net1conv1fcXL", (1, 28, 28), 10)[0].weight
    x_mod = torch.rand(50, 1, 28, 28)
    with torch.no_grad():
        h = F.relu(F.conv2d(torch.rand(50, 1, 28, 28), weight))
        h_mod = F.relu(F.conv2d(x_mod, weight))

    @torch.no_grad()
    def published_loop():
        dw = torch.zeros_like(weight)
        for r in range(24):
            for c in range(24):
                patch = x_mod[:, :, r:r + 5, c:c + 5]
                delta = (h - h_mod)[:, :, r, c]
                dw += torch.einsum("no,nikl->oikl", delta, patch) / 50
        return dw / 576

    features = (h - h_mod).permute(1, 0, 2, 3).reshape(32, -1)

    @torch.no_grad()
    def ours():  # (h - h') times the patch columns of x' (built by the forward pass)
        columns = pepita.patch_columns(x_mod, (5, 5))
        return (features @ columns.T).view_as(weight) / (50 * 576)

    torch.testing.assert_close(ours(), published_loop(), rtol=1e-4, atol=1e-7)
    return published_loop, lambda: [ours() for _ in range(20)]


# ---- --baseline: main_pytorch.py's epochs here and in an earlier checkout -----------------
# Runs in a process of its own with the checkout's folder first on sys.path: main_pytorch.py
# trains two epochs (their test accuracy left out), and the second epoch's time is printed as
# metrics.json records it (the first pays the process's one-time costs). It uses only main_pytorch.main and .accuracy, which both have.
EPOCH_DRIVER = """
import json, pathlib, sys
sys.path.insert(0, sys.argv[1])
import main_pytorch
main_pytorch.accuracy = lambda *args, **kwargs: 0.0
main_pytorch.main(sys.argv[2:])
metrics = next(pathlib.Path(sys.argv[sys.argv.index("--results_dir") + 1]).rglob("metrics.json"))
print(json.loads(metrics.read_text())["epoch_time_s"][0][-1])
"""
BASELINE_EPOCHS = {  # name: (dataset, images, flags)
    "conv MNIST epoch, 5,000 images, batch 50": (
        "mn", 5000, "--model Net1conv1fcXL --batch_size 50 --eta_decay"),
    "tutorial epoch, CIFAR-10-shaped, 50,000 images, batch 64": (
        "cif", 50000, "--model NetFC1x1024DOcust_cif --batch_size 64 --eta_decay "
                      "--decay_scheme 0"),
}


def write_random_dataset(folder, code, n_train, rng):
    spec = datasets.DATASETS[code]
    h, w, c = spec["shape"]
    shape = (h, w) if c == 1 else (h, w, c)
    np.savez(Path(folder) / spec["npz"],
             x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
             y_train=rng.integers(0, 10, n_train), x_test=np.zeros((10, *shape), np.uint8),
             y_test=np.zeros(10, np.int64))


def checkout_epoch(checkout, code, flags, data_dir, results):
    def run():
        command = [sys.executable, "-c", EPOCH_DRIVER, str(checkout), "--learn_type", "ERIN",
                   "--dataset", code, *flags.split(), "--train_epochs", "2", "--seed", "0",
                   "--update_type", "mom", "--eta", "0.01", "--dropout", "0.9",
                   "--device", "cpu", "--data_dir", str(data_dir),
                   "--results_dir", tempfile.mkdtemp(dir=results)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=checkout)
        if done.returncode != 0:
            sys.exit(f"{checkout}: {done.stderr.strip().splitlines()[-1]}")
        return float(done.stdout.split()[-1])
    return run


def compare_with_baseline(baseline, repeats, tiny):
    """{epoch name: (this checkout's median seconds, the baseline's)}, timed in turns."""
    rng = np.random.default_rng(0)
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (code, n_images, flags) in BASELINE_EPOCHS.items():
            write_random_dataset(tmp, code, 640 if tiny else n_images, rng)
            times = {"ours": [], "baseline": []}
            for _ in range(repeats):
                for who, checkout in (("ours", ROOT), ("baseline", baseline)):
                    times[who].append(checkout_epoch(checkout, code, flags, tmp, tmp)())
            found[name] = tuple(statistics.median(times[who]) for who in ("ours", "baseline"))
    return found


def print_baseline(baseline, repeats, tiny):
    found = compare_with_baseline(Path(baseline).resolve(), repeats, tiny)
    commit = subprocess.run(["git", "-C", str(baseline), "log", "-1", "--format=%h %s"],
                            capture_output=True, text=True).stdout.strip()[:70]
    print(f"\nmain_pytorch.py's training epoch: this checkout against {baseline} ({commit})")
    print(f"{'epoch':58s} {'ours':>9s} {'baseline':>9s} {'ratio':>7s}")
    for name, (ours, theirs) in found.items():
        print(f"{name:58s} {ours:8.3f}s {theirs:8.3f}s {ours / theirs:6.3f}x")
    print(f"medians of {repeats} repeats, timed in turns, each epoch in a process of its own; "
          f"torch threads {torch.get_num_threads()}")


# ---- the table ---------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description="speed benchmark (see the docstring)")
    parser.add_argument("--repeats", type=utils.positive_int, default=3)
    parser.add_argument("--samples", type=utils.positive_int, default=1800,
                        help="samples timed in the per-sample loop (scaled to an epoch)")
    parser.add_argument("--tiny", action="store_true",
                        help="every figure on a few hundred samples, once: checks that the "
                             "benchmark runs; its times mean nothing")
    parser.add_argument("--baseline", metavar="DIR", default=None,
                        help="only main_pytorch.py's conv MNIST and tutorial epochs, here and "
                             "in the checkout DIR (e.g. a git worktree of an earlier commit)")
    args = parser.parse_args()
    if args.baseline:
        print_baseline(args.baseline, 1 if args.tiny else args.repeats, args.tiny)
        return
    global N_TRAIN, N_TEST
    n_images, batches = 50000, 100
    if args.tiny:
        N_TRAIN, N_TEST, n_images, batches = 640, 128, 640, 2
        args.repeats, args.samples = 1, 64
    protocol.keep_freed_memory()
    peak = None if args.tiny else epoch_peak_memory_mb()  # first, while this process is small
    rows = []

    numpy_runs = {"loop": published_style_loop(args.samples)}
    for dtype in ("float64", "float32"):
        numpy_runs[dtype] = engine_epoch(np.dtype(dtype))
        numpy_runs[f"matmul {dtype}"] = large_matmuls(np.dtype(dtype))
    seconds = in_turns(numpy_runs, args.repeats)
    loop = seconds["loop"] * N_TRAIN / args.samples
    for dtype in ("float64", "float32"):
        rate = MATMUL_FLOPS / seconds[f"matmul {dtype}"]
        ours, floor = seconds[dtype], epoch_flops() / rate
        rows.append((f"numpy PEPITA MNIST epoch, {dtype}", loop, ours,
                     f"floor {floor:.2f} s at {rate / 1e9:.0f} GFLOP/s: ours = "
                     f"{ours / floor:.2f} x floor"))
    del numpy_runs

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n_images)
    test_images, test_labels = images[:n_images // 5], labels[:n_images // 5]

    def to_tensor(images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).contiguous()

    tutorial_data = (to_tensor(images), torch.from_numpy(labels), to_tensor(test_images),
                     torch.from_numpy(test_labels), BATCH)
    seconds = in_turns({
        "published": published_tutorial(images, labels, test_images, test_labels, batches),
        "ours": project_epoch("NetFC1x1024DOcust_cif", *tutorial_data),
        "pepita.PEPITA": pepita_rule_epoch(*tutorial_data),
        "products only": tutorial_products_only(len(images), len(test_images))},
        args.repeats)
    published = seconds["published"] * -(-len(images) // BATCH) / batches
    rows.append(("tutorial epoch, CIFAR-10 3072-1024-10", published, seconds["ours"],
                 "published: per-image ToTensor DataLoader, hooks"))
    rows.append(("  our products alone (a bound)", published, seconds["products only"],
                 "the 3 weight-sized operations per batch, validation"))
    rows.append(("  the same net, a user's optimizer", published, seconds["pepita.PEPITA"],
                 f"{seconds['pepita.PEPITA'] / seconds['ours']:.2f} x main_pytorch.py's path "
                 "(.grad and torch's fused SGD)"))

    loop, ours = conv_updates()
    seconds = in_turns({"loop": loop, "ours": ours}, max(args.repeats, 5))
    rows.append(("conv update, Net1conv1fcXL, batch 50", seconds["loop"], seconds["ours"] / 20,
                 "loop over 576 positions"))

    mnist = torch.from_numpy(rng.integers(0, 256, (N_TRAIN + N_TEST, 1, 28, 28),
                                          dtype=np.uint8)).float().div(255)
    digits = torch.from_numpy(rng.integers(0, 10, N_TRAIN + N_TEST))
    seconds = in_turns({"ours": project_epoch("Net1conv1fcXL", mnist[:N_TRAIN],
                                              digits[:N_TRAIN], mnist[N_TRAIN:],
                                              digits[N_TRAIN:], 50)}, args.repeats)
    rows.append(("conv MNIST epoch (ours only)", float("nan"), seconds["ours"],
                 "published: about 180 s"))

    print(f"\n{'figure':40s} {'published':>11s} {'ours':>9s} {'speed-up':>9s}  notes")
    for name, theirs, ours, note in rows:
        speedup = theirs / ours if theirs == theirs else float("nan")
        print(f"{name:40s} {theirs:10.3f}s {ours:8.3f}s {speedup:8.1f}x  {note}")
    if peak is not None:
        print(f"peak memory of main.py, one MNIST epoch (float64, data included): "
              f"{peak:.0f} MB")
    print(f"medians of {args.repeats} repeats, timed in turns; the published numpy loop in "
          f"float64 (as published) for both rows; torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
