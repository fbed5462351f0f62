"""The follow-up's rules (reference section 7) against small written-out references."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main_pytorch
import models
import pepita

SIZES = [12, 8, 6, 4]
BATCH = 5
KEEP = 0.8


def small_net(seed=0, keep=KEEP, normalize=None):
    """A fully connected net, a batch, its one-hot targets, a projection B and the
    generator of the masks."""
    model = models.fc_net(SIZES, keep, normalize, rng=np.random.default_rng(seed)).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, SIZES[0], generator=gen, dtype=torch.float64)
    t = F.one_hot(torch.arange(BATCH) % SIZES[-1], SIZES[-1]).double()
    B = 0.3 * torch.randn(SIZES[0], SIZES[-1], generator=gen, dtype=torch.float64)
    return model, x, t, B, gen


def masks_drawn(gen, passes=1):
    """The masks a rule draws from gen (as documented: per pass, per hidden layer in order,
    Bernoulli(keep) / keep), without touching gen."""
    copy = torch.Generator().set_state(gen.get_state())
    return [[(torch.rand(BATCH, n, generator=copy) < KEEP).double() / KEEP
             for n in SIZES[1:-1]] for _ in range(passes)]


def rule_of(model, B, gen, mode):
    return pepita.PEPITA(model, SIZES[-1], SIZES[0], B=B, generator=gen, mode=mode,
                         batch_size=BATCH)


def weights(model):
    return [layer.weight.detach().clone() for layer in models.weight_layers(model)]


def written_forward(W, x, masks):
    """[x, h_1, ..., h_{L-1}] and y: linear -> ReLU -> mask blocks, a softmax last."""
    hs = [x]
    for w, m in zip(W[:-1], masks):
        hs.append(torch.relu(hs[-1] @ w.T) * m)
    return hs, torch.softmax(hs[-1] @ W[-1].T, dim=1)


def written_gradients(mode, W, x, t, B, masks):
    """Section 7's dW of each mode, divided by the batch, written out layer by layer."""
    hs, y = written_forward(W, x, masks)
    e = y - t
    x_mod = x - e @ B.T
    hs_mod, y_mod = written_forward(W, x_mod, masks)
    grads = []
    for layer in range(len(W) - 1):
        h, h_mod = hs[layer + 1], hs_mod[layer + 1]
        prev, prev_mod = hs[layer], hs_mod[layer]
        grads.append({"modulated": (h - h_mod).T @ prev_mod, "forward": (h - h_mod).T @ prev,
                      "mixed": h.T @ prev - h_mod.T @ prev_mod}[mode])
    grads.append({"modulated": e.T @ hs_mod[-1], "forward": e.T @ hs[-1],
                  "mixed": y.T @ hs[-1] - t.T @ hs_mod[-1]}[mode])
    return [g / BATCH for g in grads]


@pytest.mark.parametrize("mode", ["modulated", "forward", "mixed"])
def test_mode_step_equals_the_written_rule(mode):
    model, x, t, B, gen = small_net()
    W = weights(model)
    (masks,) = masks_drawn(gen)
    optimizer = models.make_optimizer("SGD", "ERIN", list(model.parameters()), 0.1, 0, mode)
    rule_of(model, B, gen, mode).step(x, t.argmax(1), optimizer)
    for layer, w, g in zip(models.weight_layers(model), W,
                           written_gradients(mode, W, x, t, B, masks)):
        torch.testing.assert_close(layer.weight.detach(), w - 0.1 * g, rtol=1e-12, atol=1e-14)
        assert g.abs().max() > 0


def test_time_local_steps_twice_with_the_updated_weights_and_fresh_masks():
    model, x, t, B, gen = small_net()
    masks, masks_2 = masks_drawn(gen, passes=2)
    W = weights(model)
    optimizer = models.make_optimizer("SGD", "ERIN", list(model.parameters()), 0.1, 0,
                                      "time_local")
    rule = rule_of(model, B, gen, "time_local")
    with pytest.raises(ValueError, match="call step\\(x, y, optimizer\\)"):
        rule.step(x, t.argmax(1))
    with pytest.raises(ValueError, match="time_local's first half; this rule's mode is"):
        rule_of(model, B, gen, "modulated").clean_step(x, t.argmax(1), optimizer)
    rule.step(x, t.argmax(1), optimizer)
    hs, y = written_forward(W, x, masks)
    W_mid = [w - 0.1 * h.T @ prev / BATCH for w, h, prev in zip(W, [*hs[1:], y], hs)]
    x_mod = x - (y - t) @ B.T  # the FIRST pass's error
    hs_mod, _ = written_forward(W_mid, x_mod, masks_2)
    expected = [w + 0.1 * h.T @ prev / BATCH
                for w, h, prev in zip(W_mid, [*hs_mod[1:], t], hs_mod)]
    for layer, w in zip(models.weight_layers(model), expected):
        torch.testing.assert_close(layer.weight.detach(), w, rtol=1e-12, atol=1e-14)


