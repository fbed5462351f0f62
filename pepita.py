"""PEPITA as a training step for your own PyTorch model: two forward passes, no backward pass.

    import pepita
    rule = pepita.PEPITA(model, n_classes=10, input_shape=(1, 28, 28), Bstd=0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in loader:
        optimizer.zero_grad()
        logits = rule.step(x, y)  # the first pass's output
        optimizer.step()

The model: an nn.Sequential (nested ones too) of nn.Linear and nn.Conv2d layers (with or
without bias), element-wise activations, max and average pooling, nn.Flatten and nn.Dropout,
returning logits. One step (Dellaferrera & Kreiman, ICML 2022):

    pass 1   on x:              h_l, e = softmax(logits) - onehot(y)
    pass 2   on x' = x + e B^T:  h'_l, a'_l (each weight layer's input), e'
    hidden layer l:  g_l = (h_l - h'_l)^T a'_l / batch
    last layer:      g_L = e'^T a'_L / batch

h_l is the layer's output after the element-wise modules right after it (its activation and
dropout; the layer's own output if none follows). A conv layer takes the same rule: g is the
correlation of a' with (h - h'), torch.nn.grad.conv2d_weight(a', W.shape, h - h') / batch.
Biases take the rule with an input of ones. `step` writes g into each parameter's .grad and
changes no weight: any torch.optim optimizer, scheduler, weight decay or clipping applies it.
Dropout draws one mask per sample and step, the same in both passes.

Options: `last_error="first"` uses e for the last layer (the published conv net does);
`conv_update="published"` is the published conv net's update (opposite sign, divided again by
the output positions and the batch size; `sqrt_conv` divides by their square root instead);
`mode` "modulated", "forward" or "mixed" are the follow-up's update modes (Srinivasan et al.,
ICLR 2024), with its sign x' = x - e F^T.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# element-wise and deterministic, with no parameters of their own (PReLU's would not be
# trained, RReLU's slopes would differ between the passes), and dropout, whose mask is shared
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
               nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout)
RESHAPING = (nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)
WEIGHTED = (nn.Linear, nn.Conv2d)
MODES = ("published", "modulated", "forward", "mixed")
LAST_ERRORS = ("modulated", "first")
CONV_UPDATES = ("rule", "published")


def projection_matrix(generator, n_in, n_out, b_std=0.05, mean_zero=True, device="cpu"):
    """B (= F), shape (n_in, n_out), as the paper's nets draw it: U(-s, s) * Bstd with
    s = sqrt(6 / n_in); U(0, s) * Bstd without mean_zero."""
    limit = math.sqrt(6 / n_in)
    u = torch.rand(n_in, n_out, generator=generator, device=device)
    return (u * 2 * limit - limit if mean_zero else u * limit) * b_std


def flat_modules(model):
    """The leaf modules of an nn.Sequential (nested ones opened) as (name, module), or a
    TypeError that names the first module PEPITA cannot train and its position."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"pepita.PEPITA trains an nn.Sequential; got {type(model).__name__}, "
                        "whose forward it cannot see (a skip connection or recurrence "
                        "would be trained wrongly): rebuild the model as an nn.Sequential")
    leaves = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            continue
        if not isinstance(module, (*WEIGHTED, *ELEMENTWISE, *RESHAPING)):
            raise TypeError(f"pepita.PEPITA cannot train layer {len(leaves)} ({name}: "
                            f"{type(module).__name__}): it takes nn.Linear, nn.Conv2d, "
                            "element-wise activations, pooling, nn.Flatten and nn.Dropout "
                            "in an nn.Sequential")
        leaves.append((name, module))
    if not any(isinstance(m, WEIGHTED) for _, m in leaves):
        raise TypeError("pepita.PEPITA: the model has no nn.Linear or nn.Conv2d layer to train")
    return leaves


