"""PyTorch models of the paper and their PEPITA update with a fixed random projection B
(called F in the paper): convolutional (Net1conv1fcXL) and fully connected (the tutorial's
NetFC1x1024DOcust) networks, no biases, softmax output.

Each forward returns the activations the update needs, so no hooks are involved. The
updates below are written as gradients g (W -= eta g), i.e. g = -dW / batch_size for the
published W += eta dW / batch_size.
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import utils
from utils import UsageError, init_weight


class FCNet(nn.Module):
    """Fully connected: ReLU hidden layers with dropout masks, softmax output. Each hidden
    block is linear -> mask -> ReLU [-> normalization (--normalize)]."""

    def __init__(self, sizes, w_init="he_uniform", rng=None):
        super().__init__()
        self.sizes = list(sizes)
        self.normalize = None
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out, bias=False)
                                    for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        rng = rng or np.random.default_rng()
        with torch.no_grad():
            for layer in self.layers:
                n_out, n_in = layer.weight.shape
                layer.weight.copy_(torch.from_numpy(init_weight(rng, w_init, n_out, n_in,
                                                                np.float32)))

    def forward(self, x, masks=None, logits=False, first_pre=None):
        """Output (softmax, or logits for BP) and (post-activations with the input first,
        the first layer's pre-activation). first_pre: that pre-activation, when known."""
        h = x.flatten(1)
        hidden = [h]
        pre = first_pre if first_pre is not None else self.layers[0](h)
        for index, layer in enumerate(self.layers[:-1]):
            h = self.hidden_output(pre if index == 0 else layer(h),
                                   None if masks is None else masks[index])
            hidden.append(h)
        out = self.layers[-1](h)
        return (out if logits else F.softmax(out, dim=1)), (hidden, pre)

    def hidden_output(self, a, mask):
        """A hidden block's output from its pre-activation: ReLU, mask, normalization."""
        h = F.relu(a)
        if mask is not None:
            h = h * mask
        return normalized(h, self.normalize) if self.normalize else h

    def block(self, index, h, mask=None):
        """Block `index` alone on the input h: what weight mirroring drives with noise."""
        a = self.layers[index](h)
        if index == len(self.layers) - 1:
            return F.softmax(a, dim=1)
        return self.hidden_output(a, mask)

    def mask_sizes(self):
        return self.sizes[1:-1]

    def first_pass(self, x, masks, B):
        """Pass 1, and W_1 B for the second pass from the same product W_1 [x^T, B]: one read
        of W_1, not two (W_1 on the left is also the faster order on CPUs)."""
        n = len(x)
        products = self.layers[0].weight @ torch.cat([x.flatten(1), B.T]).T
        return self(x, masks, first_pre=products[:, :n].T.contiguous()), products[:, n:]

    def modulated_pass(self, x_mod, masks, first, e, W1_B):
        """The second pass. The first layer is linear, W_1 x' = W_1 x + (W_1 B) e: a product
        with the small W_1 B replaces one with the whole batch (same values up to rounding)."""
        return self(x_mod, masks, first_pre=first[1][1] + e @ W1_B.T)

    def pepita_factors(self, first, second, e, e_mod, batch_size, sqrt_conv=False):
        """Each layer's gradient g = D^T X as its factors (D, X). Hidden layers:
        dW = -(h - h')^T h'_prev (input: the modulated x'); last layer: dW = -e'^T h'_last.
        The 1 / batch_size goes on the small factor."""
        (_, (hidden, _)), (_, (hidden_mod, _)) = first, second
        factors = [((h - h_mod) / batch_size, h_prev_mod)
                   for h, h_mod, h_prev_mod in zip(hidden[1:], hidden_mod[1:], hidden_mod[:-1])]
        factors.append((e_mod / batch_size, hidden_mod[-1]))
        return factors


def patch_columns(x, size):
    """Every size x size patch of x (N, C, H, W) as a column, rows in the order of
    conv.weight.flatten(1): (C * size * size, N * positions). A strided view, copied once
    (in this order the copy runs along image rows: much faster than patches as rows)."""
    n, c, h, w = x.shape
    x = x.contiguous()
    s_n, s_c, s_h, s_w = x.stride()
    view = x.as_strided((c, size, size, n, h - size + 1, w - size + 1),
                        (s_c, s_h, s_w, s_n, s_h, s_w))
    return view.reshape(c * size * size, -1)


def max_pool_2x2(maps):
    """2x2 max-pooling of maps (C, N, H, W) with H, W even, as maxima of strided views."""
    rows = torch.maximum(maps[:, :, 0::2], maps[:, :, 1::2])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class ConvNet(nn.Module):
    """conv 5x5 (32 maps) -> ReLU -> max-pool 2 -> fc -> softmax; PyTorch's default init.

    The convolution is one matrix product of the kernels with the patch columns, giving
    channel-first feature maps (32, N * positions); the patch columns are kept, since the
    PEPITA conv update is a product of (h - h') with the same columns. (Faster on CPUs than
    F.conv2d + F.max_pool2d.)"""

    def __init__(self, channels, image_size, n_out):
        super().__init__()
        self.conv = nn.Conv2d(channels, 32, 5, bias=False)
        self.side = image_size - 4  # even for both published models
        self.fc = nn.Linear(32 * (self.side // 2) ** 2, n_out, bias=False)
        self.layers = [self.conv, self.fc]

    def forward(self, x, masks=None, logits=False):
        """Output and (patch columns of x, ReLU(conv(x)) before pooling as (32, N *
        positions), pooled features flattened in PyTorch's (C, H, W) order)."""
        columns = patch_columns(x, self.conv.kernel_size[0])
        features = (self.conv.weight.flatten(1) @ columns).relu_()
        maps = features.view(32, len(x), self.side, self.side)
        pooled = max_pool_2x2(maps).permute(1, 0, 2, 3).flatten(1)
        out = self.fc(pooled)
        return (out if logits else F.softmax(out, dim=1)), (columns, features, pooled)

    def mask_sizes(self):
        return []

    def first_pass(self, x, masks, B):
        """Pass 1 (nothing to share with the second: see modulated_pass)."""
        return self(x, masks), None

    def modulated_pass(self, x_mod, masks, first, e, W1_B):
        """The second pass (the conv layer gains nothing from linearity: a full pass)."""
        return self(x_mod, masks)

    def pepita_factors(self, first, second, e, e_mod, batch_size, sqrt_conv=False):
        """Each layer's gradient g = D^T X as its factors (D, X), the conv kernels flattened.
        fc: dW = -e^T pooled' (the FIRST pass's error, the second pass's features).
        conv: dW = mean over the batch and positions of (h - h') * patch of x', added without
        the fc rule's minus sign (so it moves opposite), then divided by batch_size again."""
        (_, (_, features, _)), (_, (columns_mod, features_mod, pooled_mod)) = first, second
        n = len(e)
        positions = features.shape[1] // n
        scale = math.sqrt(positions) if sqrt_conv else positions
        conv_delta = (features_mod - features) / (n * scale * batch_size)
        return [(conv_delta.T, columns_mod.T), (e / batch_size, pooled_mod)]


MODELS = {
    # name: (input shape (C, H, W) or None for any, constructor(n_in, n_out, w_init, rng))
    "Net1conv1fcXL": ((1, 28, 28), lambda n_in, n_out, w_init, rng: ConvNet(1, 28, n_out)),
    "Net1conv1fcXL_cif": ((3, 32, 32), lambda n_in, n_out, w_init, rng: ConvNet(3, 32, n_out)),
    "NetFC1x1024DOcust": ((1, 28, 28), lambda n_in, n_out, w_init, rng:
                          FCNet([n_in, 1024, n_out], w_init, rng)),
    "NetFC1x1024DOcust_cif": ((3, 32, 32), lambda n_in, n_out, w_init, rng:
                              FCNet([n_in, 1024, n_out], w_init, rng)),
}


def build_model(name, input_shape, n_out, w_init="he_uniform", rng=None, hidden=None):
    """The named model for inputs of input_shape (C, H, W); "NetFC" takes hidden sizes."""
    n_in = int(np.prod(input_shape))
    if name == "NetFC":
        return FCNet([n_in, *(hidden or [1024]), n_out], w_init, rng)
    if name not in MODELS:
        raise UsageError(f"unknown --model {name!r}; choose one of "
                         f"{', '.join([*MODELS, 'NetFC'])}")
    shape, make = MODELS[name]
    if tuple(input_shape) != shape:
        raise UsageError(f"--model {name} takes {shape[0]}x{shape[1]}x{shape[2]} images, the "
                         f"dataset has {'x'.join(map(str, input_shape))}; pick the model "
                         "for this dataset (the _cif models take CIFAR)")
    return make(n_in, n_out, w_init, rng)


def draw_masks(model, generator, n, keep, device):
    """Dropout masks Bernoulli(keep) / keep for the model's hidden layers, or None."""
    sizes = model.mask_sizes()
    if keep == 1 or not sizes:
        return None
    return [(torch.rand(n, size, generator=generator, device=device) < keep).float() / keep
            for size in sizes]


@torch.no_grad()
def pepita_step(model, optimizer, x, target, B, masks, batch_size, sqrt_conv=False):
    """One PEPITA batch: pass 1 on x, pass 2 on x + e B^T, then the layers' updates.
    Returns the first pass's output."""
    first, W1_B = model.first_pass(x, masks, B)
    e = first[0] - target
    x_mod = x + (e @ B.T).view_as(x)
    second = model.modulated_pass(x_mod, masks, first, e, W1_B)
    e_mod = second[0] - target
    factors = model.pepita_factors(first, second, e, e_mod, batch_size, sqrt_conv=sqrt_conv)
    apply_factors(model, optimizer, factors)
    return first[0]


class PublishedMomentum(torch.optim.Optimizer):
    """The published PEPITA update: V = 0.9 V + lr g; W -= V (torch's SGD keeps lr outside
    the velocity, which differs after a learning-rate change). With weight decay wd,
    g = D^T X + wd W, as torch's SGD adds it.

    It takes g as factors, g = D^T X, and keeps V as scale * buffer: then V = 0.9 V + lr g is
    scale *= 0.9 and one addmm_ adding (lr / scale) D^T X into the buffer, and W -= V one
    add_. Two passes over weight-sized tensors instead of five. (One parameter group.)"""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.velocity_scale = 1.0

    @torch.no_grad()
    def step_factors(self, weights_and_factors):
        """weights_and_factors: (W, (D, X)) pairs, g = D^T X shaped like W."""
        group = self.param_groups[0]
        self.velocity_scale *= group["momentum"]
        s = self.velocity_scale
        for weight, (delta, inputs) in weights_and_factors:
            state = self.state[weight]
            if "velocity" not in state:
                state["velocity"] = torch.zeros_like(weight)
            buffer = state["velocity"]
            if group["weight_decay"]:
                buffer.add_(weight, alpha=group["lr"] * group["weight_decay"] / s)
            buffer.view(len(buffer), -1).addmm_(delta.T, inputs, alpha=group["lr"] / s)
            weight.add_(buffer, alpha=-s)
        if s < 1e-3:  # keep the buffers' values in a safe range
            self.settle()

    @torch.no_grad()
    def settle(self):
        """Fold the scale into the buffers: each state's "velocity" is then V itself."""
        for state in self.state.values():
            state["velocity"].mul_(self.velocity_scale)
        self.velocity_scale = 1.0

    def state_dict(self):
        self.settle()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.velocity_scale = 1.0


def make_optimizer(kind, rule, params, lr, weight_decay=0.0, mode="published"):
    """SGD, mom or adam, with L2 weight decay; mom is the published PEPITA form for ERIN's
    published mode, torch's SGD with momentum for BP (as published) and for the follow-up's
    modes (as its code)."""
    if kind == "SGD":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if kind == "mom":
        return (PublishedMomentum(params, lr, weight_decay=weight_decay)
                if rule == "ERIN" and mode == "published"
                else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay))
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


# ------------------------------------------------------------------------------------------
# The follow-up's rules (Srinivasan et al., ICLR 2024; ../shared/pepita-reference.md, 7):
# update modes, per-layer feedback, weight mirroring, activation normalization. FCNet only.
# ------------------------------------------------------------------------------------------
PEPITA_MODES = ("published", "modulated", "forward", "mixed", "time_local")
NORMALIZATIONS = ("batch", "sample")


def normalized(h, how):
    """batch: h / ||h||_F over the whole batch (the follow-up's; one scalar per batch);
    sample: each row over its own L2 norm (a sample's output then ignores its batch)."""
    norm = h.norm() if how == "batch" else h.norm(dim=1, keepdim=True)
    return h / norm.clamp_min(1e-12)  # an all-zero block output stays zero


class Feedback:
    """The projection F (n_in x n_out) of the modulated pass: one matrix ("uniform", the
    ICML F) or the product B_1 ... B_L of one matrix per layer ("normal", the follow-up's),
    which weight mirroring trains. `matrices` are the state; F follows them."""

    def __init__(self, matrices):
        self.matrices = matrices
        self.refresh()

    def refresh(self):
        """F = B_1 (B_2 (... B_L)): from the right, every product has only n_out columns
        (from the left, 1024 x 1024 layers would cost about 1000 times more)."""
        self.F = functools.reduce(lambda right, B: B @ right, reversed(self.matrices))

    @property
    def per_layer(self):
        return len(self.matrices) > 1


def feedback_sd(n_in, b_std):
    """The std of the follow-up's F: sqrt(2 / n_in) * Bstd."""
    return math.sqrt(2 / n_in) * b_std


def normal_feedback(generator, sizes, b_std, device="cpu"):
    """One B_l per layer, (n_{l-1} x n_l), N(0, s_B) with s_B = (sd / sqrt(prod of the
    hidden sizes)) ** (1 / L), so that std(B_1 ... B_L) is about sd."""
    depth = len(sizes) - 1
    s_b = (feedback_sd(sizes[0], b_std) / math.sqrt(math.prod(sizes[1:-1]))) ** (1 / depth)
    return Feedback([torch.randn(n_in, n_out, generator=generator, device=device) * s_b
                     for n_in, n_out in zip(sizes[:-1], sizes[1:])])


@torch.no_grad()
def mirror_feedback(model, feedback, generator, batch_size, keep, lr, weight_decay, sd):
    """One weight-mirroring step of every B_l, then the rescaling that keeps std(F) = sd.
    Noise xi = 0.1 N(0, 1) (batch x n_{l-1}) minus its mean drives block l alone (with fresh
    dropout masks), y_l = block_l(xi), and B_l += lr (xi^T y_l / batch) - lr wd B_l."""
    depth = len(feedback.matrices)
    for index, B in enumerate(feedback.matrices):
        xi = 0.1 * torch.randn(batch_size, B.shape[0], generator=generator, device=B.device)
        xi -= xi.mean()
        mask = None
        if index < depth - 1 and keep < 1:
            mask = (torch.rand(batch_size, B.shape[1], generator=generator,
                               device=B.device) < keep).float() / keep
        y = model.block(index, xi, mask)
        B.mul_(1 - lr * weight_decay).addmm_(xi.T, y, alpha=lr / batch_size)
    feedback.refresh()
    scale = (sd / float(feedback.F.std())) ** (1 / depth)
    for B in feedback.matrices:
        B.mul_(scale)
    feedback.refresh()


def followup_factors(mode, first, second, target, batch_size):
    """Each layer's gradient g = D^T X as factors (D, X), for the follow-up's modes (not
    time_local): hidden l and last layer L, with h_0 = x, primes for the modulated pass:
    modulated: (h_l - h'_l)^T h'_{l-1}, e^T h'_{L-1} (the FIRST pass's error e);
    forward:   (h_l - h'_l)^T h_{l-1},  e^T h_{L-1};
    mixed:     h_l^T h_{l-1} - h'_l^T h'_{l-1},  y^T h_{L-1} - t^T h'_{L-1}."""
    (y, (hidden, _)), (_, (hidden_mod, _)) = first, second
    pairs = list(zip(hidden[1:], hidden_mod[1:], hidden[:-1], hidden_mod[:-1]))
    e = y - target
    if mode == "modulated":
        factors = [(h - h_mod, prev_mod) for h, h_mod, _, prev_mod in pairs]
        factors.append((e, hidden_mod[-1]))
    elif mode == "forward":
        factors = [(h - h_mod, prev) for h, h_mod, prev, _ in pairs]
        factors.append((e, hidden[-1]))
    else:  # mixed: Hebbian on the clean pass, anti-Hebbian on the modulated one
        factors = [(torch.cat([h, -h_mod]), torch.cat([prev, prev_mod]))
                   for h, h_mod, prev, prev_mod in pairs]
        factors.append((torch.cat([y, -target]), torch.cat([hidden[-1], hidden_mod[-1]])))
    return [(delta / batch_size, inputs) for delta, inputs in factors]


def apply_factors(model, optimizer, factors):
    """One optimiser step with g = D^T X for every trained layer (not a frozen conv)."""
    trained = [(layer.weight, pair) for layer, pair in zip(model.layers, factors)
               if layer.weight.requires_grad]
    if isinstance(optimizer, PublishedMomentum):
        optimizer.step_factors(trained)
        return
    for weight, (delta, inputs) in trained:
        weight.grad = (delta.T @ inputs).view_as(weight)
    optimizer.step()


@torch.no_grad()
def followup_step(model, optimizer, x, target, F_proj, masks, mode, batch_size, new_masks,
                  clean_step_only=False):
    """One batch of the follow-up's PEPITA modes; x' = x - e F^T (their sign). time_local:
    a step after the clean pass (h_l^T h_{l-1}, y^T h_{L-1}), then, unless clean_step_only,
    the modulated pass with the updated weights and fresh masks (new_masks()) and a second
    step (-h'_l^T h'_{l-1}, -t^T h'_{L-1}). Returns the first pass's output."""
    first, W1_F = model.first_pass(x, masks, F_proj)
    e = first[0] - target
    x_mod = x - (e @ F_proj.T).view_as(x)
    if mode == "time_local":
        y, (hidden, _) = first
        apply_factors(model, optimizer, [(h / batch_size, prev) for h, prev in
                                         zip([*hidden[1:], y], hidden)])
        if clean_step_only:
            return y
        _, (hidden_mod, _) = model(x_mod, new_masks())
        apply_factors(model, optimizer, [(-h / batch_size, prev) for h, prev in
                                         zip([*hidden_mod[1:], target], hidden_mod)])
        return y
    second = model.modulated_pass(x_mod, masks, first, -e, W1_F)
    apply_factors(model, optimizer, followup_factors(mode, first, second, target, batch_size))
    return first[0]


@torch.no_grad()
def alignment_angle(model, F_proj):
    """The angle between F and the forward weights' product (W_L ... W_1)^T."""
    product = functools.reduce(lambda acc, layer: acc @ layer.weight.T, model.layers[1:],
                               model.layers[0].weight.T)
    return utils.angle_degrees(product, F_proj)


@torch.no_grad()
def alignment(model, feedback):
    """The follow-up's per-epoch logs: the angle between F and (W_L ... W_1)^T, per layer
    between W_l^T and B_l (per-layer feedback), the weights' norms, each B_l's mean, std."""
    logs = {"angle_F": alignment_angle(model, feedback.F),
            "weight_norms": [float(layer.weight.norm()) for layer in model.layers],
            "B_mean": [float(B.mean()) for B in feedback.matrices],
            "B_std": [float(B.std()) for B in feedback.matrices]}
    if feedback.per_layer:
        logs["angle_layers"] = [utils.angle_degrees(layer.weight.T, B)
                                for layer, B in zip(model.layers, feedback.matrices)]
    return logs
