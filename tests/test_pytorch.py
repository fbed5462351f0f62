"""The PyTorch path: updates against the published definitions, BP against autograd, the
published commands end to end."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import main_pytorch
import models
import pepita
from utils import UsageError

README_COMMAND = ("--exp_name Experiment2 --learn_type ERIN --n_runs 1 --train_epochs 100 "
                  "--eta 0.01 --dropout 0.9 --Bstd 0.05 --eta_decay --dataset mn "
                  "--batch_size 50 --update_type mom --w_init he_uniform "
                  "--model Net1conv1fcXL").split()


def published_conv_update(x_mod, h, h_mod, kernel, sqrt_conv):
    """The published loop over output positions: dW += mean over the batch of
    (h - h')[o at the position] * x'[i, patch], then divided by the positions (or sqrt)."""
    n, channels = x_mod.shape[:2]
    rows, cols = h.shape[2:]
    dw = torch.zeros(h.shape[1], channels, kernel, kernel, dtype=x_mod.dtype)
    for r in range(rows):
        for c in range(cols):
            patch = x_mod[:, :, r:r + kernel, c:c + kernel]           # (n, C, k, k)
            delta = (h - h_mod)[:, :, r, c]                           # (n, O)
            dw += torch.einsum("no,nikl->oikl", delta, patch) / n
    positions = rows * cols
    return dw / (positions ** 0.5 if sqrt_conv else positions)


def published_conv_rule(model, B, sqrt_conv=False, batch_size=None):
    """The paper's conv net as main_pytorch.py trains it: the published conv update and the
    first pass's error for the last layer."""
    return pepita.PEPITA(model, 10, model_input(model), B=B, last_error="first",
                         conv_update="published", sqrt_conv=sqrt_conv, batch_size=batch_size)


def model_input(model):
    return (model[0].in_channels, 28, 28) if model[0].in_channels == 1 else (3, 32, 32)


@pytest.mark.parametrize("channels,size,sqrt_conv", [(1, 28, False), (1, 28, True),
                                                     (3, 32, False)])
def test_conv_update_equals_published_loop(channels, size, sqrt_conv):
    torch.manual_seed(0)
    model = models.build_model(f"Net1conv1fcXL{'_cif' if channels == 3 else ''}",
                               (channels, size, size), 10).double()
    x = torch.rand(4, channels, size, size, dtype=torch.float64)
    y = torch.tensor([1, 3, 5, 7])
    target = F.one_hot(y, 10).double()
    B = pepita.projection_matrix(torch.Generator().manual_seed(1), channels * size * size,
                                 10).double()
    _, grads = published_conv_rule(model, B, sqrt_conv).compute(x, y, {})
    grads = [grad for _, grad in grads]
    conv, fc = model[0], model[4]
    with torch.no_grad():
        e = F.softmax(fc(F.max_pool2d(F.relu(conv(x)), 2).flatten(1)), dim=1) - target
        x_mod = x + (e @ B.T).view_as(x)
        h, h_mod = (F.relu(F.conv2d(inp, conv.weight)) for inp in (x, x_mod))
        expected = published_conv_update(x_mod, h, h_mod, 5, sqrt_conv)
        pooled_mod = F.max_pool2d(h_mod, 2).flatten(1)
    # published: W += eta * dW / batch_size, so the gradient (W -= eta g) is -dW / batch_size
    torch.testing.assert_close(grads[0], -expected / 4, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grads[1], e.T @ pooled_mod / 4, rtol=1e-10, atol=1e-14)
    assert grads[0].abs().max() > 0


def test_a_last_partial_batch_is_divided_by_the_nominal_batch_size():
    """As published: the fc update e^T pooled' / batch_size and the conv update's
    1 / (n * positions * batch_size), n the batch's own size."""
    torch.manual_seed(0)
    model = models.build_model("Net1conv1fcXL", (1, 28, 28), 10).double()
    B = pepita.projection_matrix(torch.Generator().manual_seed(1), 784, 10).double()
    x, y = torch.rand(3, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 2, 3])
    own = [g for _, g in published_conv_rule(model, B).compute(x, y, {})[1]]
    nominal = [g for _, g in published_conv_rule(model, B, batch_size=50).compute(x, y,
                                                                                  {})[1]]
    for a, b in zip(nominal, own):
        torch.testing.assert_close(a, b * 3 / 50, rtol=1e-10, atol=1e-18)


