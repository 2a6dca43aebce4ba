"""Tests, in realnvp.py's order and then the scripts': the math in float64 against brute force, shapes,
errors, the data loader, and the scripts end to end. Everything runs offline on tiny inputs that the tests make
themselves (conftest.py). Tests marked `slow` start subprocesses: `python -m pytest -q -m "not slow"` skips them.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import realnvp
from conftest import (HERE, NOTEBOOK, OFFLINE, TINY, TINY_RUN, assert_one_line_error, assert_same_weights,
                      legacy_model, load, logdet, make_mnist, perturb_and_settle, script, tiny_model)
from realnvp import (CouplingLayer, DataNotFoundError, ImageDataset, MaskType, RealNVP, RealNVPConfig,
                     RealNVPLoss, ResidualBlock, WNConv2d, bits_per_dim, checkerboard_mask, get_param_groups,
                     read_idx, squeeze_2x2)


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
    assert abs(sldj_flow.item() - logdet(lambda v: model.flows(v, torch.zeros(1, dtype=torch.float64))[0], y).item()) < 1e-9
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


def test_model_follows_dtype_and_holds_no_device():
    model = RealNVP(img_size=4, num_scales=2, **TINY)
    assert not hasattr(model, 'device')
    assert model.sample(3).dtype == torch.float32
    model.double()
    z, sldj = model(torch.rand(2, 1, 4, 4, dtype=torch.float64))
    assert z.dtype == sldj.dtype == torch.float64


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
    """RealNVP(RealNVPConfig(...)) and the keyword form build the same model; the config checks itself."""
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
    # the flags of train.py and bench.py give the same config through one helper
    import bench
    import train
    flags = ['--image-size', '8', '--mid-channels', '4', '--num-blocks', '1', '--num-scales', '2']
    from_train = realnvp.config_from_args(train.build_parser().parse_args(flags + ['--dataset', 'cifar10']))
    from_bench = realnvp.config_from_args(bench.build_parser().parse_args(flags + ['--in-channels', '3']))
    assert from_train == from_bench == replace(config, flow_norm=True, t_bound=realnvp.DEFAULT_T_BOUND)
    lectures = realnvp.config_from_args(bench.build_parser().parse_args(flags + ['--in-channels', '3',
                                                                                '--no-flow-norm', '--t-bound', '0']))
    assert lectures == config


def test_bad_inputs_raise_value_error():
    model = RealNVP(img_size=4, num_scales=2, **TINY)
    with pytest.raises(ValueError, match=r'pixels in \[0, 1\]'):
        model(torch.full((1, 1, 4, 4), 1.5))
    with pytest.raises(ValueError, match=r'pixels in \[0, 1\]'):
        model(torch.full((1, 1, 4, 4), -0.1))
    with pytest.raises(ValueError, match=r'pixels in \[0, 1\]'):
        model(torch.full((1, 1, 4, 4), float('nan')))
    with pytest.raises(ValueError, match=r'expected input of shape \(B, 1, 4, 4\)'):
        model(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match='reduction'):
        RealNVPLoss(reduction='sum')



@pytest.mark.skipif(not os.path.isfile(NOTEBOOK), reason='the lecture notebook (../shared/seed) is not here')
@pytest.mark.parametrize('channels,size,scales', [(1, 8, 2), (3, 8, 3)])
def test_same_weights_give_the_lecture_models_latent_and_log_det(channels, size, scales):
    """Our model is the lecture's architecture: its state dict loads into the lecture's code, and both agree."""
    import bench
    lecture = bench.lecture_code(NOTEBOOK)
    ours = tiny_model(channels, size, scales)
    theirs = bench.lecture_model(lecture, ours.config, torch.device('cpu')).double()
    state = legacy_model(ours).state_dict()   # the lecture's weight-norm parameter names
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
    their_loss = lecture['RealNVPLoss']()(z_theirs.contiguous(), sldj_theirs)
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
    wn = [m for m in model.modules() if isinstance(m, (WNConv2d, realnvp.Rescale))]
    assert len(scales) == len(wn) > 0
    # g has one entry per output channel; the direction v is not in the group
    for m in wn:
        assert any(p is m.weight_g for p in scales)
        assert all(p is not m.weight_v for p in scales)
    assert len(scales) + len(others) == len(list(model.parameters()))
    assert not {id(p) for p in scales} & {id(p) for p in others}


def old_param_groups(legacy):
    """The optimizer groups as get_param_groups made them under torch's weight-norm parametrization."""
    from torch.nn.utils import parametrize
    scales = [m.parametrizations.weight.original0 for m in legacy.modules()
              if parametrize.is_parametrized(m, 'weight')]
    ids = {id(p) for p in scales}
    return [scales, [p for p in legacy.parameters() if id(p) not in ids]]


def test_weight_norm_modules_compute_what_torchs_parametrization_computed():
    """WNConv2d and Rescale hold g and v themselves: same values, outputs and gradients (float64) as the
    nn.Conv2d under `parametrizations.weight_norm` they replace."""
    model = tiny_model(1, 8, 2)
    legacy = legacy_model(model)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    noise = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    for m in (model, legacy):
        m.train()
        z, sldj = m(x, noise=noise)
        (z.square().sum() + sldj.sum()).backward()
    new_names = {id(p): n for n, p in model.named_parameters()}
    old = dict(legacy.named_parameters())
    for new_groups, old_groups in zip([g['params'] for g in get_param_groups(model, 0.0)], old_param_groups(legacy)):
        # the same parameters in the same order: Adam's state in older checkpoints maps onto them
        assert len(new_groups) == len(old_groups)
        for p, q in zip(new_groups, old_groups):
            assert p.shape == q.shape and torch.equal(p, q), new_names[id(p)]
            assert (p.grad - q.grad).abs().max() < 1e-10, new_names[id(p)]
    assert len(old) == len(list(model.parameters()))
    model.eval(), legacy.eval()
    assert torch.allclose(model(x, noise=noise)[0], legacy(x, noise=noise)[0], rtol=0, atol=1e-12)


def test_state_dicts_with_the_parametrization_names_still_load(tmp_path):
    """A checkpoint written before WNConv2d held g and v (keys `conv.parametrizations.weight.original0` ...)
    loads into this version's model, also through load_checkpoint, and gives the same density."""
    model = tiny_model(1, 8, 2)
    old_state = legacy_model(model).state_dict()
    assert any(k.endswith('conv.parametrizations.weight.original0') for k in old_state)
    assert any(k.endswith('rescale.parametrizations.weight.original1') for k in old_state)
    fresh = RealNVP(img_size=8, num_scales=2, **TINY).double().eval()
    fresh.load_state_dict(old_state)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    path = str(tmp_path / 'old.pt')
    torch.save(dict(config=asdict(model.config), model=old_state), path)
    loaded, _ = realnvp.load_checkpoint(path)   # a float32 model, as checkpoints hold
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.float()), key
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    noise = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(fresh(x, noise=noise)[1], model(x, noise=noise)[1], rtol=0, atol=1e-12)


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


def test_weight_average_follows_its_update_rule_exactly():
    torch.manual_seed(0)
    model = RealNVP(img_size=4, **TINY).double()
    average = realnvp.WeightAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    for got, want in zip(average.model.parameters(), expected):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert not any(p.requires_grad for p in average.model.parameters())
    # decay 0 is the trained weights themselves
    plain = realnvp.WeightAverage(model, decay=0.0)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    plain.update(model, 1)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), model.parameters()))
    with pytest.raises(ValueError, match='decay'):
        realnvp.WeightAverage(model, decay=1.0)


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
    plain, normed = RealNVP(img_size=8, **TINY), RealNVP(img_size=8, flow_norm=True, **TINY)
    couplings = [m for m in normed.modules() if isinstance(m, CouplingLayer)]
    assert len(couplings) == 10 and all(isinstance(c.bn_flow, realnvp.BatchNormFlow) for c in couplings)
    assert not any(isinstance(m, realnvp.BatchNormFlow) for m in plain.modules())
    assert RealNVPConfig().flow_norm is False   # the lecture's architecture, and every older checkpoint's
    extra = {k for k in normed.state_dict()} - {k for k in plain.state_dict()}
    assert extra and all('.bn_flow.' in k for k in extra)


def test_the_translation_bound_bends_t_and_keeps_it_inside():
    """Every coupling's t is t_bound tanh(raw t / t_bound): inside the bound, and bent where raw t is large (in the
    tiny float64 models of the inverse and log-det tests, whose ARCHS bound of 0.5 is therefore not idle)."""
    bound = ARCHS[-1]['t_bound']
    model = tiny_model(1, 8, 2, **ARCHS[-1]).eval()
    assert RealNVPConfig().t_bound == 0.0   # the lecture's architecture, and every older checkpoint's
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


