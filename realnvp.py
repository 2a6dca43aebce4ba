"""RealNVP (Dinh, Sohl-Dickstein & Bengio, 2016) in plain PyTorch: the lecture, and nothing but the lecture.

Every layer, the model, the loss and the data sets live in this one file, in the order of the lecture
notebook (Lecture 8: Normalizing Flows):

    1. squeeze and masks         squeeze_2x2, MaskType, checkerboard_mask
    2. s/t networks              Rescale, WNConv2d, ResidualBlock, ResNet
    3. coupling                  CouplingLayer, BatchNormFlow
    4. multi-scale model         RealNVPConfig, Scale, ClassPrior (a class's, or a learned, prior), RealNVP
    5. loss and optimisation     RealNVPLoss, nll_terms, bits_per_dim, nll_per_image, class_nll, get_param_groups
    6. data                      ImageDataset (MNIST, CIFAR-10), DataNotFoundError

How a run trains it (the step, the weight average, the batch-norm refresh) is in train.py; what the scripts
share (checkpoints, run folders, devices, command lines, the digit judge of samples) is in plumbing.py.

Direction: `reverse=False` maps data -> latent, adding log|det J| to `sldj`; `reverse=True` maps back, sldj untouched.
"""
import gzip
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

# -----------------------------------------------------------------------------
# 1. Squeeze and masks (paper Section 3.4, Figure 3)

# The alternate order's four positions (0,0), (1,1), (0,1), (1,0), as indices 2*dy + dx, and its inverse.
_ALT_ORDER = [0, 3, 1, 2]
_ALT_INVERSE = [0, 2, 3, 1]


