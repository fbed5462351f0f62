"""PEPITA as a training step for your own PyTorch model: two forward passes, no backward pass.

    import pepita
    rule = pepita.PEPITA(model, n_classes=10, input_shape=(1, 28, 28), Bstd=0.05, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in loader:
        optimizer.zero_grad()
        logits = rule.step(x, y)  # the first pass's output
        optimizer.step()

The model: an nn.Sequential (nested ones too) of nn.Linear and nn.Conv2d layers (with or
without bias, any padding and padding mode), element-wise activations (in-place ones too),
max and average pooling, nn.Flatten and nn.Dropout, returning logits; a module may appear at
several places (tied weights take the sum of their places' updates). One step (Dellaferrera &
Kreiman, ICML 2022):

    pass 1   on x:              h_l, e = softmax(logits) - onehot(y)
    pass 2   on x' = x + e B^T:  h'_l, a'_l (each weight layer's input), e'
    hidden layer l:  g_l = (h_l - h'_l)^T a'_l / batch
    last layer:      g_L = e'^T a'_L / batch

h_l is the layer's output after the element-wise modules right after it (its activation and
dropout; the layer's own output if none follows). A conv layer takes the same rule: g is the
correlation of a' (padded as the layer pads) with (h - h'). The last weight layer may be
followed only by element-wise modules and nn.Flatten: its error is e reshaped to its output.
Biases take the rule with an input of ones. `step` writes g into each parameter's .grad and
changes no weight: any torch.optim optimizer, scheduler, weight decay or clipping applies it.
Each nn.Dropout in training mode (its own .training) draws one mask per sample and step, the
same in both passes.

Refused, in one line naming the module and its position: any other module, an
nn.Sequential subclass with a forward of its own, an accepted class whose forward was
replaced, a weight computed from other parameters (parametrizations, pruning, weight_norm),
and forward hooks (step runs the layers itself, so hooks would not fire as in model(x)).

Options: `last_error="first"` uses e for the last layer (the published conv net does);
`conv_update="published"` is the published conv net's update (opposite sign, divided again by
the output positions and the batch size; `sqrt_conv` divides by their square root instead);
`mode` "modulated", "forward" or "mixed" are the follow-up's update modes (Srinivasan et al.,
ICLR 2024), with its sign x' = x - e F^T.
"""
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

# element-wise and deterministic, with no parameters of their own (PReLU's would not be
# trained, RReLU's slopes would differ between the passes), and dropout, whose mask is shared
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
               nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout)
RESHAPING = (nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)
WEIGHTED = (nn.Linear, nn.Conv2d)
ACCEPTED = (*WEIGHTED, *ELEMENTWISE, *RESHAPING)
MODES = ("published", "modulated", "forward", "mixed")
LAST_ERRORS = ("modulated", "first")
CONV_UPDATES = ("rule", "published")
WHAT_IT_TAKES = ("it takes nn.Linear, nn.Conv2d, element-wise activations, pooling, "
                 "nn.Flatten and nn.Dropout in an nn.Sequential")


def projection_matrix(generator, n_in, n_out, b_std=0.05, mean_zero=True, device="cpu"):
    """B (= F), shape (n_in, n_out), as the paper's nets draw it: U(-s, s) * Bstd with
    s = sqrt(6 / n_in); U(0, s) * Bstd without mean_zero."""
    limit = math.sqrt(6 / n_in)
    u = torch.rand(n_in, n_out, generator=generator, device=device)
    return (u * 2 * limit - limit if mean_zero else u * limit) * b_std


