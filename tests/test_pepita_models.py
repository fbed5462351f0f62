"""pepita.PEPITA on every kind of model a user may give it: each one trained exactly (its .grad
against a by-hand computation, one sample at a time in float64, written here) or refused in
one line at construction or at the first step; its state; its own package."""
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

import pepita

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# The by-hand rule: one sample at a time, every layer written out, the places in run order
# ------------------------------------------------------------------------------------------
def conv_by_loops(conv, v, padding):
    """One sample through conv by explicit loops over output positions (stride 1, no
    dilation), v padded by F.pad's (left, right, top, bottom) amounts in conv's mode."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(v[None], padding, mode=mode)[0]
    W = conv.weight.detach()
    k_h, k_w = W.shape[2:]
    rows, cols = padded.shape[1] - k_h + 1, padded.shape[2] - k_w + 1
    out = torch.zeros(len(W), rows, cols, dtype=v.dtype)
    for o in range(len(W)):
        for r in range(rows):
            for c in range(cols):
                out[o, r, c] = (W[o] * padded[:, r:r + k_h, c:c + k_w]).sum()
    if conv.bias is not None:
        out += conv.bias.detach()[:, None, None]
    return out, padded


def conv_update_by_loops(conv, delta, padded):
    """sum over positions of delta[o, r, c] * the patch of the padded input at (r, c)."""
    k_h, k_w = conv.weight.shape[2:]
    g = torch.zeros_like(conv.weight)
    for o in range(delta.shape[0]):
        for r in range(delta.shape[1]):
            for c in range(delta.shape[2]):
                g[o] += delta[o, r, c] * padded[:, r:r + k_h, c:c + k_w]
    return g


RESHAPING_OR_WEIGHTED = (nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)


def sample_pass(places, v, masks, paddings):
    """One sample v through the modules in places: per weight place its input (padded, for a
    conv) and h (its output after the element-wise modules right after it), and the logits."""
    inputs, hs, last_weighted = {}, {}, None
    for i, m in enumerate(places):
        if isinstance(m, nn.Linear):
            inputs[i] = v
            v = v @ m.weight.detach().T + (0 if m.bias is None else m.bias.detach())
        elif isinstance(m, nn.Conv2d):
            v, inputs[i] = conv_by_loops(m, v, paddings[i])
        elif isinstance(m, nn.Dropout):
            v = v * masks[i] if i in masks else v
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, pepita.Normalize)):
            v = m(v[None])[0]
        else:  # an element-wise activation, on a copy (it may be in-place)
            v = m(v.clone())
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last_weighted = i
        if last_weighted is not None and not any(isinstance(p, RESHAPING_OR_WEIGHTED)
                                                 for p in places[last_weighted + 1:i + 1]):
            hs[last_weighted] = v
    return inputs, hs, v


def by_hand(places, B, x, y, n_classes, masks=None, paddings=None):
    """Each parameter's g (keyed by the parameter), the published rule, summed over the
    samples and over a module's places, and the logits. Hidden: (h - h') (x) a', last:
    e' (x) a' with e' reshaped to the layer's output; biases with an input of one."""
    masks, paddings = masks or {}, paddings or {}
    weighted = [i for i, m in enumerate(places) if isinstance(m, (nn.Linear, nn.Conv2d))]
    grads, logits = {}, []
    for s, (v, label) in enumerate(zip(x, y)):
        sample_masks = {i: mask[s] for i, mask in masks.items()}
        _, hs, out = sample_pass(places, v, sample_masks, paddings)
        e = torch.softmax(out, 0) - F.one_hot(label, n_classes).to(out.dtype)
        inputs_mod, hs_mod, out_mod = sample_pass(places, v + (B @ e).view_as(v),
                                                  sample_masks, paddings)
        e_mod = torch.softmax(out_mod, 0) - F.one_hot(label, n_classes).to(out.dtype)
        logits.append(out)
        for i in weighted:
            layer, a = places[i], inputs_mod[i]
            delta = e_mod.view_as(hs[i]) if i == weighted[-1] else hs[i] - hs_mod[i]
            if isinstance(layer, nn.Conv2d):
                g_w, g_b = conv_update_by_loops(layer, delta, a), delta.sum((1, 2))
            else:  # a Linear on the last axis: one outer product per row
                rows_d, rows_a = delta.reshape(-1, delta.shape[-1]), a.reshape(-1, a.shape[-1])
                g_w = sum(torch.outer(d, r) for d, r in zip(rows_d, rows_a))
                g_b = rows_d.sum(0)
            for param, g in ((layer.weight, g_w), (layer.bias, g_b)):
                if param is not None:
                    grads[param] = grads.get(param, 0) + g / len(x)
    return grads, torch.stack(logits)


def assert_exact(model, places, input_shape, n_classes=3, batch=4, paddings=None,
                 dropout_masks=None, **options):
    """One step's .grad equals the by-hand rule for every parameter, its logits equal the
    by-hand ones, and, with no dropout drawing, model(x)'s."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, n_classes, (batch,), generator=gen)
    rule = pepita.PEPITA(model, n_classes, input_shape, Bstd=1.0, seed=1, **options)
    masks = dropout_masks(rule, batch) if dropout_masks else None
    logits = rule.step(x, y)
    want, want_logits = by_hand(places, rule.B, x, y, n_classes, masks, paddings)
    torch.testing.assert_close(logits, want_logits, rtol=1e-10, atol=1e-12)
    if not masks:
        torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
    params = list(model.parameters())
    assert set(want) == set(params)
    for param in params:
        torch.testing.assert_close(param.grad, want[param], rtol=1e-9, atol=1e-12)
    return rule


