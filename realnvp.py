"""RealNVP (Dinh, Sohl-Dickstein & Bengio, 2016) in plain PyTorch.

Every layer, the model, the loss and the data sets live in this one file, in the
order of the lecture notebook (Lecture 8: Normalizing Flows):

    1. squeeze and masks         squeeze_2x2, MaskType, checkerboard_mask
    2. s/t networks              Rescale, WNConv2d, ResidualBlock, ResNet
    3. coupling                  CouplingLayer, BatchNormFlow
    4. multi-scale model         RealNVPConfig, _RealNVP, RealNVP
    5. loss and optimisation     RealNVPLoss, nll_terms, bits_per_dim, get_param_groups, WeightAverage,
                                 refresh_batch_norm
    6. data                      ImageDataset (MNIST, CIFAR-10), DataNotFoundError
    7. shared by the scripts     nll_per_image, save_grid, pick_device, checkpoints
    8. command-line helpers      argparse types, add_model_args, config_from_args, die

Direction convention, everywhere: `reverse=False` maps data -> latent and adds
log|det J| to `sldj`; `reverse=True` maps latent -> data and leaves `sldj` alone.
"""
import argparse
import copy
import gzip
import io
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Squeeze and masks (paper Section 3.4, Figure 3)


def squeeze_2x2(x, reverse=False, alt_order=False):
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2); `reverse=True` undoes it.

    Default order: output channel `4c + 2dy + dx` holds x[c, 2i+dy, 2j+dx].
    Alternate order: output channel `q*C + c` holds x[c, 2i+dy_q, 2j+dx_q] with
    q = 0..3 the positions (0,0), (1,1), (0,1), (1,0), so the first 2C channels
    are one checkerboard colour and the last 2C the other (the factor-out split).
    Both are pure permutations: exact in every dtype.
    """
    B, C, H, W = x.shape
    if reverse:
        if C % 4 != 0:
            raise ValueError(f'unsqueeze needs a channel count divisible by 4, got {C}')
        if alt_order:
            x = x.reshape(B, 4, C // 4, H, W)[:, _ALT_INVERSE]        # (B, 4, C/4, H, W) in (dy, dx) order
            x = x.reshape(B, 2, 2, C // 4, H, W).permute(0, 3, 4, 1, 5, 2)
        else:
            x = x.reshape(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(B, C // 4, 2 * H, 2 * W)                    # (B, C/4, 2H, 2W)
    if H % 2 != 0 or W % 2 != 0:
        raise ValueError(f'squeeze needs even height and width, got {H}x{W}')
    x = x.reshape(B, C, H // 2, 2, W // 2, 2)                        # (B, C, H/2, dy, W/2, dx)
    if alt_order:
        x = x.permute(0, 3, 5, 1, 2, 4).reshape(B, 4, C, H // 2, W // 2)[:, _ALT_ORDER]
    else:
        x = x.permute(0, 1, 3, 5, 2, 4)
    return x.reshape(B, 4 * C, H // 2, W // 2)                       # (B, 4C, H/2, W/2)


# (dy, dx) index 2*dy + dx of the alternate order's four positions, and its inverse.
_ALT_ORDER = (0, 3, 1, 2)
_ALT_INVERSE = (0, 2, 3, 1)


class MaskType(IntEnum):
    CHECKERBOARD = 0
    CHANNEL_WISE = 1


def checkerboard_mask(height, width, reverse=False, dtype=torch.float32, device=None):
    """(1, 1, height, width) mask of alternating 0/1 with 0 top-left (1 top-left if `reverse`)."""
    i = torch.arange(height, device=device).view(-1, 1)
    j = torch.arange(width, device=device).view(1, -1)
    mask = ((i + j + int(reverse)) % 2).to(dtype)
    return mask.view(1, 1, height, width)


# -----------------------------------------------------------------------------
# 2. The s/t networks: weight-normed ResNets (paper Section 4.1)


def _weight_norm(g, v):
    """g * v / ||v||, the norm over every dim but the first (one per output channel): torch's fused kernel,
    the one `torch.nn.utils.parametrizations.weight_norm` calls, so the numbers are the same as with it."""
    return torch._weight_norm(v, g, 0)


class Rescale(nn.Module):
    """Per-channel scale y = w_c * x; weight-normed, so w = g * v / |v| (paper Section 4.1)."""

    def __init__(self, num_channels):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(num_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.ones(num_channels, 1, 1))

    def forward(self, x):
        return _weight_norm(self.weight_g, self.weight_v) * x


class WNConv2d(nn.Module):
    """Weight-normalised convolution, W = g * V / ||V|| per output channel (Salimans & Kingma 2016).

    W is computed in `forward` from plain parameters (bias, weight_g, weight_v, in the order and with the
    values that `parametrizations.weight_norm` had; older checkpoints load through `upgrade_state_dict`):
    one class for all convolutions, so torch.compile traces one graph for them, not one per convolution."""

    def __init__(self, in_channels, out_channels, kernel_size, padding, bias=True):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)  # its initialisation
        self.padding = padding
        self.bias = nn.Parameter(conv.bias.detach()) if bias else None
        self.weight_g = nn.Parameter(conv.weight.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1))  # (out, 1, 1, 1)
        self.weight_v = nn.Parameter(conv.weight.detach())

    def forward(self, x):
        return F.conv2d(x, _weight_norm(self.weight_g, self.weight_v), self.bias, padding=self.padding)


# The names torch.nn.utils.parametrizations.weight_norm gave these parameters, in checkpoints written before
# WNConv2d and Rescale held them directly.
_OLD_NAMES = [(re.compile(r'(\.conv)?\.parametrizations\.weight\.original0$'), '.weight_g'),
              (re.compile(r'(\.conv)?\.parametrizations\.weight\.original1$'), '.weight_v'),
              (re.compile(r'\.conv\.bias$'), '.bias')]


def upgrade_state_dict(state):
    """A model state dict with the parameter names of this version (older checkpoints' are renamed)."""
    renamed = {}
    for key, value in state.items():
        for pattern, new in _OLD_NAMES:
            key = pattern.sub(new, key)
        renamed[key] = value
    return renamed


class ResidualBlock(nn.Module):
    """Pre-activation ResNet block: x + conv(relu(bn(conv(relu(bn(x)))))) (He et al. 2016)."""

    def __init__(self, channels):
        super().__init__()
        self.in_norm = nn.BatchNorm2d(channels)
        self.in_conv = WNConv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.out_norm = nn.BatchNorm2d(channels)
        self.out_conv = WNConv2d(channels, channels, kernel_size=3, padding=1, bias=True)

    def forward(self, x):
        # In place where autograd allows it (batch norm keeps its input, not its output; a convolution keeps
        # its input): a new channels-last tensor per ReLU costs as much as the batch norm before it on a CPU.
        h = self.in_conv(F.relu(self.in_norm(x), inplace=True))
        h = self.out_conv(F.relu(self.out_norm(h), inplace=True))
        return h.add_(x)


class ResNet(nn.Module):
    """The s/t network: bn -> [x, -x] -> relu -> conv -> residual blocks with 1x1 skips -> bn -> relu -> 1x1 conv."""

    def __init__(self, in_channels, mid_channels, out_channels, num_blocks, double_after_norm):
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

    def forward(self, x):
        x = self.in_norm(x)
        if self.double_after_norm:
            x = 2.0 * x
        # NHWC from here on: faster convolutions and batch norms on CPU and GPU. Made after the cat, not before:
        # a 1-channel image's strides are NCHW and NHWC at once, torch.cat returns NCHW for it, and every layer
        # after the first convolution follows its input's layout, backward too (about 8% slower on a CPU).
        x = torch.cat((x, -x), dim=1).contiguous(memory_format=torch.channels_last)  # (B, 2C, H, W)
        x = F.relu(x, inplace=True)
        x = self.in_conv(x)
        x_skip = self.in_skip(x)
        for block, skip in zip(self.blocks, self.skips):
            x = block(x)
            x_skip.add_(skip(x))
        return self.out_conv(F.relu(self.out_norm(x_skip), inplace=True))


# -----------------------------------------------------------------------------
# 3. Affine coupling (paper Section 3.2-3.3)


class CouplingLayer(nn.Module):
    """Affine coupling y = b*x + (1-b) * (x + t(b*x)) * exp(s(b*x)), log|det| = sum (1-b)*s (Section 3.3).

    s = rescale(tanh(raw s)); t = t_bound tanh(raw t / t_bound) when `t_bound` > 0, else raw t (the lecture's).
    t does not enter the log-det, so bounding it keeps the flow exact; it keeps one unusual input from being
    carried far out of the range the next couplings were trained on. Checkerboard masks act on the spatial
    grid; channel-wise masks keep one half of the channels (the first if `reverse_mask`) and change the other.
    """

    def __init__(self, in_channels, mid_channels, num_blocks, mask_type, reverse_mask, flow_norm=False,
                 t_bound=0.0):
        super().__init__()
        self.mask_type = MaskType(mask_type)
        self.reverse_mask = reverse_mask
        self.t_bound = float(t_bound)
        if self.mask_type == MaskType.CHANNEL_WISE:
            in_channels //= 2
        self.st_net = ResNet(in_channels, mid_channels, 2 * in_channels, num_blocks,
                             double_after_norm=self.mask_type == MaskType.CHECKERBOARD)
        self.rescale = Rescale(in_channels)
        out_channels = 2 * in_channels if self.mask_type == MaskType.CHANNEL_WISE else in_channels  # all of x
        self.bn_flow = BatchNormFlow(out_channels) if flow_norm else None

    def _scale_translate(self, x_id):
        # The s/t net may run in bf16 under autocast; the coupling arithmetic stays in x's dtype.
        s, t = self.st_net(x_id).to(x_id.dtype).chunk(2, dim=1)
        if self.t_bound > 0:
            t = self.t_bound * torch.tanh(t / self.t_bound)
        return self.rescale(torch.tanh(s)), t

    def forward(self, x, sldj=None, reverse=False):
        """The affine coupling, then (with `flow_norm`) the batch normalisation of its output; reversed in reverse."""
        if self.bn_flow is None:
            return self._couple(x, sldj, reverse)
        if reverse:
            return self._couple(self.bn_flow(x, reverse=True)[0], sldj, reverse=True)
        return self.bn_flow(*self._couple(x, sldj))

    def _couple(self, x, sldj=None, reverse=False):
        if self.mask_type == MaskType.CHECKERBOARD:
            B, C, H, W = x.shape
            b = checkerboard_mask(H, W, self.reverse_mask, dtype=x.dtype, device=x.device)
            s, t = self._scale_translate(x * b)
            s, t = s * (1 - b), t * (1 - b)
            x_change, x_id = x, None
        elif self.reverse_mask:
            x_id, x_change = x.chunk(2, dim=1)                          # 2 x (B, C/2, H, W)
            s, t = self._scale_translate(x_id)
        else:
            x_change, x_id = x.chunk(2, dim=1)
            s, t = self._scale_translate(x_id)

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


class BatchNormFlow(nn.BatchNorm2d):
    """Batch normalisation as a layer of the flow (paper Section 3.7), per channel c:

        y = (x - mu_c) / sqrt(var_c + eps) * exp(log_gamma_c) + beta_c,
        log|det dy/dx| = H W sum_c (log_gamma_c - log(var_c + eps) / 2).

    Train mode uses the batch's statistics (biased variance, and the log-det of the batch's map, as the
    paper does) and moves the running ones; eval mode and the reverse use the running ones, so there it is an
    exact bijection with an exact log-det. `refresh_batch_norm` recomputes them like any batch norm's."""

    def __init__(self, num_features):
        super().__init__(num_features, affine=False, momentum=0.05)
        self.log_gamma = nn.Parameter(torch.zeros(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))

    def _statistics(self, x):
        if not self.training:
            return self.running_mean, self.running_var
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        with torch.no_grad():   # running statistics as nn.BatchNorm2d keeps them (unbiased variance)
            n = x.numel() // x.shape[1]
            self.num_batches_tracked.add_(1)
            weight = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
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

    Validates itself when built: a size the squeezes cannot take is a one-line ValueError."""
    in_channels: int = 1
    img_size: int = 14
    num_scales: int = 2
    mid_channels: int = 64
    num_blocks: int = 8
    data_constraint: float = 0.9
    flow_norm: bool = False   # batch normalisation after each coupling (paper Section 3.7); the lecture has none
    t_bound: float = 0.0      # couplings' translations bounded to (-t_bound, t_bound) by a tanh; 0: unbounded (lecture)

    def __post_init__(self):
        for name in ('in_channels', 'img_size', 'num_scales', 'mid_channels', 'num_blocks'):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'{name} must be a positive integer, got {value!r}')
        if not isinstance(self.flow_norm, bool):
            raise ValueError(f'flow_norm must be True or False, got {self.flow_norm!r}')
        if (not isinstance(self.t_bound, (int, float)) or isinstance(self.t_bound, bool)
                or not 0.0 <= self.t_bound < math.inf):
            raise ValueError(f't_bound must be a finite number >= 0 (0: unbounded), got {self.t_bound!r}')
        if not 0.0 < self.data_constraint < 1.0:
            raise ValueError(f'data_constraint must lie in (0, 1), got {self.data_constraint!r}')
        factor = 2 ** (self.num_scales - 1)
        if self.img_size % factor != 0 or self.img_size // factor < 2:
            sizes = ', '.join(str(factor * k) for k in range(2, 7))
            raise ValueError(f'image size {self.img_size} does not fit {self.num_scales} scales: every squeeze '
                             f'halves it, so it must be a multiple of {factor} and at least {2 * factor} '
                             f'(e.g. {sizes}, ...)')

    def activation_bytes(self, batch_size):
        """A rough estimate of what a training step keeps for its backward pass (fp32): each coupling's s/t ResNet
        keeps about 6 tensors per residual block and 8 more, of its channels times its pixels."""
        per_image, pixels, mid = 0, self.img_size ** 2, self.mid_channels
        for scale in range(self.num_scales):
            last = scale == self.num_scales - 1
            per_image += (4 if last else 3) * mid * pixels + (0 if last else 3 * 2 * mid * pixels // 4)
            pixels, mid = pixels // 4, 2 * mid
        return 4 * batch_size * (6 * self.num_blocks + 8) * per_image


class _RealNVP(nn.Module):
    """One scale: 3 checkerboard couplings, squeeze, 3 channel-wise couplings, unsqueeze, then factor
    out half the variables (alternate-order squeeze) and recurse; the last scale has 4 checkerboard couplings."""

    def __init__(self, scale_idx, num_scales, in_channels, mid_channels, num_blocks, **coupling):
        """`coupling`: the settings every coupling layer gets (flow_norm, t_bound)."""
        super().__init__()
        self.is_last_block = scale_idx == num_scales - 1
        n_checker = 4 if self.is_last_block else 3
        self.in_couplings = nn.ModuleList([
            CouplingLayer(in_channels, mid_channels, num_blocks, MaskType.CHECKERBOARD, reverse_mask=i % 2 == 1,
                          **coupling)
            for i in range(n_checker)])
        if not self.is_last_block:
            self.out_couplings = nn.ModuleList([
                CouplingLayer(4 * in_channels, 2 * mid_channels, num_blocks, MaskType.CHANNEL_WISE,
                              reverse_mask=i % 2 == 1, **coupling)
                for i in range(3)])
            self.next_block = _RealNVP(scale_idx + 1, num_scales, 2 * in_channels, 2 * mid_channels, num_blocks,
                                       **coupling)

    def forward(self, x, sldj, reverse=False):
        if reverse:
            if not self.is_last_block:
                x, sldj = self._factor_out(x, sldj, reverse=True)
                x, sldj = self._channel_couplings(x, sldj, reverse=True)
            for coupling in reversed(self.in_couplings):
                x, sldj = coupling(x, sldj, reverse=True)
        else:
            for coupling in self.in_couplings:
                x, sldj = coupling(x, sldj)
            if not self.is_last_block:
                x, sldj = self._channel_couplings(x, sldj)
                x, sldj = self._factor_out(x, sldj)
        return x, sldj

    def _channel_couplings(self, x, sldj, reverse=False):
        x = squeeze_2x2(x)                                              # (B, 4C, H/2, W/2)
        for coupling in (reversed(self.out_couplings) if reverse else self.out_couplings):
            x, sldj = coupling(x, sldj, reverse)
        return squeeze_2x2(x, reverse=True), sldj                       # (B, C, H, W)

    def _factor_out(self, x, sldj, reverse=False):
        x = squeeze_2x2(x, alt_order=True)                              # (B, 4C, H/2, W/2)
        x, x_split = x.chunk(2, dim=1)                                  # go on with 2C channels, keep 2C as they are
        x, sldj = self.next_block(x, sldj, reverse)
        return squeeze_2x2(torch.cat((x, x_split), dim=1), reverse=True, alt_order=True), sldj  # (B, C, H, W)


class RealNVP(nn.Module):
    """RealNVP: z = f(logit(c * (x*255 + u)/256 + (1-c)/2)), log p(x) >= log N(z) + log|det df| - D log 256.

    Dinh et al. 2016, Sections 3 and 4.1. The latent z has the input's shape: the factored-out
    halves sit in place, in the alternate-order squeeze layout of each scale.
    """

    def __init__(self, config=None, **kwargs):
        """`RealNVP(RealNVPConfig(...))`, or the same settings as keywords: `RealNVP(in_channels=1, img_size=14)`."""
        super().__init__()
        if config is not None and kwargs:
            raise TypeError('pass a RealNVPConfig or keyword settings, not both')
        self.config = RealNVPConfig(**kwargs) if config is None else config
        c = self.config
        self.flows = _RealNVP(0, c.num_scales, c.in_channels, c.mid_channels, c.num_blocks,
                              flow_norm=c.flow_norm, t_bound=c.t_bound)
        self.to(memory_format=torch.channels_last)  # convolution weights in NHWC, like their inputs

    @property
    def shape(self):
        return (self.config.in_channels, self.config.img_size, self.config.img_size)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As nn.Module's, also for state dicts of checkpoints written before the weight-norm parameters
        were renamed (`upgrade_state_dict`)."""
        return super().load_state_dict(upgrade_state_dict(state_dict), strict=strict, assign=assign)

    def forward(self, x, reverse=False, noise=None, validate=True):
        """data -> (z, sldj) with x in [0, 1]; or, with `reverse=True`, latent -> (logits, None).

        `noise` is the dequantisation noise u in [0, 1) (drawn when None); `validate=False`
        skips the input-range check, which costs a host sync, for data already checked."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f'expected input of shape (B, {", ".join(map(str, self.shape))}), '
                             f'got {tuple(x.shape)}')
        if reverse:
            return self.flows(x, None, reverse=True)
        if validate:
            lo, hi = x.min().item(), x.max().item()
            if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
                raise ValueError(f'expected pixels in [0, 1], got min {lo:.4g} and max {hi:.4g}')
        y, sldj = self.preprocess(x, noise)
        return self.flows(y, sldj)

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
    def decode(self, z, batch_size=256):
        """Latents (n, C, H, W) -> images in [0, 1], in eval mode, `batch_size` at a time (memory does not grow
        with n); the model's mode is restored."""
        with in_mode(self, False):
            return torch.cat([self.postprocess(self(chunk, reverse=True)[0]) for chunk in z.split(batch_size)])

    def sample(self, n, temperature=1.0, generator=None):
        """n images in [0, 1], shape (n, C, H, W), from z ~ N(0, temperature^2 I)."""
        param = next(self.parameters())
        z = torch.randn((n, *self.shape), generator=generator, dtype=param.dtype, device=param.device)
        return self.decode(temperature * z)


# -----------------------------------------------------------------------------
# 5. Loss, metrics and the optimizer's parameter groups (paper Section 3.1, Eq. 3)


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
        prior_ll = -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(-1)
        nll = -(prior_ll + sldj - D * math.log(self.k))
        return nll.mean() if self.reduction == 'mean' else nll


def nll_terms(model, x, noise=None):
    """Each image's NLL in nats, split into the terms that add up to it (one dequantisation draw u):

        prior           -log N(z; 0, I)                 the latent's Gaussian density
        flow            -log|det dz/dy|                 the couplings (and squeezes: they add nothing)
        logit           -log|det dy/dv|                 the logit pre-processing, v = (255x + u)/256
        dequantisation  D log 256                       v's bins are 1/256 wide: 8 bits a dimension

    Their sum is RealNVPLoss(reduction='none') of model(x, noise=noise)."""
    y, ldj_logit = model.preprocess(x, noise)
    z, ldj_flow = model.flows(y, torch.zeros_like(ldj_logit))
    prior = 0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(-1)
    return dict(prior=prior, flow=-ldj_flow, logit=-ldj_logit,
                dequantisation=torch.full_like(prior, x[0].numel() * math.log(256)))


def bits_per_dim(x, nll):
    """bpd = nll / (D ln 2), D = C*H*W of `x` (a batch or a shape's worth of tensor)."""
    D = x[0].numel()
    return nll / (D * math.log(2))


def get_param_groups(model, weight_decay):
    """Two Adam groups: the weight-norm scales g (L2 `weight_decay`, paper Section 4.1) and the rest (none).

    The scales are the `weight_g` of every WNConv2d and Rescale (the lecture selects them by that name too)."""
    scales = [p for name, p in model.named_parameters() if name.endswith('weight_g')]
    scale_ids = {id(p) for p in scales}
    others = [p for p in model.parameters() if id(p) not in scale_ids]
    return [{'name': 'weight_norm_scales', 'params': scales, 'weight_decay': weight_decay},
            {'name': 'others', 'params': others, 'weight_decay': 0.0}]


def make_optimizer(model, lr, weight_decay, device):
    """Adam over `get_param_groups`, fused where PyTorch has a fused kernel (CUDA, CPU)."""
    return torch.optim.Adam(get_param_groups(model, weight_decay), lr=lr, fused=torch.device(device).type in ('cuda', 'cpu'))


class WeightAverage:
    """Polyak averaging of a model's weights (Polyak & Juditsky 1992; as in Glow's and Flow++'s successors).

    `model` is a full copy of the trained model whose parameters follow, after optimizer step t,
        a <- d_t a + (1 - d_t) w,   d_t = min(decay, (1 + t) / (10 + t)),
    so early on it averages over the few steps there are, later over about 1 / (1 - decay) steps.
    With decay 0 it is the trained weights. Its batch-norm statistics are not averaged: set them
    with `refresh_batch_norm` (or copy the trained model's) before using it."""

    def __init__(self, model, decay):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f'the weight average\'s decay must lie in [0, 1), got {decay!r}')
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        averaged = list(self.model.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], 1.0 - d)


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def refresh_batch_norm(model, batches):
    """Recompute every batch-norm running statistic of `model` for its current weights: the plain average
    of the batch statistics over `batches` ((x in [0, 1], noise u) pairs), in train mode without gradients.
    Eval mode then uses statistics of these weights, not an exponential average over weights long gone."""
    norms = batch_norms(model)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    try:
        with in_mode(model, True):
            for x, noise in batches:
                model(x, noise=noise, validate=False)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


