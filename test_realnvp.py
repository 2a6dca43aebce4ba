"""The model's mathematics, in realnvp.py's order: squeeze and masks, couplings, the multi-scale model, the loss
and what optimisation needs, each checked in float64 against brute force (full Jacobians, direct formulas) where
there is one. The data loaders, the scripts, the benchmark and answers.md have test files of their own."""
import itertools
import math
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

import realnvp
from conftest import NOTEBOOK, TINY, logdet, perturb_and_settle, tiny_model
from realnvp import (CouplingLayer, MaskType, RealNVP, RealNVPConfig, RealNVPLoss, ResidualBlock, WNConv2d,
                     LABEL_GAIN, bits_per_dim, checkerboard_mask, get_param_groups, squeeze_2x2)


# -----------------------------------------------------------------------------
# 1. squeeze and masks


@pytest.mark.parametrize('alt_order', [False, True])
def test_squeeze_is_a_permutation_with_exact_inverse(alt_order):
    B, C, H, W = 2, 3, 6, 4
    x = torch.arange(B * C * H * W, dtype=torch.float64).reshape(B, C, H, W)
    y = squeeze_2x2(x, alt_order=alt_order)
    assert y.shape == (B, 4 * C, H // 2, W // 2)
    assert torch.equal(y.flatten().sort().values, x.flatten())
    assert torch.equal(squeeze_2x2(y, reverse=True, alt_order=alt_order), x)
    z = torch.randn(B, 4 * C, H // 2, W // 2, dtype=torch.float64)
    assert torch.equal(squeeze_2x2(squeeze_2x2(z, reverse=True, alt_order=alt_order), alt_order=alt_order), z)


def test_squeeze_layouts_match_their_definition():
    C, H, W = 2, 4, 4
    x = torch.randn(1, C, H, W)
    y, y_alt = squeeze_2x2(x), squeeze_2x2(x, alt_order=True)
    alt_positions = [(0, 0), (1, 1), (0, 1), (1, 0)]
    for c in range(C):
        for i in range(H // 2):
            for j in range(W // 2):
                for dy in range(2):
                    for dx in range(2):
                        assert y[0, 4 * c + 2 * dy + dx, i, j] == x[0, c, 2 * i + dy, 2 * j + dx]
                for q, (dy, dx) in enumerate(alt_positions):
                    assert y_alt[0, q * C + c, i, j] == x[0, c, 2 * i + dy, 2 * j + dx]


def test_squeeze_rejects_odd_sizes_and_bad_channels():
    with pytest.raises(ValueError, match='even height and width'):
        squeeze_2x2(torch.zeros(1, 1, 5, 4))
    with pytest.raises(ValueError, match='divisible by 4'):
        squeeze_2x2(torch.zeros(1, 6, 2, 2), reverse=True)


def test_checkerboard_masks_are_complementary():
    a = checkerboard_mask(5, 6)
    b = checkerboard_mask(5, 6, reverse=True)
    assert a.shape == (1, 1, 5, 6)
    assert a[0, 0, 0, 0] == 0 and b[0, 0, 0, 0] == 1
    assert torch.equal(a + b, torch.ones_like(a))
    # no two neighbours share a value
    assert (a[..., 1:, :] != a[..., :-1, :]).all() and (a[..., :, 1:] != a[..., :, :-1]).all()
    assert checkerboard_mask(2, 2, dtype=torch.float64).dtype == torch.float64


# -----------------------------------------------------------------------------
# 2-3. s/t networks and coupling layers: inverse and log-determinant


COUPLINGS = [(MaskType.CHECKERBOARD, False, 2), (MaskType.CHECKERBOARD, True, 3),
             (MaskType.CHANNEL_WISE, False, 4), (MaskType.CHANNEL_WISE, True, 8)]


@pytest.mark.parametrize('mask_type,reverse_mask,channels', COUPLINGS)
def test_coupling_logdet_matches_brute_force_jacobian(mask_type, reverse_mask, channels):
    torch.manual_seed(1)
    layer = CouplingLayer(channels, 4, 1, mask_type, reverse_mask).double()
    perturb_and_settle(layer, (channels, 4, 4))
    x = torch.randn(1, channels, 4, 4, dtype=torch.float64)
    y, sldj = layer(x, torch.zeros(1, dtype=torch.float64))
    brute = logdet(lambda v: layer(v, torch.zeros(1, dtype=torch.float64))[0], x)
    assert abs(sldj.item()) > 1e-3, 'the test needs a coupling that changes volume'
    assert abs(sldj.item() - brute.item()) < 1e-10
    x_back, _ = layer(y, reverse=True)
    assert (x_back - x).abs().max() < 1e-12
    # the half that conditions passes through unchanged
    if mask_type == MaskType.CHECKERBOARD:
        b = checkerboard_mask(4, 4, reverse_mask, dtype=torch.float64)
        assert torch.equal(y * b, x * b)
    else:
        keep = slice(0, channels // 2) if reverse_mask else slice(channels // 2, channels)
        assert torch.equal(y[:, keep], x[:, keep])


# -----------------------------------------------------------------------------
# 4. the multi-scale model and its config


# The lecture's couplings, with the flow's batch norms, and with both those and a translation bound small enough
# to bend the tiny models' t (checked in test_the_translation_bound_bends_t_and_keeps_it_inside).
ARCHS = [dict(), dict(flow_norm=True), dict(flow_norm=True, t_bound=0.5)]


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('scales', [1, 2, 3])
def test_model_inverse_recovers_input(channels, scales, arch):
    model = tiny_model(channels, 8, scales, **arch)
    x = torch.randint(0, 256, (4, channels, 8, 8)).double() / 255
    u = torch.rand_like(x)
    z, _ = model(x, noise=u)
    y, none = model(z, reverse=True)
    assert none is None
    y_expected, _ = model.preprocess(x, u)
    assert (y - y_expected).abs().max() < 1e-10
    assert (model.postprocess(y) - (255 * x + u) / 256).abs().max() < 1e-10
    # and the other way: latent -> data -> latent
    z2 = torch.randn_like(x)
    y2, _ = model(z2, reverse=True)
    assert (model.flows(y2, torch.zeros(4, dtype=torch.float64))[0] - z2).abs().max() < 1e-10


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('channels,size,scales', [(1, 4, 2), (3, 8, 2), (1, 8, 3)])
def test_model_logdet_matches_brute_force_jacobian(channels, size, scales, arch):
    """sldj covers pre-processing and flow: log|dz/du| = sldj - D log 256, with v = (255x + u)/256."""
    model = tiny_model(channels, size, scales, **arch)
    x = torch.randint(0, 256, (1, channels, size, size)).double() / 255
    u = torch.rand_like(x)
    z, sldj = model(x, noise=u)
    D = x.numel()
    brute = logdet(lambda noise: model(x, noise=noise)[0], u)
    assert abs(sldj.item() - D * math.log(256) - brute.item()) < 1e-10 * max(1.0, abs(brute.item()))
    # the flow alone, without pre-processing
    y, ldj_pre = model.preprocess(x, u)
    _, sldj_flow = model.flows(y, torch.zeros(1, dtype=torch.float64))
    brute = logdet(lambda v: model.flows(v, torch.zeros(1, dtype=torch.float64))[0], y)
    assert abs(sldj_flow.item() - brute.item()) < 1e-9
    assert abs((ldj_pre + sldj_flow).item() - sldj.item()) < 1e-10


def test_preprocess_logdet_matches_brute_force():
    model = RealNVP(img_size=4, num_scales=2, **TINY).double()
    x = torch.randint(0, 256, (1, 1, 4, 4)).double() / 255
    u = torch.rand_like(x)
    v = (255 * x + u) / 256
    y, ldj = model.preprocess(x, u)
    # preprocess as a function of v: x = 0, u = 256 v
    brute = logdet(lambda vv: model.preprocess(torch.zeros_like(vv), 256 * vv)[0], v)
    assert abs(ldj.item() - brute.item()) < 1e-10
    assert (model.postprocess(y) - v).abs().max() < 1e-12


@pytest.mark.parametrize('channels,size', [(3, 32), (1, 14)])
def test_latent_has_input_shape(channels, size):
    model = RealNVP(in_channels=channels, img_size=size, num_scales=2, **TINY)
    x = torch.rand(2, channels, size, size)
    z, sldj = model(x)
    assert z.shape == x.shape and z[0].numel() == channels * size * size
    assert sldj.shape == (2,)


def test_model_follows_dtype_and_device_of_its_weights():
    model = RealNVP(img_size=4, num_scales=2, **TINY)
    assert model.sample(3).dtype == torch.float32
    model.double()
    z, sldj = model(torch.rand(2, 1, 4, 4, dtype=torch.float64))
    assert z.dtype == sldj.dtype == model.dtype == torch.float64 and model.device == torch.device('cpu')


def test_sample_is_in_unit_range_and_restores_mode():
    model = RealNVP(img_size=8, num_scales=2, **TINY)
    model.train()
    x = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 8, 8)
    assert x.min() >= 0 and x.max() <= 1
    assert model.training
    again = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_sample_decodes_through_postprocess_and_temperature_scales_z():
    model = tiny_model(1, 4, 2)
    g = torch.Generator().manual_seed(3)
    z = torch.randn((4, 1, 4, 4), generator=g, dtype=torch.float64)
    x = model.sample(4, temperature=0.5, generator=torch.Generator().manual_seed(3))
    y, _ = model(0.5 * z, reverse=True)
    assert torch.equal(x, model.postprocess(y))
    assert not torch.allclose(x, torch.sigmoid(y))


@pytest.mark.parametrize('kwargs,pattern', [
    (dict(img_size=14, num_scales=3), 'image size 14 does not fit 3 scales'),
    (dict(img_size=7, num_scales=2), 'image size 7'),
    (dict(img_size=2, num_scales=2), 'at least 4'),
    (dict(in_channels=0), 'in_channels must be a positive integer'),
    (dict(num_blocks=-1), 'num_blocks must be a positive integer'),
    (dict(data_constraint=1.5), 'data_constraint'),
    (dict(flow_norm=1), 'flow_norm must be True or False'),
    (dict(t_bound=-1.0), 't_bound must be a finite number >= 0'),
    (dict(t_bound=math.inf), 't_bound must be a finite number >= 0'),
    (dict(t_bound=math.nan), 't_bound must be a finite number >= 0'),
    (dict(t_bound=True), 't_bound must be a finite number >= 0'),
    (dict(t_bound='20'), 't_bound must be a finite number >= 0'),
])
def test_bad_configs_raise_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RealNVP(**{**TINY, **kwargs})


def test_config_round_trips_through_plain_types():
    config = RealNVPConfig(in_channels=3, img_size=8, num_scales=2, mid_channels=4, num_blocks=1)
    model = RealNVP(RealNVPConfig(**asdict(config)))
    assert model.config == config
    assert RealNVP(config).config == config



def test_one_path_from_settings_to_a_model():
    """RealNVPConfig() is the default model (the paper's flow batch norm, bounded translations, a learned prior) and
    the one that train.py and bench.py build from their default flags; the lecture's model is a preset;
    RealNVP(config) and the keyword form build the same model; the config checks itself."""
    import bench
    import plumbing
    import train
    default, lecture = RealNVPConfig(), RealNVPConfig.lecture()
    assert (default.flow_norm, default.t_bound, default.learned_prior) == (True, 10.0, True)
    assert asdict(lecture) == {**asdict(default), 'flow_norm': False, 't_bound': 0.0, 'learned_prior': False}
    assert RealNVP().config == default
    assert plumbing.config_from_args(train.parse_args(['--device', 'cpu'])[0]) == default
    assert plumbing.config_from_args(bench.build_parser().parse_args([])) == default
    assert plumbing.config_from_args(train.parse_args(['--device', 'cpu', '--recipe', 'lecture'])[0]) == lecture
    config = RealNVPConfig(in_channels=3, img_size=8, num_scales=2, mid_channels=4, num_blocks=1)
    torch.manual_seed(0)
    a = RealNVP(config)
    torch.manual_seed(0)
    b = RealNVP(in_channels=3, img_size=8, num_scales=2, mid_channels=4, num_blocks=1)
    assert a.config == b.config == config
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match='image size 6 does not fit 3 scales.*e.g. 8, 12'):
        RealNVPConfig(img_size=6, num_scales=3)   # at construction, before any model exists
    with pytest.raises(TypeError, match='not both'):
        RealNVP(config, img_size=8)


def test_bad_inputs_raise_value_error():
    model = RealNVP(img_size=4, num_scales=2, **TINY)
    with pytest.raises(ValueError, match=r'expected input of shape \(B, 1, 4, 4\)'):
        model(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match='reduction'):
        RealNVPLoss(reduction='sum')



def with_lecture_names(state):
    """Our state dict under the names of the lecture's layers: its `_RealNVP` is our `Scale`, `next_block` our
    `next_scale` (the weight-normed layers have the lecture's names already)."""
    return {key.replace('next_scale', 'next_block'): value for key, value in state.items()}


@pytest.mark.skipif(not os.path.isfile(NOTEBOOK), reason='the lecture notebook (../shared/seed) is not here')
@pytest.mark.parametrize('channels,size,scales', [(1, 8, 2), (3, 8, 3)])
def test_same_weights_give_the_lecture_models_latent_and_log_det(channels, size, scales):
    """Our model is the lecture's architecture: its state dict loads into the lecture's code, and both agree."""
    import bench
    ours = tiny_model(channels, size, scales)
    theirs, their_loss_fn, _ = bench.lecture_training(NOTEBOOK, ours.config, torch.device('cpu'))
    theirs.double()
    state = with_lecture_names(ours.state_dict())
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert missing == ['data_constraint'] and unexpected == []
    theirs.data_constraint.fill_(0.9)  # its buffer was float32 0.9 before .double(); ours is the float64 0.9
    theirs.eval()
    x = torch.randint(0, 256, (3, channels, size, size)).double() / 255
    torch.manual_seed(7)
    z_ours, sldj_ours = ours(x)
    torch.manual_seed(7)
    with torch.no_grad():
        z_theirs, sldj_theirs = theirs(x)
    assert (z_ours - z_theirs).abs().max() < 1e-9
    assert (sldj_ours - sldj_theirs).abs().max() < 1e-9
    # .contiguous(): the lecture's loss calls .view, which fails on its own 3-channel, 3-scale latent
    their_loss = their_loss_fn(z_theirs.contiguous(), sldj_theirs)
    assert abs(RealNVPLoss()(z_ours, sldj_ours).item() - their_loss.item()) < 1e-8


# -----------------------------------------------------------------------------
# 5. loss, bpd and the optimizer groups


def test_loss_equals_brute_force_negative_log_likelihood():
    torch.manual_seed(0)
    z = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    sldj = torch.randn(5, dtype=torch.float64)
    D = 3 * 4 * 4
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    brute = -(normal.log_prob(z).reshape(5, -1).sum(1) + sldj) + D * math.log(256)
    per_image = RealNVPLoss(reduction='none')(z, sldj)
    assert torch.allclose(per_image, brute, rtol=0, atol=1e-10)
    assert abs(RealNVPLoss()(z, sldj).item() - brute.mean().item()) < 1e-10
    assert abs(RealNVPLoss(k=2)(z, sldj).item() - (brute.mean().item() - D * math.log(128))) < 1e-10
    bpd = bits_per_dim(z, RealNVPLoss()(z, sldj))
    assert abs(bpd.item() - brute.mean().item() / (D * math.log(2))) < 1e-12


def test_param_groups_select_exactly_the_weight_norm_scales():
    model = RealNVP(img_size=8, num_scales=2, **TINY)
    groups = get_param_groups(model, 5e-5)
    scales, others = groups[0]['params'], groups[1]['params']
    assert groups[0]['weight_decay'] == 5e-5 and groups[1]['weight_decay'] == 0.0
    wn = [m.conv if isinstance(m, WNConv2d) else m for m in model.modules()
          if isinstance(m, (WNConv2d, realnvp.Rescale))]
    assert len(scales) == len(wn) > 0
    # g has one entry per output channel; the direction v is not in the group
    for m in wn:
        assert any(p is m.parametrizations.weight.original0 for p in scales)
        assert all(p is not m.parametrizations.weight.original1 for p in scales)
    assert len(scales) + len(others) == len(list(model.parameters()))
    assert not {id(p) for p in scales} & {id(p) for p in others}


def test_weight_normed_layers_compute_g_v_over_the_norm_of_v():
    """A WNConv2d and a weight-normed Rescale against W = g * v / ||v|| computed by hand in float64 (the norm of
    each output channel's weights), output and gradients; a fresh layer's W is the convolution's initial weight."""
    torch.manual_seed(0)
    layer = WNConv2d(3, 5, kernel_size=3, padding=1).double()
    torch.manual_seed(0)
    fresh = torch.nn.Conv2d(3, 5, 3, padding=1).double()
    assert (layer.conv.weight - fresh.weight).abs().max() < 1e-7
    weights = layer.conv.parametrizations.weight
    with torch.no_grad():
        weights.original0.mul_(1.5)
    g = weights.original0.detach().clone().requires_grad_()
    v = weights.original1.detach().clone().requires_grad_()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    by_hand = torch.nn.functional.conv2d(x, g * v / v.square().sum(dim=(1, 2, 3), keepdim=True).sqrt(),
                                         layer.conv.bias, padding=1)
    ours = layer(x)
    assert (ours - by_hand).abs().max() < 1e-12
    ours.square().sum().backward()
    by_hand.square().sum().backward()
    assert (weights.original0.grad - g.grad).abs().max() < 1e-10
    assert (weights.original1.grad - v.grad).abs().max() < 1e-10
    rescale = realnvp.weight_norm(realnvp.Rescale(4)).double()
    with torch.no_grad():
        rescale.parametrizations.weight.original0.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]).view(4, 1, 1))
        rescale.parametrizations.weight.original1.copy_(torch.tensor([2.0, 0.5, -1.0, 4.0]).view(4, 1, 1))
    h = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = torch.tensor([1.0, -2.0, -0.5, 3.0], dtype=torch.float64).view(1, 4, 1, 1) * h   # g * sign(v)
    assert (rescale(h) - expected).abs().max() < 1e-12


