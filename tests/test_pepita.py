"""pepita.PEPITA: the update against by-hand per-sample computations, with any optimizer,
without autograd, compiled, and its refusals (the paper's nets through it: test_pytorch.py,
the follow-up's modes: test_followup.py)."""
import itertools

import pytest
import torch
from torch import nn

import models
import pepita

torch.set_num_threads(1)


def softmax_error(logits, y, n_classes):
    return torch.softmax(logits, dim=1) - torch.eye(n_classes, dtype=logits.dtype)[y]


# ------------------------------------------------------------------------------------------
# By hand: one sample at a time, float64
# ------------------------------------------------------------------------------------------
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.ReLU(),
                         nn.Linear(4, 3)).double()


def by_hand_mlp(model, B, x, y):
    """g per layer, summed sample by sample: hidden (h - h') a'^T, last e' a'^T; biases
    with an input of one."""
    W1, b1, W2, W3, b3 = (p.detach() for p in model.parameters())
    grads = [torch.zeros_like(p) for p in (W1, b1, W2, W3, b3)]

    def forward(v):
        h1 = torch.tanh(W1 @ v + b1)
        h2 = torch.relu(W2 @ h1)
        return h1, h2, W3 @ h2 + b3

    for v, label in zip(x, y):
        h1, h2, out = forward(v)
        e = softmax_error(out[None], label[None], 3)[0]
        v_mod = v + B @ e
        h1m, h2m, out_m = forward(v_mod)
        e_mod = softmax_error(out_m[None], label[None], 3)[0]
        for grad, value in zip(grads, [torch.outer(h1 - h1m, v_mod), h1 - h1m,
                                       torch.outer(h2 - h2m, h1m), torch.outer(e_mod, h2m),
                                       e_mod]):
            grad += value / len(x)
    return grads


def test_an_mlp_update_equals_the_by_hand_one():
    model = mlp()
    rule = pepita.PEPITA(model, n_classes=3, input_shape=(6,), seed=0)
    x = torch.randn(7, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    before = [p.detach().clone() for p in model.parameters()]
    rule.step(x, y)
    expected = by_hand_mlp(model, rule.B, x, y)
    for param, want, old in zip(model.parameters(), expected, before):
        torch.testing.assert_close(param.grad, want, rtol=1e-12, atol=1e-14)
        assert torch.equal(param.detach(), old)  # step changes no weight


def convnet():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 4)).double()


def by_hand_conv(model, B, x, y, published=False):
    """The conv layer's g by explicit loops over samples, output positions and kernel
    entries: sum of (h - h')[o, position] * x'[i, patch] / batch (published: negated and
    divided again by the positions and the batch size); the last layer takes e'."""
    conv, fc = model[0], model[4]
    W, b = conv.weight.detach(), conv.bias.detach()
    n, (c_out, _, k, _) = len(x), W.shape
    side = x.shape[-1]

    def conv_relu(v):  # padding 1, stride 1, by loops
        padded = torch.nn.functional.pad(v, (1, 1, 1, 1))
        out = torch.zeros(c_out, side, side, dtype=v.dtype)
        for o, r, c in itertools.product(range(c_out), range(side), range(side)):
            out[o, r, c] = (W[o] * padded[:, r:r + k, c:c + k]).sum() + b[o]
        return out.relu(), padded

    g_w, g_b = torch.zeros_like(W), torch.zeros_like(b)
    g_fc, g_fc_b = torch.zeros_like(fc.weight), torch.zeros_like(fc.bias)
    for v, label in zip(x, y):
        h, _ = conv_relu(v)
        features = torch.nn.functional.avg_pool2d(h[None], 2).flatten()
        e = softmax_error(fc(features[None]).detach(), label[None], 4)[0]
        v_mod = v + (B @ e).view_as(v)
        h_mod, padded_mod = conv_relu(v_mod)
        features_mod = torch.nn.functional.avg_pool2d(h_mod[None], 2).flatten()
        e_mod = softmax_error(fc(features_mod[None]).detach(), label[None], 4)[0]
        for o, r, c in itertools.product(range(c_out), range(side), range(side)):
            d = h[o, r, c] - h_mod[o, r, c]
            g_w[o] += d * padded_mod[:, r:r + k, c:c + k]
            g_b[o] += d
        g_fc += torch.outer(e_mod, features_mod)
        g_fc_b += e_mod
    scale = -1 / (n * n * side * side) if published else 1 / n
    return [g_w * scale, g_b * scale, g_fc / n, g_fc_b / n]


