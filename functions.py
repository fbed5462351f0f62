"""The numpy engine: fully connected networks trained with PEPITA (ERIN), ERINsign, BP, FA,
DFA or DRTP, one matrix product per layer and pass over a whole mini-batch.

Conventions: rows are samples. W_l has shape (n_out, n_in) and maps post[l] to pre[l];
post[0] is the input, post[l + 1] = f(pre[l]) * mask_l for hidden layers, post[L] the output.

The published code loops over single samples and changes the weights only after every
batch_size-th sample of an epoch, so every sample of a batch sees the same weights and the
sum of the per-sample outer products is one matrix product (tests/test_numpy_equivalence.py
checks this against a per-sample loop).
"""
import ctypes
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import utils
from utils import UsageError, check_finite, init_weight, uniform

# ------------------------------------------------------------------------------------------
# Activations and their derivatives (numpy path)
# ------------------------------------------------------------------------------------------
CIRESAN_A, CIRESAN_B = 1.7159, 0.6666


def softmax(a):
    """Softmax over the last axis, shifted by the max as published."""
    z = np.exp(a - a.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def relu(a):
    return np.maximum(a, 0)


def sigm(a):
    return 1 / (1 + np.exp(-a))


ACTIVATIONS = {
    "relu": relu,
    "sigm": sigm,
    "Lrelu": lambda a: np.where(a > 0, a, 0.1 * a),
    "tanh": np.tanh,
    "tanh_ciresan": lambda a: CIRESAN_A * np.tanh(CIRESAN_B * a),
    "step_f": lambda a: (a > 0).astype(a.dtype),
    "softmax": softmax,
}

# Derivatives f'(a) as published; step_f and softmax (as a hidden layer) have none.
DERIVATIVES = {
    "relu": lambda a: (a > 0).astype(a.dtype),
    "sigm": lambda a: sigm(a) * (1 - sigm(a)),
    "Lrelu": lambda a: np.where(a > 0, 1.0, 0.1).astype(a.dtype),
    "tanh": lambda a: 1 - np.tanh(a) ** 2,
    "tanh_ciresan": lambda a: CIRESAN_A * CIRESAN_B * (1 - np.tanh(CIRESAN_B * a) ** 2),
}


PEPITA_RULES = ("ERIN", "ERINsign")
LEARN_TYPES = ("BP", "ERIN", "ERINsign", "FA", "DFA", "DRTP")
UPDATE_TYPES = ("SGD", "mom", "NAG", "rmsprop", "Adam")
MOMENTUM = 0.9
RMSPROP_RHO, ADAM_BETA1, ADAM_BETA2, EPSILON = 0.9, 0.9, 0.999, 1e-8


@dataclass
class Model:
    weights: list            # W_l, (n_out, n_in)
    acts: list               # activation name of each layer
    keep: float              # dropout keep probability of hidden layers
    F: np.ndarray = None     # PEPITA projection, (n_in of the net, n_out of the net)
    feedback: list = field(default_factory=list)  # FA/DFA/DRTP: one matrix per hidden layer

    @property
    def sizes(self):
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]


def check_architecture(sizes, acts, rule):
    if len(acts) != len(sizes) - 1:
        raise UsageError(f"--act_list has {len(acts)} activations for {len(sizes) - 1} "
                         "layers; give one per layer")
    unknown = [a for a in acts if a not in ACTIVATIONS]
    if unknown:
        raise UsageError(f"unknown activation {unknown[0]!r}; choose one of "
                         f"{', '.join(ACTIVATIONS)}")
    if rule not in PEPITA_RULES:
        no_derivative = [a for a in acts[:-1] if a not in DERIVATIVES]
        if no_derivative:
            raise UsageError(f"hidden activation {no_derivative[0]} has no derivative, so "
                             f"{rule} cannot train it; use ERIN or another activation")
        if acts[-1] != "softmax" and acts[-1] not in DERIVATIVES:
            raise UsageError(f"output activation {acts[-1]} has no derivative for {rule}")


