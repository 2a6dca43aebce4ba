"""Tests for realnvp.py: the math in float64 against brute force, shapes, errors and the data loader.

Everything runs offline on tiny inputs that the tests make themselves.
"""
import gzip
import math
import os

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

import realnvp
from realnvp import (CouplingLayer, DataNotFoundError, ImageDataset, MaskType, RealNVP, RealNVPConfig,
                     RealNVPLoss, WNConv2d, bits_per_dim, checkerboard_mask, get_param_groups, read_idx,
                     squeeze_2x2)

TINY = dict(mid_channels=4, num_blocks=1)


def perturb_and_settle(model, shape, seed=0, steps=3):
    """Move the weights off their initial values and the batch-norm statistics off their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.5
        for _ in range(steps):
            x = torch.rand((8, *shape), generator=g, dtype=torch.float64)
            model(x) if isinstance(model, RealNVP) else model(x, torch.zeros(8, dtype=torch.float64))
    model.eval()
    moved = [m.running_var for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all((v - 1).abs().max() > 1e-3 for v in moved), 'batch-norm statistics did not move'
    return model


def tiny_model(channels, size, scales, seed=0):
    torch.manual_seed(seed)
    model = RealNVP(in_channels=channels, img_size=size, num_scales=scales, **TINY).double()
    return perturb_and_settle(model, (channels, size, size), seed)


def logdet(f, x):
    """log|det df/dx| by brute force: the full Jacobian of f at one example x of shape (1, ...)."""
    D = x.numel()
    J = jacobian(f, x).reshape(D, D)
    sign, value = torch.linalg.slogdet(J)
    assert sign != 0, 'singular Jacobian'
    return value


# -----------------------------------------------------------------------------
# squeeze and masks


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
# coupling layers: inverse and log-determinant


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
# the whole model


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('scales', [1, 2, 3])
def test_model_inverse_recovers_input(channels, scales):
    model = tiny_model(channels, 8, scales)
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


@pytest.mark.parametrize('channels,size,scales', [(1, 4, 2), (3, 8, 2), (1, 8, 3)])
def test_model_logdet_matches_brute_force_jacobian(channels, size, scales):
    """sldj covers pre-processing and flow: log|dz/du| = sldj - D log 256, with v = (255x + u)/256."""
    model = tiny_model(channels, size, scales)
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


# -----------------------------------------------------------------------------
# errors


@pytest.mark.parametrize('kwargs,pattern', [
    (dict(img_size=14, num_scales=3), 'image size 14 does not fit 3 scales'),
    (dict(img_size=7, num_scales=2), 'image size 7'),
    (dict(img_size=2, num_scales=2), 'at least 4'),
    (dict(in_channels=0), 'in_channels must be a positive integer'),
    (dict(num_blocks=-1), 'num_blocks must be a positive integer'),
    (dict(data_constraint=1.5), 'data_constraint'),
])
def test_bad_configs_raise_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RealNVP(**{**TINY, **kwargs})


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


# -----------------------------------------------------------------------------
# loss, bpd and the optimizer groups


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
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {n for n in names.values() if n.endswith('parametrizations.weight.original0')}
    assert {names[id(p)] for p in scales} == expected
    n_wn = sum(isinstance(m, (WNConv2d, realnvp.Rescale)) for m in model.modules())
    assert len(scales) == n_wn > 0
    # g has one entry per output channel; the direction v is not in the group
    for m in model.modules():
        if isinstance(m, WNConv2d):
            assert any(p is m.conv.parametrizations.weight.original0 for p in scales)
            assert all(p is not m.conv.parametrizations.weight.original1 for p in scales)
    assert len(scales) + len(others) == len(list(model.parameters()))
    assert not {id(p) for p in scales} & {id(p) for p in others}
    # the lecture's suffix selects nothing under the parametrizations API
    assert not [n for n in names.values() if n.endswith('weight_g')]


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


# -----------------------------------------------------------------------------
# data


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype='>i4').tobytes()
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'wb') as f:
        f.write(header + array.tobytes())


def make_mnist(root, n=20, gz=False, seed=0):
    """A tiny MNIST in torchvision's layout: root/MNIST/raw/*-idx?-ubyte[.gz], labels 0..9 repeating."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, 'MNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    suffix = '.gz' if gz else ''
    for prefix in ('train', 't10k'):
        images = rng.integers(0, 256, size=(n, 28, 28))
        write_idx(os.path.join(raw, f'{prefix}-images-idx3-ubyte{suffix}'), images)
        write_idx(os.path.join(raw, f'{prefix}-labels-idx1-ubyte{suffix}'), np.arange(n) % 10)
    return root


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

    def offline(*args, **kwargs):
        raise RuntimeError('Error downloading train-images-idx3-ubyte.gz:\n<urlopen error [Errno -2] Name or service not known>')

    monkeypatch.setattr(torchvision.datasets, 'MNIST', offline)
    with pytest.raises(DataNotFoundError) as info:
        ImageDataset('mnist', str(tmp_path), train=True)
    message = str(info.value)
    assert '\n' not in message
    for needed in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', '--data-dir', str(tmp_path)):
        assert needed in message
    assert 'Name or service not known' in message


def test_corrupt_idx_file_is_reported(tmp_path):
    root = make_mnist(str(tmp_path), n=4)
    path = os.path.join(root, 'MNIST', 'raw', 'train-images-idx3-ubyte')
    with open(path, 'r+b') as f:
        f.truncate(100)
    with pytest.raises(ValueError, match='truncated'):
        ImageDataset('mnist', root, train=True, download=False)
    with pytest.raises(ValueError, match='unknown data set'):
        ImageDataset('svhn', root)


def test_config_round_trips_through_plain_types():
    config = RealNVPConfig(in_channels=3, img_size=8, num_scales=2, mid_channels=4, num_blocks=1)
    from dataclasses import asdict
    model = RealNVP.from_config(asdict(config))
    assert model.config == config
    assert RealNVP.from_config(config).config == config
