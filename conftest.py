"""Shared test helpers and fixtures: tiny models, brute-force log-determinants, a tiny MNIST in IDX files,
the scripts run in subprocesses (also killed after a chosen file write), and a trained run that several tests
read."""
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from realnvp import LABEL_GAIN, RealNVP

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(HERE, '..', 'shared', 'seed', '000_3ef8c274db9a0617.txt')
TINY = dict(mid_channels=4, num_blocks=1)
TINY_RUN = ['--image-size', '8', '--mid-channels', '4', '--num-blocks', '1', '--batch-size', '16',
            '--num-threads', '1', '--no-amp']   # fp32: the same numbers on every machine
OFFLINE = {'http_proxy': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9',
           'HTTP_PROXY': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9'}

if os.environ.get('PYTEST_XDIST_WORKER'):   # pytest -n N: the workers share the cores, one thread each (in the
    os.environ['OMP_NUM_THREADS'] = '1'     # processes they start too): torch's threads spin while they wait, so
    torch.set_num_threads(1)                # two workers of two threads on two cores run many times slower


# -----------------------------------------------------------------------------
# models and brute force


def perturb_and_settle(model, shape, seed=0, steps=3):
    """Move the weights off their initial values (each by about 0.2 as used: the label's parameters, used times
    LABEL_GAIN, by 0.2 / LABEL_GAIN) and the batch-norm statistics off their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            label_parameter = name.endswith('class_bias') or name.startswith('prior.')
            p.add_(0.2 / (LABEL_GAIN if label_parameter else 1.0) * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.5
        for _ in range(steps):
            x = torch.rand((8, *shape), generator=g, dtype=torch.float64)
            if isinstance(model, RealNVP):
                classes = model.config.num_classes
                model(x, labels=torch.randint(0, classes, (8,), generator=g) if classes else None)
            else:
                model(x, torch.zeros(8, dtype=torch.float64))
    model.eval()
    moved = [m.running_var for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all((v - 1).abs().max() > 1e-3 for v in moved), 'batch-norm statistics did not move'
    return model


def tiny_model(channels, size, scales, seed=0, **arch):
    """A float64 tiny model, its batch norms settled; `arch`: RealNVPConfig settings (flow_norm, t_bound,
    learned_prior, ...) other than the lecture's, whose model it is without them."""
    torch.manual_seed(seed)
    arch = {'flow_norm': False, 't_bound': 0.0, 'learned_prior': False, **arch}
    model = RealNVP(in_channels=channels, img_size=size, num_scales=scales, **arch, **TINY).double()
    return perturb_and_settle(model, (channels, size, size), seed)


def logdet(f, x):
    """log|det df/dx| by brute force: the full Jacobian of f at one example x of shape (1, ...)."""
    D = x.numel()
    J = jacobian(f, x).reshape(D, D)
    sign, value = torch.linalg.slogdet(J)
    assert sign != 0, 'singular Jacobian'
    return value


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


# -----------------------------------------------------------------------------
# the scripts in subprocesses


def script(name, *args, timeout=300):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **OFFLINE}
    return subprocess.run([sys.executable, os.path.join(HERE, name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=HERE)


def run_main(name, args, monkeypatch, capsys):
    """A script's main(args) run in this process, offline, as a CompletedProcess (exit code, stdout, stderr): what
    the command line gets, without the interpreter's start-up. An exception that escapes main is a traceback on
    the command line, and fails the test here."""
    import importlib
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    args = [str(a) for a in args]
    try:
        code = importlib.import_module(name.removesuffix('.py')).main(args)
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([name, *args], code or 0, captured.out, captured.err)


@pytest.fixture
def in_process(monkeypatch, capsys):
    """`script`, run in this process (`run_main`)."""
    return lambda name, *args: run_main(name, args, monkeypatch, capsys)


# Runs a script (argv[2:]) in a process that SIGKILLs itself right after the N-th file (argv[1]) that the project
# writes: every file goes through plumbing.write_atomically, which is wrapped here, from the outside.
KILL_AFTER_WRITES = """
import os, runpy, signal, sys
import plumbing
n, written, write = int(sys.argv[1]), [0], plumbing.write_atomically
def counted(data, path):
    write(data, path)
    written[0] += 1
    if written[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
plumbing.write_atomically = counted
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def script_killed_after_writes(n, name, *args):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **OFFLINE}
    return subprocess.run([sys.executable, '-c', KILL_AFTER_WRITES, str(n), os.path.join(HERE, name),
                           *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=HERE)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_one_line_error(result, code, *needles):
    assert result.returncode == code, (result.returncode, result.stderr)
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last


def assert_same_weights(path_a, path_b):
    """Two checkpoints at the same step with the same averaged model, trained model and optimizer state (and the
    same training state but for the seconds it took)."""
    a, b = load(path_a), load(path_b)
    assert {**a['state'], 'seconds': 0} == {**b['state'], 'seconds': 0}
    for part in ('model', 'train_model'):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for p, moments in a['optimizer']['state'].items():
        for key, value in moments.items():
            assert torch.equal(value, b['optimizer']['state'][p][key]), (p, key)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after the test, even when it fails."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_mnist(str(tmp_path_factory.mktemp('data')), n=100)


@pytest.fixture(scope='module')
def full_run(data_dir, tmp_path_factory):
    """An uninterrupted 2-epoch run: 100 images / batch 16 = 7 steps an epoch."""
    out = str(tmp_path_factory.mktemp('runs') / 'full')
    result = script('train.py', '--data-dir', data_dir, '--out-dir', out, '--epochs', 2, *TINY_RUN)
    assert result.returncode == 0, result.stderr
    return out