@pytest.mark.parametrize('flow_norm', [False, True])
def test_refreshed_batch_norm_makes_eval_mode_match_train_mode(flow_norm):
    """After a refresh on a batch, eval mode (running statistics) gives the NLL that train mode (batch statistics)
    gives for the same images and noise: exactly, once BatchNorm's unbiased running variance (n / (n - 1)) is
    undone, and within 1% as it is; the stale statistics the model had are far off. With --flow-norm, the flow's
    own batch norms (and their log-dets) are refreshed too."""
    model = tiny_model(1, 8, 2, flow_norm=flow_norm)   # statistics settled on other batches and other weights
    assert any(isinstance(m, realnvp.BatchNormFlow) for m in realnvp.batch_norms(model)) == flow_norm
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    x = torch.randint(0, 256, (256, 1, 8, 8)).double() / 255
    u = torch.rand_like(x)
    loss_fn = RealNVPLoss(reduction='none')
    counts = {}
    hooks = [m.register_forward_hook(lambda m, inp, out: counts.__setitem__(m, inp[0].numel() // inp[0].shape[1]))
             for m in realnvp.batch_norms(model)]
    with torch.no_grad():
        model.train()
        train_nll = loss_fn(*model(x, noise=u))
        for h in hooks:
            h.remove()
        model.eval()
        stale_nll = loss_fn(*model(x, noise=u))
        momenta = [m.momentum for m in realnvp.batch_norms(model)]
        realnvp.refresh_batch_norm(model, [(x, u)])
        assert not model.training and [m.momentum for m in realnvp.batch_norms(model)] == momenta
        eval_nll = loss_fn(*model(x, noise=u))
        for m in realnvp.batch_norms(model):
            m.running_var.mul_((counts[m] - 1) / counts[m])
        biased_nll = loss_fn(*model(x, noise=u))
    assert (biased_nll - train_nll).abs().max() < 1e-9 * train_nll.abs().max()
    assert ((eval_nll - train_nll) / train_nll).abs().max() < 0.01
    # the stale statistics are far off (less so with the flow's own normalisation, which keeps z near unit scale)
    assert ((stale_nll - train_nll) / train_nll).abs().max() > (0.05 if flow_norm else 0.5)
    # several batches: the plain average of their statistics
    halves = [(x[:128], u[:128]), (x[128:], u[128:])]
    realnvp.refresh_batch_norm(model, halves)
    first = realnvp.batch_norms(model)[0]    # the first coupling's s/t net sees the masked logits y * b
    b = checkerboard_mask(8, 8, dtype=torch.float64)
    means = [(model.preprocess(xx, uu)[0] * b).mean() for xx, uu in halves]
    assert torch.allclose(first.running_mean, torch.stack(means).mean().reshape(1), rtol=0, atol=1e-12)

# -----------------------------------------------------------------------------
# 6. data


@pytest.mark.parametrize('gz', [False, True])
def test_mnist_loader_filters_resizes_and_keeps_the_pixel_grid(tmp_path, gz):
    root = make_mnist(str(tmp_path), n=30, gz=gz)
    ds = ImageDataset('mnist', root, train=True, img_size=14, digits=[0, 2], download=False)
    assert len(ds) == 6
    assert set(ds.labels.tolist()) == {0, 2}
    assert ds.images.shape == (6, 1, 14, 14) and ds.images.dtype == torch.uint8
    x, label = ds[0]
    assert x.shape == (1, 14, 14) and label in (0, 2)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-4)
    # a resize is a local average: the mean brightness survives it
    src = torch.from_numpy(read_idx(os.path.join(root, 'MNIST', 'raw', 'train-images-idx3-ubyte' + ('.gz' if gz else ''))))
    assert abs(ds.images.float().mean() - src[ds.labels.new_tensor([0, 2, 10, 12, 20, 22])].float().mean()) < 3
    test = ImageDataset('mnist', root, train=False, img_size=28, download=False)
    assert len(test) == 30 and test.images.shape == (30, 1, 28, 28)
    assert torch.equal(test.images[:, 0], torch.from_numpy(read_idx(os.path.join(
        root, 'MNIST', 'raw', 't10k-images-idx3-ubyte' + ('.gz' if gz else '')))))


def test_missing_mnist_offline_names_the_files_and_the_flag(tmp_path, monkeypatch):
    import torchvision

    def offline(root, *args, **kwargs):
        os.makedirs(os.path.join(root, 'MNIST', 'raw'), exist_ok=True)   # as torchvision does before it downloads
        raise RuntimeError('Error downloading train-images-idx3-ubyte.gz:\n<urlopen error [Errno -2] Name or service not known>')

    monkeypatch.setattr(torchvision.datasets, 'MNIST', offline)
    with pytest.raises(DataNotFoundError) as info:
        ImageDataset('mnist', str(tmp_path), train=True)
    message = str(info.value)
    assert '\n' not in message
    for needed in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', '--data-dir', str(tmp_path)):
        assert needed in message
    assert 'Name or service not known' in message
    assert os.listdir(tmp_path) == []   # the failed download left no empty MNIST/raw/ behind


def test_missing_cifar10_names_the_folder_and_the_flag(tmp_path, monkeypatch):
    import torchvision
    with pytest.raises(DataNotFoundError, match='CIFAR-10 not found in .*cifar-10-batches-py.*--data-dir'):
        ImageDataset('cifar10', str(tmp_path), img_size=32, download=False)
    real = torchvision.datasets.CIFAR10

    def offline(root, train=True, download=False):
        if download:
            raise RuntimeError('<urlopen error [Errno -2] Name or service not known>')
        return real(root, train=train, download=False)

    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', offline)
    with pytest.raises(DataNotFoundError, match='downloading failed: .*Name or service not known'):
        ImageDataset('cifar10', str(tmp_path), img_size=32)


def test_resizing_beyond_the_machine_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    root = make_mnist(str(tmp_path), n=20)
    real = os.sysconf
    monkeypatch.setattr(os, 'sysconf', lambda name: 2 ** 14 if name == 'SC_PHYS_PAGES' else real(name))  # 64 MiB
    with pytest.raises(ValueError, match=r'resizing 20 images to 1000x1000 needs about 0.1 GB.*--image-size'):
        ImageDataset('mnist', root, train=True, img_size=1000, download=False)
    assert len(ImageDataset('mnist', root, train=True, img_size=14, download=False)) == 20


def test_corrupt_idx_file_is_reported(tmp_path):
    root = make_mnist(str(tmp_path), n=4)
    path = os.path.join(root, 'MNIST', 'raw', 'train-images-idx3-ubyte')
    with open(path, 'r+b') as f:
        f.truncate(100)
    with pytest.raises(ValueError, match='truncated'):
        ImageDataset('mnist', root, train=True, download=False)
    with pytest.raises(ValueError, match='unknown data set'):
        ImageDataset('svhn', root)


# -----------------------------------------------------------------------------
# train.py: the pieces, in process


def nan_loss(z, sldj):
    """The loss of a step gone wrong."""
    return RealNVPLoss()(z, sldj) * float('nan')


@pytest.mark.parametrize('fused', [True, False])
def test_non_finite_step_leaves_weights_and_optimizer_untouched(fused):
    import train
    from contextlib import nullcontext
    torch.manual_seed(0)
    model = RealNVP(img_size=4, num_scales=2, **TINY)
    opt = torch.optim.Adam(get_param_groups(model, 5e-5), lr=1e-2, fused=fused)
    update = train.Update(opt, 100.0)
    x = torch.rand(8, 1, 4, 4)
    loss, bad = train.train_step(model, update, RealNVPLoss(), x, nullcontext())
    assert bad.item() == 0 and torch.isfinite(loss)
    weights = {k: v.clone() for k, v in model.state_dict().items()}   # batch-norm statistics included
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}

    loss, bad = train.train_step(model, update, nan_loss, x, nullcontext())
    assert bad.item() == 1 and torch.isnan(loss)
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, moments[id(p)][k]), k
    loss, bad = train.train_step(model, update, RealNVPLoss(), x, nullcontext())
    assert bad.item() == 0
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in weights.items())



def test_resume_policy_classifies_every_flag():
    """Each flag of train.py is frozen, kept or per-run on --resume: a new flag cannot slip through."""
    import train
    dests = {a.dest for a in train.build_parser()._actions if a.dest != 'help'}
    assert set(train.RESUME_POLICY) == dests
    assert set(train.RESUME_POLICY.values()) == {train.FROZEN, train.KEPT, train.PER_RUN}


def test_one_process_dist_is_the_identity(monkeypatch):
    import train
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    d = train.Dist.start(torch.device('cpu'), log_every=10)
    assert type(d) is train.Dist and (d.rank, d.world, d.sync_every) == (0, 1, 1)
    t = torch.tensor([1.0, 2.0])
    assert d.all_reduce(t, 'max') is t and d.shard(t) is t and d.any(True) and not d.any(False)
    assert d.gather('x') == ['x'] and d.broadcast('y') == 'y'
    model = RealNVP(img_size=4, **TINY)
    assert d.wrap(model) is model


# -----------------------------------------------------------------------------
# train.py end to end