def test_the_conv_nets_fast_forward_equals_conv2d_and_max_pool():
    """pepita's conv by patch columns and its 2x2 pooling by strided maxima, on the paper's
    conv net, against torch's own modules."""
    torch.manual_seed(0)
    model = models.build_model("Net1conv1fcXL_cif", (3, 32, 32), 10)
    rule = published_conv_rule(model, torch.zeros(3072, 10))
    assert rule.by_columns == {0} and rule.pool_2x2 == {2}
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        logits, inputs, outputs = rule.forward(x, {})
        torch.testing.assert_close(outputs[0], F.relu(model[0](x)))
        torch.testing.assert_close(inputs[4], F.max_pool2d(F.relu(model[0](x)), 2).flatten(1))
        torch.testing.assert_close(logits, model(x))


def test_fc_pepita_step_equals_layer_formulas():
    """One step of NetFC1x1024DOcust (the published momentum, first step: W -= eta g)
    against the reference's per-layer formulas, with the dropout masks shared by both
    passes, drawn from the run's generator after B."""
    rng = np.random.default_rng(0)
    model = models.build_model("NetFC1x1024DOcust", (1, 28, 28), 10, "he_uniform", rng,
                               keep=0.9)
    W1, W2 = (layer.weight.detach().clone() for layer in models.weight_layers(model))
    x = torch.rand(8, 1, 28, 28)
    y = torch.arange(8) % 10
    t = F.one_hot(y, 10).float()
    gen = torch.Generator().manual_seed(3)
    B = pepita.projection_matrix(gen, 784, 10)
    mask_gen = torch.Generator().set_state(gen.get_state())
    mask = (torch.rand(8, 1024, generator=mask_gen) < 0.9).float() / 0.9
    torch.testing.assert_close(mask.unique(), torch.tensor([0, 1 / 0.9]))
    optimizer = models.make_optimizer("mom", "ERIN", [W for W in model.parameters()], 0.01)
    rule = pepita.PEPITA(model, 10, (1, 28, 28), B=B, generator=gen, batch_size=8)
    rule.step(x, y, optimizer)

    xf = x.flatten(1)
    h = F.relu(xf @ W1.T) * mask
    e = F.softmax(h @ W2.T, dim=1) - t
    x_mod = xf + e @ B.T
    h_mod = F.relu(x_mod @ W1.T) * mask
    e_mod = F.softmax(h_mod @ W2.T, dim=1) - t
    dW1 = -(h - h_mod).T @ x_mod
    dW2 = -e_mod.T @ h_mod
    torch.testing.assert_close(model[1].weight, W1 + 0.01 * dW1 / 8)
    torch.testing.assert_close(model[4].weight, W2 + 0.01 * dW2 / 8)


def test_published_momentum_keeps_velocity_across_learning_rate_changes():
    w = torch.nn.Parameter(torch.zeros(1, 1))
    opt = models.PublishedMomentum([w], lr=1.0)
    for lr in (1.0, 0.1):
        opt.param_groups[0]["lr"] = lr
        opt.step_factors([(w, [(torch.ones(1, 1), torch.ones(1, 1))])])
    # V1 = 1, W1 = -1; V2 = 0.9 + 0.1 = 1.0, W2 = -2
    assert w.item() == pytest.approx(-2.0)


def test_published_momentum_takes_formed_terms_too():
    """A term that is a tensor (a conv update by conv2d_weight, a bias) adds as it is."""
    w = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    opt = models.PublishedMomentum([w], lr=0.5)
    delta, inputs = torch.ones(4, 2, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)
    opt.step_factors([(w, [(delta, inputs), torch.full((2, 3), 2.0, dtype=torch.float64)])])
    torch.testing.assert_close(w.detach(), torch.full((2, 3), -0.5 * (4 + 2.0),
                                                      dtype=torch.float64))


