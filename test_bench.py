"""bench.py and gpu_check.sh: the benchmark's figures agree with each other and with torch's flop counter, and the
GPU check runs every stage (here on the CPU, with a tiny model) and records what fails."""
import json
import math
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch

from conftest import HERE, NOTEBOOK, OFFLINE, script
from realnvp import RealNVP, RealNVPConfig, WNConv2d


@pytest.mark.slow
def test_bench_reports_consistent_figures():
    result = script('bench.py', '--image-size', 8, '--mid-channels', 4, '--num-blocks', 1, '--batch-size', 8,
                    '--steps', 2, '--warmup', 1, '--num-threads', 1, '--device', 'cpu', '--json')
    assert result.returncode == 0, result.stderr
    import bench
    r = json.loads(result.stdout)
    params, forward, step = bench.count_flops(RealNVPConfig(img_size=8, mid_channels=4, num_blocks=1))
    assert r['parameters'] == params and r['gflop_train_step_per_image'] == step / 1e9
    ceiling = max(r['matmul_fp32_gflop_per_s'], r['conv_fp32_gflop_per_s'])
    assert r['ceiling_fp32_gflop_per_s'] == ceiling and r['ceiling_dtype'] == 'fp32'
    assert abs(r['ratio_to_ceiling'] - r['achieved_gflop_per_s'] / ceiling) < 1e-9
    assert 0 < r['share_outside_convolutions'] < 1
    assert r['conv_bound_images_per_s'] > 0
    assert r['ema_update_share_of_step'] > 0 and r['bn_refresh_batch_share_of_step'] > 0
    assert r['first_step_s'] > 0 and r['launches_per_step'] > 100
    assert r['train_images_per_s'] > 0 and r['sample_images_per_s'] > 0 and r['eval_images_per_s'] > 0


TINY_CHECK = ['--image-size', '8', '--mid-channels', '4', '--num-blocks', '1', '--batch-size', '16',
              '--num-threads', '1']


def gpu_check(data_dir, out, device, *notebook, work=None):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **OFFLINE, 'GPU_CHECK_DEVICE': device, 'GPU_CHECK_EPOCHS': '1',
           'GPU_CHECK_COMPILE': '0', 'GPU_CHECK_NOTEBOOK': '', **({'GPU_CHECK_WORK': str(work)} if work else {})}
    return subprocess.run(['bash', os.path.join(HERE, 'gpu_check.sh'), *notebook, data_dir, str(out), *TINY_CHECK],
                          capture_output=True, text=True, env=env, cwd=HERE, timeout=600)


def test_gpu_check_stage_limits_with_their_grace_fit_in_540_seconds():
    """Every stage's `timeout` limit and its kill grace, summed, leave room in a 10-minute device call."""
    import re
    script = open(os.path.join(HERE, 'gpu_check.sh')).read()
    limits = [int(n) for n in re.findall(r'^\s*stage \w+ (\d+) ', script, flags=re.M)]
    grace = int(re.search(r'--kill-after=(\d+)', script).group(1))
    assert len(limits) == 7 and sum(limits) + grace * len(limits) <= 540