class PEPITA:
    """The PEPITA rule for a feedforward model (see the module's docstring).

    model: nn.Sequential returning logits; n_classes; input_shape: one sample's shape, e.g.
    (1, 28, 28); Bstd, B_mean_zero: the projection B's scale and centring; seed or generator
    (on the model's device): B and the dropout masks; B: a projection of your own instead,
    shape (number of input features, n_classes)."""

    def __init__(self, model, n_classes, input_shape, Bstd=0.05, *, B_mean_zero=True, seed=None,
                 generator=None, B=None, mode="published", last_error=None,
                 conv_update="rule", sqrt_conv=False, check_labels=True):
        self.model = model
        self.layers = [module for _, module in flat_modules(model)]
        self.n_classes = int(n_classes)
        self.input_shape = tuple(input_shape)
        self.mode = _choice("mode", mode, MODES)
        if last_error is not None and mode != "published":
            raise ValueError(f"last_error goes with mode='published'; mode={mode!r} fixes "
                             "the last layer's error itself")
        self.last_error = _choice("last_error", last_error or "modulated", LAST_ERRORS)
        self.conv_update = _choice("conv_update", conv_update, CONV_UPDATES)
        self.sqrt_conv = bool(sqrt_conv)
        self.check_labels = check_labels
        weight = next(m.weight for m in self.layers if isinstance(m, WEIGHTED))
        self.device, self.dtype = weight.device, weight.dtype
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(torch.seed() if seed is None else seed)
        self.generator = generator
        n_features = math.prod(self.input_shape)
        if B is None:
            B = projection_matrix(generator, n_features, self.n_classes, Bstd, B_mean_zero,
                                  self.device)
        if tuple(B.shape) != (n_features, self.n_classes):
            raise ValueError(f"B has shape {tuple(B.shape)}; expected ({n_features}, "
                             f"{self.n_classes}): (input features, classes)")
        self.B = B.to(self.device, self.dtype)
        self.weighted = [i for i, m in enumerate(self.layers) if isinstance(m, WEIGHTED)]
        self.read_at = {i: self._activation_end(i) for i in self.weighted}
        first = self.weighted[0]
        # a first Linear layer on the (flattened) input is linear in it: see compute
        self.linear_first = isinstance(self.layers[first], nn.Linear) and all(
            isinstance(m, nn.Flatten) for m in self.layers[:first])
        self.mask_shapes = self._probe()

    def _activation_end(self, index):
        """Where layer index's h is read: after the element-wise modules that follow it."""
        end = index
        while end + 1 < len(self.layers) and isinstance(self.layers[end + 1], ELEMENTWISE):
            end += 1
        return end

    @torch.no_grad()
    def _probe(self):
        """One pass on a zero sample: checks that input_shape fits the model and n_classes
        its output, and gives each dropout's mask shape (per sample)."""
        x = torch.zeros(1, *self.input_shape, device=self.device, dtype=self.dtype)
        shapes = {}
        for index, module in enumerate(self.layers):
            if isinstance(module, nn.Dropout):
                shapes[index] = tuple(x.shape[1:])
                continue
            try:
                x = module(x)
            except RuntimeError as err:
                raise ValueError(f"input_shape {self.input_shape} does not fit layer {index} "
                                 f"({module}): {str(err).splitlines()[0]}") from None
        if tuple(x.shape) != (1, self.n_classes):
            raise ValueError(f"the model's output for one sample has shape "
                             f"{tuple(x.shape[1:])}; expected ({self.n_classes},) logits")
        return shapes

    # --- one step -----------------------------------------------------------------------------
    def step(self, x, y):
        """Two forward passes; writes each parameter's PEPITA gradient into .grad (added to
        what .grad holds, as backward() does). Returns the first pass's logits."""
        self._check(x, y)
        masks = self.draw_masks(len(x))
        logits, grads = self.compute(x, y, masks)
        with torch.no_grad():
            for param, grad in grads:
                if param.requires_grad:
                    param.grad = grad if param.grad is None else param.grad.add_(grad)
        return logits

    def draw_masks(self, n):
        """Dropout masks Bernoulli(1 - p) / (1 - p), one per sample, for this step (none in
        eval mode), drawn as the paper's nets draw theirs."""
        masks = {}
        for index, shape in self.mask_shapes.items():
            keep = 1 - self.layers[index].p
            if self.model.training and keep < 1:
                u = torch.rand(n, *shape, generator=self.generator, device=self.device)
                masks[index] = (u < keep).to(self.dtype) / keep
        return masks

    @torch.no_grad()
    def compute(self, x, y, masks):
        """(first pass's logits, [(parameter, gradient)]): no host synchronisation, so that
        torch.compile can capture it whole."""
        target = F.one_hot(y.long(), self.n_classes).to(self.dtype)
        first_out, W1_B = self._first_layer(x)
        logits, inputs, outputs = self.forward(x, masks, first_out)
        e = F.softmax(logits, dim=1) - target
        sign = 1 if self.mode == "published" else -1  # the follow-up's x' = x - e F^T
        x_mod = x + sign * (e @ self.B.T).view_as(x)
        # W_1 x' = W_1 x + (W_1 B) e: a product with the small W_1 B instead of the batch
        first_mod = None if W1_B is None else first_out + sign * (e @ W1_B)
        logits_mod, inputs_mod, outputs_mod = self.forward(x_mod, masks, first_mod)
        e_mod = F.softmax(logits_mod, dim=1) - target
        grads = []
        last = self.weighted[-1]
        for index in self.weighted:
            if index == last:
                pairs = self._last_pairs(e, e_mod, inputs, inputs_mod, target, logits)
            else:
                pairs = self._hidden_pairs(outputs[index], outputs_mod[index], inputs[index],
                                           inputs_mod[index])
            grads += self._layer_grads(self.layers[index], pairs, len(x), index == last)
        return logits, grads

    def _first_layer(self, x):
        """With a linear first layer: its output on x and (W_1 B)^T from one product with
        W_1 (one read of the largest weight), else (None, None)."""
        if not self.linear_first:
            return None, None
        layer, n = self.layers[self.weighted[0]], len(x)
        # W_1 on the left: the faster order on CPUs for a wide W_1 and a small batch
        products = layer.weight @ torch.cat([x.reshape(n, -1), self.B.T]).T
        out = products[:, :n].T
        out = out.contiguous() if layer.bias is None else out + layer.bias
        return out, products[:, n:].T

    def forward(self, x, masks, first_out=None):
        """Logits, and per weight layer its input and its h (see _activation_end);
        first_out: the first weight layer's output, when known."""
        inputs, outputs, ends = {}, {}, {end: i for i, end in self.read_at.items()}
        for index, module in enumerate(self.layers):
            if index in self.read_at:
                inputs[index] = x
            if first_out is not None and index == self.weighted[0]:
                x = first_out
            elif isinstance(module, nn.Dropout):
                x = x * masks[index] if index in masks else x
            else:
                x = module(x)
            if index in ends:
                outputs[ends[index]] = x
        return x, inputs, outputs

    def _hidden_pairs(self, h, h_mod, a, a_mod):
        """A hidden layer's gradient as (delta, input) pairs, g = sum of delta (x) input."""
        if self.mode == "forward":
            return [(h - h_mod, a)]
        if self.mode == "mixed":  # Hebbian on the clean pass, anti-Hebbian on the modulated
            return [(h, a), (-h_mod, a_mod)]
        return [(h - h_mod, a_mod)]

    def _last_pairs(self, e, e_mod, inputs, inputs_mod, target, logits):
        last = self.weighted[-1]
        if self.mode == "forward":
            return [(e, inputs[last])]
        if self.mode == "mixed":
            return [(F.softmax(logits, dim=1), inputs[last]), (-target, inputs_mod[last])]
        error = e_mod if self.mode == "published" and self.last_error == "modulated" else e
        return [(error, inputs_mod[last])]

    def _layer_grads(self, layer, pairs, batch, is_last):
        """[(weight, g), (bias, g)] of one layer from its (delta, input) pairs; the scale
        goes on the small delta, not on the weight-sized product."""
        scale = 1 / batch
        if isinstance(layer, nn.Conv2d) and not is_last and self.conv_update == "published":
            positions = pairs[0][0][0, 0].numel()
            scale = -1 / (batch * batch * (math.sqrt(positions) if self.sqrt_conv
                                           else positions))
        weight_grad = bias_grad = None
        for delta, a in pairs:
            delta = delta * scale
            if isinstance(layer, nn.Conv2d):
                weight = torch.nn.grad.conv2d_weight(a, layer.weight.shape, delta, layer.stride,
                                                     layer.padding, layer.dilation, layer.groups)
                bias = delta.sum((0, 2, 3))
            else:
                delta = delta.reshape(-1, delta.shape[-1])
                weight, bias = delta.T @ a.reshape(-1, a.shape[-1]), delta.sum(0)
            weight_grad = weight if weight_grad is None else weight_grad.add_(weight)
            bias_grad = bias if bias_grad is None else bias_grad.add_(bias)
        grads = [(layer.weight, weight_grad)]
        if layer.bias is not None:
            grads.append((layer.bias, bias_grad))
        return grads

    def _check(self, x, y):
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"pepita.PEPITA.step: x has shape {tuple(x.shape)}; expected "
                             f"(batch, {', '.join(map(str, self.input_shape))})")
        if y.shape != (len(x),) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"pepita.PEPITA.step: y has shape {tuple(y.shape)} and type "
                             f"{y.dtype}; expected ({len(x)},) integer class indices")
        # one boolean read from the device; check_labels=False skips it (CUDA graphs)
        if self.check_labels and bool(((y < 0) | (y >= self.n_classes)).any()):
            raise ValueError(f"pepita.PEPITA.step: labels from {int(y.min())} to "
                             f"{int(y.max())}; expected 0..{self.n_classes - 1}")


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(map(repr, choices))}")
    return value