def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    model = RealNVP(img_size=4, num_scales=2, mid_channels=8, num_blocks=1)
    # synthetic 8-bit data: two blurry prototypes plus noise
    protos = torch.tensor([[0.9, 0.1, 0.9, 0.1], [0.1, 0.9, 0.1, 0.9]]).repeat_interleave(2, 0)
    data = protos.reshape(1, 1, 4, 4).repeat(64, 1, 1, 1)
    data[::2] = data[::2].flip(-1)
    data = ((data + 0.05 * torch.randn_like(data)).clamp(0, 1) * 255).round() / 255
    opt = torch.optim.Adam(get_param_groups(model, 5e-5), lr=3e-3)
    loss_fn = RealNVPLoss()
    losses = []
    for _ in range(40):
        z, sldj = model(data)
        loss = loss_fn(z, sldj)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.1 * abs(first), (first, last)



def test_nll_terms_add_up_and_each_matches_a_direct_computation():
    model = tiny_model(1, 4, 2)
    x = torch.randint(0, 256, (1, 1, 4, 4)).double() / 255
    u = torch.rand_like(x)
    terms = realnvp.nll_terms(model, x, noise=u)
    D = x.numel()
    total = sum(terms.values())
    assert torch.allclose(total, RealNVPLoss(reduction='none')(*model(x, noise=u)), rtol=0, atol=1e-10)
    y, _ = model.preprocess(x, u)
    z, _ = model.flows(y, torch.zeros(1, dtype=torch.float64))
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    assert abs(terms['prior'].item() + normal.log_prob(z).sum().item()) < 1e-10
    flow = logdet(lambda v: model.flows(v, torch.zeros(1, dtype=torch.float64))[0], y)
    assert abs(terms['flow'].item() + flow.item()) < 1e-9
    logit = logdet(lambda vv: model.preprocess(torch.zeros_like(vv), 256 * vv)[0], (255 * x + u) / 256)
    assert abs(terms['logit'].item() + logit.item()) < 1e-10
    assert terms['dequantisation'].item() / (D * math.log(2)) == pytest.approx(8.0, abs=1e-12)