# -----------------------------------------------------------------------------
# 6. Data: MNIST (IDX files in torchvision's layout) and CIFAR-10, as uint8 tensors in memory

MNIST_FILES = {True: ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
               False: ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
DATASET_CHANNELS = {'mnist': 1, 'cifar10': 3}
DATASETS = tuple(DATASET_CHANNELS)


class DataNotFoundError(FileNotFoundError):
    """The data set is not on disk and could not be downloaded; the message says what is needed where."""


def read_idx(path):
    """Read an IDX file (or its .gz) into a numpy array: magic 0,0,dtype,ndim then big-endian int32 sizes."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:   # a corrupt or truncated .gz
        raise ValueError(f'{path} cannot be read: {_one_line(e)}') from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f'{path} is not an unsigned-byte IDX file')
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f'{path} is truncated: its header is cut short')
    dims = np.frombuffer(data, dtype='>i4', count=ndim, offset=4).astype(np.int64)
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f'{path} is truncated: expected {int(np.prod(dims))} values, found {array.size}')
    return array.reshape(tuple(dims)).copy()  # writable, independent of the file buffer


def _one_line(error, index=-1):
    """One line of an exception's message (the last by default), for one-line error reports."""
    text = str(error).strip()
    return text.splitlines()[index] if text else type(error).__name__


def _find(raw_dir, name):
    for candidate in (name, name + '.gz'):
        path = os.path.join(raw_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def load_mnist(data_dir, train=True, download=True):
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) from DIR/MNIST/raw/, downloading only if missing."""
    raw_dir = os.path.join(data_dir, 'MNIST', 'raw')
    names = MNIST_FILES[train]
    paths = [_find(raw_dir, n) for n in names]
    if None in paths and download:
        made = [d for d in (data_dir, os.path.join(data_dir, 'MNIST'), raw_dir) if not os.path.exists(d)]
        try:
            import torchvision
            torchvision.datasets.MNIST(data_dir, train=train, download=True)
        except Exception as e:  # offline, or a mirror failed: say what is needed instead of the traceback
            for folder in reversed(made):   # leave no empty folders behind
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)
            raise DataNotFoundError(
                f'MNIST not found: need {" and ".join(names)} in {raw_dir}/ (point --data-dir at the folder '
                f'holding MNIST/raw/); downloading failed: {_one_line(e)}') from None
        paths = [_find(raw_dir, n) for n in names]
    if None in paths:
        raise DataNotFoundError(f'MNIST not found: need {" and ".join(names)} in {raw_dir}/ '
                                f'(point --data-dir at the folder holding MNIST/raw/)')
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or labels.shape != images.shape[:1]:
        raise ValueError(f'{paths[0]} (shape {images.shape}) and {paths[1]} (shape {labels.shape}) do not form an '
                         f'image/label pair')
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_cifar10(data_dir, train=True, download=True):
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) via torchvision from DIR/cifar-10-batches-py/."""
    import torchvision
    try:
        ds = torchvision.datasets.CIFAR10(data_dir, train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataNotFoundError(f'CIFAR-10 not found in {data_dir}/cifar-10-batches-py/ (point --data-dir '
                                    f'at the folder holding it)') from None
        try:
            ds = torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
        except Exception as e:
            raise DataNotFoundError(f'CIFAR-10 not found in {data_dir}/cifar-10-batches-py/ (point --data-dir '
                                    f'at the folder holding it); downloading failed: {_one_line(e)}') from None
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
        if digits:
            keep = torch.isin(labels, torch.tensor(sorted(set(digits)), dtype=labels.dtype))
            if not keep.any():
                raise ValueError(f'no {name} images with labels {sorted(set(digits))}')
            images, labels = images[keep], labels[keep]
        if images.shape[-1] != img_size or images.shape[-2] != img_size:
            check_memory(images.shape[0] * images.shape[1] * img_size ** 2 * 5,  # uint8 out, float32 on the way
                         f'resizing {images.shape[0]} images to {img_size}x{img_size}', 'a smaller --image-size')
            import torchvision.transforms.functional as TF
            images = TF.resize(images, [img_size, img_size], antialias=True)  # uint8 in, uint8 out
        self.images = images.contiguous()
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / 255.0, self.labels[i]


# -----------------------------------------------------------------------------
# 7. Evaluation, devices and checkpoints (shared by train.py, sample.py, evaluate.py)


@contextmanager
def in_mode(model, training):
    """Run a block with `model` in train (`training=True`) or eval mode, then put back the mode it had."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def nll_per_image(model, images, batch_size=512, dequant_samples=1):
    """NLL in nats of each uint8 image (N, C, H, W), in eval mode; the model's mode is restored.

    With K = `dequant_samples` > 1 it is the importance-weighted bound -log mean_k p(x + u_k)
    (logsumexp over K dequantisation draws), which is no looser than K = 1."""
    device = next(model.parameters()).device
    loss_fn = RealNVPLoss(reduction='none')
    out = []
    with in_mode(model, False):
        for batch in images.split(batch_size):
            x = batch.to(device).float() / 255.0                     # (b, C, H, W) in [0, 1]
            draws = torch.stack([loss_fn(*model(x, validate=False)) for _ in range(dequant_samples)])  # (K, b)
            out.append(-(torch.logsumexp(-draws, dim=0) - math.log(dequant_samples)))
    return torch.cat(out)


@torch.no_grad()
def nll_terms_per_image(model, images, batch_size=512):
    """`nll_terms` of each uint8 image (N, C, H, W), one dequantisation draw, in eval mode: {term: (N,)}."""
    device = next(model.parameters()).device
    parts = []
    with in_mode(model, False):
        for batch in images.split(batch_size):
            parts.append(nll_terms(model, batch.to(device).float() / 255.0))
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def save_grid(images, path, nrow=None, scale=None):
    """Images (n, C, H, W) in [0, 1] as one PNG grid, `nrow` to a row (default: as square as it gets),
    enlarged `scale` times with nearest-neighbour pixels (default: the least whole factor that makes a
    cell at least 56 pixels high, so a 14x14 digit can be seen)."""
    from torchvision.utils import make_grid, save_image
    grid = make_grid(images, nrow=nrow or math.ceil(math.sqrt(len(images))), padding=1, pad_value=1.0)
    scale = scale or max(1, math.ceil(56 / images.shape[-2]))
    save_image(grid.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1), path)


def check_writable_folder(folder, what):
    """Raise a one-line ValueError unless `folder` is, or can be created as, a folder this process can write in:
    its nearest existing ancestor must be a writable folder, not a file."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f'{what}: {path} is a file, not a folder')
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f'{what}: {path} is not writable')


def check_memory(needed, what, advice):
    """Raise a one-line ValueError when `needed` bytes would not fit in 90% of this machine's memory."""
    try:
        total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return  # the OS does not say: go ahead
    if needed > 0.9 * total:
        raise ValueError(f'{what} needs about {needed / 1e9:.1f} GB, and this machine has {total / 1e9:.1f} GB of '
                         f'memory; choose {advice}')


def pick_device(name=None):
    """torch.device for `name`, or the best there is: CUDA, then MPS, then CPU."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device('cuda')
        if torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f'unknown device {name!r}; use cpu, cuda, cuda:N or mps')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {name!r} asked for, but CUDA is not available here; use --device cpu')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f'device {name!r} asked for, but MPS is not available here; use --device cpu')
    return device


def native_bf16(device):
    """(bool, why): whether `device` runs bf16 matrix work in hardware, so that --amp is the faster default: a
    CUDA GPU of compute capability 8.0 or later, a CPU with AMX or AVX-512 BF16; not MPS."""
    device = torch.device(device)
    if device.type == 'cuda':
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f'a CUDA GPU of compute capability {major}.{minor}'
    if device.type == 'cpu':
        for what, check in (('AMX', '_is_amx_tile_supported'), ('AVX-512 BF16', '_is_avx512_bf16_supported')):
            if getattr(torch.cpu, check, lambda: False)():   # private in torch: a version without it says no
                return True, f'a CPU with {what}'
        return False, 'a CPU without AVX-512 BF16 or AMX'
    return False, f'{device.type}'


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit; the message says which and what to do."""


def non_finite_tensor(tensors):
    """The name of the first tensor of a {name: tensor} mapping (nested dicts and lists too) holding a NaN or an
    infinity, or None."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for name, value in items:
        if isinstance(value, (dict, list, tuple)):
            inner = non_finite_tensor(value)
            if inner is not None:
                return f'{name}.{inner}'
        elif torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return str(name)
    return None


def checkpoint_bytes(obj):
    """`obj` serialised by torch.save, once, for as many files as need it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def write_atomically(data, path):
    """Write bytes through a temporary file beside `path`, flushed to disk (file and folder) before the rename:
    a crash or a power cut never leaves half a file, and a failed write (a full disk) leaves the old file as it
    was and no temporary behind."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f'could not write {path}: {e.strerror or e}; the file there before is untouched') from None
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def fsync_folder(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path, device='cpu'):
    """(model in eval mode on `device`, checkpoint dict) from a file written by train.py."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} not found; give the path of a best.pt or last.pt from train.py')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'checkpoint {path} cannot be read ({_one_line(e, 0)}); it may be truncated or not '
                              f'from train.py') from None
    if not isinstance(ckpt, dict) or 'config' not in ckpt or 'model' not in ckpt:
        raise CheckpointError(f'{path} is not a train.py checkpoint (no model config and weights inside)')
    try:
        model = RealNVP(RealNVPConfig(**ckpt['config']))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'the config in {path} cannot build a model: {_one_line(e, 0)}') from None
    mismatch = state_dict_mismatch(model, ckpt['model'])
    if mismatch:
        raise CheckpointError(f'the weights in {path} do not fit its config: {mismatch}')
    model.load_state_dict(ckpt['model'])
    bad = non_finite_tensor(ckpt['model'])
    if bad is not None:
        raise CheckpointError(f'checkpoint {path} is not finite: its weight {bad} holds NaN or infinite values, '
                              f'so it cannot be used; take an earlier checkpoint')
    return model.to(device).eval(), ckpt