def seeded(make):
    torch.manual_seed(0)
    return make().double()


# ------------------------------------------------------------------------------------------
# Trained exactly
# ------------------------------------------------------------------------------------------
INPLACE = [lambda: nn.ReLU(inplace=True), lambda: nn.LeakyReLU(0.1, inplace=True),
           lambda: nn.ELU(inplace=True), lambda: nn.SiLU(inplace=True),
           lambda: nn.Hardtanh(-0.5, 0.5, inplace=True)]


@pytest.mark.parametrize("activation", INPLACE)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("flatten", [True, False])
def test_an_inplace_activation_after_the_first_linear_layer(activation, bias, flatten):
    first, act, last = seeded(lambda: nn.Linear(6, 5, bias=bias)), activation(), \
        seeded(lambda: nn.Linear(5, 3))
    places = [nn.Flatten()] * flatten + [first, act, last, activation()]
    model = nn.Sequential(*places)
    assert_exact(model, places, (2, 3) if flatten else (6,))


def test_an_inplace_activation_that_starts_the_model_leaves_x_alone():
    places = [nn.ReLU(inplace=True), seeded(lambda: nn.Linear(4, 3))]
    model = nn.Sequential(*places)
    x = torch.randn(5, 4, dtype=torch.float64)
    kept = x.clone()
    pepita.PEPITA(model, 3, 4, seed=0).step(x, torch.zeros(5, dtype=torch.long))
    assert torch.equal(x, kept)
    model.zero_grad()
    assert_exact(model, places, (4,))


def test_one_activation_object_at_two_places():
    relu = nn.Tanh()
    places = [seeded(lambda: nn.Linear(6, 5)), relu, seeded(lambda: nn.Linear(5, 4)), relu,
              seeded(lambda: nn.Linear(4, 3))]
    assert_exact(nn.Sequential(*places), places, (6,))


def test_tied_weights_take_the_sum_of_their_places_updates():
    shared = seeded(lambda: nn.Linear(5, 5))
    places = [seeded(lambda: nn.Linear(6, 5)), nn.Tanh(), shared, nn.Tanh(), shared, nn.ReLU(),
              seeded(lambda: nn.Linear(5, 3))]
    assert_exact(nn.Sequential(*places), places, (6,))


def test_tied_weights_in_the_last_layer_and_in_nested_sequentials():
    shared = seeded(lambda: nn.Linear(3, 3))
    block = nn.Sequential(shared, nn.Sigmoid())
    places = [seeded(lambda: nn.Linear(4, 3)), shared, nn.Sigmoid(), shared]
    model = nn.Sequential(places[0], block, shared)
    assert_exact(model, places, (4,))