@pytest.mark.slow
def test_train_writes_checkpoints_metrics_plot_and_grid(full_run):
    for name in ('last.pt', 'best.pt', 'metrics.csv', 'curves.png', 'samples_epoch001.png', 'samples_epoch002.png',
                 'train.log', 'config.json'):
        assert os.path.isfile(os.path.join(full_run, name)), name
    ckpt = load(os.path.join(full_run, 'last.pt'))
    assert ckpt['step'] == 14 and ckpt['epoch'] == 2 and ckpt['skipped'] == 0
    assert ckpt['config'] == dict(in_channels=1, img_size=8, num_scales=2, mid_channels=4, num_blocks=1,
                                  data_constraint=0.9, flow_norm=True, t_bound=10.0)   # the default recipe's
    assert ckpt['args']['seed'] == 0 and 'state' in ckpt['optimizer']
    import train
    last_lr = train.learning_rate(SimpleNamespace(**ckpt['args']), 13, 14)   # step 14 of 14 ran at this lr
    assert 0 < last_lr < 1e-3 and all(g['lr'] == last_lr for g in ckpt['optimizer']['param_groups'])
    rows = open(os.path.join(full_run, 'metrics.csv')).read().strip().splitlines()
    assert rows[0].startswith('epoch,step,train_bpd,test_bpd') and len(rows) == 3
    best_bpd = min(float(r.split(',')[3]) for r in rows[1:])
    assert abs(load(os.path.join(full_run, 'best.pt'))['best_bpd'] - best_bpd) < 1e-4
    log = open(os.path.join(full_run, 'train.log')).read()
    assert 'seed 0' in log and 'epoch 2: train bpd' in log
    assert 'bf16 autocast off' in log   # --no-amp, said at the start
    with open(os.path.join(full_run, 'config.json')) as f:
        config = json.load(f)
    assert config['model']['mid_channels'] == 4 and config['args']['amp'] is False


@pytest.mark.slow
def test_resume_under_amp_equals_the_uninterrupted_run(data_dir, tmp_path):
    """bf16 autocast (training, refresh and evaluation) resumes bit-exactly too."""
    runs = {}
    for name, steps in (('full', []), ('stopped', ['--max-steps', 10])):
        runs[name] = str(tmp_path / name)
        result = script('train.py', '--data-dir', data_dir, '--out-dir', runs[name], '--epochs', 2, *steps,
                        *TINY_RUN, '--amp')
        assert result.returncode == 0, result.stderr
    assert 'bf16 autocast on' in open(os.path.join(runs['full'], 'train.log')).read()
    second = script('train.py', '--resume', os.path.join(runs['stopped'], 'last.pt'), '--data-dir', data_dir,
                    '--num-threads', 1)
    assert second.returncode == 0, second.stderr
    assert_same_weights(os.path.join(runs['stopped'], 'last.pt'), os.path.join(runs['full'], 'last.pt'))


@pytest.mark.slow
def test_resume_continues_and_equals_the_uninterrupted_run(full_run, data_dir, tmp_path):
    out = str(tmp_path / 'stopped')
    first = script('train.py', '--data-dir', data_dir, '--out-dir', out, '--epochs', 2, '--max-steps', 10, *TINY_RUN)
    assert first.returncode == 0, first.stderr
    assert load(os.path.join(out, 'last.pt'))['step'] == 10   # mid-way through epoch 2
    second = script('train.py', '--resume', os.path.join(out, 'last.pt'), '--data-dir', data_dir, '--num-threads', 1)
    assert second.returncode == 0, second.stderr
    assert 'resumed from' in second.stdout
    assert_same_weights(os.path.join(out, 'last.pt'), os.path.join(full_run, 'last.pt'))
    rows = open(os.path.join(out, 'metrics.csv')).read().strip().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['1', '2']


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_equals_the_uninterrupted_run(full_run, data_dir, tmp_path):
    out = str(tmp_path / 'interrupted')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **OFFLINE}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'train.py'), '--data-dir', data_dir, '--out-dir', out,
                             '--epochs', '2', *TINY_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=HERE)
    for line in proc.stdout:
        if line.startswith('training'):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert 'Traceback' not in stderr and 'interrupted at step' in stdout
    step = load(os.path.join(out, 'last.pt'))['step']
    assert 1 <= step < 14
    resumed = script('train.py', '--resume', os.path.join(out, 'last.pt'), '--data-dir', data_dir, '--num-threads', 1)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(os.path.join(out, 'last.pt'), os.path.join(full_run, 'last.pt'))