def test_batch_norm_flow_normalises_a_batch_and_its_logdet_is_the_jacobians():
    """Train mode maps the batch to mean beta and standard deviation exp(log_gamma) per channel, with the log-det
    of that (per-image, statistics held) map; eval mode's log-det is the brute-force Jacobian's and the reverse
    inverts it."""
    torch.manual_seed(0)
    layer = realnvp.BatchNormFlow(3).double()
    with torch.no_grad():
        layer.log_gamma.copy_(torch.tensor([0.3, -0.2, 0.0]))
        layer.beta.copy_(torch.tensor([1.0, 0.0, -2.0]))
    x = 5 * torch.randn(64, 3, 2, 2, dtype=torch.float64) + 3
    y, sldj = layer(x, torch.zeros(64, dtype=torch.float64))
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(y.mean((0, 2, 3)), layer.beta, atol=1e-12)
    assert torch.allclose(y.std((0, 2, 3), unbiased=False), layer.log_gamma.exp(), atol=1e-12)
    expected = 4 * (layer.log_gamma - 0.5 * torch.log(var + layer.eps)).sum()
    assert torch.allclose(sldj, expected.expand(64), rtol=0, atol=1e-12)
    assert torch.allclose(layer.running_mean, 0.05 * mean, atol=1e-12)          # momentum 0.05 from 0
    assert torch.allclose(layer.running_var, 0.95 + 0.05 * var * 256 / 255, atol=1e-12)   # unbiased, from 1
    layer.eval()
    one = x[:1]
    y1, ldj = layer(one, torch.zeros(1, dtype=torch.float64))
    assert abs(ldj.item() - logdet(lambda v: layer(v, torch.zeros(1, dtype=torch.float64))[0], one).item()) < 1e-10
    back, none = layer(y1, None, reverse=True)
    assert none is None and (back - one).abs().max() < 1e-12