CONV_CASES = {  # name: (Conv2d keyword arguments, F.pad's amounts for a 3x3 or 4x4 kernel)
    "zeros": (dict(kernel_size=3, padding=1), (1, 1, 1, 1)),
    "reflect": (dict(kernel_size=3, padding=1, padding_mode="reflect"), (1, 1, 1, 1)),
    "replicate": (dict(kernel_size=3, padding=(1, 2), padding_mode="replicate"), (2, 2, 1, 1)),
    "circular": (dict(kernel_size=3, padding=1, padding_mode="circular"), (1, 1, 1, 1)),
    "same": (dict(kernel_size=3, padding="same"), (1, 1, 1, 1)),
    "same, even kernel": (dict(kernel_size=4, padding="same"), (1, 2, 1, 2)),
    "same, reflect": (dict(kernel_size=4, padding="same", padding_mode="reflect"), (1, 2, 1, 2)),
    "valid": (dict(kernel_size=3, padding="valid"), (0, 0, 0, 0)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("conv_update", ["rule", "published"])
def test_every_conv_padding_and_padding_mode(case, conv_update):
    kwargs, padding = CONV_CASES[case]
    conv = seeded(lambda: nn.Conv2d(2, 3, **kwargs))
    maps = conv_by_loops(conv, torch.zeros(2, 5, 5, dtype=torch.float64), padding)[0]
    places = [conv, nn.ReLU(), nn.Flatten(), seeded(lambda: nn.Linear(maps.numel(), 4))]
    model = nn.Sequential(*places)
    if conv_update == "published":  # the published form: minus, / (positions * batch) again
        rule = pepita.PEPITA(model, 4, (2, 5, 5), Bstd=1.0, seed=1, conv_update="published")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 2, 5, 5, generator=gen, dtype=torch.float64)
        y = torch.tensor([0, 3, 1])
        rule.step(x, y)
        want, _ = by_hand(places, rule.B, x, y, 4, paddings={0: padding})
        scale = -1 / (3 * maps[0].numel())
        torch.testing.assert_close(conv.weight.grad, want[conv.weight] * scale)
        torch.testing.assert_close(conv.bias.grad, want[conv.bias] * scale)
        return
    assert_exact(model, places, (2, 5, 5), n_classes=4, batch=3, paddings={0: padding})


def test_a_conv_layer_last_with_flatten_as_the_classifier():
    conv = seeded(lambda: nn.Conv2d(2, 3, 3, padding=1))
    places = [seeded(lambda: nn.Conv2d(1, 2, 3)), nn.ReLU(), conv, nn.Flatten()]
    model = nn.Sequential(*places)
    assert_exact(model, places, (1, 3, 3), n_classes=3, paddings={0: (0, 0, 0, 0),
                                                                   2: (1, 1, 1, 1)})


def test_a_first_linear_on_the_last_axis_of_each_sample():
    places = [seeded(lambda: nn.Linear(4, 5)), nn.ReLU(), nn.Flatten(),
              seeded(lambda: nn.Linear(15, 3))]
    assert_exact(nn.Sequential(*places), places, (3, 4))


def test_a_last_linear_on_the_last_axis_then_flatten():
    places = [seeded(lambda: nn.Linear(4, 5)), nn.Tanh(), seeded(lambda: nn.Linear(5, 2)),
              nn.Flatten()]
    assert_exact(nn.Sequential(*places), places, (3, 4), n_classes=6)


def draw_like_the_docs(rule, n):
    """The documented masks: Bernoulli(1 - p) / (1 - p) per sample, one uniform draw from
    the rule's generator per Dropout in training mode, in run order."""
    gen = torch.Generator().set_state(rule.generator.get_state())
    masks = {}
    for i, m in enumerate(rule.layers):
        if isinstance(m, nn.Dropout) and m.training and 0 < m.p < 1:
            u = torch.rand(n, *rule.mask_shapes[i], generator=gen)
            masks[i] = (u < 1 - m.p).double() / (1 - m.p)
        elif isinstance(m, nn.Dropout) and m.training and m.p == 1:
            masks[i] = torch.zeros(n, *rule.mask_shapes[i], dtype=torch.float64)
    return masks


def test_each_dropout_follows_its_own_mode():
    off = nn.Dropout(0.5).eval()
    places = [seeded(lambda: nn.Linear(6, 8)), nn.ReLU(), off, seeded(lambda: nn.Linear(8, 8)),
              nn.ReLU(), nn.Dropout(0.5), seeded(lambda: nn.Linear(8, 3))]
    model = nn.Sequential(*places)
    assert model.training and not off.training
    rule = assert_exact(model, places, (6,), dropout_masks=draw_like_the_docs)
    assert set(rule.draw_masks(2)) == {5}


def test_dropout_of_one_gives_zeros_as_torch_does():
    places = [seeded(lambda: nn.Linear(6, 8)), nn.ReLU(), nn.Dropout(1.0),
              seeded(lambda: nn.Linear(8, 3))]
    model = nn.Sequential(*places)
    rule = assert_exact(model, places, (6,), dropout_masks=draw_like_the_docs)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.equal(rule.draw_masks(2)[2], torch.zeros(2, 8, dtype=torch.float64))


def test_the_followups_normalization_per_sample_belongs_to_the_layers_h():
    places = [seeded(lambda: nn.Linear(6, 5)), nn.ReLU(), pepita.Normalize("sample"),
              seeded(lambda: nn.Linear(5, 3))]
    assert_exact(nn.Sequential(*places), places, (6,))


def test_the_followups_normalization_over_the_batch_gives_model_x():
    model = nn.Sequential(seeded(lambda: nn.Linear(6, 5)), nn.ReLU(), pepita.Normalize("batch"),
                          seeded(lambda: nn.Linear(5, 3)))
    x = torch.randn(4, 6, dtype=torch.float64)
    rule = pepita.PEPITA(model, 3, 6, seed=0)
    assert rule.read_at == {0: 2, 3: 3}
    torch.testing.assert_close(rule.step(x, torch.tensor([0, 1, 2, 0])), model(x))


def test_a_model_moved_to_another_dtype_after_the_rule_was_built():
    places = [nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)]
    torch.manual_seed(0)
    model = nn.Sequential(*places)
    rule = pepita.PEPITA(model, 3, (2, 3), seed=1)
    B32 = rule.B
    model.double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    rule.step(x, y)
    assert rule.B.dtype == torch.float64 and torch.equal(rule.B, B32.double())
    want, _ = by_hand(places, rule.B, x, y, 3)
    for param in model.parameters():
        torch.testing.assert_close(param.grad, want[param], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_an_x_that_model_x_would_refuse_is_refused(dtype):
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double()
    rule = pepita.PEPITA(model, 3, (2, 3), seed=0)
    x = torch.ones(2, 2, 3, dtype=dtype)
    with pytest.raises(RuntimeError):
        model(x)
    with pytest.raises(ValueError, match=f"x is {dtype} on cpu, the model torch.float64"):
        rule.step(x, torch.tensor([0, 1]))


def test_a_step_inside_inference_mode_then_outside():
    places = [seeded(lambda: nn.Linear(6, 4)), nn.ReLU(), seeded(lambda: nn.Linear(4, 3))]
    model = nn.Sequential(*places)
    rule = pepita.PEPITA(model, 3, 6, Bstd=1.0, seed=0)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    with torch.inference_mode():
        rule.step(x, y)
    rule.step(x, y)
    want, _ = by_hand(places, rule.B, x, y, 3)
    for param in model.parameters():
        assert not param.grad.is_inference()
        torch.testing.assert_close(param.grad, 2 * want[param])


def test_an_unseeded_rule_leaves_torchs_global_draws_reproducible():
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3))
        rule = pepita.PEPITA(model, 3, 4)
        return rule.B, model[0].weight.detach().clone(), torch.rand(3)
    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------------