@pytest.mark.slow
def test_persistent_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(full_run, data_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    import train
    out = str(tmp_path / 'nan')
    shutil.copytree(full_run, out)
    before = open(os.path.join(out, 'last.pt'), 'rb').read()
    monkeypatch.setattr(RealNVPLoss, 'forward', lambda self, z, sldj: (z.sum() + sldj.sum()) * float('nan'))
    code = train.main(['--resume', os.path.join(out, 'last.pt'), '--data-dir', data_dir, '--epochs', '4',
                       '--max-bad-steps', '3', '--log-every', '1'])
    assert code == 1
    assert 'steps in a row had a non-finite loss' in capsys.readouterr().out
    assert open(os.path.join(out, 'last.pt'), 'rb').read() == before



# The checkpoint layout of the first round (before TrainState): the keys train.py wrote then, at the top level.
FIRST_ROUND_KEYS = ('config', 'model', 'optimizer', 'args', 'rng', 'world_size', 'epoch', 'step', 'best_bpd',
                    'skipped', 'epoch_loss', 'epoch_count')


@pytest.mark.slow
def test_first_round_checkpoints_still_sample_evaluate_and_resume(full_run, data_dir, tmp_path):
    ckpt = load(os.path.join(full_run, 'last.pt'))
    old = {key: ckpt[key] for key in FIRST_ROUND_KEYS}
    old['args'] = {k: v for k, v in ckpt['args'].items()
                   if k in ('epochs', 'batch_size', 'lr', 'weight_decay', 'max_grad_norm', 'num_scales',
                            'mid_channels', 'num_blocks', 'image_size', 'digits', 'dataset', 'data_dir', 'out_dir',
                            'seed', 'resume', 'max_steps', 'sample_every', 'log_every', 'max_bad_steps', 'device',
                            'amp', 'compile', 'num_threads')}
    run = tmp_path / 'old'
    run.mkdir()
    torch.save(old, run / 'last.pt')
    assert script('sample.py', '--ckpt', run / 'last.pt', '--n', 4, '--out', tmp_path / 's.png').returncode == 0
    evaluated = script('evaluate.py', '--ckpt', run / 'last.pt', '--data-dir', data_dir, '--json')
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)['step'] == 14
    resumed = script('train.py', '--resume', run / 'last.pt', '--epochs', 3, '--data-dir', data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert load(run / 'last.pt')['step'] == 21 and load(run / 'last.pt')['epoch'] == 3
    assert load(run / 'last.pt')['args']['lr_decay'] == 0.0   # as it ran before the flag existed


@pytest.mark.slow
def test_a_default_recipe_run_from_before_the_lr_decay_resumes_without_it(full_run, tmp_path):
    """Checkpoints of the default recipe written before --lr-decay existed ran at a constant rate: a resume
    keeps it so, while a new run of the default recipe gets the decay."""
    import train
    run = tmp_path / 'before'
    shutil.copytree(full_run, run)
    ckpt = load(run / 'last.pt')
    assert ckpt['args']['recipe'] == 'default' and ckpt['args']['lr_decay'] == 0.2
    del ckpt['args']['lr_decay']
    torch.save(ckpt, run / 'last.pt')
    args, _, _ = train.parse_args(train.build_parser(), ['--resume', str(run / 'last.pt'), '--epochs', '3'])
    assert args.lr_decay == 0.0
    assert train.parse_args(train.build_parser(), [])[0].lr_decay == 0.2


@pytest.mark.slow
def test_resume_takes_the_flow_norm_from_the_checkpoints_model(full_run, tmp_path):
    """The architecture is the checkpoint's: a default-recipe run resumes with its flow batch norms even when its
    saved arguments lack the flag, another value is refused, and a model without them resumes without them."""
    import train
    run = tmp_path / 'run'
    shutil.copytree(full_run, run)
    ckpt = load(run / 'last.pt')
    assert ckpt['config']['flow_norm'] is True and ckpt['args']['flow_norm'] is True
    del ckpt['args']['flow_norm']
    torch.save(ckpt, run / 'last.pt')
    resume = ['--resume', str(run / 'last.pt')]
    assert train.parse_args(train.build_parser(), resume)[0].flow_norm is True
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(train.build_parser(), resume + ['--no-flow-norm'])
    assert exit_info.value.code == 2
    plain = RealNVP(RealNVPConfig(**{**ckpt['config'], 'flow_norm': False}))
    ckpt['config'] = {k: v for k, v in ckpt['config'].items() if k != 'flow_norm'}   # as older checkpoints are
    ckpt['model'] = ckpt['train_model'] = plain.state_dict()
    torch.save(ckpt, run / 'last.pt')
    assert train.parse_args(train.build_parser(), resume)[0].flow_norm is False


@pytest.mark.slow
def test_resume_takes_the_translation_bound_from_the_checkpoints_model(full_run, tmp_path):
    """Like the flow norm: a default-recipe run resumes with its bound even when its saved arguments lack the flag,
    another bound is refused, and a checkpoint from before the bound existed resumes unbounded."""
    import train
    run = tmp_path / 'run'
    shutil.copytree(full_run, run)
    ckpt = load(run / 'last.pt')
    assert ckpt['config']['t_bound'] == ckpt['args']['t_bound'] == realnvp.DEFAULT_T_BOUND
    del ckpt['args']['t_bound']
    torch.save(ckpt, run / 'last.pt')
    resume = ['--resume', str(run / 'last.pt')]
    assert train.parse_args(train.build_parser(), resume)[0].t_bound == realnvp.DEFAULT_T_BOUND
    assert train.parse_args(train.build_parser(), resume + ['--t-bound', '10'])[0].t_bound == 10.0   # the same
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(train.build_parser(), resume + ['--t-bound', '5'])
    assert exit_info.value.code == 2
    ckpt['config'] = {k: v for k, v in ckpt['config'].items() if k != 't_bound'}   # as older checkpoints are
    torch.save(ckpt, run / 'last.pt')
    assert train.parse_args(train.build_parser(), resume)[0].t_bound == 0.0


# -----------------------------------------------------------------------------
# train.py: one run folder, one run; crash order; nothing non-finite is saved


def copy_run(full_run, path, run_id=None):
    """A copy of the full run's folder; with `run_id`, its checkpoints say they belong to another run."""
    shutil.copytree(full_run, path)
    if run_id:
        for name in ('last.pt', 'best.pt'):
            ckpt = load(os.path.join(path, name))
            ckpt['run_id'] = run_id
            torch.save(ckpt, os.path.join(path, name))
    return str(path)


@pytest.mark.slow
def test_resuming_an_older_checkpoint_never_overwrites_a_newer_one(full_run, data_dir, tmp_path):
    run = copy_run(full_run, tmp_path / 'run')
    older = load(os.path.join(run, 'last.pt'))
    older['step'], older['epoch'] = 7, 1          # as a best.pt from epoch 1 would be
    torch.save(older, os.path.join(run, 'best.pt'))
    before = folder_bytes(run)
    refused = script('train.py', '--resume', os.path.join(run, 'best.pt'), '--data-dir', data_dir)
    assert_one_line_error(refused, 2, 'step 14, past', '--out-dir')
    assert folder_bytes(run) == before
    # branching into a new folder is the way: a new run, that says where it came from
    branch = str(tmp_path / 'branch')
    result = script('train.py', '--resume', os.path.join(run, 'best.pt'), '--out-dir', branch, '--data-dir', data_dir)
    assert result.returncode == 0, result.stderr
    assert folder_bytes(run) == before
    config = json.load(open(os.path.join(branch, 'config.json')))
    assert config['branched_from'] == load(os.path.join(run, 'last.pt'))['run_id'] != config['run_id']
    assert load(os.path.join(branch, 'last.pt'))['run_id'] == config['run_id']


@pytest.mark.slow
def test_a_folder_holding_another_run_is_never_written_into(full_run, data_dir, tmp_path):
    a = copy_run(full_run, tmp_path / 'a')
    b = copy_run(full_run, tmp_path / 'b', run_id='another')
    before = folder_bytes(b)
    result = script('train.py', '--resume', os.path.join(a, 'last.pt'), '--out-dir', b, '--epochs', 3,
                    '--data-dir', data_dir)
    assert_one_line_error(result, 2, 'holds another run', 'another')
    assert folder_bytes(b) == before


@pytest.mark.slow
def test_resuming_on_other_data_is_refused(full_run, tmp_path):
    run = copy_run(full_run, tmp_path / 'run')
    other = make_mnist(str(tmp_path / 'other'), n=100, seed=1)   # same sizes, other pixels
    before = folder_bytes(run)
    result = script('train.py', '--resume', os.path.join(run, 'last.pt'), '--epochs', 3, '--data-dir', other)
    assert_one_line_error(result, 1, 'not the data this run trained on', '--data-dir')
    assert folder_bytes(run) == before


@pytest.mark.slow
def test_a_second_training_into_a_folder_in_use_is_refused_and_a_killed_ones_lock_is_not(data_dir, tmp_path):
    out = str(tmp_path / 'busy')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **OFFLINE}
    first = subprocess.Popen([sys.executable, os.path.join(HERE, 'train.py'), '--data-dir', data_dir, '--out-dir',
                              out, '--epochs', '50', *TINY_RUN], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=env, cwd=HERE)
    try:
        for line in first.stdout:
            if line.startswith('epoch 1:'):   # last.pt exists
                break
        second = script('train.py', '--resume', os.path.join(out, 'last.pt'), '--data-dir', data_dir)
        assert_one_line_error(second, 1, f'{out} is in use by another training (pid {first.pid})')
    finally:
        first.kill()
        first.wait()
    open(os.path.join(out, 'last.pt.tmp999999'), 'wb').close()   # as a process killed mid-write leaves
    step = load(os.path.join(out, 'last.pt'))['step']
    third = script('train.py', '--resume', os.path.join(out, 'last.pt'), '--max-steps', step + 1,
                   '--data-dir', data_dir)
    assert third.returncode == 0, third.stderr
    assert load(os.path.join(out, 'last.pt'))['step'] == step + 1
    assert not [n for n in os.listdir(out) if '.tmp' in n]


@pytest.mark.slow
@pytest.mark.parametrize('kill_after', [6, 7, 8, 9, 10])
def test_a_kill_at_each_write_of_an_epoch_end_loses_nothing(full_run, data_dir, tmp_path, kill_after):
    """Epoch 1 writes 5 files (best.pt, metrics.csv, curves.png, the grid, last.pt: the commit point); a SIGKILL
    after each write of epoch 2's sequence, then --resume, gives the uninterrupted run's files."""
    out = str(tmp_path / 'killed')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'REALNVP_KILL_AFTER_WRITES': str(kill_after), **OFFLINE}
    killed = subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), '--data-dir', data_dir, '--out-dir', out,
                             '--epochs', '2', *TINY_RUN], capture_output=True, text=True, env=env, cwd=HERE)
    assert killed.returncode == -signal.SIGKILL
    resumed = script('train.py', '--resume', os.path.join(out, 'last.pt'), '--data-dir', data_dir, '--num-threads', 1)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(os.path.join(out, 'last.pt'), os.path.join(full_run, 'last.pt'))
    assert_same_weights(os.path.join(out, 'best.pt'), os.path.join(full_run, 'best.pt'))

    def rows(run):
        return [r.split(',')[:4] for r in open(os.path.join(run, 'metrics.csv')).read().strip().splitlines()]
    assert rows(out) == rows(full_run) and len(rows(out)) == 3
    assert os.path.isfile(os.path.join(out, 'samples_epoch002.png'))


@pytest.mark.slow
@pytest.mark.parametrize('flags', [['--lr', '1e10'], ['--weight-decay', '1e300']])
def test_a_run_that_goes_non_finite_stops_and_saves_nothing_non_finite(data_dir, tmp_path, flags):
    out = str(tmp_path / 'bad')
    result = script('train.py', '--data-dir', data_dir, '--out-dir', out, '--epochs', 3, *flags, *TINY_RUN)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'not finite' in result.stdout or 'non-finite' in result.stdout
    for name in ('last.pt', 'best.pt'):
        if os.path.exists(os.path.join(out, name)):
            ckpt = load(os.path.join(out, name))
            assert realnvp.non_finite_tensor({k: ckpt[k] for k in ('model', 'train_model', 'optimizer')}) is None


def test_a_full_disk_while_saving_leaves_the_old_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    realnvp.write_atomically(b'old', path)

    def full(fd):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(realnvp.CheckpointError, match='could not write .*No space left on device.*untouched'):
        realnvp.write_atomically(b'new', path)
    assert open(path, 'rb').read() == b'old' and os.listdir(tmp_path) == ['last.pt']


def test_learning_rate_warms_up_holds_and_decays_to_zero_over_the_last_fraction():
    import train
    lr = lambda step, warmup=0, decay=0.2: train.learning_rate(
        SimpleNamespace(lr=1e-3, warmup_steps=warmup, lr_decay=decay), step, 100)
    assert [lr(s) for s in (0, 50, 80)] == [1e-3] * 3           # constant until the last 20 of 100 steps
    assert lr(90) == pytest.approx(0.5e-3) and lr(99) == pytest.approx(0.05e-3) and lr(100) == 0.0
    assert lr(0, warmup=10) == pytest.approx(1e-4) and lr(9, warmup=10) == 1e-3
    assert lr(95, warmup=10) == pytest.approx(0.25e-3)
    assert lr(99, decay=0.0) == 1e-3