def test_flow_norm_is_a_layer_after_every_coupling_and_off_in_the_lectures_model():
    plain, normed = RealNVP(RealNVPConfig.lecture(img_size=8, **TINY)), RealNVP(img_size=8, learned_prior=False, **TINY)
    couplings = [m for m in normed.modules() if isinstance(m, CouplingLayer)]
    assert len(couplings) == 10 and all(isinstance(c.bn_flow, realnvp.BatchNormFlow) for c in couplings)
    assert not any(isinstance(m, realnvp.BatchNormFlow) for m in plain.modules())
    extra = {k for k in normed.state_dict()} - {k for k in plain.state_dict()}
    assert extra and all('.bn_flow.' in k for k in extra)


def test_the_translation_bound_bends_t_and_keeps_it_inside():
    """Every coupling's t is t_bound tanh(raw t / t_bound): inside the bound, and bent where raw t is large (in the
    tiny float64 models of the inverse and log-det tests, whose ARCHS bound of 0.5 is therefore not idle)."""
    bound = ARCHS[-1]['t_bound']
    model = tiny_model(1, 8, 2, **ARCHS[-1]).eval()
    couplings = [m for m in model.modules() if isinstance(m, CouplingLayer)]
    assert len(couplings) == 10 and all(c.t_bound == bound for c in couplings)
    seen = []
    hooks = [c.st_net.register_forward_hook(lambda net, inputs, out, c=c: seen.append((c, inputs[0], out)))
             for c in couplings]
    model(torch.randint(0, 256, (4, 1, 8, 8)).double() / 255)
    for h in hooks:
        h.remove()
    assert len(seen) == 10
    largest = 0.0
    for coupling, x_id, out in seen:
        raw_t = out.chunk(2, dim=1)[1]
        t = coupling._scale_translate(x_id)[1]
        assert t.abs().max() < bound
        assert (t - bound * torch.tanh(raw_t / bound)).abs().max() < 1e-15
        largest = max(largest, raw_t.abs().max().item())
    assert largest > 2 * bound   # the bound bends t: tanh(2) is 0.96, 4% below the identity
    coupling.t_bound = 0.0
    assert torch.equal(coupling._scale_translate(x_id)[1], raw_t)   # unbounded: the lecture's t


