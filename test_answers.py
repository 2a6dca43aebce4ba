"""answers.md: its checkable claims (the latent shapes, the parameter and FLOP counts, where the factored-out half
sits, the Jensen bound's direction) against the code."""
import math
import os
import re

import pytest
import torch

from conftest import HERE, TINY
from realnvp import CouplingLayer, RealNVP, RealNVPConfig, Scale, checkerboard_mask, squeeze_2x2


ANSWERS = os.path.join(HERE, 'answers.md')


def test_jensen_bound_direction_on_a_gaussian():
    """A 1-D Gaussian p = N(mu, sigma^2) and one discrete value x: closed forms on both sides of Jensen."""
    mu, sigma, x = 2.3, 0.7, 2.0
    normal = torch.distributions.Normal(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
    cdf = lambda v: normal.cdf(torch.tensor(v, dtype=torch.float64))
    log_P = torch.log(cdf(x + 1.0) - cdf(x))
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
                 for m in model.modules() if isinstance(m, Scale)]
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
    assert len(rows) == 3
    for shape_text, params_text, forward_text, step_text in rows:
        C, H, _ = parse_shape(shape_text)
        params, forward, step = bench.count_flops(RealNVPConfig(in_channels=C, img_size=H))
        assert params == int(params_text.replace(',', ''))
        assert f'{forward / 1e9:.3f}' == forward_text
        assert f'{step / 1e9:.3f}' == step_text



@pytest.mark.parametrize('channels,size', [(1, 14), (3, 32)])
def test_factored_out_half_sits_at_odd_pixels(channels, size):
    """answers.md, question 3: scale 1's factored-out half is z at the pixels with i + j odd, in every channel."""
    torch.manual_seed(0)
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
    assert (z[~odd] != h[~odd]).all()                        # the even pixels went through scale 2
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
                         coupling.st_net.in_conv.conv.weight.shape[0], f'{counter.get_total_flops() / 1e9:.3f}'))
    expected = []
    for couplings, mask, runs_on, channels, gflop in answers_table('| couplings | mask |'):
        count = int(couplings.split(', ')[1])
        expected += [(mask, runs_on.split(' ')[0].replace('×', 'x'), int(channels), gflop)] * count
    assert measured == expected and len(measured) == 10
    assert sum(float(g) for *_, g in measured) == pytest.approx(float(f'{bench_forward_gflop():.3f}'), abs=0.005)


def bench_forward_gflop():
    import bench
    return bench.count_flops(RealNVPConfig())[1] / 1e9



def performance_table_fp32(label):
    """The fp32 column of the row of docs/performance.md's measurement table whose label starts with `label`."""
    for line in open(os.path.join(HERE, 'docs', 'performance.md')).read().splitlines():
        cells = [cell.strip() for cell in line.strip('|').split('|')]
        if line.startswith('|') and cells[0].startswith(label):
            return cells[1]
    raise AssertionError(f'no row {label!r} in docs/performance.md')


def test_answers_memory_and_speed_are_those_of_their_one_source():
    """answers.md, question 4: the peak memory and the GFLOP/s it quotes are docs/performance.md's fp32 figures,
    the minutes an epoch takes follow from them and the FLOP table, what a step keeps for its backward pass is what
    bench.saved_for_backward counts for the default model, and the peak's parts add up to it."""
    import bench
    text = ' '.join(open(ANSWERS).read().split())
    peak = re.search(r'peaks at ([\d,]+) MiB', text).group(1)
    assert peak == performance_table_fp32('peak memory')
    gflops = re.search(r'about (\d+) minutes at the ([\d.]+) GFLOP/s', text)
    assert gflops.group(2) == performance_table_fp32('achieved GFLOP/s')
    step = bench.count_flops(RealNVPConfig())[2]
    assert int(gflops.group(1)) == round(60_000 * step / (float(gflops.group(2)) * 1e9) / 60)
    per_image, fixed = bench.saved_for_backward(RealNVPConfig())
    assert f'{per_image:.1f} MiB an image, about {per_image * 128 / 1024:.1f} GiB at batch 128, plus {fixed:.0f} MiB' \
        in text
    # the peak's parts: the process before the model (measured), four copies of the weights (weights, gradients,
    # Adam's two moments), what the step keeps for its backward pass, and what is left
    mib = lambda pattern: int(re.search(pattern, text).group(1).replace(',', ''))
    base = mib(r'Of that, ([\d,]+) MiB is the process')
    assert f'{base:,}' == performance_table_fp32('process memory before the model')
    state = 4 * 4 * bench.count_flops(RealNVPConfig())[0] / 2 ** 20
    assert mib(r'([\d,]+) MiB are the weights, their gradients') == round(state)
    rest = int(peak.replace(',', '')) - base - state - 128 * per_image - fixed
    assert mib(r'the remaining ([\d,]+) MiB') == round(rest) > 0


def test_answers_jacobian_cost_and_channel_parameters():
    """answers.md, question 4: forming one 3x32x32 image's Jacobian (3072 input-only backward passes, each about a
    forward pass) costs about 1,000 one-image training steps, 8 of a batch of 128; and 3 channels instead of 1 add
    the parameters it names, in the s/t networks' first and last convolutions and the per-channel layers."""
    import bench
    text = ' '.join(open(ANSWERS).read().split())
    _, forward, step = bench.count_flops(RealNVPConfig(in_channels=3, img_size=32))
    steps = 3072 * forward / step
    assert 'about 1,000 training steps of one image (8 of a batch of 128)' in text
    assert round(steps, -2) == 1000 and round(steps / 128) == 8

    def by_kind(model):
        counts = {'first': 0, 'last': 0, 'other': 0, 'prior': 0}
        for name, p in model.named_parameters():
            outer = '.blocks.' not in name   # the ResNet's own in_conv and out_conv, not a residual block's
            kind = 'first' if outer and '.in_conv.' in name else 'last' if outer and '.out_conv.' in name else 'other'
            counts['prior' if name.startswith('prior.') else kind] += p.numel()
        return counts
    one, three = by_kind(RealNVP()), by_kind(RealNVP(in_channels=3, img_size=32))
    added = {kind: three[kind] - one[kind] for kind in one}
    assert (f'3×32×32 has {sum(added.values()):,} more than 1×14×14, {added["first"]:,} in the s/t '
            f'networks\' first convolutions, {added["last"]:,} in their last 1×1 convolutions, '
            f'{added["other"]:,} in the per-channel layers and {added["prior"]:,} in the learned prior') in text
    assert added['prior'] == 2 * (3 * 32 * 32 - 196)   # a mean and a log-scale per dimension