def squeeze_2x2(x, reverse=False, alt_order=False):
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2); `reverse=True` undoes it.

    Default order: output channel `4c + 2dy + dx` holds x[c, 2i+dy, 2j+dx], which is torch's `pixel_unshuffle`.
    Alternate order: output channel `q*C + c` holds x[c, 2i+dy_q, 2j+dx_q] with q = 0..3 the positions
    (0,0), (1,1), (0,1), (1,0), so the first 2C channels are one checkerboard colour and the last 2C the
    other (the factor-out split). Both are pure permutations: exact in every dtype.
    """
    B, C, H, W = x.shape
    if reverse:
        if C % 4 != 0:
            raise ValueError(f'unsqueeze needs a channel count divisible by 4, got {C}')
        if alt_order:   # (B, 4, C/4, H, W) in q order -> (B, C/4, 4, H, W) in (dy, dx) order
            x = x.reshape(B, 4, C // 4, H, W)[:, _ALT_INVERSE].transpose(1, 2).reshape(B, C, H, W)
        return F.pixel_shuffle(x, 2)                                   # (B, C/4, 2H, 2W)
    if H % 2 != 0 or W % 2 != 0:
        raise ValueError(f'squeeze needs even height and width, got {H}x{W}')
    x = F.pixel_unshuffle(x, 2)                                        # (B, 4C, H/2, W/2)
    if alt_order:   # (B, C, 4, H/2, W/2) in (dy, dx) order -> (B, 4, C, H/2, W/2) in q order
        x = x.reshape(B, C, 4, H // 2, W // 2)[:, :, _ALT_ORDER].transpose(1, 2).reshape(B, 4 * C, H // 2, W // 2)
    return x


class MaskType(IntEnum):
    CHECKERBOARD = 0
    CHANNEL_WISE = 1


def checkerboard_mask(height, width, reverse=False, dtype=torch.float32, device=None):
    """(1, 1, height, width) mask of alternating 0/1 with 0 top-left (1 top-left if `reverse`)."""
    i = torch.arange(height, device=device).view(-1, 1)
    j = torch.arange(width, device=device).view(1, -1)
    return ((i + j + int(reverse)) % 2).to(dtype).view(1, 1, height, width)


# -----------------------------------------------------------------------------
# 2. The s/t networks: weight-normed ResNets (paper Section 4.1)


class Rescale(nn.Module):
    """Per-channel scale y = w_c * x; weight-normed (below), so w = g * v / |v| (paper Section 4.1)."""

    def __init__(self, num_channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels, 1, 1))

    def forward(self, x):
        return self.weight * x


class WNConv2d(nn.Module):
    """Weight-normalised convolution, W = g * V / ||V|| per output channel (Salimans & Kingma 2016), by torch's
    `parametrizations.weight_norm`: g is `conv.parametrizations.weight.original0`, V `original1`."""

    def __init__(self, in_channels, out_channels, kernel_size, padding, bias=True):
        super().__init__()
        self.conv = weight_norm(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias))

    def forward(self, x):
        return self.conv(x)


class ResidualBlock(nn.Module):
    """Pre-activation ResNet block: x + conv(relu(bn(conv(relu(bn(x)))))) (He et al. 2016)."""

    def __init__(self, channels):
        super().__init__()
        self.in_norm = nn.BatchNorm2d(channels)
        self.in_conv = WNConv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.out_norm = nn.BatchNorm2d(channels)
        self.out_conv = WNConv2d(channels, channels, kernel_size=3, padding=1, bias=True)

    def forward(self, x):
        # ReLU in place: batch norm keeps its input for the backward pass, not its output (10% of a CPU step)
        skip = x
        x = self.in_conv(F.relu(self.in_norm(x), inplace=True))
        x = self.out_conv(F.relu(self.out_norm(x), inplace=True))
        return x + skip


LABEL_GAIN = 100.0
"""The label's parameters (the couplings' class biases, the prior's means and log-scales) are stored divided by
this gain and multiplied by it where used. Adam moves a parameter by about its learning rate a step whatever its
gradient's scale, so these move 100 times as fast as the weights (Karras et al. 2018 scale their weights at run
time for the same reason). From zero at 1e-3 they could move at most about 0.4 in the 469 steps of an epoch, too
little for a mean or a log-scale of a latent whose spread is 1. (docs/experiments.md: one epoch with and without.)"""


class ResNet(nn.Module):
    """The s/t network: bn -> [x, -x] -> relu -> conv -> residual blocks with 1x1 skips -> bn -> relu -> 1x1 conv.

    With `num_classes` > 0 the label is an input too: a learned bias per class (zero at the start, used times
    LABEL_GAIN) is added to the first convolution's output, so s and t may differ from digit to digit."""

    def __init__(self, in_channels, mid_channels, out_channels, num_blocks, double_after_norm, num_classes=0):
        super().__init__()
        self.double_after_norm = double_after_norm
        self.in_norm = nn.BatchNorm2d(in_channels)
        self.in_conv = WNConv2d(2 * in_channels, mid_channels, kernel_size=3, padding=1, bias=True)
        self.in_skip = WNConv2d(mid_channels, mid_channels, kernel_size=1, padding=0, bias=True)
        self.blocks = nn.ModuleList([ResidualBlock(mid_channels) for _ in range(num_blocks)])
        self.skips = nn.ModuleList([WNConv2d(mid_channels, mid_channels, kernel_size=1, padding=0, bias=True)
                                    for _ in range(num_blocks)])
        self.out_norm = nn.BatchNorm2d(mid_channels)
        self.out_conv = WNConv2d(mid_channels, out_channels, kernel_size=1, padding=0, bias=True)
        self.class_bias = nn.Parameter(torch.zeros(num_classes, mid_channels)) if num_classes else None  # (K, mid)

    def forward(self, x, labels=None):
        """x (B, C, H, W) -> (B, out, H, W); `labels` (B,) for a class-conditional network."""
        x = self.in_norm(x)
        if self.double_after_norm:
            x = 2.0 * x
        # channels-last from here on: the convolutions and batch norms run faster in that layout, CPU and GPU
        x = torch.cat((x, -x), dim=1).contiguous(memory_format=torch.channels_last)  # (B, 2C, H, W)
        x = self.in_conv(F.relu(x, inplace=True))                                    # (B, mid, H, W)
        if self.class_bias is not None:
            x = x + (LABEL_GAIN * self.class_bias[labels]).to(x.dtype)[:, :, None, None]   # + (B, mid, 1, 1)
        x_skip = self.in_skip(x)
        for block, skip in zip(self.blocks, self.skips):
            x = block(x)
            x_skip += skip(x)
        return self.out_conv(F.relu(self.out_norm(x_skip), inplace=True))


# -----------------------------------------------------------------------------
# 3. Affine coupling (paper Section 3.2-3.3)