@pytest.mark.parametrize("published", [False, True])
def test_a_conv_net_update_equals_the_by_hand_one(published):
    model = convnet()
    rule = pepita.PEPITA(model, n_classes=4, input_shape=(2, 4, 4), seed=3,
                         conv_update="published" if published else "rule")
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([3, 0, 1])
    rule.step(x, y)
    for param, want in zip(model.parameters(), by_hand_conv(model, rule.B, x, y, published)):
        torch.testing.assert_close(param.grad, want, rtol=1e-10, atol=1e-13)


def test_the_conv_rule_is_conv2d_weight_of_the_modulated_input_and_the_difference():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3, bias=False))
    rule = pepita.PEPITA(model, 3, (1, 6, 6), seed=0)
    x, y = torch.rand(5, 1, 6, 6), torch.tensor([0, 1, 2, 1, 0])
    masks = rule.draw_masks(len(x))
    logits, inputs, outputs = rule.forward(x, masks)
    e = torch.softmax(logits, 1) - torch.eye(3)[y]
    x_mod = x + (e @ rule.B.T).view_as(x)
    _, _, outputs_mod = rule.forward(x_mod, masks)
    rule.step(x, y)
    want = torch.nn.grad.conv2d_weight(x_mod, model[0].weight.shape,
                                       outputs[0] - outputs_mod[0]) / len(x)
    torch.testing.assert_close(model[0].weight.grad, want)


# ------------------------------------------------------------------------------------------
# Use: any optimizer, no autograd, reproducible, compiled, refusals
# ------------------------------------------------------------------------------------------
def blobs(n=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 1, 6, 6, generator=gen) * 2
    y = torch.randint(0, 4, (n,), generator=gen)
    return centres[y] + torch.randn(n, 1, 6, 6, generator=gen) * 0.5, y


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    lambda p: torch.optim.Adam(p, lr=5e-3),
    lambda p: torch.optim.RMSprop(p, lr=2e-3),
])
def test_any_torch_optimizer_trains_a_small_cnn(make_optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Dropout(0.1),
                          nn.Linear(16, 4))
    rule = pepita.PEPITA(model, 4, (1, 6, 6), seed=0)
    optimizer = make_optimizer(model.parameters())
    x, y = blobs()
    accuracy = lambda: float((model(x).argmax(1) == y).float().mean())  # noqa: E731
    before = accuracy()
    for _ in range(5):
        for start in range(0, len(x), 32):
            optimizer.zero_grad()
            rule.step(x[start:start + 32], y[start:start + 32])
            optimizer.step()
    model.eval()
    assert accuracy() > max(0.8, before + 0.3)


def test_a_step_through_an_optimizer_equals_grad_then_its_step():
    """step(x, y, optimizer): .grad then optimizer.step() for torch's optimizers, and the
    factor pairs into an optimizer with step_factors (the published momentum: its first
    step is SGD's), for weights and biases, a linear and a conv layer."""
    x, y = torch.rand(5, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    results = []
    for how in ("grad", "through", "factors"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3),
                              nn.Tanh()).double()
        start = model[0].weight.detach().clone()
        rule = pepita.PEPITA(model, 3, (2, 6, 6), seed=0)
        optimizer = (models.PublishedMomentum(model.parameters(), lr=0.1) if how == "factors"
                     else torch.optim.SGD(model.parameters(), lr=0.1))
        if how == "grad":
            rule.step(x, y)
            optimizer.step()
        else:
            rule.step(x, y, optimizer)
        results.append([p.detach().clone() for p in model.parameters()])
    assert not torch.equal(results[0][0], start)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_no_backward_pass_runs_through_the_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("autograd's backward was called")
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    model = mlp()
    logits = pepita.PEPITA(model, 3, (6,), seed=0).step(torch.randn(4, 6).double(),
                                                        torch.tensor([0, 1, 2, 0]))
    assert logits.grad_fn is None and all(p.grad is not None for p in model.parameters())