@pytest.mark.parametrize('amp', [False, True])
@pytest.mark.parametrize('channels', [1, 3])
def test_every_residual_block_runs_channels_last_forward_and_backward(channels, amp):
    """The s/t nets run NHWC, forward and backward, also for 1-channel images, whose strides are NCHW and NHWC
    at once (where torch.cat would fall back to NCHW and every layer after it would follow)."""
    model = RealNVP(in_channels=channels, img_size=8, **TINY)
    seen = []

    def channels_last(t):
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    def hook(block, inputs, out):
        seen.append(('output', channels_last(out)))
        out.register_hook(lambda grad: seen.append(('gradient', channels_last(grad))))
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    for block in blocks:
        block.register_forward_hook(hook)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        RealNVPLoss()(*model(torch.rand(4, channels, 8, 8))).backward()
    assert len(blocks) == 10 and len(seen) == 20
    assert all(is_nhwc for _, is_nhwc in seen), seen



# -----------------------------------------------------------------------------
# the class-conditional prior and the judge's distance


def conditional_tiny(seed=0):
    """A float64 tiny class-conditional model, its prior moved off zero (means of spread 1, log-scales of 0.5 as
    used, the stored parameters times LABEL_GAIN), in eval mode."""
    torch.manual_seed(seed)
    model = tiny_model(1, 4, 2, num_classes=3, learned_prior=True)
    with torch.no_grad():
        model.prior.mean.normal_(0.0, 1.0 / LABEL_GAIN)
        model.prior.log_scale.normal_(0.0, 0.5 / LABEL_GAIN)
    return model.eval()