@pytest.mark.slow
def test_gpu_check_runs_every_stage_and_packs_what_it_reports_in_a_few_small_files(data_dir, tmp_path):
    """gpu_check.sh on the CPU with a tiny model: every stage exits 0; OUT_DIR holds the summary and the run's
    log, metrics and grid, nothing else (the data and checkpoints stay in the scratch folder); the summary holds
    what the stages printed and names the notebook."""
    notebook = ['--notebook', NOTEBOOK] if os.path.isfile(NOTEBOOK) else []
    out, work = tmp_path / 'check', tmp_path / 'work'
    result = gpu_check(data_dir, out, 'cpu', *notebook, work=work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(out)) == ['metrics.csv', 'samples.png', 'summary.json', 'train.log']
    assert all(os.path.getsize(out / f) < 16 * 2 ** 20 for f in os.listdir(out))
    summary = json.loads((out / 'summary.json').read_text())
    assert set(summary['stages']) == {'copy', 'versions', 'bench_fp32', 'bench_amp', 'train', 'evaluate'}
    assert all(s['exit'] == 0 and 0 < s['seconds'] <= s['limit'] + 5 for s in summary['stages'].values())
    assert summary['versions']['torch'] == torch.__version__
    evaluation = summary['outputs']['evaluate']
    assert summary['test_bpd'] == evaluation['bpd'] and math.isfinite(evaluation['bpd'])
    assert summary['evaluated_step'] == 7 and summary['train_finished']   # 100 images / 16: 7 steps
    fp32 = summary['outputs']['bench_fp32']
    assert summary['fp32']['images_per_s'] == fp32['train_images_per_s'] > 0 and summary['amp']['images_per_s'] > 0
    assert fp32['launches_per_step'] > 100
    if notebook:
        assert summary['fp32']['times_lecture'] == fp32['train_images_per_s'] / fp32['lecture_train_images_per_s']
        assert summary['lecture_notebook'] == NOTEBOOK
    assert any('test bpd' in line for line in summary['outputs']['train'])
    assert 'test bpd' in (out / 'train.log').read_text()
    assert os.path.isfile(work / 'data' / 'MNIST' / 'raw' / 'train-images-idx3-ubyte')
    again = gpu_check(data_dir, out, 'cpu')
    assert again.returncode == 2 and 'earlier check' in again.stderr   # never over an earlier check


def test_gpu_check_without_mnist_or_with_a_missing_notebook_says_so_and_writes_nothing(tmp_path):
    result = gpu_check(str(tmp_path / 'nowhere'), tmp_path / 'check', 'cpu')
    assert result.returncode == 2 and result.stderr.strip().count('\n') == 0
    assert 'MNIST/raw not found' in result.stderr and not (tmp_path / 'check').exists()
    os.makedirs(tmp_path / 'data' / 'MNIST' / 'raw')
    result = gpu_check(str(tmp_path / 'data'), tmp_path / 'check', 'cpu', '--notebook', str(tmp_path / 'none.txt'))
    assert result.returncode == 2 and 'no such file' in result.stderr and not (tmp_path / 'check').exists()