def test_mixed_differs_from_modulated():
    after = {}
    for mode in ("modulated", "mixed"):
        model, x, t, B, gen = small_net()
        optimizer = models.make_optimizer("SGD", "ERIN", list(model.parameters()), 0.1, 0,
                                          mode)
        rule_of(model, B, gen, mode).step(x, t.argmax(1), optimizer)
        after[mode] = weights(model)
    assert all((a - b).abs().max() > 1e-6 for a, b in zip(after["modulated"], after["mixed"]))


def test_weight_decay_in_both_momentum_forms():
    """torch's SGD (follow-up modes): v = 0.9 v + g + wd W, W -= lr v; the published form:
    V = 0.9 V + lr (g + wd W), W -= V. Two steps each, against the formulas."""
    for mode in ("modulated", "published"):
        w = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
        optimizer = models.make_optimizer("mom", "ERIN", [w], 0.5, 0.1, mode)
        w_ref, v_ref = w.detach().clone(), torch.zeros(2, 3, dtype=torch.float64)
        for step in range(2):
            delta = torch.full((4, 2), 0.25 * (step + 1), dtype=torch.float64)
            inputs = torch.ones(4, 3, dtype=torch.float64)
            g = delta.T @ inputs + 0.1 * w_ref
            if mode == "published":
                v_ref = 0.9 * v_ref + 0.5 * g
                w_ref = w_ref - v_ref
            else:
                v_ref = 0.9 * v_ref + g if step else g
                w_ref = w_ref - 0.5 * v_ref
            pepita.apply_updates([(w, [(delta, inputs)])], optimizer)
        torch.testing.assert_close(w.detach(), w_ref, rtol=1e-12, atol=1e-14)


def test_normal_feedback_has_the_intended_std():
    sizes = [784, 1024, 1024, 10]
    feedback = models.normal_feedback(torch.Generator().manual_seed(0), sizes, 0.05)
    sd = models.feedback_sd(784, 0.05)
    assert feedback.B.shape == (784, 10) and len(feedback.matrices) == 3
    assert float(feedback.B.std()) == pytest.approx(sd, rel=0.1)


def test_mirroring_equals_the_written_rule_and_keeps_std_of_F():
    model = small_net(normalize="batch")[0].float()
    gen = torch.Generator().manual_seed(3)
    feedback = models.normal_feedback(gen, SIZES, 0.05)
    before = [B.clone() for B in feedback.matrices]
    sd, lr, wd, keep = models.feedback_sd(SIZES[0], 0.05), 0.5, 0.01, 0.8
    state = gen.get_state()
    models.mirror_feedback(model, feedback, gen, 16, keep, lr, wd, sd)
    gen.set_state(state)  # the same noise and masks, drawn in the same order
    expected = []
    W = weights(model)
    for layer, B in enumerate(before):
        xi = 0.1 * torch.randn(16, B.shape[0], generator=gen)
        xi = xi - xi.mean()
        a = xi @ W[layer].T
        if layer < len(W) - 1:
            mask = (torch.rand(16, B.shape[1], generator=gen) < keep).float() / keep
            y = torch.relu(a) * mask
            y = y / y.norm()
        else:
            y = torch.softmax(a, dim=1)
        expected.append(B + lr * xi.T @ y / 16 - lr * wd * B)
    product = expected[0] @ expected[1] @ expected[2]
    scale = (sd / float(product.std())) ** (1 / 3)
    for B, B_ref in zip(feedback.matrices, expected):
        torch.testing.assert_close(B, B_ref * scale, rtol=1e-5, atol=1e-7)
    assert float(feedback.B.std()) == pytest.approx(sd, rel=1e-5)
    assert any((B - b).abs().max() > 0 for B, b in zip(feedback.matrices, before))


