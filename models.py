"""The paper's PyTorch nets, as nn.Sequentials that pepita.PEPITA trains (and BP): the
convolutional Net1conv1fcXL and the fully connected NetFC1x1024DOcust of the tutorial, no
biases, returning logits; the published momentum; the follow-up's feedback matrices and
weight mirroring. The rule itself is pepita.PEPITA's, the one torch engine.

The projection of the modulated pass is called F in the paper and B in the published flags
(--Bstd): here, as in pepita.py, B.
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pepita
import utils
from pepita import WEIGHTED
from utils import UsageError, init_weight


def fc_net(sizes, keep=1.0, normalize=None, w_init="he_uniform", rng=None):
    """Fully connected: each hidden block linear -> ReLU -> dropout (keep probability keep)
    [-> pepita.Normalize(normalize)], a linear last layer; the weights drawn by init_weight
    from rng, layer by layer."""
    rng = rng or np.random.default_rng()
    modules = [nn.Flatten()]
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = nn.Linear(n_in, n_out, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(init_weight(rng, w_init, n_out, n_in,
                                                            np.float32)))
        modules.append(layer)
        if index < len(sizes) - 2:
            modules += [nn.ReLU(), nn.Dropout(1 - keep)]
            modules += [pepita.Normalize(normalize)] if normalize else []
    return nn.Sequential(*modules)


def conv_net(channels, image_size, n_out):
    """conv 5x5 (32 maps) -> ReLU -> max-pool 2 -> fc; PyTorch's default init."""
    side = (image_size - 4) // 2
    return nn.Sequential(nn.Conv2d(channels, 32, 5, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * side * side, n_out, bias=False))


def fc_model(hidden):
    return lambda n_in, n_out, w_init, rng, keep, normalize: fc_net(
        [n_in, *hidden, n_out], keep, normalize, w_init, rng)


MODELS = {
    # name: (input shape (C, H, W) or None for any, constructor)
    "Net1conv1fcXL": ((1, 28, 28), lambda n_in, n_out, *rest: conv_net(1, 28, n_out)),
    "Net1conv1fcXL_cif": ((3, 32, 32), lambda n_in, n_out, *rest: conv_net(3, 32, n_out)),
    "NetFC1x1024DOcust": ((1, 28, 28), fc_model([1024])),
    "NetFC1x1024DOcust_cif": ((3, 32, 32), fc_model([1024])),
}


def build_model(name, input_shape, n_out, w_init="he_uniform", rng=None, hidden=None,
                keep=1.0, normalize=None):
    """The named model for inputs of input_shape (C, H, W); "NetFC" takes hidden sizes;
    keep: the dropout keep probability of fully connected nets; normalize: their
    pepita.Normalize after each hidden block ("batch", "sample" or None)."""
    n_in = int(np.prod(input_shape))
    if name == "NetFC":
        return fc_model(hidden or [1024])(n_in, n_out, w_init, rng, keep, normalize)
    if name not in MODELS:
        raise UsageError(f"unknown --model {name!r}; choose one of "
                         f"{', '.join([*MODELS, 'NetFC'])}")
    shape, make = MODELS[name]
    if tuple(input_shape) != shape:
        raise UsageError(f"--model {name} takes {shape[0]}x{shape[1]}x{shape[2]} images, the "
                         f"dataset has {'x'.join(map(str, input_shape))}; pick the model "
                         "for this dataset (the _cif models take CIFAR)")
    return make(n_in, n_out, w_init, rng, keep, normalize)


def weight_layers(model):
    return [module for module in model if isinstance(module, WEIGHTED)]


def layer_sizes(model):
    """[inputs, hidden sizes..., outputs] of a fully connected net."""
    layers = weight_layers(model)
    return [layers[0].in_features, *(layer.out_features for layer in layers)]


def load_weights(model, state):
    """model.load_state_dict(state), also from the layout of the nets before they were
    nn.Sequentials (FCNet's layers.<i>.weight, ConvNet's conv.weight and fc.weight: their
    weights in order)."""
    old_layout = state and all(key.split(".")[0] in ("layers", "conv", "fc") for key in state)
    if old_layout:
        names = [f"{i}.weight" for i, m in enumerate(model) if isinstance(m, WEIGHTED)]
        if len(names) != len(state):
            raise KeyError(f"{len(state)} weights for a model of {len(names)} layers")
        state = dict(zip(names, state.values()))
    model.load_state_dict(state)


class PublishedMomentum(torch.optim.Optimizer):
    """The published PEPITA update: V = 0.9 V + lr g; W -= V (torch's SGD keeps lr outside
    the velocity, which differs after a learning-rate change). With weight decay wd,
    g = D^T X + wd W, as torch's SGD adds it.

    It takes g as factors, g = D^T X (pepita.PEPITA hands them over), and keeps V as
    scale * buffer: then V = 0.9 V + lr g is scale *= 0.9 and one addmm_ adding
    (lr / scale) D^T X into the buffer, and W -= V one add_. Two passes over weight-sized
    tensors instead of five. (One parameter group.)"""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.velocity_scale = 1.0

    @torch.no_grad()
    def step_factors(self, updates):
        """updates: (parameter, terms) pairs as pepita.PEPITA.factors gives them, g the sum
        of the terms: (D, X) pairs standing for D^T X, and tensors."""
        group = self.param_groups[0]
        self.velocity_scale *= group["momentum"]
        s = self.velocity_scale
        for param, terms in updates:
            state = self.state[param]
            if "velocity" not in state:
                state["velocity"] = torch.zeros_like(param)
            buffer = state["velocity"]
            if group["weight_decay"]:
                buffer.add_(param, alpha=group["lr"] * group["weight_decay"] / s)
            for term in terms:
                if isinstance(term, tuple):
                    buffer.view(len(buffer), -1).addmm_(term[0].T, term[1],
                                                        alpha=group["lr"] / s)
                else:
                    buffer.add_(term, alpha=group["lr"] / s)
            param.add_(buffer, alpha=-s)
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
# per-layer feedback and weight mirroring, for fully connected nets (their update modes and
# normalization are pepita.PEPITA's and pepita.Normalize).
# ------------------------------------------------------------------------------------------
PEPITA_MODES = ("published", "modulated", "forward", "mixed", "time_local")
NORMALIZATIONS = ("batch", "sample")