def test_every_batch_is_full_and_every_image_is_seen_each_epoch():
    import train
    order = torch.randperm(100)
    filled = train.fill_batches(order, 7, 16)   # 100 images, batch 16: 7 steps, the last filled up
    assert len(filled) == 7 * 16 and torch.equal(filled[:100], order) and torch.equal(filled[100:], order[:12])
    assert torch.equal(train.fill_batches(torch.arange(3), 2, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))


@pytest.mark.parametrize('flow_norm', [False, True])
@pytest.mark.parametrize('amp', [False, True])
def test_the_model_traces_into_one_graph_forward_and_reverse(amp, flow_norm):
    """torch.compile sees the whole flow, under --amp's autocast too: no graph breaks either way."""
    model = RealNVP(img_size=8, flow_norm=flow_norm, **TINY)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        forward = torch._dynamo.explain(model)(torch.rand(4, 1, 8, 8), validate=False)
        model.eval()
        reverse = torch._dynamo.explain(model)(torch.randn(4, 1, 8, 8), reverse=True)
    for explained in (forward, reverse):
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def counting_compile(monkeypatch):
    """torch.compile with a backend that runs each graph as dynamo built it (no C++ compiler needed) and keeps
    a list of the graphs compiled, which it returns."""
    import functools
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    torch._dynamo.reset()
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend=backend))
    return graphs


def test_a_compiled_run_never_recompiles(data_dir, tmp_path, monkeypatch):
    """Two epochs of 100 images in batches of 16 (the last one filled up) under --compile, through the
    learning rate's decay: every graph (the net's, the update's) is compiled in the first step, none after."""
    import train
    graphs, after_step = counting_compile(monkeypatch), []
    step = train.Trainer.step
    monkeypatch.setattr(train.Trainer, 'step', lambda self, idx: (step(self, idx), after_step.append(len(graphs))))
    out = str(tmp_path / 'compiled')
    assert train.main(['--data-dir', data_dir, '--out-dir', out, '--epochs', '2', '--compile', *TINY_RUN]) == 0
    assert load(os.path.join(out, 'last.pt'))['step'] == len(after_step) == 14
    assert after_step[0] >= 2 and after_step == after_step[:1] * 14, after_step
    torch._dynamo.reset()


def test_the_update_asks_no_host_and_compiles_to_the_same_steps(monkeypatch):
    """`Update` with a fused Adam: its found_inf is one buffer for the whole run. Compiled, the update takes the
    same steps as eager, bit for bit, through a changing learning rate and a skipped step; each of its two
    halves is one graph without breaks (no host sync in them), and no graph is compiled after the first step."""
    import copy
    import train
    from contextlib import nullcontext
    torch.manual_seed(0)
    eager_model = RealNVP(img_size=4, num_scales=2, flow_norm=True, **TINY)
    compiled_model = copy.deepcopy(eager_model)
    graphs = counting_compile(monkeypatch)
    eager = train.Update(realnvp.make_optimizer(eager_model, 1e-3, 5e-5, 'cpu'), 100.0)
    compiled = train.Update(realnvp.make_optimizer(compiled_model, 1e-3, 5e-5, 'cpu'), 100.0, compile=True)
    found_inf = compiled.optimizer.found_inf
    g, compiled_after = torch.Generator().manual_seed(0), []
    for i in range(6):
        x = torch.rand(8, 1, 4, 4, generator=g)
        for update, model in ((eager, eager_model), (compiled, compiled_model)):
            update.set_lr(1e-3 * (1 - i / 6))
            torch.manual_seed(i)   # the same dequantisation noise
            loss, bad = train.train_step(model, update, nan_loss if i == 3 else RealNVPLoss(), x, nullcontext())
            assert bad.item() == (i == 3)
        compiled_after.append(len(graphs))
        for (name, a), b in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
            assert torch.equal(a, b), (i, name)
        assert compiled.optimizer.found_inf is found_inf and found_inf.item() == (i == 3)
    assert compiled_after == [2] * 6
    buffers = list(compiled_model.buffers())
    for half, inputs in ((compiled._check, (torch.tensor(1.0),)),
                         (compiled._commit, (torch.tensor(0.0), buffers, [b.clone() for b in buffers]))):
        explained = torch._dynamo.explain(half)(*inputs)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


def test_a_model_compiled_for_cuda_starts_a_cuda_graph_step_at_every_call(monkeypatch):
    """Under CUDA graphs each training step must tell torch that the last step's outputs are free: the compiled
    net does it itself before each call (checked here with dynamo's eager backend on the CPU)."""
    import train
    compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda net, mode, dynamic: compile(net, backend='eager', dynamic=dynamic))
    marks = []
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: marks.append(1))
    net = torch.nn.Linear(2, 2)
    cuda = train.compile_model(net, torch.device('cuda'))
    for _ in range(3):
        cuda(torch.randn(1, 2))
    assert len(marks) == 3
    train.compile_model(net, torch.device('cpu'))(torch.randn(1, 2))
    assert len(marks) == 3
    torch._dynamo.reset()


def test_deterministic_asks_torch_for_deterministic_kernels():
    import train
    try:
        train.set_determinism(True, torch.device('cuda'))
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert os.environ['CUBLAS_WORKSPACE_CONFIG']
        train.set_determinism(False, torch.device('cuda'))
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        train.set_determinism(False, torch.device('cpu'))
    assert not torch.backends.cudnn.benchmark


def test_native_bf16_reads_the_hardware(monkeypatch):
    for amx, avx, expected in [(True, False, 'AMX'), (False, True, 'AVX-512 BF16'), (False, False, None)]:
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx)
        native, why = realnvp.native_bf16('cpu')
        assert native == (expected is not None) and (expected is None or expected in why)
    monkeypatch.delattr(torch.cpu, '_is_amx_tile_supported')   # a torch without the check: no
    assert realnvp.native_bf16('cpu')[0] is False
    assert realnvp.native_bf16('mps')[0] is False


@pytest.mark.parametrize('native', [True, False])
def test_amp_is_on_by_default_exactly_where_bf16_is_native(monkeypatch, native):
    import train
    monkeypatch.setattr(realnvp, 'native_bf16', lambda device: (native, 'a test CPU'))
    parse = lambda *flags: train.parse_args(train.build_parser(), ['--device', 'cpu', *flags])[0].amp
    assert parse() is native
    assert parse('--amp') is True and parse('--no-amp') is False


def test_digits_are_a_set_and_epochs_0_says_nothing_was_saved(data_dir, tmp_path, capsys):
    import train
    args, _, _ = train.parse_args(train.build_parser(), ['--digits', '2', '0', '2'])
    assert args.digits == [0, 2]
    out = str(tmp_path / 'zero')
    assert train.main(['--data-dir', data_dir, '--out-dir', out, '--epochs', '0', *TINY_RUN]) == 0
    assert 'trains nothing; no checkpoint written' in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, 'last.pt'))


# -----------------------------------------------------------------------------
# sample.py and evaluate.py


@pytest.mark.slow
def test_sample_writes_a_grid_of_the_right_size(full_run, tmp_path):
    from PIL import Image
    out = str(tmp_path / 'grid.png')
    result = script('sample.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--n', 9, '--out', out)
    assert result.returncode == 0, result.stderr
    assert out in result.stdout
    # 3x3 tiles of 8 pixels with 1-pixel padding, enlarged 7 times: cells of at least 56 pixels
    assert Image.open(out).size == (7 * (3 * 9 + 1), 7 * (3 * 9 + 1))
    small = str(tmp_path / 'small.png')
    assert script('sample.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--n', 9, '--out', small,
                  '--scale', 1).returncode == 0
    assert Image.open(small).size == (3 * 9 + 1, 3 * 9 + 1)
    big, little = np.asarray(Image.open(out)), np.asarray(Image.open(small))
    assert np.array_equal(big[::7, ::7], little)   # nearest-neighbour: every pixel becomes a 7x7 block
    interp = str(tmp_path / 'interp.png')
    result = script('sample.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--interpolate', '--pairs', 2,
                    '--steps', 5, '--out', interp)
    assert result.returncode == 0, result.stderr
    assert Image.open(interp).size == (7 * (5 * 9 + 1), 7 * (2 * 9 + 1))


@pytest.mark.slow
def test_interpolation_ends_decode_to_the_inputs_exactly(full_run, data_dir):
    import sample
    model, _ = realnvp.load_checkpoint(os.path.join(full_run, 'best.pt'))
    images = ImageDataset('mnist', data_dir, train=False, img_size=8, download=False).images[:6].float() / 255
    out = sample.interpolate(model, images[:3], images[3:], steps=4).reshape(3, 4, 1, 8, 8)
    assert torch.equal(out[:, 0], images[:3]) and torch.equal(out[:, -1], images[3:])
    assert not torch.equal(out[:, 1], images[:3])