# Refused in one line
# ------------------------------------------------------------------------------------------
class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def pruned():
    layer = nn.Linear(4, 4)
    torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5)
    return nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 3))


def old_weight_norm():
    with pytest.warns(FutureWarning):
        layer = torch.nn.utils.weight_norm(nn.Linear(4, 4))
    return nn.Sequential(nn.Flatten(), layer, nn.Linear(4, 3))


def parametrized():
    layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    return nn.Sequential(layer, nn.Linear(4, 3))


@pytest.mark.parametrize("make,words", [
    (lambda: nn.Sequential(nn.Linear(4, 4), Residual(nn.Linear(4, 4)), nn.Linear(4, 3)),
     r"layer 1 \(1: Residual\): an nn.Sequential subclass with a forward of its own"),
    (lambda: Residual(nn.Linear(4, 3)), r"the model \(Residual\): an nn.Sequential subclass"),
    (lambda: nn.Sequential(ScaledLinear(4, 3)), r"layer 0 \(0: ScaledLinear\): a Linear with a "
                                                "forward of its own"),
    (pruned, r"layer 0 \(0: Linear\): its weight is computed from other parameters "
             r"\(bias, weight_orig: pruning"),
    (old_weight_norm, r"layer 1 \(1: Linear\): its weight is computed from other parameters "
                      r"\(bias, weight_g, weight_v"),
    (parametrized, r"layer 0 \(0: ParametrizedLinear\): its weight is computed by "
                   "torch.nn.utils.parametrize"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)),
     r"layer 1 \(1: MaxPool2d\) after the last weight layer"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.MaxPool2d(2, return_indices=True)),
     "return_indices"),
])
def test_a_model_it_cannot_train_exactly_is_refused_in_one_line(make, words):
    with pytest.raises(TypeError, match=words) as err:
        pepita.PEPITA(make(), 3, (4,) if "Conv" not in words else (1, 4, 4))
    assert "\n" not in str(err.value) and "ModuleDict" not in str(err.value)