def init_model(rng, rule, sizes, acts, w_init, keep, dtype=np.float64):
    """Weights, and the fixed random matrices of the rule, with the published inits."""
    weights = [init_weight(rng, w_init, n_out, n_in, dtype)
               for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    model = Model(weights, list(acts), keep)
    n_in, n_out = sizes[0], sizes[-1]
    if rule in PEPITA_RULES:
        if w_init == "he_uniform":
            F = uniform(rng, np.sqrt(6 / n_in), (n_in, n_out), dtype)
        elif w_init == "ones":
            F = np.ones((n_in, n_out), dtype)
        else:  # nok and every other init
            F = uniform(rng, 1 / np.sqrt(n_out), (n_in, n_out), dtype)
        model.F = F * (0.05 if rule == "ERIN" else 0.005)
    elif rule == "FA":  # shaped like the next layer's W transposed
        model.feedback = [uniform(rng, np.sqrt(6 / n_l) if w_init == "he_uniform"
                                  else 1 / np.sqrt(n_next), (n_l, n_next), dtype)
                          for n_l, n_next in zip(sizes[1:-1], sizes[2:])]
    elif rule in ("DFA", "DRTP"):  # from the output error (DFA) or target (DRTP)
        model.feedback = [uniform(rng, np.sqrt(6 / n_l) if w_init == "he_uniform"
                                  else 1 / np.sqrt(n_out), (n_l, n_out), dtype)
                          for n_l in sizes[1:-1]]
    return model


def draw_masks(rng, model, n):
    """Dropout masks of the hidden layers for n samples: Bernoulli(keep) / keep.

    Drawn as rng.random(dtype=float32) < keep, which takes u = (w >> 8) / 2^24 for each
    32-bit word w of the bit generator (the low half of each 64-bit word first): the same
    test is w < ceil(float32(keep) 2^24) 2^8 on the raw words, at half the cost of the
    float conversion. (With an odd n * size the spare half-word is dropped, where
    rng.random would keep it for the next draw.)"""
    if model.keep == 1:
        return None
    if isinstance(rng.bit_generator, np.random.MT19937):  # its raw words are 32-bit
        raise TypeError("draw_masks needs a 64-bit bit generator, as np.random.default_rng")
    dtype = model.weights[0].dtype
    scale = dtype.type(1) / dtype.type(model.keep)
    last_kept = np.uint32(math.ceil(float(np.float32(model.keep)) * 2**24) * 2**8 - 1)
    masks = []
    for size in model.sizes[1:-1]:
        words = rng.bit_generator.random_raw(-(-n * size // 2)).view(np.uint32)
        masks.append(np.multiply(words[:n * size].reshape(n, size) <= last_kept, scale,
                                 dtype=dtype))
    return masks


def forward(model, x, masks=None, first_pre=None):
    """Pre-activations of every layer and post-activations (masked) with the input first.
    first_pre: the first layer's pre-activation, when already known."""
    pre, post = [], [x]
    last = len(model.weights) - 1
    for layer, (w, act) in enumerate(zip(model.weights, model.acts)):
        a = first_pre if layer == 0 and first_pre is not None else post[-1] @ w.T
        h = ACTIVATIONS[act](a)
        if masks is not None and layer < last:
            h *= masks[layer]
        pre.append(a)
        post.append(h)
    return pre, post


def predict(model, x, chunk=8192):
    return np.concatenate([forward(model, x[i:i + chunk])[1][-1]
                           for i in range(0, len(x), chunk)])


def accuracy(model, x, labels):
    """The fraction of correct predictions (the published text files' unit)."""
    return utils.accuracy(lambda batch: predict(model, batch), x, labels)


def n_correct(y, t):
    return int(np.count_nonzero(y.argmax(1) == t.argmax(1)))


# ------------------------------------------------------------------------------------------
# Learning rules. The summed weight change of a batch, G_l = sum over samples of
# delta_l input_l^T, is kept as its two factors (D_l, X_l), rows = samples: G_l = D_l^T X_l.
# Factors of several passes, or of a partial batch carried over, stack along the rows, and
# the optimiser turns them into a weight change with one matrix product per layer.
# ------------------------------------------------------------------------------------------
def stack_factors(*factor_lists):
    return [(np.concatenate([f[layer][0] for f in factor_lists]),
             np.concatenate([f[layer][1] for f in factor_lists]))
            for layer in range(len(factor_lists[0]))]


def pepita_factors(model, x, t, masks, passes, sign=False):
    """PEPITA: pass k sees x + F e_{k-1}; every pass after the first contributes
    (h_prev - h) * mask for hidden layers (the mask a second time) and e_k for the output,
    times the layer's input in that pass.

    The first layer is linear in its input, W_1 x' = W_1 x + (W_1 F) e: a product with the
    small W_1 F replaces a second product with the whole batch (same values up to rounding).
    W_1 F comes from the first pass's product, as extra columns: one read of W_1, not two.
    """
    n = len(x)
    products = model.weights[0] @ np.concatenate([x, model.F.T]).T  # [W_1 x^T, W_1 F]
    pre, post = forward(model, x, masks, first_pre=np.ascontiguousarray(products[:, :n].T))
    W1_F_T = products[:, n:].T
    correct = n_correct(post[-1], t)
    per_pass = []
    for _ in range(passes - 1):
        e = post[-1] - t
        signal = np.sign(e) if sign else e
        x_mod = x + signal @ model.F.T
        post_mod = forward(model, x_mod, masks, first_pre=pre[0] + signal @ W1_F_T)[1]
        factors = []
        for layer in range(len(model.weights) - 1):
            delta = post[layer + 1] - post_mod[layer + 1]
            if masks is not None:
                delta *= masks[layer]
            factors.append((delta, post_mod[layer]))
        factors.append((post_mod[-1] - t, post_mod[-2]))
        per_pass.append(factors)
        correct += n_correct(post_mod[-1], t)
        post = post_mod
    return (per_pass[0] if len(per_pass) == 1 else stack_factors(*per_pass)), correct


def error_factors(model, x, t, masks, rule):
    """BP, FA, DFA and DRTP: deltas from the output error, sent back through W (BP), a
    fixed B per layer (FA), a fixed B from the output (DFA) or from the target (DRTP)."""
    pre, post = forward(model, x, masks)
    e = post[-1] - t
    delta = e if model.acts[-1] == "softmax" else e * DERIVATIVES[model.acts[-1]](pre[-1])
    factors = [(delta, post[-2])]
    for layer in reversed(range(len(model.weights) - 1)):
        if rule == "BP":
            back = delta @ model.weights[layer + 1]
        elif rule == "FA":
            back = delta @ model.feedback[layer].T
        elif rule == "DFA":
            back = e @ model.feedback[layer].T
        else:  # DRTP
            back = t @ model.feedback[layer].T
        delta = back * DERIVATIVES[model.acts[layer]](pre[layer])
        if masks is not None:
            delta *= masks[layer]
        factors.insert(0, (delta, post[layer]))
    return factors, n_correct(post[-1], t)


def batch_factors(model, rule, x, t, masks, passes):
    """Factors of the batch's summed G_l, and the correct argmax over the passes counted."""
    if rule in PEPITA_RULES:
        return pepita_factors(model, x, t, masks, passes, sign=rule == "ERINsign")
    # The other rules: one pass and one step per batch, whatever sample_passes (README,
    # "Differences from the published code", says what the published code does instead).
    factors, correct = error_factors(model, x, t, masks, rule)
    return factors, correct * passes


def effective_batch(rule, batch_size, passes):
    """The published divisor of the summed update (B_eff), for the factors computed here."""
    return batch_size * (passes - 1) if rule in PEPITA_RULES else batch_size


# ------------------------------------------------------------------------------------------
# Adding a product into a weight-sized array. numpy's matmul always writes a fresh result;
# the BLAS gemm under it can add alpha A^T B into an existing C instead. After the matrix
# products, the passes over weight-sized arrays are the largest cost of an epoch, so the
# updates call the gemm and axpy of the OpenBLAS in numpy's own wheel (the one matmul uses:
# no second thread pool). Other numpy builds use the numpy expressions (same values).
# ------------------------------------------------------------------------------------------
def load_numpy_openblas():
    """{dtype: (gemm, axpy)} from numpy's bundled scipy-openblas (ILP64), or None."""
    folder = Path(np.__file__).parent
    paths = sorted([*folder.parent.glob("numpy.libs/libscipy_openblas64_*"),
                    *folder.glob(".dylibs/libscipy_openblas64_*")])
    try:
        lib = ctypes.CDLL(str(paths[0]))
        routines = {}
        for dtype, letter, scalar in ((np.float64, "d", ctypes.c_double),
                                      (np.float32, "s", ctypes.c_float)):
            gemm, axpy = (getattr(lib, f"scipy_cblas_{letter}{name}64_")
                          for name in ("gemm", "axpy"))
            size, pointer = ctypes.c_int64, ctypes.c_void_p
            gemm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, size, size, size,
                             scalar, pointer, size, pointer, size, scalar, pointer, size]
            axpy.argtypes = [size, scalar, pointer, size, pointer, size]
            gemm.restype = axpy.restype = None
            routines[np.dtype(dtype)] = gemm, axpy
        return routines
    except (IndexError, OSError, AttributeError):
        return None


BLAS = load_numpy_openblas()
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def add_product(c, a, b, alpha):
    """c += alpha a^T b, for a (k, m), b (k, n) and c (m, n) C-contiguous."""
    if BLAS is None or c.dtype not in BLAS:
        c += alpha * (a.T @ b)
        return
    if not (c.flags.c_contiguous and c.flags.writeable and a.ndim == b.ndim == 2
            and a.shape[0] == b.shape[0] and c.shape == (a.shape[1], b.shape[1])):
        raise ValueError(f"add_product: shapes {c.shape} += {a.shape}^T {b.shape}, or c is "
                         "not a writeable C-contiguous array")
    a, b = np.ascontiguousarray(a, c.dtype), np.ascontiguousarray(b, c.dtype)
    (k, m), n = a.shape, b.shape[1]
    BLAS[c.dtype][0](ROW_MAJOR, TRANS, NO_TRANS, m, n, k, alpha, a.ctypes.data, m,
                     b.ctypes.data, n, 1.0, c.ctypes.data, n)


def add_scaled(y, x, alpha):
    """y += alpha x, for C-contiguous arrays of one shape and dtype."""
    if BLAS is None or y.dtype not in BLAS:
        y += alpha * x
        return
    if not (y.flags.c_contiguous and y.flags.writeable and x.shape == y.shape):
        raise ValueError(f"add_scaled: shapes {y.shape} += {x.shape}, or y is not a "
                         "writeable C-contiguous array")
    x = np.ascontiguousarray(x, y.dtype)
    BLAS[y.dtype][1](y.size, alpha, x.ctypes.data, 1, y.ctypes.data, 1)


# ------------------------------------------------------------------------------------------
# Optimisers: SGD and momentum as published; NAG, RMSprop, Adam with standard definitions
# ------------------------------------------------------------------------------------------
class Optimizer:
    def __init__(self, kind, weights):
        if kind not in UPDATE_TYPES:
            raise UsageError(f"unknown --update_type {kind!r}; choose one of "
                             f"{', '.join(UPDATE_TYPES)}")
        self.kind = kind
        self.step_count = 0
        n_buffers = {"SGD": 0, "mom": 1, "NAG": 1, "rmsprop": 1, "Adam": 2}[kind]
        self.buffers = [[np.zeros_like(w) for w in weights] for _ in range(n_buffers)]
        # mom keeps the velocity as velocity_scale * buffers[0]: V = 0.9 V + eta g becomes
        # one gemm adding (eta / scale) g into the buffer, after scale *= 0.9.
        self.velocity_scale = 1.0
        self.scratch = ([np.empty_like(w) for w in weights]  # reused: no allocation per batch
                        if kind in ("NAG", "rmsprop", "Adam") else None)

    def settle(self):
        """Fold the velocity's scale into its buffers: buffers[0] is then V itself."""
        if self.kind == "mom" and self.velocity_scale != 1.0:
            for v in self.buffers[0]:
                v *= self.velocity_scale
            self.velocity_scale = 1.0

    def state_dict(self):
        """What an exact resume needs: the buffers (the momentum velocity at its true scale)
        as {"opt<k>_<layer>": array}, the checkpoint's names, and the step count."""
        self.settle()
        return {"buffers": {f"opt{k}_{layer}": b for k, buffers in enumerate(self.buffers)
                            for layer, b in enumerate(buffers)},
                "steps": self.step_count}

    def load_state_dict(self, state):
        """The state of state_dict, copied into this optimiser's buffers."""
        for name, b in self.state_dict()["buffers"].items():
            b[...] = state["buffers"][name]
        self.step_count = state["steps"]

    def step(self, weights, factors, eta, scale):
        """Change weights in place with g_l = scale * D_l^T X_l (scale = 1 / B_eff)."""
        self.step_count += 1
        if self.kind == "SGD":              # W -= eta g
            for w, (delta, inputs) in zip(weights, factors):
                add_product(w, delta, inputs, -eta * scale)
        elif self.kind == "mom":            # V = 0.9 V + eta g; W -= V
            self.velocity_scale *= MOMENTUM
            s = self.velocity_scale
            for w, v, (delta, inputs) in zip(weights, self.buffers[0], factors):
                add_product(v, delta, inputs, eta * scale / s)
                add_scaled(w, v, -s)
            if s < 1e-3:                    # keep the buffer's values in a safe range
                self.settle()
        else:
            for layer, (w, (delta, inputs)) in enumerate(zip(weights, factors)):
                g = self.scratch[layer]
                np.matmul((delta * scale).T, inputs, out=g)
                self.adaptive_step(layer, w, g, eta)

    def adaptive_step(self, layer, w, g, eta):
        if self.kind == "NAG":              # V = 0.9 V + eta g; W -= 0.9 V + eta g
            v = self.buffers[0][layer]
            v *= MOMENTUM
            v += eta * g
            w -= MOMENTUM * v + eta * g
        elif self.kind == "rmsprop":        # s = rho s + (1 - rho) g^2
            s = self.buffers[0][layer]
            s *= RMSPROP_RHO
            s += (1 - RMSPROP_RHO) * g * g
            w -= eta * g / (np.sqrt(s) + EPSILON)
        else:                               # Adam with bias correction
            m, v = self.buffers[0][layer], self.buffers[1][layer]
            m *= ADAM_BETA1
            m += (1 - ADAM_BETA1) * g
            v *= ADAM_BETA2
            v += (1 - ADAM_BETA2) * g * g
            m_hat = m / (1 - ADAM_BETA1 ** self.step_count)
            v_hat = v / (1 - ADAM_BETA2 ** self.step_count)
            w -= eta * m_hat / (np.sqrt(v_hat) + EPSILON)


# ------------------------------------------------------------------------------------------
# One epoch
# ------------------------------------------------------------------------------------------
@dataclass
class Carry:
    """Factors of a last, partial batch: the published code adds them to the next update."""
    factors: list = None


def train_epoch(model, optimizer, rule, x, t, order, batch_size, passes, eta, mask_rng,
                carry, progress=None):
    """Train on x[order] in mini-batches; returns the training accuracy over all passes."""
    b_eff = effective_batch(rule, batch_size, passes)
    correct = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        masks = draw_masks(mask_rng, model, len(idx))
        factors, batch_correct = batch_factors(model, rule, x[idx], t[idx], masks, passes)
        correct += batch_correct
        if carry.factors is not None:
            factors, carry.factors = stack_factors(carry.factors, factors), None
        if len(idx) == batch_size:
            optimizer.step(model.weights, factors, eta, 1.0 / b_eff)
            check_finite(model.weights[-1], f"batch {start // batch_size + 1}", eta)
        else:
            carry.factors = factors
        if progress is not None:
            progress.update(len(idx))
    return correct / (len(order) * passes)


def angle_with_F(model):
    """Angle in degrees between flatten(W_1^T ... W_L^T) and flatten(F), and ||W_1||."""
    product = model.weights[0].T
    for w in model.weights[1:]:
        product = product @ w.T
    return utils.angle_degrees(product, model.F), float(np.linalg.norm(model.weights[0]))