@pytest.mark.slow
def test_gpu_check_records_failed_stages_and_exits_1(data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip('needs a machine without CUDA')
    out = tmp_path / 'check'
    result = gpu_check(data_dir, out, 'cuda', work=tmp_path / 'work')
    assert result.returncode == 1
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['stages']['copy']['exit'] == 0 and summary['stages']['bench_fp32']['exit'] == 2
    assert summary['fp32']['images_per_s'] is None and summary['test_bpd'] is None
    assert summary['lecture_notebook'].startswith('none given') and summary['messages']['bench_fp32']
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



def test_the_launch_counter_counts_kernel_calls_exactly():
    """Forward and backward of a known function: the operators that run a kernel, not the views."""
    import bench

    def fn():
        a = torch.randn(3, 4, requires_grad=True)            # randn: 1
        c = (a * 2.0).view(12) + 1.0                         # mul, add: 2 (the view launches nothing)
        c.sum().backward()                                   # sum, the seed gradient (ones_like), mul: 3
    assert bench.count_launches(fn) == 6
    assert bench.count_launches(lambda: torch.zeros(3).view(3, 1).t()) == 1   # zeros; views and transposes: 0
    assert bench.count_launches(lambda: torch.empty(3).new_empty((2, 2)).fill_(1.0)) == 1   # allocations: 0


def test_the_launches_around_compiled_graphs_are_what_runs_outside_them(fresh_dynamo):
    """Under --compile: one graph, and outside it the operators that run a kernel (sum, mul, the cast), not the
    view, nor what runs inside the graph."""
    import bench
    graph = torch.compile(lambda a: (a * 2.0 + 1.0).sin(), backend='eager')
    x = torch.randn(8)

    def step():
        return (graph(x).sum() * 3.0).view(1).to(torch.float64)
    step()
    assert bench.count_launches_around_graphs(step) == dict(launches_outside_graphs=3, graphs_per_step=1)


def test_a_conditional_model_adds_its_label_parameters_and_no_convolution_flops():
    """--conditional: the parameters are the unconditional model's plus nine more classes' prior (a mean and a
    log-scale per class and dimension; the unconditional one has one) and a bias per class for each s/t net's first
    convolution; the convolutions' FLOPs are the same."""
    import bench
    unconditional = RealNVPConfig(img_size=8, mid_channels=4, num_blocks=1)
    conditional = RealNVPConfig(img_size=8, mid_channels=4, num_blocks=1, num_classes=10)
    (p0, f0, s0), (p1, f1, s1) = bench.count_flops(unconditional), bench.count_flops(conditional)
    model = RealNVP(conditional)
    first_convs = [m.in_conv.conv.weight.shape[0] for m in model.modules() if hasattr(m, 'class_bias')]
    assert len(first_convs) == 10   # 3 + 3 couplings at the first scale, 4 at the second
    assert p1 - p0 == 2 * (10 - 1) * 64 + 10 * sum(first_convs) and (f1, s1) == (f0, s0)


def test_time_to_reach_interpolates_between_points_and_says_when_a_curve_never_gets_there():
    import time_to_bpd
    points = [(10, 60.0, 5.0), (20, 120.0, 3.0), (30, 180.0, 3.5)]
    assert time_to_bpd.time_to_reach(points, 4.0) == 90.0     # halfway from 5.0 to 3.0
    assert time_to_bpd.time_to_reach(points, 3.2) == pytest.approx(114.0, abs=1e-9)
    assert time_to_bpd.time_to_reach(points, 6.0) == 60.0     # already there at the first point
    assert time_to_bpd.time_to_reach(points, 2.9) is None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(NOTEBOOK), reason='the lecture notebook (../shared/seed) is not here')
def test_time_to_bpd_trains_the_lecture_code_and_both_recipes_the_recipes_as_train_py_does(data_dir, tmp_path):
    """Three curves of test bpd against training time, written as CSV, JSON and PNG; each recipe's curve is one
    train.py run stopped and resumed at every point, so its last checkpoint is an uninterrupted run's; a folder
    that holds curves already is refused."""
    from conftest import assert_same_weights
    out = tmp_path / 'curves'
    tiny = ['--image-size', 8, '--mid-channels', 4, '--num-blocks', 1, '--batch-size', 16, '--num-threads', 1]
    args = [out, '--data-dir', data_dir, '--lecture', NOTEBOOK, '--steps', 3, 9, *tiny]
    result = script('time_to_bpd.py', *args)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert set(r['curves']) == {'lecture code', '--recipe lecture', '--recipe default'}
    for points in r['curves'].values():
        assert [p['step'] for p in points] == [3, 9]
        assert 0 < points[0]['seconds'] < points[1]['seconds'] and all(math.isfinite(p['bpd']) for p in points)
    assert r['target_bpd'] == r['curves']['lecture code'][-1]['bpd']
    assert r['seconds_to_target']['lecture code'] <= r['curves']['lecture code'][-1]['seconds']
    assert len(open(out / 'time_to_bpd.csv').read().splitlines()) == 1 + 3 * 2
    assert os.path.getsize(out / 'time_to_bpd.png') > 10_000
    import train
    whole = str(tmp_path / 'whole')
    assert train.main(['--data-dir', data_dir, '--out-dir', whole, '--epochs', str(r['epochs']), '--max-steps', '9',
                       '--seed', '0', '--no-amp', *map(str, tiny)]) == 0
    assert_same_weights(os.path.join(whole, 'last.pt'), out / 'recipe-default' / 'last.pt')
    before = open(out / 'time_to_bpd.json').read()
    again = script('time_to_bpd.py', *args)
    assert again.returncode == 2 and 'exists' in again.stderr.strip().splitlines()[-1]
    assert open(out / 'time_to_bpd.json').read() == before