def test_one_seed_gives_the_same_projection_masks_and_updates_run_twice():
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        rule = pepita.PEPITA(model, 3, (6,), seed=11)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            optimizer.zero_grad()
            rule.step(torch.ones(4, 6) * step, torch.tensor([0, 1, 2, 0]))
            optimizer.step()
        return rule.B, [p.detach() for p in model.parameters()]
    (B1, w1), (B2, w2) = run(), run()
    assert torch.equal(B1, B2) and all(torch.equal(a, b) for a, b in zip(w1, w2))
    limit = (6 / 6) ** 0.5 * 0.05
    assert B1.shape == (6, 3) and float(B1.abs().max()) <= limit


def test_the_compiled_step_gives_the_eager_update():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    rule = pepita.PEPITA(model, 3, (3, 4), seed=0)
    x, y = torch.rand(6, 3, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    eager = rule.compute(x, y, {})
    compiled = torch.compile(rule.compute, fullgraph=True, backend="aot_eager")(x, y, {})
    torch.testing.assert_close(compiled[0], eager[0])
    for (p1, g1), (p2, g2) in zip(eager[1], compiled[1]):
        assert p1 is p2
        torch.testing.assert_close(g1, g2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_on_cuda_the_update_equals_the_cpu_one():
    model = mlp()
    rule = pepita.PEPITA(model, 3, (6,), B=torch.rand(6, 3, dtype=torch.float64) * 0.1)
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    rule.step(x, y)
    cuda_model = mlp().cuda()
    pepita.PEPITA(cuda_model, 3, (6,), B=rule.B.cuda()).step(x.cuda(), y.cuda())
    for a, b in zip(model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad.cpu())


class WithSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


@pytest.mark.parametrize("model,words", [
    (nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)), "layer 1 (1: LSTM)"),
    (nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.MultiheadAttention(4, 1))),
     "layer 2 (1.1: MultiheadAttention)"),
    (nn.Sequential(nn.Flatten(), WithSkip()), "layer 1 (1: WithSkip)"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "layer 1 (1: BatchNorm1d)"),
    (WithSkip(), "got WithSkip"),
])
def test_a_model_it_cannot_train_is_refused_naming_the_layer(model, words):
    with pytest.raises(TypeError, match="pepita.PEPITA") as err:
        pepita.PEPITA(model, 4, (4,))
    assert words in str(err.value)


def test_wrong_shapes_and_labels_are_refused_naming_what_was_expected():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match=r"input_shape \(5,\) does not fit layer 1"):
        pepita.PEPITA(model, 3, (5,))
    with pytest.raises(ValueError, match=r"expected \(4,\) logits"):
        pepita.PEPITA(model, 4, (3, 4))
    with pytest.raises(ValueError, match=r"expected \(12, 3\)"):
        pepita.PEPITA(model, 3, (3, 4), B=torch.zeros(10, 3))
    rule = pepita.PEPITA(model, 3, (3, 4), seed=0)
    with pytest.raises(ValueError, match=r"expected \(batch, 3, 4\)"):
        rule.step(torch.rand(2, 12), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels from 0 to 3; expected 0..2"):
        rule.step(torch.rand(2, 3, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer class indices"):
        rule.step(torch.rand(2, 3, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="mode='published'"):
        pepita.PEPITA(model, 3, (3, 4), mode="forward", last_error="first")