def test_published_momentum_over_many_steps_and_a_resume():
    """1000 float32 steps (without folding the velocity's lazy scale 0.9^t back into its
    buffer, the buffer overflows after about 800), a change of lr, and a state_dict round
    trip: W and V follow V = 0.9 V + lr g; W -= V, computed here in float64."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    w_ref, v_ref = w.detach().double(), torch.zeros(6, 5, dtype=torch.float64)
    opt = models.PublishedMomentum([w], lr=0.1)
    for step in range(1000):
        if step == 500:
            state = opt.state_dict()
            torch.testing.assert_close(state["state"][0]["velocity"].double(), v_ref,
                                       rtol=1e-4, atol=1e-6)
            opt = models.PublishedMomentum([w], lr=0.1)
            opt.load_state_dict(state)
        if step == 700:
            opt.param_groups[0]["lr"] = 0.01
        delta, inputs = (torch.randn(4, k, generator=gen) for k in (6, 5))
        opt.step_factors([(w, [(delta, inputs)])])
        v_ref = 0.9 * v_ref + opt.param_groups[0]["lr"] * delta.double().T @ inputs.double()
        w_ref -= v_ref
    torch.testing.assert_close(w.detach().double(), w_ref, rtol=1e-4,
                               atol=1e-4 * float(w_ref.abs().max()))


def test_an_old_bp_checkpoint_with_dropout_is_refused_in_one_line():
    """BP's dropout masks came from the run's generator before the nets were
    nn.Sequentials; they come from torch's now: such a run cannot resume exactly."""
    args = SimpleNamespace(learn_type="BP", dropout=0.9, model="NetFC1x1024DOcust")
    with pytest.raises(UsageError, match="cannot resume exactly; start again with "
                                         "--overwrite"):
        main_pytorch.check_resumable(args, "checkpoint.pt", {"model": {}})
    main_pytorch.check_resumable(args, "checkpoint.pt", {main_pytorch.TORCH_RNG_KEY: []})
    main_pytorch.check_resumable(SimpleNamespace(**{**vars(args), "learn_type": "ERIN"}),
                                 "checkpoint.pt", {"model": {}})


def test_an_old_layout_checkpoint_loads_into_the_sequential_nets():
    """The nets were modules of their own (FCNet: layers.<i>.weight; ConvNet: conv.weight,
    fc.weight) before they were nn.Sequentials: their weights load in order."""
    conv = models.build_model("Net1conv1fcXL", (1, 28, 28), 10)
    old = {"conv.weight": torch.ones(32, 1, 5, 5), "fc.weight": torch.full((10, 4608), 2.0)}
    models.load_weights(conv, old)
    assert torch.equal(conv[0].weight, old["conv.weight"])
    assert torch.equal(conv[4].weight, old["fc.weight"])
    fc = models.build_model("NetFC", (1, 28, 28), 10, hidden=[8, 6])
    models.load_weights(fc, {f"layers.{i}.weight": w.detach() * 0 + i for i, w in
                             enumerate(fc.parameters())})
    assert [float(w.detach().mean()) for w in fc.parameters()] == [0.0, 1.0, 2.0]
    with pytest.raises(KeyError):
        models.load_weights(fc, {"layers.0.weight": torch.zeros(8, 784)})


def run_torch(tmp_path, data_dir, *flags):
    argv = [*flags, "--data_dir", str(data_dir), "--results_dir", str(tmp_path / "results")]
    assert main_pytorch.main(argv) == 0
    return max((p for p in (tmp_path / "results").rglob("res_*") if p.is_dir()),
               key=lambda p: p.stat().st_mtime_ns)


def shorten(command, epochs):
    argv = list(command)
    argv[argv.index("--train_epochs") + 1] = str(epochs)
    return argv


def test_published_readme_command_runs_without_is_pool(tmp_path, mnist_dir):
    folder = run_torch(tmp_path, mnist_dir, *shorten(README_COMMAND, 2), "--seed", "0")
    assert folder.name == ("res_Experiment2_mn_Net1conv1fcXLERIN_mom_50_he_uniform__rep1_"
                           "tr2etad1")
    for name in ("losses_run0.txt", "test_acc_run0.txt", "metrics.json",
                 "learning_curve.png", "weights_run0.pt", "checkpoint.pt"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["test"][0]) == 2 and metrics["test"][0][-1] > 30  # percent, > chance
    saved = torch.load(folder / "weights_run0.pt", weights_only=True)
    assert saved["B"].shape == (784, 10)


@pytest.mark.parametrize("flags", [
    ["--learn_type", "BP", "--update_type", "adam", "--model", "Net1conv1fcXL"],
    ["--model", "NetFC1x1024DOcust", "--update_type", "SGD", "--check_cos_norm"],
    ["--model", "NetFC", "--fc_hidden", "64", "32", "--no-B_mean_zero", "-eta_d", "-decs", "0"],
    ["-mod", "Net1conv1fcXL", "--sqrt_conv", "--freeze_conv", "--is_pool", "-Bmz"],
])
def test_pytorch_flags_on_mnist(tmp_path, mnist_dir, flags):
    folder = run_torch(tmp_path, mnist_dir, "--dataset", "mn", "--train_epochs", "1",
                       "--seed", "1", *flags)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "finished" and 0 <= metrics["test"][0][0] <= 100
    if "--check_cos_norm" in flags:
        angles = np.loadtxt(folder / "angles.txt")
        assert angles.shape == (2,) and 0 < angles.min() and angles.max() < 180


