"""The batched engine against a per-sample loop written plainly from the reference
(pepita-reference.md, section 1): same initial weights, F/B, masks and sample order."""
import copy

import numpy as np
import pytest

import functions as fn

SIZES = [12, 9, 7, 4]
ACTS = ["relu", "tanh", "softmax"]


# ---- the published per-sample algorithm, one sample and one pass at a time ---------------
def act(name, a):
    if name == "relu":
        return np.maximum(a, 0)
    if name == "tanh":
        return np.tanh(a)
    z = np.exp(a - a.max())
    return z / z.sum()


def act_derivative(name, a):
    return (a > 0).astype(float) if name == "relu" else 1 - np.tanh(a) ** 2


def sample_forward(weights, x, masks):
    """Pre-activations and (masked) post-activations of one sample, input first."""
    pre, post = [], [x]
    for layer, w in enumerate(weights):
        a = w @ post[-1]
        h = act(ACTS[layer], a)
        if layer < len(weights) - 1:
            h = h * masks[layer]
        pre.append(a)
        post.append(h)
    return pre, post


def sample_update(model, rule, x, t, masks, passes):
    """The per-sample outer products G_l of the published code, and correct argmax count."""
    W = model.weights
    G = [np.zeros_like(w) for w in W]
    pre, post = sample_forward(W, x, masks)
    correct = int(post[-1].argmax() == t.argmax())
    if rule in ("ERIN", "ERINsign"):
        for _ in range(passes - 1):
            e = post[-1] - t
            x_mod = x + model.F @ (np.sign(e) if rule == "ERINsign" else e)
            pre_mod, post_mod = sample_forward(W, x_mod, masks)
            for layer in range(len(W) - 1):
                delta = (post[layer + 1] - post_mod[layer + 1]) * masks[layer]
                G[layer] += np.outer(delta, post_mod[layer])
            G[-1] += np.outer(post_mod[-1] - t, post_mod[-2])
            correct += int(post_mod[-1].argmax() == t.argmax())
            post = post_mod
        return G, correct
    e = post[-1] - t
    delta = e
    G[-1] += np.outer(delta, post[-2])
    for layer in reversed(range(len(W) - 1)):
        if rule == "BP":
            back = W[layer + 1].T @ delta
        elif rule == "FA":
            back = model.feedback[layer] @ delta
        elif rule == "DFA":
            back = model.feedback[layer] @ e
        else:
            back = model.feedback[layer] @ t
        delta = back * act_derivative(ACTS[layer], pre[layer]) * masks[layer]
        G[layer] += np.outer(delta, post[layer])
    return [g * passes for g in G], correct * passes


class ReferenceOptimizer:
    """SGD and momentum as published; NAG, RMSprop and Adam by their textbook formulas."""

    def __init__(self, kind, weights):
        self.kind, self.t = kind, 0
        self.v = [np.zeros_like(w) for w in weights]
        self.s = [np.zeros_like(w) for w in weights]

    def update(self, weights, G, eta, b_eff):
        self.t += 1
        for layer, w in enumerate(weights):
            g = G[layer] / b_eff
            if self.kind == "SGD":
                w -= eta * g
            elif self.kind == "mom":
                self.v[layer] = 0.9 * self.v[layer] + eta * g
                w -= self.v[layer]
            elif self.kind == "NAG":
                self.v[layer] = 0.9 * self.v[layer] + eta * g
                w -= 0.9 * self.v[layer] + eta * g
            elif self.kind == "rmsprop":
                self.s[layer] = 0.9 * self.s[layer] + 0.1 * g ** 2
                w -= eta * g / (np.sqrt(self.s[layer]) + 1e-8)
            else:
                self.v[layer] = 0.9 * self.v[layer] + 0.1 * g
                self.s[layer] = 0.999 * self.s[layer] + 0.001 * g ** 2
                m_hat = self.v[layer] / (1 - 0.9 ** self.t)
                s_hat = self.s[layer] / (1 - 0.999 ** self.t)
                w -= eta * m_hat / (np.sqrt(s_hat) + 1e-8)


def reference_epochs(model, rule, update, x, t, orders, batch_size, passes, eta, masks):
    """Published structure: weights change when the sample index in the epoch (from 1) is a
    multiple of batch_size; G is not cleared at the end of an epoch."""
    b_eff = batch_size * (passes - 1) if rule in ("ERIN", "ERINsign") else batch_size * passes
    optimizer = ReferenceOptimizer(update, model.weights)
    G = [np.zeros_like(w) for w in model.weights]
    accuracies = []
    for order, epoch_masks in zip(orders, masks):
        correct = 0
        for i, n in enumerate(order, start=1):
            sample_masks = [m[i - 1] for m in epoch_masks]
            dG, c = sample_update(model, rule, x[n], t[n], sample_masks, passes)
            G = [g + d for g, d in zip(G, dG)]
            correct += c
            if i % batch_size == 0:
                optimizer.update(model.weights, G, eta, b_eff)
                G = [np.zeros_like(w) for w in model.weights]
        accuracies.append(correct / (len(order) * passes))
    return accuracies