def state_dict_mismatch(model, state):
    """'' when `state` fits `model`, else what does not: missing and unexpected names, shapes that differ."""
    if not isinstance(state, dict):
        return 'the weights are not a state dict'
    own, state = model.state_dict(), upgrade_state_dict(state)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} is {tuple(state[k].shape)}, the model wants {tuple(v.shape)}' for k, v in own.items()
              if k in state and torch.is_tensor(state[k]) and state[k].shape != v.shape]

    def listed(names):
        return ', '.join(names[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')
    parts = ([f'{len(missing)} missing ({listed(missing)})'] if missing else []) + \
            ([f'{len(unexpected)} unexpected ({listed(unexpected)})'] if unexpected else []) + \
            ([f'{len(shapes)} of another shape ({listed(shapes)})'] if shapes else [])
    return '; '.join(parts)


def checkpoint_dataset(ckpt, train=False, data_dir=None):
    """The data set a checkpoint's run trained on (its name, digits and image size), from `data_dir` or the run's."""
    saved = ckpt.get('args', {})
    return ImageDataset(saved.get('dataset', 'mnist'), data_dir or saved.get('data_dir', './data'), train=train,
                        img_size=ckpt['config']['img_size'], digits=saved.get('digits'))


def find_checkpoint(runs_dir='runs'):
    """The newest run's best.pt (or last.pt) under `runs_dir`."""
    candidates = []
    if os.path.isdir(runs_dir):
        for run in os.listdir(runs_dir):
            for name in ('best.pt', 'last.pt'):
                path = os.path.join(runs_dir, run, name)
                if os.path.isfile(path):
                    candidates.append((os.path.getmtime(os.path.join(runs_dir, run)), path))
                    break
    if not candidates:
        raise CheckpointError(f'no checkpoint found under {runs_dir}/; train one with train.py or pass --ckpt PATH')
    return max(candidates)[1]


# -----------------------------------------------------------------------------
# 8. Command-line helpers (argparse types: a bad value exits 2 with one line)


def _number(kind, text, ok, what):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be {what}, got {text!r}') from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f'must be {what}, got {text!r}')
    return value


def positive_int(text):
    return _number(int, text, lambda v: v >= 1, 'a positive integer')


def non_negative_int(text):
    return _number(int, text, lambda v: v >= 0, 'zero or a positive integer')


def positive_float(text):
    return _number(float, text, lambda v: v > 0 and math.isfinite(v), 'a positive number')


def seed(text):
    return _number(int, text, lambda v: 0 <= v < 2 ** 63, 'an integer from 0 to 2^63 - 1')


def non_negative_float(text):
    return _number(float, text, lambda v: v >= 0 and math.isfinite(v), 'zero or a positive number')


def die(prog, error, code=1):
    """Print `prog: error: <one line>` to stderr and exit with `code`."""
    print(f'{prog}: error: {error}', file=sys.stderr)
    sys.exit(code)


DEFAULT_T_BOUND = 10.0   # the default recipe's --t-bound


def add_model_args(parser):
    """The architecture's flags, shared by train.py and bench.py; `config_from_args` reads them back."""
    a = parser.add_argument
    a('--num-scales', type=positive_int, default=2, help='scales of the multi-scale architecture (default 2)')
    a('--mid-channels', type=positive_int, default=64, help='channels of the first scale\'s s/t ResNets (default 64)')
    a('--num-blocks', type=positive_int, default=8, help='residual blocks per s/t ResNet (default 8)')
    a('--image-size', type=positive_int, default=14,
      help='images are resized to this; must be a multiple of 2^(num_scales-1) (default 14)')
    a('--flow-norm', action=argparse.BooleanOptionalAction, default=None,
      help='batch normalisation of every coupling\'s output as a layer of the flow, with its log-det (RealNVP '
           'paper, Section 3.7); the lecture has none (default: on; with --recipe lecture, off)')
    a('--t-bound', type=non_negative_float, default=None, metavar='B',
      help='bound every coupling\'s translation t to (-B, B) by B tanh(t / B); t is not in the log-det, so the '
           'flow stays exact, and one unusual image cannot be carried far out of the range the later couplings '
           f'know; 0: unbounded, as in the lecture (default {DEFAULT_T_BOUND:g}; with --recipe lecture, 0)')


def config_from_args(args):
    """The RealNVPConfig of parsed flags: `add_model_args`'s, and the channels of --dataset (or --in-channels)."""
    in_channels = getattr(args, 'in_channels', None) or DATASET_CHANNELS[getattr(args, 'dataset', 'mnist')]
    return RealNVPConfig(in_channels=in_channels, img_size=args.image_size, num_scales=args.num_scales,
                         mid_channels=args.mid_channels, num_blocks=args.num_blocks,
                         flow_norm=args.flow_norm is not False,   # None: not given, the default recipe's
                         t_bound=DEFAULT_T_BOUND if args.t_bound is None else args.t_bound)