def test_freeze_conv_keeps_the_conv_fixed(tmp_path, mnist_dir):
    folder = run_torch(tmp_path, mnist_dir, "--dataset", "mn", "--train_epochs", "1",
                       "--seed", "1", "--model", "Net1conv1fcXL", "--freeze_conv")
    torch.manual_seed(int(np.random.SeedSequence(1).spawn(2)[1].generate_state(3)[0]))
    initial = models.build_model("Net1conv1fcXL", (1, 28, 28), 10)
    saved = torch.load(folder / "weights_run0.pt", weights_only=True)["model"]
    assert torch.equal(saved["0.weight"], initial[0].weight)
    assert not torch.equal(saved["4.weight"], initial[4].weight)


def test_tutorial_model_on_cifar_shaped_data(tmp_path, cifar_dir):
    folder = run_torch(tmp_path, cifar_dir, "--dataset", "cif", "--model",
                       "NetFC1x1024DOcust_cif", "--batch_size", "64", "--train_epochs", "2",
                       "--seed", "0")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test"][0][-1] > 20  # percent; chance is 10


def test_same_seed_same_results(tmp_path, mnist_dir):
    def curve(name, seed):
        folder = run_torch(tmp_path, mnist_dir, "--dataset", "mn", "--model",
                           "NetFC1x1024DOcust", "--train_epochs", "2", "--seed", str(seed),
                           "--exp_name", name)
        saved = torch.load(folder / "weights_run0.pt", weights_only=True)
        return json.loads((folder / "metrics.json").read_text())["loss"], saved

    loss_a, saved_a = curve("a", 3)
    loss_b, saved_b = curve("b", 3)
    loss_c, saved_c = curve("c", 4)
    assert loss_a == loss_b and torch.equal(saved_a["B"], saved_b["B"])
    assert all(torch.equal(saved_a["model"][k], saved_b["model"][k]) for k in saved_a["model"])
    assert loss_a != loss_c and not torch.equal(saved_a["B"], saved_c["B"])


@pytest.mark.parametrize("flags,message", [
    (["--model", "Net1conv1fcXL_cif", "--dataset", "mn"], "takes 3x32x32"),
    (["--model", "Net1conv1fcXL", "--dataset", "cif"], "takes 1x28x28"),
    (["--model", "ResNet"], "invalid choice"),
    (["--learn_type", "FA"], "invalid choice"),
    (["--update_type", "rmsprop"], "invalid choice"),
    (["--is_fc"], "no effect"),
    (["--freeze_bn"], "no effect"),
    (["--check_cos_norm", "--model", "Net1conv1fcXL", "--dataset", "mn"], "NetFC"),
    (["--sqrt_conv", "--model", "NetFC1x1024DOcust", "--dataset", "mn"], "conv model"),
    (["--dropout", "-0.1"], "KEEP probability"),
    (["--train_epochs", "0"], "positive integer"),
    (["--decay_scheme", "3"], "invalid choice"),
])
def test_pytorch_bad_input(tmp_path, mnist_dir, cifar_dir, capsys, flags, message):
    data = cifar_dir if "cif" in flags else mnist_dir
    argv = ["--dataset", "mn", *flags, "--data_dir", str(data),
            "--results_dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        main_pytorch.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "r").exists()


def test_real_mnist_one_epoch_of_the_readme_command(tmp_path, real_mnist):
    folder = run_torch(tmp_path, real_mnist, *shorten(README_COMMAND, 1), "--seed", "0")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test"][0][0] >= 93.5


def test_real_cifar10_one_epoch_of_the_tutorial_net(tmp_path, real_cifar10):
    x_train, y_train, x_test, y_test = datasets.load_dataset("cif", str(real_cifar10),
                                                             "torchvision")
    assert x_train.shape == (50000, 32, 32, 3) and x_test.shape == (10000, 32, 32, 3)
    assert np.bincount(y_train.ravel()).tolist() == [5000] * 10
    assert np.bincount(y_test.ravel()).tolist() == [1000] * 10
    folder = run_torch(tmp_path, real_cifar10, "--model", "NetFC1x1024DOcust_cif",
                       "--dataset", "cif", "--batch_size", "64", "--train_epochs", "1",
                       "--n_samples", "2000", "--seed", "0")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["test"][0][0] > 15  # the 2000 training images again; chance is 10%