class CouplingLayer(nn.Module):
    """Affine coupling y = b*x + (1-b) * (x + t(b*x)) * exp(s(b*x)), log|det| = sum (1-b)*s (Section 3.3).

    s = rescale(tanh(raw s)); t = t_bound tanh(raw t / t_bound) when `t_bound` > 0, else raw t (the lecture's).
    t does not enter the log-det, so bounding it keeps the flow exact; it keeps one unusual input from being
    carried far out of the range the next couplings were trained on. Checkerboard masks act on the spatial
    grid; channel-wise masks keep one half of the channels (the first if `reverse_mask`) and change the other.
    With `num_classes` > 0, s and t also see the image's label (a class-conditional coupling): for each label it
    is still a coupling, with the same triangular Jacobian and log-det.
    """

    def __init__(self, in_channels, mid_channels, num_blocks, mask_type, reverse_mask, flow_norm=False,
                 t_bound=0.0, num_classes=0):
        super().__init__()
        self.mask_type = MaskType(mask_type)
        self.reverse_mask = reverse_mask
        self.t_bound = float(t_bound)
        if self.mask_type == MaskType.CHANNEL_WISE:
            in_channels //= 2
        self.st_net = ResNet(in_channels, mid_channels, 2 * in_channels, num_blocks,
                             double_after_norm=self.mask_type == MaskType.CHECKERBOARD, num_classes=num_classes)
        self.rescale = weight_norm(Rescale(in_channels))
        out_channels = 2 * in_channels if self.mask_type == MaskType.CHANNEL_WISE else in_channels  # all of x
        self.bn_flow = BatchNormFlow(out_channels) if flow_norm else None

    def _scale_translate(self, x_id, labels=None):
        # The s/t net may run in bf16 under autocast; the coupling arithmetic stays in x's dtype.
        s, t = self.st_net(x_id, labels).to(x_id.dtype).chunk(2, dim=1)
        if self.t_bound > 0:
            t = self.t_bound * torch.tanh(t / self.t_bound)
        return self.rescale(torch.tanh(s)), t

    def forward(self, x, sldj=None, reverse=False, labels=None):
        """The affine coupling, then (with `flow_norm`) the batch normalisation of its output; reversed in reverse.
        `labels` (B,): each image's, for a class-conditional coupling."""
        if self.bn_flow is None:
            return self._couple(x, sldj, reverse, labels)
        if reverse:
            return self._couple(self.bn_flow(x, reverse=True)[0], sldj, True, labels)
        return self.bn_flow(*self._couple(x, sldj, False, labels))

    def _couple(self, x, sldj=None, reverse=False, labels=None):
        if self.mask_type == MaskType.CHECKERBOARD:
            B, C, H, W = x.shape
            b = checkerboard_mask(H, W, self.reverse_mask, dtype=x.dtype, device=x.device)
            s, t = self._scale_translate(x * b, labels)
            s, t = s * (1 - b), t * (1 - b)
            x_change, x_id = x, None
        elif self.reverse_mask:
            x_id, x_change = x.chunk(2, dim=1)                          # 2 x (B, C/2, H, W)
            s, t = self._scale_translate(x_id, labels)
        else:
            x_change, x_id = x.chunk(2, dim=1)
            s, t = self._scale_translate(x_id, labels)

        if reverse:
            x_change = x_change * torch.exp(-s) - t
        else:
            x_change = (x_change + t) * torch.exp(s)
            sldj = sldj + s.flatten(1).sum(-1)

        if self.mask_type == MaskType.CHECKERBOARD:
            x = x_change
        elif self.reverse_mask:
            x = torch.cat((x_id, x_change), dim=1)
        else:
            x = torch.cat((x_change, x_id), dim=1)
        return x, sldj


class BatchNormFlow(nn.Module):
    """Batch normalisation as a layer of the flow (paper Section 3.7), per channel c:

        y = (x - mu_c) / sqrt(var_c + eps) * exp(log_gamma_c) + beta_c,
        log|det dy/dx| = H W sum_c (log_gamma_c - log(var_c + eps) / 2).

    Train mode uses the batch's statistics (biased variance, and the log-det of the batch's map, as the
    paper does) and moves the running ones as nn.BatchNorm2d moves its own (unbiased variance, `momentum`;
    with `momentum=None` a cumulative average). Eval mode and the reverse use
    the running ones, so there it is an exact bijection with an exact log-det."""

    def __init__(self, num_features, momentum=0.05, eps=1e-5):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self):
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _statistics(self, x):
        if not self.training:
            return self.running_mean, self.running_var
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            self.num_batches_tracked.add_(1)
            weight = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.to(mean.dtype)
            self.running_mean.lerp_(mean, weight)
            self.running_var.lerp_(var * (n / max(n - 1, 1)), weight)
        return mean, var

    def forward(self, x, sldj=None, reverse=False):
        mean, var = (self.running_mean, self.running_var) if reverse else self._statistics(x)
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)         # (C,)
        as_map = (1, -1, 1, 1)
        if reverse:
            return (x - self.beta.view(as_map)) * torch.exp(-log_scale).view(as_map) + mean.view(as_map), sldj
        y = (x - mean.view(as_map)) * torch.exp(log_scale).view(as_map) + self.beta.view(as_map)
        return y, sldj + log_scale.sum() * (x.shape[2] * x.shape[3])