# ------------------------------------------------------------------------------------------
# What a model is made of: its modules in the order model(x) runs them
# ------------------------------------------------------------------------------------------
def flat_modules(model):
    """The leaf modules in the order model(x) runs them, as (name, module): a module used at
    two places appears twice (named_modules() would list it once). A TypeError names the
    first module that PEPITA cannot train and its position."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"pepita.PEPITA trains an nn.Sequential; got {type(model).__name__}, "
                        "whose forward it cannot see (a skip connection or recurrence "
                        "would be trained wrongly): rebuild the model as an nn.Sequential")
    leaves = []
    _open(model, "model", leaves)
    if not any(isinstance(m, WEIGHTED) for _, m in leaves):
        raise TypeError("pepita.PEPITA: the model has no nn.Linear or nn.Conv2d layer to train")
    return leaves


def _open(sequential, name, leaves):
    if type(sequential).forward is not nn.Sequential.forward:
        where = (f"the model ({type(sequential).__name__})" if name == "model" else
                 f"layer {len(leaves)} ({name}: {type(sequential).__name__})")
        raise TypeError(f"pepita.PEPITA cannot train {where}: an "
                        "nn.Sequential subclass with a forward of its own (a skip connection "
                        "would be trained as if absent); use a plain nn.Sequential")
    # iterating _modules, not named_children(): a module at two places is run twice
    for child_name, module in sequential._modules.items():
        path = child_name if name == "model" else f"{name}.{child_name}"
        if isinstance(module, nn.Sequential):
            _open(module, path, leaves)
        else:
            _check_leaf(len(leaves), path, module)
            leaves.append((path, module))


def _check_leaf(index, name, module):
    where = f"layer {index} ({name}: {type(module).__name__})"
    if not isinstance(module, ACCEPTED):
        raise TypeError(f"pepita.PEPITA cannot train {where}: {WHAT_IT_TAKES}")
    base = next(cls for cls in type(module).__mro__ if cls in ACCEPTED)
    if parametrize.is_parametrized(module):
        raise TypeError(f"pepita.PEPITA cannot train {where}: its weight is computed by "
                        "torch.nn.utils.parametrize from other parameters, which the update "
                        "would not reach; remove the parametrization "
                        "(parametrize.remove_parametrizations)")
    if type(module).forward is not base.forward:
        raise TypeError(f"pepita.PEPITA cannot train {where}: a {base.__name__} with a forward "
                        f"of its own, which the rule cannot see; use {base.__name__} itself")
    params = dict(module.named_parameters(recurse=False))
    if isinstance(module, WEIGHTED) and not (
            set(params) <= {"weight", "bias"} and isinstance(module.weight, nn.Parameter)):
        raise TypeError(f"pepita.PEPITA cannot train {where}: its weight is computed from "
                        f"other parameters ({', '.join(params)}: pruning or weight_norm), "
                        "which the update would not reach; make it a plain weight first "
                        "(torch.nn.utils.prune.remove, torch.nn.utils.remove_weight_norm)")
    if isinstance(module, nn.MaxPool2d) and module.return_indices:
        raise TypeError(f"pepita.PEPITA cannot train {where}: return_indices=True returns a "
                        "tuple; use MaxPool2d without it")


def check_no_hooks(model):
    """Forward hooks would fire as in model(x) for some modules only (step computes the
    shared first product and the dropout itself): refused, naming the first one."""
    if (torch.nn.modules.module._global_forward_hooks
            or torch.nn.modules.module._global_forward_pre_hooks):
        raise TypeError("pepita.PEPITA: a global forward hook is registered "
                        "(register_module_forward_hook); step runs the layers itself, so it "
                        "would not fire as in model(x): remove it while training")
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            raise TypeError(f"pepita.PEPITA: {name or 'the model'} ({type(module).__name__}) "
                            "has a forward "
                            "hook; step runs the layers itself, so it would not fire as in "
                            "model(x): remove it while training (keep its handle's .remove())")


# ------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------
class PEPITA:
    """The PEPITA rule for a feedforward model (see the module's docstring).

    model: nn.Sequential returning logits. n_classes and input_shape (one sample's shape,
    e.g. (1, 28, 28); an int for flat samples) are asked for, not inferred: B's shape is
    (input features, n_classes) and nothing in a model says its input's size (a conv layer
    takes any), and both are checked against the model by one pass at construction.
    Bstd (default 0.05), B_mean_zero (default True): the projection B's scale and centring;
    or B: a projection of your own, shape (input features, n_classes). seed or generator:
    B and the dropout masks; without either, the seed is drawn from torch's global
    generator (as a DataLoader draws its base seed), so torch.manual_seed makes the rule
    reproducible. B follows the model to another dtype or device; the masks are drawn where
    the generator is (the model's device when the rule was built)."""

    def __init__(self, model, n_classes, input_shape, Bstd=None, *, B_mean_zero=None, seed=None,
                 generator=None, B=None, mode="published", last_error=None,
                 conv_update="rule", sqrt_conv=False, check_labels=True):
        _check_options(Bstd, B_mean_zero, seed, generator, B, mode, last_error, conv_update,
                       sqrt_conv)
        self.model = model
        leaves = flat_modules(model)
        check_no_hooks(model)
        self.layers = [module for _, module in leaves]
        self.n_classes = _positive_int("n_classes", n_classes)
        self.input_shape = _shape(input_shape)
        self.mode = mode
        self.last_error = last_error or "modulated"
        self.conv_update, self.sqrt_conv = conv_update, bool(sqrt_conv)
        self.check_labels = check_labels
        self.weighted = [i for i, m in enumerate(self.layers) if isinstance(m, WEIGHTED)]
        self.first, self.last = self.weighted[0], self.weighted[-1]
        self._check_after_last(leaves)
        self.read_at = {i: self._activation_end(i) for i in self.weighted}
        self.ends = {end: i for i, end in self.read_at.items()}
        self.inplace = {i for i, m in enumerate(self.layers)
                        if getattr(m, "inplace", False) and not isinstance(m, nn.Dropout)}
        weight = self.layers[self.first].weight
        if generator is None:
            if seed is None:  # one draw from the global generator, which it does not reseed
                seed = int(torch.empty((), dtype=torch.int64).random_())
            generator = torch.Generator(device=weight.device).manual_seed(seed)
        self.generator = generator
        n_features = math.prod(self.input_shape)
        if B is None:
            B = projection_matrix(generator, n_features, self.n_classes,
                                  0.05 if Bstd is None else Bstd,
                                  True if B_mean_zero is None else B_mean_zero, weight.device)
        self._set_B(B)
        self.mask_shapes, self.last_shape, self.linear_first = self._probe()

    def _check_after_last(self, leaves):
        """After the last weight layer: element-wise modules and nn.Flatten only, so that its
        error is the output's, reshaped."""
        for index in range(self.last + 1, len(self.layers)):
            if not isinstance(self.layers[index], (*ELEMENTWISE, nn.Flatten)):
                name, module = leaves[index]
                raise TypeError(f"pepita.PEPITA cannot train layer {index} ({name}: "
                                f"{type(module).__name__}) after the last weight layer: the "
                                "last layer's update takes the output's error at its own "
                                "output, so only activations, dropout and nn.Flatten may "
                                "follow it")

    def _activation_end(self, index):
        """Where layer index's h is read: after the element-wise modules that follow it."""
        end = index
        while end + 1 < len(self.layers) and isinstance(self.layers[end + 1], ELEMENTWISE):
            end += 1
        return end

    def _set_B(self, B):
        n_features = math.prod(self.input_shape)
        if not isinstance(B, torch.Tensor) or tuple(B.shape) != (n_features, self.n_classes):
            shape = tuple(B.shape) if isinstance(B, torch.Tensor) else type(B).__name__
            raise ValueError(f"B has shape {shape}; expected ({n_features}, {self.n_classes}): "
                             "a tensor of (input features, classes)")
        self._B_source = B.detach()
        weight = self.layers[self.first].weight
        self.B = self._B_source.to(weight.device, weight.dtype)

    @torch.no_grad()
    def _probe(self):
        """One pass on two zero samples: checks that input_shape fits the model and n_classes
        its output; gives each dropout's mask shape (per sample), the last weight layer's
        output shape, and whether the first weight layer is an nn.Linear on the flattened
        input (then linear in it: see _first_layer)."""
        weight = self.layers[self.first].weight
        x = torch.zeros(2, *self.input_shape, device=weight.device, dtype=weight.dtype)
        mask_shapes, flat_first, last_shape = {}, False, None
        for index, module in enumerate(self.layers):
            if index == self.first:
                flat_first = isinstance(module, nn.Linear) and x.dim() == 2 and all(
                    isinstance(m, nn.Flatten) for m in self.layers[:index])
            if isinstance(module, nn.Dropout):  # not run: it would draw from torch's generator
                mask_shapes[index] = tuple(x.shape[1:])
                continue
            try:
                x = module(x)
            except RuntimeError as err:
                raise ValueError(f"input_shape {self.input_shape} does not fit layer {index} "
                                 f"({module}): {str(err).splitlines()[0]}") from None
            if index == self.last:
                last_shape = tuple(x.shape[1:])
        if tuple(x.shape) != (2, self.n_classes):
            raise ValueError(f"the model's output for one sample has shape "
                             f"{tuple(x.shape[1:])}; expected ({self.n_classes},) logits")
        return mask_shapes, last_shape, flat_first

    # --- the rule's state ---------------------------------------------------------------------
    def state_dict(self):
        """B (as drawn or given) and the mask generator's state: what a resumed run needs to
        draw the masks an uninterrupted one would (the options are the constructor's)."""
        return {"B": self._B_source.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self._set_B(state["B"])
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError as err:
            raise ValueError(f"load_state_dict: the generator's state does not fit this rule's "
                             f"{self.generator.device} generator ({str(err).splitlines()[0]})"
                             ) from None

    # --- one step -----------------------------------------------------------------------------
    def step(self, x, y):
        """Two forward passes; writes each parameter's PEPITA gradient into .grad (added to
        what .grad holds, as backward() does). Returns the first pass's logits."""
        check_no_hooks(self.model)
        self._follow_model()
        self._check(x, y)
        # inside torch.inference_mode the gradients would be inference tensors, which a later
        # step outside it could not add to
        with torch.inference_mode(False):
            masks = self.draw_masks(len(x))
            logits, grads = self.compute(x, y, masks)
            with torch.no_grad():
                for param, grad in grads:
                    if param.requires_grad:
                        param.grad = grad if param.grad is None else param.grad.add_(grad)
        return logits

    def _follow_model(self):
        """B on the model's dtype and device, were it moved after the rule was built."""
        weights = [self.layers[i].weight for i in self.weighted]
        for index, weight in zip(self.weighted, weights):
            if (weight.dtype, weight.device) != (weights[0].dtype, weights[0].device):
                raise ValueError(f"pepita.PEPITA.step: layer {index} is {weight.dtype} on "
                                 f"{weight.device}, layer {self.first} {weights[0].dtype} on "
                                 f"{weights[0].device}: put the whole model on one dtype "
                                 "and device")
        if (self.B.dtype, self.B.device) != (weights[0].dtype, weights[0].device):
            self.B = self._B_source.to(weights[0].device, weights[0].dtype)

    def draw_masks(self, n):
        """Dropout masks Bernoulli(1 - p) / (1 - p), one per sample, for each nn.Dropout in
        training mode (its own .training), drawn as the paper's nets draw theirs."""
        masks = {}
        for index, shape in self.mask_shapes.items():
            layer = self.layers[index]
            if not layer.training or layer.p == 0:
                continue
            if layer.p == 1:  # as torch: zeros, not 0 / 0
                masks[index] = self.B.new_zeros(n, *shape)
                continue
            keep = 1 - layer.p
            u = torch.rand(n, *shape, generator=self.generator, device=self.generator.device)
            masks[index] = ((u < keep).to(self.B.dtype) / keep).to(self.B.device)
        return masks

    @torch.no_grad()
    def compute(self, x, y, masks):
        """(first pass's logits, [(parameter, gradient)]): no host synchronisation, so that
        torch.compile can capture it whole."""
        target = F.one_hot(y.long(), self.n_classes).to(x.dtype)
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
        for index in self.weighted:
            if index == self.last:
                pairs = self._last_pairs(e, e_mod, inputs, inputs_mod, target, logits)
            else:
                pairs = self._hidden_pairs(outputs[index], outputs_mod[index], inputs[index],
                                           inputs_mod[index])
            grads += self._layer_grads(self.layers[index], pairs, len(x), index == self.last)
        return logits, grads

    def _first_layer(self, x):
        """With a first nn.Linear on the flattened input: its output on x and (W_1 B)^T from
        one product with W_1 (one read of the largest weight), else (None, None)."""
        if not self.linear_first:
            return None, None
        layer, n = self.layers[self.first], len(x)
        # W_1 on the left: the faster order on CPUs for a wide W_1 and a small batch
        products = layer.weight @ torch.cat([x.reshape(n, -1), self.B.T]).T
        out = products[:, :n].T
        out = out.contiguous() if layer.bias is None else out + layer.bias
        return out, products[:, n:].T

    def forward(self, x, masks, first_out=None):
        """Logits, and per weight layer its input and its h (see _activation_end);
        first_out: the first weight layer's output, when known. An in-place module runs on
        a copy, so that no tensor kept for the update (nor x) is overwritten."""
        inputs, outputs = {}, {}
        for index, module in enumerate(self.layers):
            if index in self.read_at:
                inputs[index] = x
            if first_out is not None and index == self.first:
                x = first_out
            elif isinstance(module, nn.Dropout):
                x = x * masks[index] if index in masks else x
            elif index in self.inplace:
                x = module(x.clone())
            else:
                x = module(x)
            if index in self.ends:
                outputs[self.ends[index]] = x
        return x, inputs, outputs

    def _hidden_pairs(self, h, h_mod, a, a_mod):
        """A hidden layer's gradient as (delta, input) pairs, g = sum of delta (x) input."""
        if self.mode == "forward":
            return [(h - h_mod, a)]
        if self.mode == "mixed":  # Hebbian on the clean pass, anti-Hebbian on the modulated
            return [(h, a), (-h_mod, a_mod)]
        return [(h - h_mod, a_mod)]

    def _last_pairs(self, e, e_mod, inputs, inputs_mod, target, logits):
        """The last layer's pairs, the output's errors reshaped to the layer's output."""
        def shaped(delta):
            return delta.view(len(delta), *self.last_shape)

        a, a_mod = inputs[self.last], inputs_mod[self.last]
        if self.mode == "forward":
            return [(shaped(e), a)]
        if self.mode == "mixed":
            return [(shaped(F.softmax(logits, dim=1)), a), (shaped(-target), a_mod)]
        error = e_mod if self.mode == "published" and self.last_error == "modulated" else e
        return [(shaped(error), a_mod)]

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
                weight, bias = conv_weight_grad(layer, a, delta), delta.sum((0, 2, 3))
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
        weight = self.layers[self.first].weight
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            wrong = "x" if not isinstance(x, torch.Tensor) else "y"
            raise ValueError(f"pepita.PEPITA.step: {wrong} is a "
                             f"{type(x if wrong == 'x' else y).__name__}; expected a tensor "
                             "(x: samples, y: integer class indices)")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"pepita.PEPITA.step: x has shape {tuple(x.shape)}; expected "
                             f"(batch, {', '.join(map(str, self.input_shape))})")
        if len(x) == 0:
            raise ValueError("pepita.PEPITA.step: x holds no samples; give a batch of one or "
                             "more")
        if (x.dtype, x.device) != (weight.dtype, weight.device):
            raise ValueError(f"pepita.PEPITA.step: x is {x.dtype} on {x.device}, the model "
                             f"{weight.dtype} on {weight.device} (model(x) would refuse it "
                             f"too): convert it, x.to({weight.device.type!r}, {weight.dtype})")
        if y.shape != (len(x),) or y.dtype.is_floating_point or y.dtype.is_complex \
                or y.dtype == torch.bool:
            raise ValueError(f"pepita.PEPITA.step: y has shape {tuple(y.shape)} and type "
                             f"{y.dtype}; expected ({len(x)},) integer class indices")
        if y.device != weight.device:
            raise ValueError(f"pepita.PEPITA.step: y is on {y.device}, the model on "
                             f"{weight.device}: move it, y.to({weight.device.type!r})")
        # one boolean read from the device; check_labels=False skips it (CUDA graphs)
        if self.check_labels and bool(((y < 0) | (y >= self.n_classes)).any()):
            raise ValueError(f"pepita.PEPITA.step: labels from {int(y.min())} to "
                             f"{int(y.max())}; expected 0..{self.n_classes - 1}")


def conv_weight_grad(layer, a, delta):
    """The correlation of the layer's input a with delta, sum over the batch: a padded as
    the layer pads it (any padding mode, "same", "valid"), then conv2d_weight unpadded."""
    padding = layer.padding
    if isinstance(padding, str) or layer.padding_mode != "zeros":
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        a, padding = F.pad(a, conv_padding(layer), mode=mode), 0
    return torch.nn.grad.conv2d_weight(a, layer.weight.shape, delta, layer.stride, padding,
                                       layer.dilation, layer.groups)


def conv_padding(layer):
    """The layer's padding as F.pad's (left, right, top, bottom): "same" puts the odd one
    on the right and bottom, as torch's Conv2d does."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        amounts = []
        for dilation, size in zip(reversed(layer.dilation), reversed(layer.kernel_size)):
            total = dilation * (size - 1)
            amounts += [total // 2, total - total // 2]
        return tuple(amounts)
    rows, cols = layer.padding
    return (cols, cols, rows, rows)


def _check_options(Bstd, B_mean_zero, seed, generator, B, mode, last_error, conv_update,
                   sqrt_conv):
    """Every option either acts or is refused: none is silently ignored."""
    _choice("mode", mode, MODES)
    _choice("conv_update", conv_update, CONV_UPDATES)
    if last_error is not None:
        _choice("last_error", last_error, LAST_ERRORS)
        if mode != "published":
            raise ValueError(f"last_error goes with mode='published'; mode={mode!r} fixes "
                             "the last layer's error itself")
    if sqrt_conv and conv_update != "published":
        raise ValueError("sqrt_conv changes the published conv update: add "
                         "conv_update='published', or drop it")
    if seed is not None and generator is not None:
        raise ValueError("seed and generator both seed B and the masks: give one")
    if B is not None and (Bstd is not None or B_mean_zero is not None):
        raise ValueError("Bstd and B_mean_zero shape a drawn B; with your own B drop them")
    if Bstd is not None and not Bstd > 0:
        raise ValueError(f"Bstd={Bstd!r}: expected a positive number")


def _positive_int(name, value):
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int")
    return number


def _shape(input_shape):
    """One sample's shape as a tuple; an int is a flat sample's size."""
    shape = (input_shape,) if isinstance(input_shape, int) else input_shape
    try:
        shape = tuple(_positive_int("input_shape", size) for size in shape)
    except (TypeError, ValueError):
        shape = None
    if not shape:
        raise ValueError(f"input_shape={input_shape!r}: expected one sample's shape, a tuple "
                         "of positive ints such as (1, 28, 28), or an int")
    return shape


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(map(repr, choices))}")
    return value