# ---- the comparison ----------------------------------------------------------------------
def run_both(rule, update="mom", passes=2, keep=0.8, n=50, batch_size=8, epochs=2):
    rng = np.random.default_rng(3)
    x = rng.random((n, SIZES[0]))
    t = np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], n)]
    model = fn.init_model(rng, rule, SIZES, ACTS, "he_uniform", keep)
    reference = copy.deepcopy(model)
    orders = [rng.permutation(n) for _ in range(epochs)]

    mask_rng = np.random.default_rng(7)
    optimizer, carry = fn.Optimizer(update, model.weights), fn.Carry()
    accuracies = [fn.train_epoch(model, optimizer, rule, x, t, order, batch_size, passes, 0.05,
                                 mask_rng, carry) for order in orders]

    # The same masks, drawn as the engine draws them (per batch), laid out per sample.
    mask_rng = np.random.default_rng(7)
    masks = []
    for order in orders:
        chunks = [fn.draw_masks(mask_rng, reference, len(order[s:s + batch_size]))
                  or [np.ones((len(order[s:s + batch_size]), k)) for k in SIZES[1:-1]]
                  for s in range(0, n, batch_size)]
        masks.append([np.concatenate([c[layer] for c in chunks])
                      for layer in range(len(SIZES) - 2)])
    ref_accuracies = reference_epochs(reference, rule, update, x, t, orders, batch_size,
                                      passes, 0.05, masks)
    return model, reference, accuracies, ref_accuracies


def assert_same_weights(model, reference):
    for w, w_ref in zip(model.weights, reference.weights):
        np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-12 * np.abs(w_ref).max())


@pytest.mark.parametrize("rule,passes", [("ERIN", 2), ("ERIN", 3), ("ERINsign", 2),
                                         ("BP", 1), ("FA", 1), ("DFA", 1), ("DRTP", 1),
                                         ("BP", 2)])
def test_rules_match_per_sample_loop(rule, passes):
    model, reference, accuracies, ref_accuracies = run_both(rule, passes=passes)
    assert_same_weights(model, reference)
    assert accuracies == ref_accuracies
    initial = run_both(rule, passes=passes, epochs=0)[0]
    assert all(np.abs(w - w0).max() > 1e-6 for w, w0 in zip(model.weights, initial.weights))


@pytest.mark.parametrize("update", fn.UPDATE_TYPES)
def test_every_optimiser_matches_per_sample_loop(update):
    model, reference, _, _ = run_both("ERIN", update=update)
    assert_same_weights(model, reference)


def test_partial_batch_is_carried_into_next_epoch():
    """Dropping the carried samples would change the weights: the test above can fail."""
    model, reference, _, _ = run_both("ERIN", n=50, batch_size=8)
    rng = np.random.default_rng(3)
    x = rng.random((50, SIZES[0]))
    t = np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], 50)]
    fresh = fn.init_model(rng, "ERIN", SIZES, ACTS, "he_uniform", 0.8)
    orders = [rng.permutation(50) for _ in range(2)]
    optimizer, mask_rng = fn.Optimizer("mom", fresh.weights), np.random.default_rng(7)
    for order in orders:
        fn.train_epoch(fresh, optimizer, "ERIN", x, t, order, 8, 2, 0.05, mask_rng, fn.Carry())
    assert not np.allclose(fresh.weights[0], model.weights[0], rtol=1e-9, atol=0)


def test_no_dropout_and_full_batches():
    model, reference, _, _ = run_both("ERIN", keep=1.0, n=48, batch_size=8)
    assert_same_weights(model, reference)


def test_bp_deltas_equal_finite_difference_gradient():
    rng = np.random.default_rng(0)
    model = fn.init_model(rng, "BP", SIZES, ACTS, "he_uniform", 0.8)
    x = rng.random((5, SIZES[0]))
    t = np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], 5)]
    masks = fn.draw_masks(rng, model, 5)

    def loss():
        y = fn.forward(model, x, masks)[1][-1]
        return -np.sum(t * np.log(y))

    factors, _ = fn.error_factors(model, x, t, masks, "BP")
    eps = 1e-6
    for layer, w in enumerate(model.weights):
        analytic = factors[layer][0].T @ factors[layer][1]
        numeric = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            saved = w[idx]
            w[idx] = saved + eps
            up = loss()
            w[idx] = saved - eps
            down = loss()
            w[idx] = saved
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


def published_bp_deltas(weights, x, t, masks):
    """BP's deltas of one sample in the published order: the whole backward chain first,
    unmasked, then each hidden delta multiplied by its mask."""
    pre, post = sample_forward(weights, x, masks)
    chain = [post[-1] - t]
    for layer in reversed(range(len(weights) - 1)):
        chain.insert(0, (weights[layer + 1].T @ chain[0]) * act_derivative(ACTS[layer],
                                                                           pre[layer]))
    return [d * m for d, m in zip(chain[:-1], masks)] + [chain[-1]]