# -----------------------------------------------------------------------------
# 4. The multi-scale model (paper Section 3.6, Figure 4)


@dataclass
class RealNVPConfig:
    """The architecture: everything needed to rebuild a model, as plain types (it travels in checkpoints).

    `RealNVPConfig()` is the model `python train.py` trains: the lecture's architecture with the paper's batch
    normalisation after every coupling, bounded translations and a learned prior. `RealNVPConfig.lecture()` is
    the lecture notebook's model exactly. Validates itself when built: a size the squeezes cannot take is a
    one-line ValueError."""
    in_channels: int = 1
    img_size: int = 14
    num_scales: int = 2
    mid_channels: int = 64
    num_blocks: int = 8
    data_constraint: float = 0.9
    flow_norm: bool = True    # batch normalisation after each coupling (paper Section 3.7); the lecture has none
    t_bound: float = 10.0     # couplings' translations bounded to (-t_bound, t_bound) by a tanh; 0: unbounded
    num_classes: int = 0      # > 0: class-conditional, the label in every s/t net (and a prior per class)
    learned_prior: bool = True    # the prior N(mean, diag(scale)^2) learned (a ClassPrior, of one class if
                                  # unconditional); False: N(0, I), the lecture's

    @classmethod
    def lecture(cls, **settings):
        """The lecture notebook's model: no flow batch norm, unbounded translations, the prior N(0, I)."""
        return cls(**{'flow_norm': False, 't_bound': 0.0, 'learned_prior': False, **settings})

    def __post_init__(self):
        for name in ('in_channels', 'img_size', 'num_scales', 'mid_channels', 'num_blocks', 'num_classes'):
            value = getattr(self, name)
            if type(value) is not int or value < (name != 'num_classes'):   # num_classes 0: unconditional
                what = 'an integer >= 0' if name == 'num_classes' else 'a positive integer'
                raise ValueError(f'{name} must be {what}, got {value!r}')
        for name in ('flow_norm', 'learned_prior'):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f'{name} must be True or False, got {getattr(self, name)!r}')
        if type(self.t_bound) not in (int, float) or not 0.0 <= self.t_bound < math.inf:
            raise ValueError(f't_bound must be a finite number >= 0 (0: unbounded), got {self.t_bound!r}')
        if type(self.data_constraint) is not float or not 0.0 < self.data_constraint < 1.0:
            raise ValueError(f'data_constraint must lie in (0, 1), got {self.data_constraint!r}')
        factor = 2 ** (self.num_scales - 1)
        if self.img_size % factor != 0 or self.img_size // factor < 2:
            sizes = ', '.join(str(factor * k) for k in range(2, 7))
            raise ValueError(f'image size {self.img_size} does not fit {self.num_scales} scales: every squeeze '
                             f'halves it, so it must be a multiple of {factor} and at least {2 * factor} '
                             f'(e.g. {sizes}, ...)')


class Scale(nn.Module):
    """One scale: 3 checkerboard couplings, squeeze, 3 channel-wise couplings, unsqueeze, then factor out half
    the variables (alternate-order squeeze) and recurse into the next scale; the last scale has 4 checkerboard
    couplings. (The lecture calls this class `_RealNVP`.)"""

    def __init__(self, scale_idx, num_scales, in_channels, mid_channels, num_blocks, **coupling):
        """`coupling`: the settings every coupling layer gets (flow_norm, t_bound, num_classes)."""
        super().__init__()
        self.is_last = scale_idx == num_scales - 1
        n_checker = 4 if self.is_last else 3
        self.in_couplings = nn.ModuleList([
            CouplingLayer(in_channels, mid_channels, num_blocks, MaskType.CHECKERBOARD, reverse_mask=i % 2 == 1,
                          **coupling)
            for i in range(n_checker)])
        if not self.is_last:
            self.out_couplings = nn.ModuleList([
                CouplingLayer(4 * in_channels, 2 * mid_channels, num_blocks, MaskType.CHANNEL_WISE,
                              reverse_mask=i % 2 == 1, **coupling)
                for i in range(3)])
            self.next_scale = Scale(scale_idx + 1, num_scales, 2 * in_channels, 2 * mid_channels, num_blocks,
                                    **coupling)

    def forward(self, x, sldj, reverse=False, labels=None):
        """`labels` (B,): each image's, for a class-conditional model's couplings."""
        if reverse:
            if not self.is_last:
                x, sldj = self._factor_out(x, sldj, True, labels)
                x, sldj = self._channel_couplings(x, sldj, True, labels)
            for coupling in reversed(self.in_couplings):
                x, sldj = coupling(x, sldj, True, labels)
        else:
            for coupling in self.in_couplings:
                x, sldj = coupling(x, sldj, False, labels)
            if not self.is_last:
                x, sldj = self._channel_couplings(x, sldj, False, labels)
                x, sldj = self._factor_out(x, sldj, False, labels)
        return x, sldj

    def _channel_couplings(self, x, sldj, reverse=False, labels=None):
        x = squeeze_2x2(x)                                              # (B, 4C, H/2, W/2)
        for coupling in (reversed(self.out_couplings) if reverse else self.out_couplings):
            x, sldj = coupling(x, sldj, reverse, labels)
        return squeeze_2x2(x, reverse=True), sldj                       # (B, C, H, W)

    def _factor_out(self, x, sldj, reverse=False, labels=None):
        x = squeeze_2x2(x, alt_order=True)                              # (B, 4C, H/2, W/2)
        x, x_split = x.chunk(2, dim=1)                                  # go on with 2C channels, keep 2C
        x, sldj = self.next_scale(x, sldj, reverse, labels)
        return squeeze_2x2(torch.cat((x, x_split), dim=1), reverse=True, alt_order=True), sldj  # (B, C, H, W)