@pytest.mark.slow
def test_evaluate_prints_the_directly_computed_bpd(full_run, data_dir):
    result = script('evaluate.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--data-dir', data_dir, '--json',
                    '--seed', 3)
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    model, _ = realnvp.load_checkpoint(os.path.join(full_run, 'best.pt'))
    x = ImageDataset('mnist', data_dir, train=False, img_size=8, download=False).images.float() / 255
    torch.manual_seed(3)
    with torch.no_grad():
        nll = RealNVPLoss(reduction='none')(*model(x))
    bpd = bits_per_dim(x, nll)
    assert reported['images'] == 100
    assert abs(reported['bpd'] - bpd.mean().item()) < 1e-5
    assert abs(reported['stderr'] - bpd.std().item() / 10) < 1e-5


@pytest.mark.slow
def test_importance_weighted_bound_is_no_worse_on_the_same_draws(full_run, data_dir):
    model, _ = realnvp.load_checkpoint(os.path.join(full_run, 'best.pt'))
    images = ImageDataset('mnist', data_dir, train=False, img_size=8, download=False).images
    torch.manual_seed(5)
    k4 = realnvp.nll_per_image(model, images, dequant_samples=4).double()
    torch.manual_seed(5)
    singles = torch.stack([realnvp.nll_per_image(model, images).double() for _ in range(4)])
    assert (k4 <= singles.mean(0) + 1e-4).all()
    assert k4.mean() < singles.mean() - 1e-4
    # and it is the log-mean-exp of those same draws
    assert torch.allclose(k4, -(torch.logsumexp(-singles, 0) - math.log(4)), atol=1e-4)



@pytest.mark.slow
def test_evaluate_breakdown_worst_and_per_image(full_run, data_dir, tmp_path):
    ckpt = os.path.join(full_run, 'best.pt')
    csv_path = tmp_path / 'bpd.csv'
    result = script('evaluate.py', '--ckpt', ckpt, '--data-dir', data_dir, '--json', '--seed', 4, '--breakdown',
                    '--worst', 5, '--per-image', csv_path, '--out-dir', tmp_path)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    # the terms add up to the bpd, and the 1/256 dequantisation is 8 bits a dimension
    assert abs(sum(r['breakdown'].values()) - r['bpd']) < 1e-9
    assert set(r['breakdown']) == {'prior', 'flow', 'logit', 'dequantisation'}
    assert r['breakdown']['dequantisation'] == pytest.approx(8.0, abs=1e-6)   # float32 here; 1e-12 in float64 above
    # the CSV holds every image; --worst names the 5 with the largest NLL, computed here directly
    rows = open(csv_path).read().strip().splitlines()
    assert rows[0] == 'index,label,bpd' and len(rows) == 101
    per_image = torch.tensor([float(row.split(',')[2]) for row in rows[1:]], dtype=torch.float64)
    labels = [int(row.split(',')[1]) for row in rows[1:]]
    assert labels == [i % 10 for i in range(100)]
    model, _ = realnvp.load_checkpoint(ckpt)
    images = ImageDataset('mnist', data_dir, train=False, img_size=8, download=False).images
    torch.manual_seed(4)
    with torch.no_grad():   # the same noise draw: one batch, one torch.rand_like
        direct = RealNVPLoss(reduction='none')(*model(images.float() / 255)).double() / (64 * math.log(2))
    assert torch.allclose(per_image, direct, atol=1e-5)
    assert r['worst_indices'] == direct.argsort(descending=True)[:5].tolist()
    assert abs(r['worst_bpd'] - direct.max().item()) < 1e-5
    from PIL import Image
    for key in ('worst_png', 'histogram_png'):
        assert Image.open(r[key]).size[0] >= 400, key
    assert_one_line_error(script('evaluate.py', '--ckpt', ckpt, '--breakdown', '--dequant-samples', 2), 2,
                          '--breakdown')


def test_recipes_fill_what_no_flag_gives():
    import train
    parser = train.build_parser()
    args, _, _ = train.parse_args(parser, [])
    assert args.recipe == 'default'
    assert {k: getattr(args, k) for k in train.RECIPES['default']} == train.RECIPES['default']
    args, _, _ = train.parse_args(parser, ['--recipe', 'lecture', '--lr', '3e-4'])
    assert (args.lr, args.weight_decay, args.warmup_steps, args.ema_decay, args.bn_refresh) == (3e-4, 0.0, 0, 0.0, 0)
    assert realnvp.config_from_args(args) == RealNVPConfig()   # the lecture's architecture: no flow norm, no bound

# -----------------------------------------------------------------------------
# bad input: one clear line, the right exit code, and nothing saved is touched

# (script, arguments, exit code, words the one line must hold); {names} are the paths of the `bad_files` fixture.
BAD_INPUT = [
    ('sample.py', ['--ckpt', '{best}', '--n', '0'], 2, ['--n', 'positive integer']),
    ('train.py', ['--epochs', '-1'], 2, ['--epochs']),
    ('train.py', ['--t-bound', '-1'], 2, ['--t-bound', 'zero or a positive number']),
    ('train.py', ['--image-size', '7', '--data-dir', '{data}'], 2, ['image size 7']),
    ('sample.py', ['--ckpt', '{tmp}/missing.pt'], 1, ['not found']),
    ('evaluate.py', ['--ckpt', '{corrupt}', '--data-dir', '{data}'], 1, ['cannot be read']),
    ('sample.py', ['--ckpt', '{misfit}'], 1, ['do not fit its config', 'of another shape', 'in_conv']),
    ('train.py', ['--data-dir', '{empty}', '--out-dir', '{tmp}/new', *TINY_RUN], 1,
     ['MNIST not found', 'train-images-idx3-ubyte', '--data-dir']),
    ('train.py', ['--data-dir', '{data}', '--out-dir', '{run}', *TINY_RUN], 2, ['already holds', '--resume']),
    ('train.py', ['--resume', '{run}/last.pt', '--mid-channels', '8'], 2, ['--mid-channels differs']),
    ('evaluate.py', ['--runs-dir', '{tmp}/no-runs'], 1, ['no checkpoint found']),
    ('bench.py', ['--image-size', '10', '--num-scales', '3'], 2, ['image size 10']),
    ('train.py', ['--lr-decay', '1.5'], 2, ['--lr-decay', '[0, 1)']),
    ('train.py', ['--resume', '{run}/last.pt', '--lr-decay', '0.5'], 2, ['--lr-decay differs']),
    ('bench.py', ['--summarize', '{tmp}/no-check'], 2, ['no stages.tsv', 'gpu_check.sh']),
    # a checkpoint with a NaN weight is refused everywhere, and never blamed on --lr
    ('sample.py', ['--ckpt', '{nonfinite}'], 1, ['not finite', 'in_norm']),
    ('evaluate.py', ['--ckpt', '{nonfinite}', '--data-dir', '{data}'], 1, ['not finite']),
    ('train.py', ['--resume', '{nonfinite}'], 2, ['not finite']),
    # memory bounds
    ('sample.py', ['--ckpt', '{best}', '--n', '100000'], 2, ['100000 images', 'at most 4096']),
    ('sample.py', ['--ckpt', '{best}', '--interpolate', '--steps', '100000'], 2, ['--steps 100000', 'at most 4096']),
    ('train.py', ['--image-size', '1000', '--data-dir', '{data}'], 2, ['GB', 'this machine has', '--image-size']),
    # where things go
    ('train.py', ['--out-dir', '{afile}', '--data-dir', '{data}'], 2, ['is a file']),
    ('train.py', ['--out-dir', '{afile}/run', '--data-dir', '{data}'], 2, ['is a file']),
    ('sample.py', ['--ckpt', '{best}', '--out', '{tmp}/grid.txt'], 2, ['image extension']),
    ('sample.py', ['--ckpt', '{best}', '--out', '{tmp}'], 2, ['is a folder']),
    ('sample.py', ['--ckpt', '{best}', '--out', '{afile}/grid.png'], 2, ['is a file']),
    # values argparse alone would let through
    ('train.py', ['--seed', str(2 ** 63)], 2, ['--seed', '2^63']),
    ('evaluate.py', ['--seed', '-1'], 2, ['--seed']),
    ('train.py', ['--device', 'meta'], 2, ['unknown device']),
    ('bench.py', ['--lecture', '{tmp}/missing.txt'], 2, ['no such file']),
    ('train.py', ['--resume', '{weightsonly}'], 2, ['not the state to resume']),
    ('train.py', ['--resume', '{run}/last.pt', '--max-steps', '3'], 2, ['not past', 'step 14']),
    ('train.py', ['--resume', '{tmp}/missing.pt'], 2, ['not found', 'give the path of a best.pt']),  # not '--ckpt'
    # data that is not there, or broken
    ('train.py', ['--data-dir', '{badgz}', '--out-dir', '{tmp}/new', *TINY_RUN], 1,
     ['t10k-images-idx3-ubyte.gz', 'cannot be read']),
    ('train.py', ['--data-dir', '{notest}', '--out-dir', '{tmp}/new', *TINY_RUN], 1, ['test split', 'no images']),
    ('train.py', ['--resume', '{garbage}/last.pt', '--data-dir', '{data}'], 1, ['metrics.csv', 'move it away']),
]