def test_bp_masks_each_delta_inside_the_chain_unlike_the_published_code():
    """Two hidden layers: ours (the masked net's true gradient, pinned by the finite-
    difference test above) differs from the published order when the second hidden layer
    drops units (the published chain carries its dropped units down to the first), and
    equals it when only the first hidden layer drops units, as with one hidden layer."""
    rng = np.random.default_rng(3)
    model = fn.init_model(rng, "BP", SIZES, ACTS, "he_uniform", 0.8)
    x, t = rng.random((6, SIZES[0])), np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], 6)]
    masks = fn.draw_masks(rng, model, 6)
    for second_layer_kept in (False, True):
        if second_layer_kept:
            masks[1][:] = 1.0
        ours = [delta for delta, _ in fn.error_factors(model, x, t, masks, "BP")[0]]
        published = [np.array(d) for d in zip(*(
            published_bp_deltas(model.weights, x[i], t[i], [m[i] for m in masks])
            for i in range(len(x))))]
        for layer in (1, 2):  # the output and the second hidden layer agree always
            np.testing.assert_allclose(ours[layer], published[layer], rtol=1e-12, atol=1e-14)
        assert np.allclose(ours[0], published[0], rtol=1e-12, atol=1e-14) == second_layer_kept


# ---- the updates' BLAS calls and the lazily scaled momentum velocity ----------------------
@pytest.mark.skipif(fn.BLAS is None, reason="this numpy does not bundle scipy-openblas")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_calls_match_numpy(dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 5)).astype(dtype)
    b = rng.standard_normal((6, 7)).astype(dtype).T  # not C-contiguous: copied first
    c = rng.standard_normal((5, 6)).astype(dtype)
    expected = c + 0.3 * a.T @ b
    fn.add_product(c, a, b, 0.3)
    np.testing.assert_allclose(c, expected, rtol=1e-5 if dtype == np.float32 else 1e-13)
    y, x = c.copy(), rng.standard_normal(c.shape).astype(dtype)
    fn.add_scaled(y, x, -0.7)
    np.testing.assert_allclose(y, c - 0.7 * x, rtol=1e-5 if dtype == np.float32 else 1e-13)
    for bad in ((c, a[:6], b), (c[:, :5], a, b), (np.asfortranarray(c), a, b)):
        with pytest.raises(ValueError):  # BLAS would read or write out of bounds
            fn.add_product(*bad, 1.0)
    with pytest.raises(ValueError):
        fn.add_scaled(y[:, :5], x[:, :5], 1.0)


@pytest.mark.parametrize("use_blas", [True, False])
def test_published_momentum_over_many_steps(monkeypatch, use_blas):
    """1000 float32 steps (without folding the velocity's lazy scale 0.9^t back into its
    buffer, the buffer overflows after about 800) and a change of eta: the weights, and the
    velocity a checkpoint saves, follow V = 0.9 V + eta g; W -= V, computed in float64."""
    if not use_blas:
        monkeypatch.setattr(fn, "BLAS", None)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    w_ref, v_ref = w.astype(np.float64), np.zeros((6, 5))
    optimizer = fn.Optimizer("mom", [w])
    for step in range(1000):
        delta, inputs = (rng.standard_normal((4, k)).astype(np.float32) for k in (6, 5))
        eta = 0.1 if step < 700 else 0.01
        optimizer.step([w], [(delta, inputs)], eta, 1 / 4)
        v_ref = 0.9 * v_ref + eta * delta.T.astype(np.float64) @ inputs / 4
        w_ref -= v_ref
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-4 * np.abs(w_ref).max())
    np.testing.assert_allclose(optimizer.state_dict()["buffers"]["opt0_0"], v_ref, rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.3, 1e-3])
def test_masks_are_float32_uniforms_below_keep(keep):
    """draw_masks tests the raw words; the values must be those of the plain formula."""
    model = fn.init_model(np.random.default_rng(0), "ERIN", [6, 512, 40, 3],
                          ["relu", "relu", "softmax"], "he_uniform", keep)
    ours, plain = np.random.default_rng(11), np.random.default_rng(11)
    for n in (64, 17, 64):
        expected = [(plain.random((n, size), dtype=np.float32) < keep) / keep
                    for size in (512, 40)]
        for mask, want in zip(fn.draw_masks(ours, model, n), expected):
            np.testing.assert_array_equal(mask, want)
    kept = np.concatenate([m.ravel() > 0 for m in fn.draw_masks(ours, model, 2000)])
    assert abs(kept.mean() - keep) < 4 * np.sqrt(keep * (1 - keep) / kept.size)
    with pytest.raises(TypeError, match="64-bit"):
        fn.draw_masks(np.random.Generator(np.random.MT19937(0)), model, 4)