class ClassPrior(nn.Module):
    """A class-conditional prior, z | y ~ N(mean_y, diag(exp(log_scale_y))^2), for every latent dimension (the
    factored-out ones and the last), written as one more invertible layer: eps = (z - mean_y) exp(-log_scale_y),
    with log-det -sum(log_scale_y), and eps ~ N(0, I) as before. So log p(x | y) = log N(eps) + sldj exactly,
    and the loss is RealNVPLoss as it is. (Glow's `--ycond` prior is of this kind; with one class and no labels it
    is an unconditional model's learned prior.) Its parameters depend on the label alone, never on x: each class's
    density stays normalised. Both start at zero, so that with the couplings' class biases, also zero, the first
    step is the unconditional model's; both are used times LABEL_GAIN."""

    def __init__(self, num_classes, shape):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(num_classes, *shape))        # (K, C, H, W)
        self.log_scale = nn.Parameter(torch.zeros(num_classes, *shape))   # (K, C, H, W)

    def forward(self, z, sldj, labels=None, reverse=False):
        k = 0 if labels is None else labels   # an unconditional model's learned prior is a class prior of one
        mean, log_scale = LABEL_GAIN * self.mean[k], LABEL_GAIN * self.log_scale[k]   # (B, C, H, W) or (C, H, W)
        if reverse:
            return z * log_scale.exp() + mean, sldj
        return (z - mean) * torch.exp(-log_scale), sldj - log_scale.expand_as(z).flatten(1).sum(-1)