@pytest.fixture(scope='module')
def bad_files(full_run, data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('bad')
    best = os.path.join(full_run, 'best.pt')
    (tmp / 'corrupt.pt').write_bytes(open(best, 'rb').read()[:1000])
    misfit = load(best)
    misfit['config']['mid_channels'] = 8
    torch.save(misfit, tmp / 'misfit.pt')
    (tmp / 'empty').mkdir()
    nonfinite = load(best)
    key = next(k for k in nonfinite['model'] if 'in_norm.weight' in k)
    nonfinite['model'][key][0] = float('nan')
    torch.save(nonfinite, tmp / 'nonfinite.pt')
    torch.save({k: v for k, v in load(best).items() if k in ('config', 'model')}, tmp / 'weightsonly.pt')
    (tmp / 'afile').write_text('not a folder')
    badgz = make_mnist(str(tmp / 'badgz'), n=20, gz=True)
    path = os.path.join(badgz, 'MNIST', 'raw', 't10k-images-idx3-ubyte.gz')
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])   # a truncated download
    notest = make_mnist(str(tmp / 'notest'), n=20)
    from conftest import write_idx
    write_idx(os.path.join(notest, 'MNIST', 'raw', 't10k-images-idx3-ubyte'), np.zeros((0, 28, 28)))
    write_idx(os.path.join(notest, 'MNIST', 'raw', 't10k-labels-idx1-ubyte'), np.zeros((0,)))
    garbage = tmp / 'garbage'
    shutil.copytree(full_run, garbage)
    (garbage / 'metrics.csv').write_text('\x00\x01 not, a csv\nat all')
    return dict(best=best, run=full_run, data=data_dir, tmp=str(tmp), corrupt=str(tmp / 'corrupt.pt'),
                misfit=str(tmp / 'misfit.pt'), empty=str(tmp / 'empty'), nonfinite=str(tmp / 'nonfinite.pt'),
                weightsonly=str(tmp / 'weightsonly.pt'), afile=str(tmp / 'afile'), badgz=badgz, notest=notest,
                garbage=str(garbage))


def folder_bytes(path):
    return {name: open(os.path.join(path, name), 'rb').read() for name in sorted(os.listdir(path))}


@pytest.mark.slow
@pytest.mark.parametrize('name,args,code,words', BAD_INPUT, ids=[f'{n}-{i}' for i, (n, *_) in enumerate(BAD_INPUT)])
def test_bad_input_gives_one_clear_line(name, args, code, words, bad_files):
    before = folder_bytes(bad_files['run'])
    assert_one_line_error(script(name, *[a.format(**bad_files) for a in args]), code, *words)
    assert folder_bytes(bad_files['run']) == before               # nothing saved is touched
    assert not os.path.exists(os.path.join(bad_files['tmp'], 'new'))   # a failed start leaves no run folder


# -----------------------------------------------------------------------------
# answers.md: its checkable claims, against the code

ANSWERS = os.path.join(HERE, 'answers.md')


def test_jensen_bound_direction_on_a_gaussian():
    """A 1-D Gaussian p = N(mu, sigma^2) and one discrete value x: closed forms on both sides of Jensen."""
    mu, sigma, x = 2.3, 0.7, 2.0
    normal = torch.distributions.Normal(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
    log_P = torch.log(normal.cdf(torch.tensor(x + 1.0, dtype=torch.float64)) - normal.cdf(torch.tensor(x, dtype=torch.float64)))
    # E_u[log p(x + u)], u ~ U[0, 1): E[(x + u - mu)^2] = (x - mu + 1/2)^2 + 1/12
    expected_log_p = -0.5 * math.log(2 * math.pi * sigma ** 2) - ((x - mu + 0.5) ** 2 + 1 / 12) / (2 * sigma ** 2)
    assert expected_log_p < log_P.item()
    # importance-weighted bounds tighten with K and stay below log P
    g = torch.Generator().manual_seed(0)
    bounds = []
    for K in (1, 4, 16):
        u = torch.rand((200_000, K), generator=g, dtype=torch.float64)
        bounds.append((torch.logsumexp(normal.log_prob(x + u), dim=1) - math.log(K)).mean().item())
    assert abs(bounds[0] - expected_log_p) < 0.01
    assert bounds[0] < bounds[1] < bounds[2] < log_P.item()


def answers_table(header_start):
    """The rows of the Markdown table in answers.md whose header begins with `header_start`."""
    lines = [line.strip() for line in open(ANSWERS).read().splitlines()]   # tables may sit in list items
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([cell.strip() for cell in line.strip('|').split('|')])
    assert rows, header_start
    return rows


def parse_shape(text):
    return tuple(int(v) for v in text.split('×'))


def test_latent_pieces_match_answers_table():
    rows = answers_table('| input | scales |')
    assert len(rows) == 5
    for shape_text, scales_text, pieces_text, total_text in rows:
        C, H, W = parse_shape(shape_text)
        model = RealNVP(in_channels=C, img_size=H, num_scales=int(scales_text), **TINY)
        entering = []
        hooks = [m.register_forward_pre_hook(lambda mod, inp: entering.append(tuple(inp[0].shape[1:])))
                 for m in model.modules() if isinstance(m, realnvp._RealNVP)]
        z, _ = model(torch.rand(1, C, H, W))
        for h in hooks:
            h.remove()
        # scale i+1's input has the shape of what scale i factors out; the last scale's output is kept whole
        pieces = entering[1:] + entering[-1:]
        assert pieces == [parse_shape(p) for p in pieces_text.split(' + ')]
        assert sum(math.prod(p) for p in pieces) == int(total_text) == z[0].numel() == C * H * W


def test_answers_flop_and_parameter_figures():
    import bench
    rows = answers_table('| input | parameters |')
    assert len(rows) == 2
    for shape_text, params_text, forward_text, step_text in rows:
        C, H, _ = parse_shape(shape_text)
        params, forward, step = bench.count_flops(RealNVPConfig(in_channels=C, img_size=H))
        assert params == int(params_text.replace(',', ''))
        assert f'{forward / 1e9:.3f}' == forward_text
        assert f'{step / 1e9:.3f}' == step_text



@pytest.mark.parametrize('channels,size', [(1, 14), (3, 32)])
def test_factored_out_half_sits_at_odd_pixels(channels, size):
    """answers.md, question 3: scale 1's factored-out half is z at the pixels with i + j odd, in every channel."""
    model = RealNVP(in_channels=channels, img_size=size, num_scales=2, **TINY).eval()
    seen = {}
    last = model.flows.out_couplings[-1]
    last.register_forward_hook(lambda mod, args, out: seen.__setitem__('h', squeeze_2x2(out[0], reverse=True)))
    with torch.no_grad():
        z, _ = model(torch.rand(2, channels, size, size))
    h = seen['h']                                            # scale 1's output, entering the factor-out
    odd = checkerboard_mask(size, size, dtype=torch.bool).expand_as(z)   # 1 where i + j is odd
    assert int(odd[0].sum()) == channels * size * size // 2 == {1: 98, 3: 1536}[channels]
    assert torch.equal(z[odd], h[odd])
    assert not torch.isclose(z[~odd], h[~odd]).any()        # the even pixels went through scale 2
    # perturbing scale 1's output at the odd pixels moves exactly those entries of z
    with torch.no_grad():
        zeros = torch.zeros(2)
        z0, _ = model.flows._factor_out(h, zeros)
        z1, _ = model.flows._factor_out(h + 0.5 * odd, zeros)
        z2, _ = model.flows._factor_out(h + 0.5 * ~odd, zeros)
    assert torch.equal(z0, z) and torch.equal((z1 != z0), odd)
    assert not (z2 != z0)[odd].any() and (z2 != z0)[~odd].float().mean() > 0.9


def test_answers_per_coupling_flops():
    """answers.md, question 4: each coupling counted alone with torch.utils.flop_counter, against its table."""
    from torch.utils.flop_counter import FlopCounterMode
    model = RealNVP()
    entering = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: entering.__setitem__(mod, args[0]))
             for m in model.modules() if isinstance(m, CouplingLayer)]
    with torch.no_grad():
        model(torch.rand(1, 1, 14, 14))
    for h in hooks:
        h.remove()
    measured = []
    for coupling, x in entering.items():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            coupling(x, torch.zeros(1))
        measured.append((coupling.mask_type.name.lower().replace('_', '-'), 'x'.join(map(str, x.shape[1:])),
                         coupling.st_net.in_conv.weight_v.shape[0], f'{counter.get_total_flops() / 1e9:.3f}'))
    expected = []
    for couplings, mask, runs_on, channels, gflop in answers_table('| couplings | mask |'):
        count = int(couplings.split(', ')[1])
        expected += [(mask, runs_on.split(' ')[0].replace('×', 'x'), int(channels), gflop)] * count
    assert measured == expected and len(measured) == 10
    assert sum(float(g) for *_, g in measured) == pytest.approx(float(f'{bench_forward_gflop():.3f}'), abs=0.005)


def bench_forward_gflop():
    import bench
    return bench.count_flops(RealNVPConfig())[1] / 1e9