def test_forward_hooks_are_refused_at_construction_and_at_step():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    handle = model[1].register_forward_hook(lambda *args: None)
    with pytest.raises(TypeError, match=r"1 \(ReLU\) has a forward hook"):
        pepita.PEPITA(model, 3, 4)
    handle.remove()
    rule = pepita.PEPITA(model, 3, 4, seed=0)
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    rule.step(x, y)
    with model[0].register_forward_pre_hook(lambda *args: None):
        with pytest.raises(TypeError, match=r"0 \(Linear\) has a forward hook"):
            rule.step(x, y)
    with nn.modules.module.register_module_forward_hook(lambda *args: None):
        with pytest.raises(TypeError, match="a global forward hook"):
            rule.step(x, y)
    rule.step(x, y)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("options,words", [
    (dict(input_shape=(4,), Bstd=0.1, B=torch.zeros(4, 3)), "with your own B drop them"),
    (dict(input_shape=(4,), B_mean_zero=False, B=torch.zeros(4, 3)), "with your own B"),
    (dict(input_shape=(4,), seed=0, generator=torch.Generator()), "give one"),
    (dict(input_shape=(4,), sqrt_conv=True), "add conv_update='published'"),
    (dict(input_shape=(4,), Bstd=-1.0), "Bstd=-1.0: expected a positive number"),
    (dict(input_shape="4"), "input_shape='4': expected one sample's shape"),
    (dict(input_shape=(4, 0)), "input_shape=.4, 0.: expected"),
    (dict(input_shape=(4,), n_classes=3.0), "n_classes=3.0: expected a positive int"),
    (dict(input_shape=(4,), mode="backprop"), "mode='backprop': choose one of"),
])
def test_options_that_would_be_ignored_or_are_wrong_are_refused(options, words):
    options.setdefault("n_classes", 3)
    with pytest.raises(ValueError, match=words) as err:
        pepita.PEPITA(mlp(), **options)
    assert "\n" not in str(err.value)


def test_an_int_input_shape_is_a_flat_samples_size():
    assert pepita.PEPITA(mlp(), 3, 4, seed=0).input_shape == (4,)


@pytest.mark.parametrize("x,y,words", [
    (torch.randn(2, 4), [0, 1], "y is a list; expected a tensor"),
    (torch.randn(2, 4).tolist(), torch.tensor([0, 1]), "x is a list"),
    (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), "x holds no samples"),
    (torch.randn(2, 4), torch.tensor([0, 1], device="meta"), "y is on meta, the model on cpu"),
    (torch.randn(2, 4), torch.tensor([[0], [1]]), r"y has shape \(2, 1\)"),
])
def test_bad_batches_are_refused_in_one_line(x, y, words):
    rule = pepita.PEPITA(mlp(), 3, 4, seed=0)
    with pytest.raises(ValueError, match=words) as err:
        rule.step(x, y)
    assert "\n" not in str(err.value)
    if not words.startswith("y "):  # logits(x) takes no labels: the same checks of x
        with pytest.raises(ValueError, match=words):
            rule.logits(x)


# ------------------------------------------------------------------------------------------
# State and package
# ------------------------------------------------------------------------------------------
def test_a_restored_rule_draws_the_masks_and_gives_the_updates_of_an_uninterrupted_one():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ours, theirs = model(), model()
    rule = pepita.PEPITA(ours, 3, 6, seed=4)
    for _ in range(3):
        rule.step(x, y)
    saved = rule.state_dict()
    torch.save(saved, buffer := io.BytesIO())
    buffer.seek(0)
    restored = pepita.PEPITA(theirs, 3, 6, seed=99)
    restored.load_state_dict(torch.load(buffer))
    for model_, rule_ in ((ours, rule), (theirs, restored)):
        model_.zero_grad()
        for _ in range(2):
            rule_.step(x, y)
    assert torch.equal(rule.B, restored.B)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad)
    with pytest.raises(ValueError, match=r"B has shape \(5, 3\)"):
        restored.load_state_dict({"B": torch.zeros(5, 3), "generator": saved["generator"]})


def test_the_wheel_holds_pepita_alone_and_imports_from_anywhere(tmp_path):
    """Built from a copy of what pyproject.toml names (a build in the checkout would leave
    build/ and *.egg-info there)."""
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "pepita.py", "README.md", "LICENSE"):
        shutil.copy(root / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert not wheel.name.startswith("pepita-")  # an unrelated "pepita" is on PyPI
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if ".dist-info/" not in n] == ["pepita.py"]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    assert b"Requires-Dist: torch" in metadata
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, "
                          f"{str(tmp_path / 'site')!r}); import pepita; print(pepita.__file__)"],
                         cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert out.startswith(str(tmp_path / "site"))