class RealNVP(nn.Module):
    """RealNVP: z = f(logit(c * (x*255 + u)/256 + (1-c)/2)), log p(x) >= log N(z) + log|det df| - D log 256.

    Dinh et al. 2016, Sections 3 and 4.1. The latent z has the input's shape: the factored-out
    halves sit in place, in the alternate-order squeeze layout of each scale.
    """

    def __init__(self, config=None, **kwargs):
        """`RealNVP()` (the default model), `RealNVP(RealNVPConfig.lecture())`, or settings as keywords:
        `RealNVP(in_channels=3, img_size=32)`."""
        super().__init__()
        if config is not None and kwargs:
            raise TypeError('pass a RealNVPConfig or keyword settings, not both')
        self.config = RealNVPConfig(**kwargs) if config is None else config
        c = self.config
        self.flows = Scale(0, c.num_scales, c.in_channels, c.mid_channels, c.num_blocks,
                           flow_norm=c.flow_norm, t_bound=c.t_bound, num_classes=c.num_classes)
        self.prior = ClassPrior(max(c.num_classes, 1), self.shape) if c.learned_prior else None

    @property
    def shape(self):
        return (self.config.in_channels, self.config.img_size, self.config.img_size)

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def forward(self, x, reverse=False, noise=None, labels=None):
        """data -> (z, sldj) with x in [0, 1]; or, with `reverse=True`, latent -> (logits, None).

        `noise` is the dequantisation noise u in [0, 1) (drawn when None). A class-conditional model
        (num_classes > 0) takes each image's label as `labels` (B,), and its z is the prior's eps."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f'expected input of shape (B, {", ".join(map(str, self.shape))}), got {tuple(x.shape)}')
        if (labels is None) != (self.config.num_classes == 0):
            raise ValueError('a class-conditional model needs labels, and an unconditional one takes none')
        if reverse:
            if self.prior is not None:
                x = self.prior(x, None, labels, reverse=True)[0]
            return self.flows(x, None, reverse=True, labels=labels)
        z, sldj = self.flows(*self.preprocess(x, noise), labels=labels)
        return (z, sldj) if self.prior is None else self.prior(z, sldj, labels)

    def preprocess(self, x, noise=None):
        """Dequantise and take logits: y = logit(c*(2v - 1)/2 + 1/2), v = (255x + u)/256 (Section 4.1).

        Returns y and log|dy/dv| summed per image; the 1/256 of v is the loss's D log 256."""
        c = self.config.data_constraint
        u = torch.rand_like(x) if noise is None else noise
        v = (x * 255.0 + u) / 256.0
        p = (c * (2.0 * v - 1.0) + 1.0) / 2.0
        y = torch.log(p) - torch.log1p(-p)
        # dy/dv = c / (p (1 - p)), and -log p - log(1 - p) = softplus(y) + softplus(-y).
        ldj = F.softplus(y) + F.softplus(-y) + math.log(c)
        return y, ldj.flatten(1).sum(-1)

    def postprocess(self, y):
        """Inverse of `preprocess` without the noise: logits -> v = (sigmoid(y) - (1-c)/2) / c, clamped to [0, 1]."""
        c = self.config.data_constraint
        return ((torch.sigmoid(y) - (1.0 - c) / 2.0) / c).clamp(0.0, 1.0)

    @torch.no_grad()
    def decode(self, z, batch_size=256, labels=None):
        """Latents (n, C, H, W) -> images in [0, 1], in eval mode, `batch_size` at a time (memory does not grow
        with n); the model's mode is restored. A class-conditional model takes the labels (n,) to draw."""
        chunks = labels.split(batch_size) if labels is not None else [None] * math.ceil(len(z) / batch_size)
        with in_mode(self, False):
            return torch.cat([self.postprocess(self(chunk, reverse=True, labels=y)[0])
                              for chunk, y in zip(z.split(batch_size), chunks)])

    def sample(self, n, temperature=1.0, generator=None, labels=None):
        """n images in [0, 1], shape (n, C, H, W), from z ~ N(0, temperature^2 I) (with a learned prior, eps: the
        prior's N(mean, diag(scale)^2), of each of `labels` (n,) if class-conditional, with scale times T)."""
        z = torch.randn((n, *self.shape), generator=generator, dtype=self.dtype, device=self.device)
        return self.decode(temperature * z, labels=labels)