# -----------------------------------------------------------------------------
# multi-process training (torchrun, gloo on the CPU) and the benchmark script


@pytest.mark.slow
def test_torchrun_two_processes_agree_and_write_a_usable_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / 'ddp')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **OFFLINE}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             os.path.join(HERE, 'train.py'), '--data-dir', data_dir, '--out-dir', out,
                             '--epochs', '1', *TINY_RUN], capture_output=True, text=True, timeout=300, env=env,
                            cwd=HERE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'weights identical across 2 ranks' in result.stdout
    assert '2 process(es)' in result.stdout
    ckpt = load(os.path.join(out, 'last.pt'))
    assert ckpt['world_size'] == 2 and len(ckpt['rng']) == 2
    assert ckpt['step'] == 7   # 100 images, 2 ranks x 8 = 16 a step
    evaluated = script('evaluate.py', '--ckpt', os.path.join(out, 'best.pt'), '--data-dir', data_dir, '--json')
    assert evaluated.returncode == 0, evaluated.stderr
    # the same model on the same test images; only the dequantisation draws differ (Monte Carlo noise)
    assert abs(json.loads(evaluated.stdout)['bpd'] - ckpt['best_bpd']) < 0.05
    sampled = script('sample.py', '--ckpt', os.path.join(out, 'best.pt'), '--n', 4, '--out', tmp_path / 's.png')
    assert sampled.returncode == 0, sampled.stderr
    assert os.path.isfile(tmp_path / 's.png')


@pytest.mark.slow
def test_bench_reports_consistent_figures():
    result = script('bench.py', '--image-size', 8, '--mid-channels', 4, '--num-blocks', 1, '--batch-size', 8,
                    '--steps', 2, '--warmup', 1, '--num-threads', 1, '--device', 'cpu', '--json')
    assert result.returncode == 0, result.stderr
    import bench
    r = json.loads(result.stdout)
    params, forward, step = bench.count_flops(RealNVPConfig(img_size=8, mid_channels=4, num_blocks=1,
                                                            flow_norm=True, t_bound=10.0))   # the default's
    assert r['parameters'] == params and r['gflop_train_step_per_image'] == step / 1e9
    assert -1 < r['flow_norm_share_of_step'] < 1   # timed against the same model without the flow's batch norms
    assert -1 < r['t_bound_share_of_step'] < 1     # and without the bound
    achieved = r['gflop_train_step_per_image'] * r['train_images_per_s']
    assert abs(r['achieved_gflop_per_s'] - achieved) < 1e-6 * r['achieved_gflop_per_s']
    ceiling = max(r['matmul_fp32_gflop_per_s'], r['conv_fp32_gflop_per_s'])
    assert r['ceiling_fp32_gflop_per_s'] == ceiling and r['ceiling_dtype'] == 'fp32'
    assert abs(r['ratio_to_ceiling'] - r['achieved_gflop_per_s'] / ceiling) < 1e-9
    assert 0 < r['share_outside_convolutions'] < 1
    # the step if it were its convolutions alone: its images/s and its share of the step agree
    assert r['conv_bound_images_per_s'] > 0
    assert abs(r['conv_bound_share_of_step'] - r['train_images_per_s'] / r['conv_bound_images_per_s']) < 1e-9
    assert r['ema_update_share_of_step'] > 0 and r['bn_refresh_batch_share_of_step'] > 0
    assert r['first_step_s'] > 0 and r['launches_per_step'] > 100 and r['launches_kind'] == 'aten operators'
    assert r['train_images_per_s'] > 0 and r['sample_images_per_s'] > 0 and r['eval_images_per_s'] > 0


TINY_CHECK = ['--image-size', '8', '--mid-channels', '4', '--num-blocks', '1', '--batch-size', '16', '--num-threads', '1']


def gpu_check(data_dir, out, device, notebook=''):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **OFFLINE, 'GPU_CHECK_DEVICE': device, 'GPU_CHECK_EPOCHS': '1',
           'GPU_CHECK_COMPILE': '0', 'GPU_CHECK_NOTEBOOK': notebook}
    return subprocess.run(['bash', os.path.join(HERE, 'gpu_check.sh'), data_dir, str(out), *TINY_CHECK],
                          capture_output=True, text=True, env=env, cwd=HERE, timeout=600)


@pytest.mark.slow
def test_gpu_check_runs_every_stage_and_sums_them_up(data_dir, tmp_path):
    """gpu_check.sh on the CPU with a tiny model: every stage exits 0, the summary holds what they printed."""
    notebook = NOTEBOOK if os.path.isfile(NOTEBOOK) else ''
    out = tmp_path / 'check'
    result = gpu_check(data_dir, out, 'cpu', notebook)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert set(summary['stages']) == {'copy', 'versions', 'bench_fp32', 'bench_amp', 'train', 'evaluate'}
    assert all(s['exit'] == 0 and 0 < s['seconds'] <= s['limit'] + 10 for s in summary['stages'].values())
    assert summary['versions']['torch'] == torch.__version__
    evaluation = json.loads((out / 'evaluate.out').read_text())
    assert summary['test_bpd'] == evaluation['bpd'] and math.isfinite(evaluation['bpd'])
    assert summary['evaluated_step'] == 7 and summary['train_finished']   # 100 images / 16: 7 steps
    fp32 = json.loads((out / 'bench_fp32.out').read_text())
    assert summary['fp32']['images_per_s'] == fp32['train_images_per_s'] > 0 and summary['amp']['images_per_s'] > 0
    if notebook:
        assert summary['fp32']['times_lecture'] == fp32['train_images_per_s'] / fp32['lecture_train_images_per_s']
    assert 'test bpd' in result.stdout and os.path.isfile(out / 'data' / 'MNIST' / 'raw' / 'train-images-idx3-ubyte')
    again = gpu_check(data_dir, out, 'cpu')
    assert again.returncode == 2 and 'earlier check' in again.stderr   # never over an earlier check


def test_gpu_check_without_mnist_says_so_and_writes_nothing(tmp_path):
    result = gpu_check(str(tmp_path / 'nowhere'), tmp_path / 'check', 'cpu')
    assert result.returncode == 2 and result.stderr.strip().count('\n') == 0
    assert 'MNIST/raw not found' in result.stderr and not (tmp_path / 'check').exists()


@pytest.mark.slow
def test_gpu_check_records_failed_stages_and_exits_1(data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip('needs a machine without CUDA')
    out = tmp_path / 'check'
    result = gpu_check(data_dir, out, 'cuda')
    assert result.returncode == 1
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['stages']['copy']['exit'] == 0 and summary['stages']['bench_fp32']['exit'] == 2
    assert summary['fp32']['images_per_s'] is None and summary['test_bpd'] is None
    assert 'NOT finished' in result.stdout


def test_the_bound_is_the_step_s_convolution_flops_at_their_measured_rates(monkeypatch):
    """With every convolution shape timed at one rate, the bound is that rate over the training step's FLOPs as
    torch's flop counter counts them (the model's only counted work is convolutions): each shape counted as
    often as the model runs it, forward and backward. Under --amp the rates are bf16's."""
    import bench
    config = RealNVPConfig(img_size=8, mid_channels=4, num_blocks=1)
    rate = {torch.float32: 3e9, torch.bfloat16: 5e9}
    monkeypatch.setattr(bench, 'conv_flops_per_s', lambda shape, device, dtype: rate[dtype])
    monkeypatch.setattr(bench, 'matmul_flops_per_s', lambda device, dtype: 1e9)
    step_flops = bench.count_flops(config)[2] * 8   # a batch of 8
    for amp, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        args = SimpleNamespace(amp=amp, batch_size=8)
        step = dict(achieved_gflop_per_s=1.0, train_step_s=0.5)   # the training step's own figures
        r = bench.measure_ceiling(args, config, torch.device('cpu'), step)
        assert abs(r['conv_bound_images_per_s'] - 8 * rate[dtype] / step_flops) < 1e-9 * r['conv_bound_images_per_s']
        assert abs(r['conv_bound_share_of_step'] - step_flops / rate[dtype] / 0.5) < 1e-12
        assert r['ceiling_dtype'] == ('bf16' if amp else 'fp32')


def test_bench_counts_convolution_flops_as_the_flop_counter_does():
    import bench
    from torch.utils.flop_counter import FlopCounterMode
    shapes = bench.conv_shapes(RealNVPConfig(img_size=8, mid_channels=4, num_blocks=1), batch_size=3)
    assert {w[2] for _, w, _ in shapes} == {1, 3} and len(shapes) >= 6
    model = RealNVP(img_size=8, mid_channels=4, num_blocks=1)   # each of its convolutions counted once
    assert sum(shapes.values()) == sum(isinstance(m, WNConv2d) for m in model.modules())
    for x_shape, w_shape, padding in shapes:
        x = torch.randn(x_shape, requires_grad=True)
        w = torch.randn(w_shape, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            torch.nn.functional.conv2d(x, w, padding=padding).sum().backward()
        assert counter.get_total_flops() == bench.conv_step_flops((x_shape, w_shape, padding))