def test_mirroring_aligns_each_B_with_its_W_transposed():
    torch.manual_seed(0)
    model = models.fc_net([30, 20, 10], rng=np.random.default_rng(0))
    gen = torch.Generator().manual_seed(0)
    feedback = models.normal_feedback(gen, models.layer_sizes(model), 0.05)
    start = models.alignment(model, feedback)["angle_layers"]
    for _ in range(300):  # the default settings of --mirror
        models.mirror_feedback(model, feedback, gen, 64, 1.0, 0.1, 0.5,
                               models.feedback_sd(30, 0.05))
    end = models.alignment(model, feedback)["angle_layers"]
    assert all(a > 75 for a in start) and all(b < a - 10 for a, b in zip(start, end)), \
        (start, end)


@pytest.mark.parametrize("how", ["batch", "sample"])
def test_normalization(how):
    h = torch.rand(6, 5) + 0.1
    normalize = pepita.Normalize(how)
    out = normalize(h)
    if how == "batch":
        assert float(out.norm()) == pytest.approx(1.0)
    else:
        torch.testing.assert_close(out.norm(dim=1), torch.ones(6))
        torch.testing.assert_close(normalize(h[:2]), out[:2])  # batch-free
    assert torch.equal(normalize(torch.zeros(2, 5)), torch.zeros(2, 5))


def run_torch(tmp_path, data_dir, *flags):
    argv = ["--dataset", "mn", "--model", "NetFC", "--fc_hidden", "32", "32", "--seed", "2",
            *flags, "--data_dir", str(data_dir), "--results_dir", str(tmp_path)]
    assert main_pytorch.main(argv) == 0
    return max((p for p in tmp_path.glob("res_*") if p.is_dir()),
               key=lambda p: p.stat().st_mtime_ns)


MIRRORED = ["--feedback", "normal", "--mirror", "--pre_mirror", "1", "--mirror_every", "2",
            "--pepita_mode", "modulated", "--weight_decay", "1e-4", "--normalize", "sample",
            "--train_epochs", "4"]