@contextmanager
def in_mode(model, training):
    """Run a block with `model` in train (`training=True`) or eval mode, then put back the mode it had."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# 5. Loss, metrics and optimisation (paper Section 3.1, Eq. 3)


def gaussian_nll(z):
    """-log N(z; 0, I) of each image of a batch (B, ...) -> (B,)."""
    return 0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(-1)


class RealNVPLoss(nn.Module):
    """NLL in nats of 8-bit data: -[log N(z; 0, I) + sldj - D log k] per image, averaged unless reduction='none'."""

    def __init__(self, k=256, reduction='mean'):
        super().__init__()
        if reduction not in ('mean', 'none'):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.k = k
        self.reduction = reduction

    def forward(self, z, sldj):
        D = z[0].numel()
        nll = gaussian_nll(z) - sldj + D * math.log(self.k)
        return nll.mean() if self.reduction == 'mean' else nll


def nll_terms(model, x, noise=None):
    """Each image's NLL in nats, split into the terms that add up to it (one dequantisation draw u):

        prior           -log N(z; 0, I)                 the latent's Gaussian density (a learned prior's N(mean, scale))
        flow            -log|det dz/dy|                 the couplings (and squeezes: they add nothing)
        logit           -log|det dy/dv|                 the logit pre-processing, v = (255x + u)/256
        dequantisation  D log 256                       v's bins are 1/256 wide: 8 bits a dimension

    Their sum is RealNVPLoss(reduction='none') of model(x, noise=noise)."""
    y, ldj_logit = model.preprocess(x, noise)
    z, ldj_flow = model.flows(y, torch.zeros_like(ldj_logit))
    eps, ldj_prior = (z, 0.0) if model.prior is None else model.prior(z, torch.zeros_like(ldj_flow))
    prior = gaussian_nll(eps) - ldj_prior
    return dict(prior=prior, flow=-ldj_flow, logit=-ldj_logit,
                dequantisation=torch.full_like(prior, x[0].numel() * math.log(256)))


def bits_per_dim(x, nll):
    """bpd = nll / (D ln 2), D = C*H*W of `x` (a batch, or one image's worth of tensor)."""
    D = x[0].numel()
    return nll / (D * math.log(2))


def to_unit(images):
    """uint8 images -> float32 in [0, 1]."""
    return images.float() / 255.0


@torch.no_grad()
def nll_per_image(model, images, batch_size=512, dequant_samples=1, labels=None):
    """NLL in nats of each uint8 image (N, C, H, W), in eval mode (the model's mode is restored). A
    class-conditional model takes the images' `labels` (N,): -log p(x | y).

    With K = `dequant_samples` > 1 it is the importance-weighted bound -log mean_k p(x + u_k)
    (logsumexp over K dequantisation draws), which is no looser than K = 1."""
    loss_fn = RealNVPLoss(reduction='none')
    parts = [torch.zeros(0, device=model.device)]   # a process's share of a split may be empty
    with in_mode(model, False):
        for i in range(0, len(images), batch_size):
            x = to_unit(images[i:i + batch_size].to(model.device)).to(model.dtype)   # (b, C, H, W) in [0, 1]
            y = None if labels is None else labels[i:i + batch_size].to(model.device)
            draws = torch.stack([loss_fn(*model(x, labels=y)) for _ in range(dequant_samples)])   # (K, b)
            parts.append(-(torch.logsumexp(-draws, dim=0) - math.log(dequant_samples)))
    return torch.cat(parts)


@torch.no_grad()
def class_nll(model, images, batch_size=512):
    """-log p(x | y) in nats of each uint8 image for every class y of a class-conditional model: (N, K), in eval mode,
    one dequantisation draw per image for all K; the couplings see y, so K copies of batch_size / K images a pass.
    The Bayes classifier is its argmin (with a uniform p(y)); the marginal NLL is -logsumexp_y(-nll_y + log p(y))."""
    K = model.config.num_classes
    loss_fn = RealNVPLoss(reduction='none')
    parts = []
    with in_mode(model, False):
        for batch in images.split(max(1, batch_size // K)):
            x = to_unit(batch.to(model.device)).to(model.dtype)             # (b, C, H, W)
            u = torch.rand_like(x)                                          # the same draw for every class
            labels = torch.arange(K, device=x.device).repeat_interleave(len(x))   # (K b,): class k for copy k
            nll = loss_fn(*model(x.repeat(K, 1, 1, 1), noise=u.repeat(K, 1, 1, 1), labels=labels))   # (K b,)
            parts.append(nll.view(K, len(x)).T)                             # (b, K)
    return torch.cat(parts)


def get_param_groups(model, weight_decay):
    """Two Adam groups: the weight-norm scales g (L2 `weight_decay`, paper Section 4.1) and the rest (none).

    The scales are the g of every weight-normed layer, which `parametrizations.weight_norm` names `original0`.
    (The lecture selects them by the name `weight_g` of the older `nn.utils.weight_norm`, which its own layers,
    parametrized, do not have: its L2 penalty falls on no parameter.)"""
    scales = [p for name, p in model.named_parameters() if name.endswith('parametrizations.weight.original0')]
    scale_ids = {id(p) for p in scales}
    others = [p for p in model.parameters() if id(p) not in scale_ids]
    return [{'name': 'weight_norm_scales', 'params': scales, 'weight_decay': weight_decay},
            {'name': 'others', 'params': others, 'weight_decay': 0.0}]


# -----------------------------------------------------------------------------
# 6. Data: MNIST and CIFAR-10 through torchvision, held in memory as uint8 tensors

MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
DATASET_CHANNELS = {'mnist': 1, 'cifar10': 3}
DATASETS = tuple(DATASET_CHANNELS)


class DataNotFoundError(FileNotFoundError):
    """The data set is not on disk and could not be downloaded; the message says what is needed where."""


def one_line(error, index=-1):
    """One line of an exception's message (the last by default), for one-line error reports."""
    text = str(error).strip()
    return text.splitlines()[index] if text else type(error).__name__


def _read_mnist(root, train):
    """torchvision's MNIST from root/MNIST/raw/ as (images, labels); a file it cannot parse is a ValueError."""
    import torchvision
    try:
        ds = torchvision.datasets.MNIST(root, train=train, download=False)
    except (AssertionError, RuntimeError, ValueError, KeyError, IndexError) as e:   # its parser asserts
        raise ValueError(f'the MNIST files in {os.path.join(root, "MNIST", "raw")} cannot be read '
                         f'({one_line(e) if str(e) else "not IDX files of the right size"})') from None
    return ds.data, ds.targets


def load_mnist(data_dir, train=True, download=True):
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) from DIR/MNIST/raw/, as plain IDX files or their .gz;
    downloaded (by torchvision) only when neither is there."""
    raw_dir = os.path.join(data_dir, 'MNIST', 'raw')
    plain = all(os.path.isfile(os.path.join(raw_dir, n)) for n in MNIST_FILES)
    gz = all(os.path.isfile(os.path.join(raw_dir, n + '.gz')) for n in MNIST_FILES)
    if plain:
        images, labels = _read_mnist(data_dir, train)
    elif gz:   # decompressed into a temporary folder: the data folder may be read-only
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, 'MNIST', 'raw'))
            for name in MNIST_FILES:
                path = os.path.join(raw_dir, name + '.gz')
                try:
                    with gzip.open(path, 'rb') as src, open(os.path.join(tmp, 'MNIST', 'raw', name), 'wb') as dst:
                        shutil.copyfileobj(src, dst)
                except (OSError, EOFError) as e:   # a corrupt or truncated download
                    raise ValueError(f'{path} cannot be read: {one_line(e)}') from None
            images, labels = _read_mnist(tmp, train)
    elif download:
        images, labels = _download_mnist(data_dir, train)
    else:
        raise DataNotFoundError(_missing_mnist(raw_dir))
    return images.unsqueeze(1), labels


def _missing_mnist(raw_dir):
    return (f'MNIST not found: need {", ".join(MNIST_FILES)} (or their .gz) in {raw_dir}/ (point --data-dir at '
            f'the folder holding MNIST/raw/)')


def _download_mnist(data_dir, train):
    made = [d for d in (data_dir, os.path.join(data_dir, 'MNIST'), os.path.join(data_dir, 'MNIST', 'raw'))
            if not os.path.exists(d)]
    import torchvision
    try:
        ds = torchvision.datasets.MNIST(data_dir, train=train, download=True)
    except Exception as e:  # offline, or a mirror failed: say what is needed instead of the traceback
        for folder in reversed(made):   # leave no empty folders behind
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise DataNotFoundError(f'{_missing_mnist(os.path.join(data_dir, "MNIST", "raw"))}; downloading failed: '
                                f'{one_line(e)}') from None
    return ds.data, ds.targets


def load_cifar10(data_dir, train=True, download=True):
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) via torchvision from DIR/cifar-10-batches-py/."""
    import torchvision
    try:
        ds = torchvision.datasets.CIFAR10(data_dir, train=train, download=download)
    except Exception as e:   # not there, and not downloaded: offline, or a mirror failed
        failed = f'; downloading failed: {one_line(e)}' if download else ''
        raise DataNotFoundError(f'CIFAR-10 not found in {data_dir}/cifar-10-batches-py/ (point --data-dir at the '
                                f'folder holding it){failed}') from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return images, torch.tensor(ds.targets, dtype=torch.int64)


class ImageDataset(torch.utils.data.Dataset):
    """An image data set held in memory as uint8 (N, C, img_size, img_size); items are (x in [0, 1], label).

    Resizing happens on the 8-bit images (antialiased bilinear, rounded back to uint8), so pixels
    stay on the 1/255 grid that dequantisation assumes. `digits` keeps only those labels."""

    def __init__(self, name='mnist', data_dir='./data', train=True, img_size=14, digits=None, download=True):
        if name not in DATASETS:
            raise ValueError(f'unknown data set {name!r}; choose one of {", ".join(DATASETS)}')
        loader = load_mnist if name == 'mnist' else load_cifar10
        images, labels = loader(data_dir, train=train, download=download)
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < 10:
            raise ValueError(f'the {name} labels in {data_dir} lie outside 0-9 ({int(labels.min())} to '
                             f'{int(labels.max())}): not the data set\'s files')
        if digits:
            keep = torch.isin(labels, torch.tensor(sorted(set(digits)), dtype=labels.dtype))
            if not keep.any():
                raise ValueError(f'no {name} images with labels {sorted(set(digits))}')
            images, labels = images[keep], labels[keep]
        if len(images) and (images.shape[-1] != img_size or images.shape[-2] != img_size):
            import torchvision.transforms.functional as TF
            images = TF.resize(images, [img_size, img_size], antialias=True)  # uint8 in, uint8 out
        self.images = images.contiguous()
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return to_unit(self.images[i]), self.labels[i]
