"""PyTorch models of the paper and their PEPITA update with a fixed random projection B
(called F in the paper): convolutional (Net1conv1fcXL) and fully connected (the tutorial's
NetFC1x1024DOcust) networks, no biases, softmax output.

Each forward returns the activations the update needs, so no hooks are involved. The
updates below are written as gradients g (W -= eta g), i.e. g = -dW / batch_size for the
published W += eta dW / batch_size.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils import UsageError, init_weight


class FCNet(nn.Module):
    """Fully connected: ReLU hidden layers with dropout masks, softmax output."""

    def __init__(self, sizes, w_init="he_uniform", rng=None):
        super().__init__()
        self.sizes = list(sizes)
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
            h = F.relu(pre if index == 0 else layer(h))
            if masks is not None:
                h = h * masks[index]
            hidden.append(h)
        out = self.layers[-1](h)
        return (out if logits else F.softmax(out, dim=1)), (hidden, pre)

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


def projection_matrix(generator, n_in, n_out, b_std=0.05, mean_zero=True, device="cpu"):
    """B (= F), shape (n_in, n_out): U(-s, s) * Bstd, s = sqrt(6 / n_in); U(0, s) * Bstd
    without mean_zero."""
    limit = math.sqrt(6 / n_in)
    u = torch.rand(n_in, n_out, generator=generator, device=device)
    return (u * 2 * limit - limit if mean_zero else u * limit) * b_std


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
    trained = [(layer.weight, pair) for layer, pair in zip(model.layers, factors)
               if layer.weight.requires_grad]  # not a frozen conv
    if isinstance(optimizer, PublishedMomentum):
        optimizer.step_factors(trained)
    else:
        for weight, (delta, inputs) in trained:
            weight.grad = (delta.T @ inputs).view_as(weight)
        optimizer.step()
    return first[0]


class PublishedMomentum(torch.optim.Optimizer):
    """The published PEPITA update: V = 0.9 V + lr g; W -= V (torch's SGD keeps lr outside
    the velocity, which differs after a learning-rate change).

    It takes g as factors, g = D^T X, and keeps V as scale * buffer: then V = 0.9 V + lr g is
    scale *= 0.9 and one addmm_ adding (lr / scale) D^T X into the buffer, and W -= V one
    add_. Two passes over weight-sized tensors instead of five. (One parameter group.)"""

    def __init__(self, params, lr, momentum=0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum))
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


def make_optimizer(kind, rule, params, lr):
    """SGD, mom or adam; mom is the published PEPITA form for ERIN, torch's SGD for BP."""
    if kind == "SGD":
        return torch.optim.SGD(params, lr=lr)
    if kind == "mom":
        return (PublishedMomentum(params, lr) if rule == "ERIN"
                else torch.optim.SGD(params, lr=lr, momentum=0.9))
    return torch.optim.Adam(params, lr=lr)