class Feedback:
    """The projection B (n_in x n_out) of the modulated pass: one matrix ("uniform", the
    ICML paper's F) or the product B_1 ... B_L of one matrix per layer ("normal", the
    follow-up's), which weight mirroring trains. `matrices` are the state; B follows them."""

    def __init__(self, matrices):
        self.matrices = matrices
        self.refresh()

    def refresh(self):
        """B = B_1 (B_2 (... B_L)): from the right, every product has only n_out columns
        (from the left, 1024 x 1024 layers would cost about 1000 times more)."""
        self.B = functools.reduce(lambda right, B: B @ right, reversed(self.matrices))

    @property
    def per_layer(self):
        return len(self.matrices) > 1


def feedback_sd(n_in, b_std):
    """The std of the follow-up's B: sqrt(2 / n_in) * Bstd."""
    return math.sqrt(2 / n_in) * b_std


def normal_feedback(generator, sizes, b_std, device="cpu"):
    """One B_l per layer, (n_{l-1} x n_l), N(0, s_B) with s_B = (sd / sqrt(prod of the
    hidden sizes)) ** (1 / L), so that std(B_1 ... B_L) is about sd."""
    depth = len(sizes) - 1
    s_b = (feedback_sd(sizes[0], b_std) / math.sqrt(math.prod(sizes[1:-1]))) ** (1 / depth)
    return Feedback([torch.randn(n_in, n_out, generator=generator, device=device) * s_b
                     for n_in, n_out in zip(sizes[:-1], sizes[1:])])


def blocks(model):
    """Each weight layer with the modules after it, up to the next weight layer."""
    groups = []
    for module in model:
        if isinstance(module, WEIGHTED):
            groups.append([module])
        elif groups:
            groups[-1].append(module)
    return groups


def block_output(block, h, mask):
    """A block alone on h, its dropout's mask given (None: none)."""
    for module in block:
        h = (h if mask is None else h * mask) if isinstance(module, nn.Dropout) else module(h)
    return h


@torch.no_grad()
def mirror_feedback(model, feedback, generator, batch_size, keep, lr, weight_decay, sd):
    """One weight-mirroring step of every B_l, then the rescaling that keeps std(B) = sd.
    Noise xi = 0.1 N(0, 1) (batch x n_{l-1}) minus its mean drives block l alone (with fresh
    dropout masks), y_l = block_l(xi) (a softmax after the last), and
    B_l += lr (xi^T y_l / batch) - lr wd B_l."""
    depth = len(feedback.matrices)
    for index, (B, block) in enumerate(zip(feedback.matrices, blocks(model))):
        xi = 0.1 * torch.randn(batch_size, B.shape[0], generator=generator, device=B.device)
        xi -= xi.mean()
        mask = None
        if index < depth - 1 and keep < 1:
            mask = (torch.rand(batch_size, B.shape[1], generator=generator,
                               device=B.device) < keep).float() / keep
        y = block_output(block, xi, mask)
        y = F.softmax(y, dim=1) if index == depth - 1 else y
        B.mul_(1 - lr * weight_decay).addmm_(xi.T, y, alpha=lr / batch_size)
    feedback.refresh()
    scale = (sd / float(feedback.B.std())) ** (1 / depth)
    for B in feedback.matrices:
        B.mul_(scale)
    feedback.refresh()


@torch.no_grad()
def alignment_angle(model, B):
    """The angle between B and the forward weights' product (W_L ... W_1)^T."""
    layers = weight_layers(model)
    product = functools.reduce(lambda acc, layer: acc @ layer.weight.T, layers[1:],
                               layers[0].weight.T)
    return utils.angle_degrees(product, B)


@torch.no_grad()
def alignment(model, feedback):
    """The follow-up's per-epoch logs: the angle between B and (W_L ... W_1)^T, per layer
    between W_l^T and B_l (per-layer feedback), the weights' norms, each B_l's mean, std.
    (The keys keep the published names: angle_F is B's angle.)"""
    layers = weight_layers(model)
    logs = {"angle_F": alignment_angle(model, feedback.B),
            "weight_norms": [float(layer.weight.norm()) for layer in layers],
            "B_mean": [float(B.mean()) for B in feedback.matrices],
            "B_std": [float(B.std()) for B in feedback.matrices]}
    if feedback.per_layer:
        logs["angle_layers"] = [utils.angle_degrees(layer.weight.T, B)
                                for layer, B in zip(layers, feedback.matrices)]
    return logs