def test_a_learned_prior_gives_log_p_x_as_a_gaussian_of_the_flow_latent_would():
    """The unconditional model's learned prior (a class prior of one class, used without labels): log p(x) against
    the flow's z under torch.distributions.Normal(mean, exp(log_scale)), in float64; eps decodes back."""
    torch.manual_seed(0)
    model = tiny_model(1, 4, 2, learned_prior=True)
    with torch.no_grad():
        model.prior.mean.normal_(0.0, 1.0 / LABEL_GAIN)
        model.prior.log_scale.normal_(0.0, 0.5 / LABEL_GAIN)
    model.eval()
    x, u = torch.rand(6, 1, 4, 4, dtype=torch.float64), torch.rand(6, 1, 4, 4, dtype=torch.float64)
    eps, sldj = model(x, noise=u)
    z, flow_sldj = model.flows(*model.preprocess(x, u))
    prior = torch.distributions.Normal(LABEL_GAIN * model.prior.mean[0], (LABEL_GAIN * model.prior.log_scale[0]).exp())
    expected = -(prior.log_prob(z).flatten(1).sum(-1) + flow_sldj) + 16 * math.log(256)
    assert (RealNVPLoss(reduction='none')(eps, sldj) - expected).abs().max() < 1e-9
    terms = realnvp.nll_terms(model, x, noise=u)   # evaluate.py --breakdown: the prior term is N(mean, scale)'s
    assert (sum(terms.values()) - expected).abs().max() < 1e-9
    y, _ = model(eps, reverse=True)
    assert (y - model.preprocess(x, u)[0]).abs().max() < 1e-8
    with pytest.raises(ValueError, match='takes none'):
        model(x, labels=torch.zeros(6, dtype=torch.long))
    lecture_conditional = tiny_model(1, 4, 2, num_classes=3)   # the prior N(0, I): the label in the couplings only
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    z, sldj = lecture_conditional(x, noise=u, labels=labels)
    flow_z, flow_sldj = lecture_conditional.flows(*lecture_conditional.preprocess(x, u), labels=labels)
    assert lecture_conditional.prior is None and torch.equal(z, flow_z) and torch.equal(sldj, flow_sldj)