def test_resume_with_mirroring_is_bit_identical(tmp_path, mnist_dir, monkeypatch):
    straight = run_torch(tmp_path / "straight", mnist_dir, *MIRRORED)
    calls = []
    real = main_pytorch.train_epoch

    def killed_in_epoch_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(main_pytorch, "train_epoch", killed_in_epoch_4)
    with pytest.raises(SystemExit):
        run_torch(tmp_path / "killed", mnist_dir, *MIRRORED)
    monkeypatch.setattr(main_pytorch, "train_epoch", real)
    killed = run_torch(tmp_path / "killed", mnist_dir, *MIRRORED, "--resume")
    a, b = (torch.load(f / "weights_run0.pt", weights_only=True) for f in (straight, killed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(p, q) for p, q in zip(a["B_layers"], b["B_layers"]))
    metrics_a, metrics_b = (json.loads((f / "metrics.json").read_text())
                            for f in (straight, killed))
    assert metrics_a["alignment"] == metrics_b["alignment"]
    assert metrics_a["test"] == metrics_b["test"]


def test_alignment_is_logged_per_epoch_and_plotted(tmp_path, mnist_dir):
    folder = run_torch(tmp_path, mnist_dir, *MIRRORED[:-1], "3")
    metrics = json.loads((folder / "metrics.json").read_text())
    logs = metrics["alignment"][0]
    assert len(logs) == 4  # before training and after each epoch
    assert len(logs[0]["angle_layers"]) == 3 and len(logs[0]["B_std"]) == 3
    assert all(0 < e["angle_F"] < 180 and min(e["weight_norms"]) > 0 for e in logs)
    assert logs[1]["weight_norms"] == logs[0]["weight_norms"]  # epoch 1: mirroring only
    assert logs[1]["B_mean"] != logs[0]["B_mean"]
    assert (folder / "alignment.png").stat().st_size > 1000
    assert folder.name.endswith("_modulated_fbnormal_mirror_wd0.0001_normsample")


@pytest.mark.parametrize("flags,words", [
    (["--mirror", "--feedback", "normal", "--model", "Net1conv1fcXL"], "fully connected"),
    (["--mirror"], "--feedback normal"),
    (["--mirror", "--feedback", "normal"], "--pepita_mode modulated"),
    (["--feedback", "normal", "--mirror", "--learn_type", "BP"], "--learn_type ERIN"),
    (["--pepita_mode", "mixed", "--learn_type", "BP"], "--learn_type ERIN"),
    (["--mirror_lr", "0.1"], "add --mirror"),
    (["--mirror", "--feedback", "normal", "--pepita_mode", "mixed", "--mirror_every", "0"],
     "positive"),
    (["--fc_hidden", "10", "--model", "NetFC1x1024DOcust"], "fixed layers"),
    (["--normalize", "batch", "--model", "Net1conv1fcXL"], "fully connected"),
])
def test_followup_flags_that_make_no_sense_exit_2(tmp_path, mnist_dir, capsys, flags, words):
    argv = ["--dataset", "mn", "--model", "NetFC", *flags, "--data_dir", str(mnist_dir),
            "--results_dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        main_pytorch.main(argv)
    assert exit_info.value.code == 2 and words in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "r").exists()


def loop_args(**changes):
    settings = dict(learn_type="ERIN", batch_size=BATCH, dropout=0.8, mirror=False,
                    pre_mirror=2, mirror_every=1, mirror_lr=0.1, mirror_wd=0.5,
                    pepita_mode="time_local", followup_loop=True, sqrt_conv=False, eta=0.1,
                    Bstd=0.05)
    settings.update(changes)
    return SimpleNamespace(**settings)


class Progress:
    def update(self, n):
        pass


def run_epoch(args, model, x, y, epoch=0):
    """main_pytorch.train_epoch on (x, y) with SGD at lr 0.1 and a fixed B."""
    _, _, _, B, _ = small_net()
    optimizer = models.make_optimizer("SGD", "ERIN", list(model.parameters()), 0.1, 0,
                                      args.pepita_mode)
    rule = rule_of(model, B, torch.Generator().manual_seed(1), args.pepita_mode)
    return main_pytorch.train_epoch(args, model, rule, optimizer, models.Feedback([B]),
                                    (x, y), torch.Generator().manual_seed(0), epoch,
                                    Progress(), "test")


@pytest.mark.parametrize("followup_loop, sizes", [(True, [BATCH, BATCH]),
                                                  (False, [BATCH, BATCH, 2])])
def test_followup_loop_drops_the_last_partial_batch(monkeypatch, followup_loop, sizes):
    seen = []
    step = pepita.PEPITA.step
    monkeypatch.setattr(pepita.PEPITA, "step",
                        lambda rule, x, *rest: seen.append(len(x)) or step(rule, x, *rest))
    model = small_net()[0]
    x = torch.rand(2 * BATCH + 2, SIZES[0], dtype=torch.float64)
    run_epoch(loop_args(followup_loop=followup_loop, pepita_mode="modulated"), model, x,
              torch.arange(len(x)) % SIZES[-1])
    assert seen == sizes


def test_followup_loop_decays_one_epoch_later():
    """Their scheduler steps at the end of epochs 60 and 90 (from 0): the new rate first
    applies in epochs 61 and 91; ours from 60 and 90."""
    def decays(scheme, code, followup_loop):
        args = SimpleNamespace(eta_decay=True, decay_scheme=scheme, followup_loop=followup_loop)
        return main_pytorch.decay_epochs(args, code)

    assert decays(2, "mn", True) == (61, 91) and decays(2, "cif", True) == (61, 91)
    assert decays(2, "mn", False) == (60, 90)
    assert decays(0, "mn", False) == (60,) and decays(0, "cif", True) == (61, 91)
    assert decays(1, "cif", True) == (11, 31, 61)


@pytest.mark.parametrize("followup_loop", [True, False])
def test_time_local_pre_mirror_epochs_take_the_clean_step_with_the_followup_loop(
        monkeypatch, followup_loop):
    monkeypatch.setattr(models, "mirror_feedback", lambda *args, **kwargs: None)
    model, x, t, _, _ = small_net(keep=1.0)
    W = weights(model)
    args = loop_args(mirror=True, dropout=1.0, followup_loop=followup_loop)
    run_epoch(args, model, x, t.argmax(1), epoch=0)  # epoch 0 < pre_mirror 2
    hs, y = written_forward(W, x, [torch.ones(BATCH, n, dtype=torch.float64)
                                   for n in SIZES[1:-1]])
    expected = ([w - 0.1 * h.T @ prev / BATCH for w, h, prev in zip(W, [*hs[1:], y], hs)]
                if followup_loop else W)
    for layer, w in zip(models.weight_layers(model), expected):
        torch.testing.assert_close(layer.weight.detach(), w, rtol=1e-12, atol=1e-14)
