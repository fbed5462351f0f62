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
max and average pooling, nn.Flatten, nn.Dropout and pepita.Normalize, returning logits; a
module may appear at several places (tied weights take the sum of their places' updates).
One step (Dellaferrera & Kreiman, ICML 2022):

    pass 1   on x:              h_l, e = softmax(logits) - onehot(y)
    pass 2   on x' = x + e B^T:  h'_l, a'_l (each weight layer's input), e'
    hidden layer l:  g_l = (h_l - h'_l)^T a'_l / batch
    last layer:      g_L = e'^T a'_L / batch

h_l is the layer's output after the modules right after it that act on it alone (its
activation, dropout and normalization; the layer's own output if none follows). A conv
layer takes the same rule: g is the correlation of a' (padded as the layer pads) with
(h - h'). The last weight layer may be followed only by element-wise modules and
nn.Flatten: its error is e reshaped to its output. Biases take the rule with an input of ones. `step` writes g into each parameter's .grad and
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
`mode` "modulated", "forward", "mixed" or "time_local" are the follow-up's update modes
(Srinivasan et al., ICLR 2024), with its sign x' = x - e B^T (time_local: two optimizer steps
a batch, so `step` takes the optimizer); `batch_size` divides every update by a nominal batch
size (the published code's, also for a last partial batch) instead of the batch's own;
`Normalize` is the follow-up's activation normalization, as a module of the model.

`step(x, y, optimizer)` takes the whole step itself: an optimizer with `step_factors` (as
the paper's published momentum, models.PublishedMomentum) gets each update as factor pairs
(delta, input) with g = delta^T input and never forms g; any other gets g in .grad and its
step() called. A first nn.Linear on the flattened input shares one product between the two
passes (W_1 x' = W_1 x + (W_1 B) e); a Conv2d with stride 1, no dilation and one group runs
as one product with its patch columns, which its update reuses; a 2x2 max-pooling of even
maps is the maximum of strided views. The values are those of the plain modules, to rounding.
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
MODES = ("published", "modulated", "forward", "mixed", "time_local")
LAST_ERRORS = ("modulated", "first")
CONV_UPDATES = ("rule", "published")
WHAT_IT_TAKES = ("it takes nn.Linear, nn.Conv2d, element-wise activations, pooling, "
                 "nn.Flatten, nn.Dropout and pepita.Normalize in an nn.Sequential")


class Normalize(nn.Module):
    """The follow-up's activation normalization: h / ||h|| over the whole batch ("batch", one
    scalar per batch: a sample's output depends on its batch) or over each sample
    ("sample"); an all-zero h stays zero. PEPITA reads a layer's h after it."""

    def __init__(self, over="batch"):
        super().__init__()
        self.over = _choice("over", over, ("batch", "sample"))

    def forward(self, h):
        if self.over == "batch":
            norm = h.norm()
        else:
            norm = h.flatten(1).norm(dim=1).view(-1, *[1] * (h.dim() - 1))
        return h / norm.clamp_min(1e-12)

    def extra_repr(self):
        return f"over={self.over!r}"


# what follows a weight layer and belongs to its h (see PEPITA._activation_end)
AFTER_LAYER = (*ELEMENTWISE, Normalize)
ACCEPTED = (*WEIGHTED, *AFTER_LAYER, *RESHAPING)


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


def _global_hooks():
    return (torch.nn.modules.module._global_forward_hooks
            or torch.nn.modules.module._global_forward_pre_hooks)


def check_no_hooks(model):
    """Forward hooks would fire as in model(x) for some modules only (step computes the
    shared first product and the dropout itself): refused, naming the first one."""
    if _global_hooks():
        raise TypeError("pepita.PEPITA: a global forward hook is registered "
                        "(register_module_forward_hook); step runs the layers itself, so it "
                        "would not fire as in model(x): remove it while training")
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            raise TypeError(f"pepita.PEPITA: {name or 'the model'} ({type(module).__name__}) "
                            "has a forward hook; step runs the layers itself, so it would not "
                            "fire as in model(x): remove it while training (keep its handle's "
                            ".remove())")


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
    the generator is (the model's device when the rule was built). batch_size: a nominal
    batch size that divides every update (default: each batch's own size)."""

    def __init__(self, model, n_classes, input_shape, Bstd=None, *, B_mean_zero=None, seed=None,
                 generator=None, B=None, mode="published", last_error=None,
                 conv_update="rule", sqrt_conv=False, batch_size=None, check_labels=True):
        _check_options(Bstd, B_mean_zero, seed, generator, B, mode, last_error, conv_update,
                       sqrt_conv)
        self.model = model
        leaves = flat_modules(model)
        check_no_hooks(model)
        self._modules = list(model.modules())
        self.layers = [module for _, module in leaves]
        self.n_classes = _positive_int("n_classes", n_classes)
        self.input_shape = _shape(input_shape)
        self.mode = mode
        self.last_error = last_error or "modulated"
        self.conv_update, self.sqrt_conv = conv_update, bool(sqrt_conv)
        self.batch_size = None if batch_size is None else _positive_int("batch_size",
                                                                        batch_size)
        self.check_labels = check_labels
        self.weighted = [i for i, m in enumerate(self.layers) if isinstance(m, WEIGHTED)]
        self.first, self.last = self.weighted[0], self.weighted[-1]
        self._check_after_last(leaves)
        self.read_at = {i: self._activation_end(i) for i in self.weighted}
        self.ends = {end: i for i, end in self.read_at.items()}
        self.inplace = {i for i, m in enumerate(self.layers)
                        if getattr(m, "inplace", False) and not isinstance(m, nn.Dropout)}
        # a conv layer run as one product with its patch columns (the update reuses them)
        self.by_columns = {i for i in self.weighted if isinstance(self.layers[i], nn.Conv2d)
                           and self.layers[i].stride == (1, 1)
                           and self.layers[i].dilation == (1, 1) and self.layers[i].groups == 1}
        self.mask_shapes, self.last_shape, self.linear_first, self.pool_2x2 = self._probe()
        # a ReLU right after a weight layer's output that nothing else holds runs in place
        # (not after a first Linear whose output the second pass reuses)
        fresh = {i for i in self.weighted if not (i == self.first and self.linear_first)}
        self.relu_in_place = {i for i in range(1, len(self.layers))
                              if type(self.layers[i]) is nn.ReLU and i - 1 in fresh}
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
        self.set_B(B)

    def _check_after_last(self, leaves):
        """After the last weight layer: element-wise modules and nn.Flatten only, so that its
        error is the output's, reshaped."""
        for index in range(self.last + 1, len(self.layers)):
            if not isinstance(self.layers[index], (*AFTER_LAYER, nn.Flatten)):
                name, module = leaves[index]
                raise TypeError(f"pepita.PEPITA cannot train layer {index} ({name}: "
                                f"{type(module).__name__}) after the last weight layer: the "
                                "last layer's update takes the output's error at its own "
                                "output, so only activations, dropout and nn.Flatten may "
                                "follow it")

    def _activation_end(self, index):
        """Where layer index's h is read: after the modules that follow it and act on its
        output alone (activations, dropout, normalization)."""
        end = index
        while end + 1 < len(self.layers) and isinstance(self.layers[end + 1], AFTER_LAYER):
            end += 1
        return end

    def set_B(self, B):
        """A new projection B (input features x classes), e.g. after weight mirroring."""
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
        output shape, whether the first weight layer is an nn.Linear on the flattened input
        (then linear in it: see _first_layer), and the 2x2 max-poolings of even maps."""
        weight = self.layers[self.first].weight
        x = torch.zeros(2, *self.input_shape, device=weight.device, dtype=weight.dtype)
        mask_shapes, flat_first, last_shape, pool_2x2 = {}, False, None, set()
        for index, module in enumerate(self.layers):
            if index == self.first:
                flat_first = isinstance(module, nn.Linear) and x.dim() == 2 and all(
                    isinstance(m, nn.Flatten) for m in self.layers[:index])
            if isinstance(module, nn.MaxPool2d) and _is_2x2(module, x):
                pool_2x2.add(index)
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
        return mask_shapes, last_shape, flat_first, pool_2x2

    # --- the rule's state ---------------------------------------------------------------------
    def state_dict(self):
        """B (as drawn or given) and the mask generator's state: what a resumed run needs to
        draw the masks an uninterrupted one would (the options are the constructor's)."""
        return {"B": self._B_source.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.set_B(state["B"])
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError as err:
            raise ValueError(f"load_state_dict: the generator's state does not fit this rule's "
                             f"{self.generator.device} generator ({str(err).splitlines()[0]})"
                             ) from None

    # --- one step -----------------------------------------------------------------------------
    def step(self, x, y, optimizer=None):
        """Two forward passes and the update; returns the first pass's logits. Without an
        optimizer: each parameter's gradient added into .grad (as backward() does), no weight
        changed. With one: the whole step through it (factor pairs to an optimizer with
        step_factors, else .grad set and optimizer.step()); time_local needs it (two steps)."""
        self._ready(x, y)
        if self.mode == "time_local" and optimizer is None:
            raise ValueError("pepita.PEPITA.step: mode='time_local' takes two optimizer steps "
                             "a batch: call step(x, y, optimizer)")
        # inside torch.inference_mode the gradients would be inference tensors, which a later
        # step outside it could not add to
        with torch.inference_mode(False):
            if self.mode == "time_local":
                return self._time_local_step(x, y, optimizer)
            logits, updates = self.factors(x, y, self.draw_masks(len(x)))
            apply_updates(updates, optimizer)
        return logits

    def clean_step(self, x, y, optimizer):
        """time_local's first half alone (the clean pass and its step): the follow-up's
        trainer takes it in the epochs where the forward weights are otherwise not trained."""
        if self.mode != "time_local":
            raise ValueError(f"pepita.PEPITA.clean_step is time_local's first half; this rule's "
                             f"mode is {self.mode!r}: call step")
        self._ready(x, y)
        with torch.inference_mode(False):
            return self._time_local_step(x, y, optimizer, clean_only=True)

    @torch.no_grad()
    def logits(self, x):
        """The first pass's logits without an update, its masks drawn as a step draws them
        (so that a loop that skips updates keeps the masks of the later steps)."""
        self._ready(x)
        return self.forward(x, self.draw_masks(len(x)))[0]

    def _ready(self, x, y=None):
        if any(m._forward_hooks or m._forward_pre_hooks for m in self._modules) \
                or _global_hooks():
            check_no_hooks(self.model)  # names the hook
        self._follow_model()
        self._check(x, y)

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

    # --- the update ---------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, x, y, masks):
        """(first pass's logits, [(parameter, gradient)]) of a step with these masks."""
        logits, updates = self.factors(x, y, masks)
        return logits, [(param, form_gradient(param, terms)) for param, terms in updates]

    @torch.no_grad()
    def factors(self, x, y, masks):
        """(first pass's logits, [(parameter, terms)]): each parameter's update g is the sum
        of its terms, a pair (D, X) standing for D^T X (reshaped to the parameter) or a
        tensor. No host synchronisation, so that torch.compile can capture it whole."""
        target = F.one_hot(y.long(), self.n_classes).to(x.dtype)
        first_out, W1_B = self._first_layer(x)
        logits, inputs, outputs = self.forward(x, masks, first_out)
        e = F.softmax(logits, dim=1) - target
        sign = 1 if self.mode == "published" else -1  # the follow-up's x' = x - e B^T
        x_mod = x + sign * (e @ self.B.T).view_as(x)
        # W_1 x' = W_1 x + (W_1 B) e: a product with the small W_1 B instead of the batch
        first_mod = None if W1_B is None else first_out + sign * (e @ W1_B)
        logits_mod, inputs_mod, outputs_mod = self.forward(x_mod, masks, first_mod)
        e_mod = F.softmax(logits_mod, dim=1) - target
        updates = []
        for index in self.weighted:
            if index == self.last:
                pairs = self._last_pairs(e, e_mod, inputs, inputs_mod, target, logits)
            else:
                pairs = self._hidden_pairs(outputs[index], outputs_mod[index], inputs[index],
                                           inputs_mod[index])
            updates += self._layer_terms(index, pairs, len(x))
        return logits, updates

    def _time_local_step(self, x, y, optimizer, clean_only=False):
        """The follow-up's PEPITA-TL: a step after the clean pass (h_l^T h_{l-1}, y^T
        h_{L-1}, y the softmax), then the modulated pass x' = x - e B^T with the updated
        weights and fresh masks, and a second step (-h'_l^T h'_{l-1}, -t^T h'_{L-1})."""
        with torch.no_grad():
            target = F.one_hot(y.long(), self.n_classes).to(x.dtype)
            logits, inputs, outputs = self.forward(x, self.draw_masks(len(x)))
            output = F.softmax(logits, dim=1)
            x_mod = x - ((output - target) @ self.B.T).view_as(x)
            apply_updates(self._local_terms(inputs, outputs, output, len(x)), optimizer)
            if not clean_only:
                _, inputs, outputs = self.forward(x_mod, self.draw_masks(len(x)))
                apply_updates(self._local_terms(inputs, outputs, -target, len(x), -1),
                              optimizer)
        return logits

    def _local_terms(self, inputs, outputs, last_delta, batch, sign=1):
        updates = []
        for index in self.weighted:
            delta = (last_delta.view(len(last_delta), *self.last_shape) if index == self.last
                     else sign * outputs[index])
            updates += self._layer_terms(index, [(delta, inputs[index])], batch)
        return updates

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
        """Logits, and per weight layer its input (its patch columns for a conv run by
        columns) and its h (see _activation_end); first_out: the first weight layer's
        output, when known. An in-place module runs on a copy, so that no tensor kept for
        the update (nor x) is overwritten."""
        inputs, outputs = {}, {}
        for index, module in enumerate(self.layers):
            if index in self.read_at:
                inputs[index] = x
            if first_out is not None and index == self.first:
                x = first_out
            elif index in self.by_columns:
                x, inputs[index] = conv_by_columns(module, x)
            elif index in self.pool_2x2:
                x = max_pool_2x2(x)
            elif index in self.relu_in_place:
                x = x.relu_()
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
        """A hidden layer's update as (delta, input) pairs, g = sum of delta (x) input."""
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

    def _layer_terms(self, index, pairs, batch):
        """[(weight, terms), (bias, terms)] of the layer at index from its (delta, input)
        pairs; the scale goes on the small delta, not on the weight-sized product."""
        layer = self.layers[index]
        divisor = self.batch_size or batch
        scale = 1 / divisor
        if isinstance(layer, nn.Conv2d) and index != self.last \
                and self.conv_update == "published":
            positions = pairs[0][0][0, 0].numel()
            scale = -1 / (batch * divisor * (math.sqrt(positions) if self.sqrt_conv
                                             else positions))
        weight_terms, bias_terms = [], []
        for delta, a in pairs:
            delta = delta * scale
            if index in self.by_columns:  # a holds the patch columns (C k k, N positions)
                delta = delta.transpose(0, 1).reshape(delta.shape[1], -1).T
                weight_terms.append((delta, a.T))
            elif isinstance(layer, nn.Conv2d):
                weight_terms.append(conv_weight_grad(layer, a, delta))
                delta = delta.transpose(0, 1).reshape(delta.shape[1], -1).T
            else:
                delta = delta.reshape(-1, delta.shape[-1])
                weight_terms.append((delta, a.reshape(-1, a.shape[-1])))
            if layer.bias is not None:
                bias_terms.append(delta.sum(0))
        updates = [(layer.weight, weight_terms)]
        if layer.bias is not None:
            updates.append((layer.bias, bias_terms))
        return updates

    def _check(self, x, y):
        """x, and y unless it is None (logits takes no labels)."""
        weight = self.layers[self.first].weight
        if not isinstance(x, torch.Tensor) or not isinstance(y, (torch.Tensor, type(None))):
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
        if y is None:
            return
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


def apply_updates(updates, optimizer=None):
    """updates ([(parameter, terms)], see PEPITA.factors) into .grad (added), or through the
    optimizer: as factor pairs to one with step_factors, else as .grad and its step()."""
    updates = [(param, terms) for param, terms in updates if param.requires_grad]
    if optimizer is not None and hasattr(optimizer, "step_factors"):
        optimizer.step_factors(updates)
        return
    with torch.no_grad():
        for param, terms in updates:
            grad = form_gradient(param, terms)
            if optimizer is not None or param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)
    if optimizer is not None:
        optimizer.step()


def form_gradient(param, terms):
    """g of one parameter from its terms: (D, X) pairs as D^T X, and tensors as they are."""
    grad = None
    for term in terms:
        part = (term[0].T @ term[1]).view_as(param) if isinstance(term, tuple) else term
        grad = part if grad is None else grad.add_(part)
    return grad


# ------------------------------------------------------------------------------------------
# Fast paths: the same values as the modules, in fewer passes over memory
# ------------------------------------------------------------------------------------------
def patch_columns(x, kernel_size):
    """Every kernel-sized patch of x (N, C, H, W) as a column, rows in the order of
    conv.weight.flatten(1): (C * k_h * k_w, N * positions). A strided view, copied once (in
    this order the copy runs along image rows: much faster than patches as rows)."""
    k_h, k_w = kernel_size
    n, c, h, w = x.shape
    x = x.contiguous()
    s_n, s_c, s_h, s_w = x.stride()
    view = x.as_strided((c, k_h, k_w, n, h - k_h + 1, w - k_w + 1),
                        (s_c, s_h, s_w, s_n, s_h, s_w))
    return view.reshape(c * k_h * k_w, -1)


def conv_by_columns(layer, x):
    """A Conv2d of stride 1, no dilation and one group as one product of its kernels with
    the patch columns of x (padded as the layer pads): (its output, the columns). The output
    is an (N, C, H, W) view of channel-first memory, which the update reads as it is."""
    padding = conv_padding(layer)
    if any(padding):
        x = F.pad(x, padding, mode="constant" if layer.padding_mode == "zeros"
                  else layer.padding_mode)
    columns = patch_columns(x, layer.kernel_size)
    out = layer.weight.flatten(1) @ columns
    if layer.bias is not None:
        out = out + layer.bias[:, None]
    k_h, k_w = layer.kernel_size
    shape = (len(out), len(x), x.shape[2] - k_h + 1, x.shape[3] - k_w + 1)
    return out.view(shape).transpose(0, 1), columns


def _is_2x2(pool, x):
    """A MaxPool2d that takes the maximum of 2x2 blocks of maps of even size."""
    return (_pair(pool.kernel_size) == (2, 2) and _pair(pool.stride or 2) == (2, 2)
            and _pair(pool.padding) == (0, 0) and _pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode and x.dim() == 4 and x.shape[2] % 2 == 0
            and x.shape[3] % 2 == 0)


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def max_pool_2x2(maps):
    """2x2 max-pooling of (N, C, H, W) maps of even size, as maxima of strided views (any
    memory layout)."""
    rows = torch.maximum(maps[:, :, 0::2], maps[:, :, 1::2])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


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