def test_the_class_prior_gives_log_p_x_given_y_as_a_gaussian_of_the_flow_latent_would():
    """log p(x | y) from the model (eps and sldj through RealNVPLoss) against an independent computation: the
    flow's z under torch.distributions.Normal(mean_y, exp(log_scale_y)), in float64; and eps decodes back."""
    model = conditional_tiny()
    x, u = torch.rand(6, 1, 4, 4, dtype=torch.float64), torch.rand(6, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    eps, sldj = model(x, noise=u, labels=labels)
    nll = RealNVPLoss(reduction='none')(eps, sldj)
    z, flow_sldj = model.flows(*model.preprocess(x, u), labels=labels)
    mean, log_scale = LABEL_GAIN * model.prior.mean[labels], LABEL_GAIN * model.prior.log_scale[labels]
    prior = torch.distributions.Normal(mean, log_scale.exp())
    expected = -(prior.log_prob(z).flatten(1).sum(-1) + flow_sldj) + 16 * math.log(256)
    assert (nll - expected).abs().max() < 1e-9
    y, _ = model(eps, reverse=True, labels=labels)
    assert (y - model.preprocess(x, u)[0]).abs().max() < 1e-8
    with pytest.raises(ValueError, match='needs labels'):
        model(x)


@pytest.mark.parametrize('flow_norm', [False, True])
def test_a_conditional_model_s_logdet_matches_brute_force_for_each_label_and_the_label_reaches_the_couplings(
        flow_norm):
    """For a fixed label the couplings are still couplings: log|dz/du| by brute force in float64 equals the sldj,
    and reverse inverts; and a different label gives the flow (not only the prior) a different latent."""
    model = tiny_model(1, 4, 2, num_classes=3, flow_norm=flow_norm, learned_prior=True)
    x = torch.randint(0, 256, (1, 1, 4, 4)).double() / 255
    u = torch.rand_like(x)
    latents = []
    for y in range(3):
        labels = torch.tensor([y])
        z, sldj = model(x, noise=u, labels=labels)
        brute = logdet(lambda noise: model(x, noise=noise, labels=labels)[0], u)
        assert abs(sldj.item() - 16 * math.log(256) - brute.item()) < 1e-10 * max(1.0, abs(brute.item()))
        assert (model(z, reverse=True, labels=labels)[0] - model.preprocess(x, u)[0]).abs().max() < 1e-10
        latents.append(model.flows(*model.preprocess(x, u), labels=labels)[0])
    assert min((a - b).abs().max() for a, b in itertools.combinations(latents, 2)) > 1e-3


def test_a_class_prior_at_zero_is_the_unconditional_model():
    models = []
    for classes in (10, 0):
        torch.manual_seed(0)
        models.append(RealNVP(img_size=4, num_classes=classes, **TINY).double().eval())
    conditional, unconditional = models
    assert torch.equal(conditional.prior.log_scale, torch.zeros(10, 1, 4, 4))
    x, u = torch.rand(4, 1, 4, 4, dtype=torch.float64), torch.rand(4, 1, 4, 4, dtype=torch.float64)
    a = conditional(x, noise=u, labels=torch.tensor([3, 1, 4, 1]))
    b = unconditional(x, noise=u)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_class_nll_is_the_model_nll_under_each_label():
    """class_nll, all classes in one pass: each column equals the model's NLL with that label, for the same
    dequantisation draw, over several passes (batch_size 7: 2 images a pass, 3 classes each)."""
    model = conditional_tiny()
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    torch.manual_seed(1)
    table = realnvp.class_nll(model, images, batch_size=7)
    torch.manual_seed(1)
    noise = torch.cat([torch.rand(len(part), 1, 4, 4, dtype=torch.float64) for part in images.split(2)])
    x = realnvp.to_unit(images).double()   # as class_nll reads them
    for y in range(3):
        column = RealNVPLoss(reduction='none')(*model(x, noise=noise, labels=torch.full((5,), y)))
        assert (table[:, y] - column).abs().max() < 1e-9
    assert table.shape == (5, 3)
