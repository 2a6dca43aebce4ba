"""sample.py and evaluate.py end to end on a trained tiny run, and every script's answer to bad input: one clear
line, the right exit code, and nothing saved touched."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import plumbing
from conftest import TINY_RUN, assert_one_line_error, load, make_mnist, run_main, script, write_idx
from realnvp import ImageDataset, RealNVPLoss, bits_per_dim, nll_per_image, to_unit



@pytest.mark.slow
def test_every_output_writing_command_can_be_run_twice_and_replaces_its_output(full_run, data_dir, tmp_path,
                                                                               in_process):
    """An output is a result, not a run: the same command a second time replaces its file (a grid, a CSV, the worst
    images and histogram), where it used to be refused as 'a file, not a folder'."""
    run = str(tmp_path / 'run')
    shutil.copytree(full_run, run)
    best = os.path.join(run, 'best.pt')
    commands = [('sample.py', '--ckpt', best, '--n', 4),
                ('sample.py', '--ckpt', best, '--n', 4, '--out', str(tmp_path / 'grid.png')),
                ('evaluate.py', '--ckpt', best, '--data-dir', data_dir, '--limit', 20, '--worst', 3,
                 '--per-image', str(tmp_path / 'bpd.csv'))]
    for command in commands:
        first = in_process(*command)
        assert first.returncode == 0, first.stderr
        written = sorted(f for f in os.listdir(run) if f.endswith(('.png', '.csv'))) + sorted(os.listdir(tmp_path))
        again = in_process(*command)
        assert again.returncode == 0, again.stderr
        assert sorted(f for f in os.listdir(run) if f.endswith(('.png', '.csv'))) + sorted(os.listdir(tmp_path)) \
            == written   # the same files, replaced, and no temporary left beside them


@pytest.mark.slow
def test_json_is_json_with_null_where_a_value_is_undefined(full_run, data_dir, in_process):
    result = in_process('evaluate.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--data-dir', data_dir,
                        '--limit', 1, '--json')
    assert result.returncode == 0 and 'NaN' not in result.stdout, result.stdout
    assert json.loads(result.stdout)['stderr'] is None   # the standard error of one image


def test_labels_outside_0_to_9_are_one_line_naming_the_folder(tmp_path):
    root = make_mnist(str(tmp_path), n=20)
    write_idx(os.path.join(root, 'MNIST', 'raw', 'train-labels-idx1-ubyte'), np.arange(20) % 13)
    with pytest.raises(ValueError, match=f'labels in {root} lie outside 0-9') as info:
        ImageDataset('mnist', root, train=True, download=False)
    assert '\n' not in str(info.value)


@pytest.mark.slow
def test_the_newest_run_is_the_one_that_saved_a_checkpoint_last(full_run, data_dir, tmp_path, in_process):
    """After an evaluation writes its PNGs into an older run's folder, the newest run is still the one whose
    checkpoint is newest."""
    runs = tmp_path / 'runs'
    shutil.copytree(full_run, runs / 'old')
    shutil.copytree(full_run, runs / 'new')
    for name in ('best.pt', 'last.pt'):   # the old run's checkpoints an hour older
        path = runs / 'old' / name
        os.utime(path, (os.path.getmtime(path) - 3600,) * 2)
    assert in_process('evaluate.py', '--ckpt', runs / 'old' / 'best.pt', '--data-dir', data_dir, '--limit', 10,
                      '--worst', 2).returncode == 0   # writes into runs/old, which is now the folder written last
    result = in_process('sample.py', '--runs-dir', runs, '--n', 4)
    assert result.returncode == 0 and str(runs / 'new' / 'best.pt') in result.stdout, result.stdout


@pytest.mark.slow
def test_sample_writes_a_grid_of_the_right_size(full_run, tmp_path, in_process):
    from PIL import Image
    out = str(tmp_path / 'grid.png')
    result = in_process('sample.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--n', 9, '--out', out)
    assert result.returncode == 0, result.stderr
    assert out in result.stdout
    # 3x3 tiles of 8 pixels with 1-pixel padding, enlarged 7 times: cells of at least 56 pixels
    assert Image.open(out).size == (7 * (3 * 9 + 1), 7 * (3 * 9 + 1))
    small = str(tmp_path / 'small.png')
    assert in_process('sample.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--n', 9, '--out', small,
                  '--scale', 1).returncode == 0
    assert Image.open(small).size == (3 * 9 + 1, 3 * 9 + 1)
    big, little = np.asarray(Image.open(out)), np.asarray(Image.open(small))
    assert np.array_equal(big[::7, ::7], little)   # nearest-neighbour: every pixel becomes a 7x7 block
    interp = str(tmp_path / 'interp.png')
    result = in_process('sample.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--interpolate', '--pairs', 2,
                    '--steps', 5, '--out', interp)
    assert result.returncode == 0, result.stderr
    assert Image.open(interp).size == (7 * (5 * 9 + 1), 7 * (2 * 9 + 1))


@pytest.mark.slow
def test_interpolation_ends_decode_to_the_inputs_exactly(full_run, data_dir):
    import sample
    model, _ = plumbing.load_checkpoint(os.path.join(full_run, 'best.pt'))
    images = to_unit(ImageDataset('mnist', data_dir, train=False, img_size=8, download=False).images[:6])
    out = sample.interpolate(model, images[:3], images[3:], steps=4).reshape(3, 4, 1, 8, 8)
    assert torch.equal(out[:, 0], images[:3]) and torch.equal(out[:, -1], images[3:])
    assert not torch.equal(out[:, 1], images[:3])


@pytest.mark.slow
def test_evaluate_prints_the_directly_computed_bpd(full_run, data_dir):
    result = script('evaluate.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--data-dir', data_dir, '--json',
                    '--seed', 3)
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    model, _ = plumbing.load_checkpoint(os.path.join(full_run, 'best.pt'))
    x = to_unit(ImageDataset('mnist', data_dir, train=False, img_size=8, download=False).images)
    torch.manual_seed(3)
    with torch.no_grad():
        nll = RealNVPLoss(reduction='none')(*model(x))
    bpd = bits_per_dim(x, nll)
    assert reported['images'] == 100
    assert abs(reported['bpd'] - bpd.mean().item()) < 1e-5
    assert abs(reported['stderr'] - bpd.std().item() / 10) < 1e-5


@pytest.mark.slow
def test_importance_weighted_bound_is_no_worse_on_the_same_draws(full_run, data_dir):
    model, _ = plumbing.load_checkpoint(os.path.join(full_run, 'best.pt'))
    images = ImageDataset('mnist', data_dir, train=False, img_size=8, download=False).images
    torch.manual_seed(5)
    k4 = nll_per_image(model, images, dequant_samples=4).double()
    torch.manual_seed(5)
    singles = torch.stack([nll_per_image(model, images).double() for _ in range(4)])
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
    model, _ = plumbing.load_checkpoint(ckpt)
    images = ImageDataset('mnist', data_dir, train=False, img_size=8, download=False).images
    torch.manual_seed(4)
    with torch.no_grad():   # the same noise draw: one batch, one torch.rand_like
        direct = RealNVPLoss(reduction='none')(*model(to_unit(images))).double() / (64 * math.log(2))
    assert torch.allclose(per_image, direct, atol=1e-5)
    assert r['worst_indices'] == direct.argsort(descending=True)[:5].tolist()
    assert abs(r['worst_bpd'] - direct.max().item()) < 1e-5
    from PIL import Image
    for key in ('worst_png', 'histogram_png'):
        assert Image.open(r[key]).size[0] >= 400, key
    assert_one_line_error(script('evaluate.py', '--ckpt', ckpt, '--breakdown', '--dequant-samples', 2), 2,
                          '--breakdown')



# -----------------------------------------------------------------------------
# bad input: one clear line, the right exit code, and nothing saved is touched

# (script, arguments, exit code, words the one line must hold); {names} are the paths of the `bad_files` fixture.
BAD_INPUT = [
    ('sample.py', ['--ckpt', '{best}', '--n', '0'], 2, ['--n', 'positive integer']),
    ('sample.py', ['--ckpt', '{best}', '--digit', '10'], 2, ['--digit', 'invalid choice']),
    ('sample.py', ['--ckpt', '{best}', '--interpolate', '--digit', '3'], 2, ['--digit', '--interpolate']),
    ('evaluate.py', ['--ckpt', '{best}', '--temperature', '0.5'], 2, ['--temperature', 'add --judge']),
    ('evaluate.py', ['--ckpt', '{best}', '--judge', '--n', '1'], 2, ['--n 1', 'at least 2']),
    ('evaluate.py', ['--ckpt', '{best}', '--judge', '--temperature', '0'], 2, ['--temperature', 'positive']),
    ('evaluate.py', ['--ckpt', '{best}', '--breakdown', '--classify'], 2, ['--classify needs a class-conditional']),
    ('train.py', ['--epochs', '-1'], 2, ['--epochs']),
    ('train.py', ['--t-bound', '-1'], 2, ['--t-bound', 'zero or a positive number']),
    ('train.py', ['--image-size', '7', '--data-dir', '{data}'], 2, ['image size 7']),
    ('sample.py', ['--ckpt', '{tmp}/missing.pt'], 1, ['not found']),
    ('evaluate.py', ['--ckpt', '{corrupt}', '--data-dir', '{data}'], 1, ['cannot be read']),
    ('sample.py', ['--ckpt', '{misfit}'], 1, ['do not fit its config', 'size mismatch', 'in_conv']),
    ('train.py', ['--data-dir', '{empty}', '--out-dir', '{tmp}/new', *TINY_RUN], 1,
     ['MNIST not found', 'train-images-idx3-ubyte', '--data-dir']),
    ('train.py', ['--data-dir', '{data}', '--out-dir', '{run}', *TINY_RUN], 2,
     ['holds run', 'continue it with --resume']),
    ('train.py', ['--resume', '{run}/last.pt', '--mid-channels', '8'], 2, ['--mid-channels differs']),
    ('evaluate.py', ['--runs-dir', '{tmp}/no-runs'], 1, ['no checkpoint found']),
    ('bench.py', ['--image-size', '10', '--num-scales', '3'], 2, ['image size 10']),
    ('train.py', ['--lr-decay', '1.5'], 2, ['--lr-decay', '[0, 1)']),
    ('train.py', ['--resume', '{run}/last.pt', '--lr-decay', '0.5'], 2, ['--lr-decay differs']),
    ('time_to_bpd.py', ['{tmp}', '--lecture', '{tmp}/none.txt'], 2, ['--lecture', 'no such file']),
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
    ('sample.py', ['--ckpt', '{best}', '--out', '{tmp}/grid.txt'], 2, ['extensions .png']),
    ('sample.py', ['--ckpt', '{best}', '--out', '{tmp}'], 2, ['is a folder']),
    ('sample.py', ['--ckpt', '{best}', '--out', '{afile}/grid.png'], 2, ['is a file']),
    # values argparse alone would let through
    ('train.py', ['--seed', str(2 ** 32)], 2, ['--seed', '2^32']),
    ('evaluate.py', ['--seed', '-1'], 2, ['--seed']),
    ('train.py', ['--device', 'meta'], 2, ['unknown device']),
    ('bench.py', ['--lecture', '{tmp}/missing.txt'], 2, ['no such file']),
    ('train.py', ['--resume', '{weightsonly}'], 2, ['not the state to resume']),
    ('train.py', ['--resume', '{run}/last.pt', '--max-steps', '3'], 2, ['not past', 'step 14']),
    ('train.py', ['--resume', '{tmp}/missing.pt'], 2, ['not found', 'give the path of a best.pt']),  # not '--ckpt'
    # data that is not there, or broken
    ('train.py', ['--data-dir', '{badgz}', '--out-dir', '{tmp}/new', *TINY_RUN], 1,
     ['t10k-images-idx3-ubyte.gz', 'cannot be read']),
    ('train.py', ['--data-dir', '{notest}', '--out-dir', '{tmp}/new', *TINY_RUN], 1, ['MNIST files', 'cannot be read']),
    ('train.py', ['--resume', '{garbage}/last.pt', '--data-dir', '{data}', '--epochs', '3'], 1,
     ['metrics.csv', 'move it away']),
    ('train.py', ['--resume', '{metricsdir}/last.pt', '--data-dir', '{data}', '--epochs', '3'], 2,
     ['metrics.csv is not a file', 'move it away']),
    ('train.py', ['--resume', '{badmetrics}/last.pt', '--data-dir', '{data}', '--epochs', '3'], 1,
     ['metrics.csv', 'move it away']),   # a column removed: refused before anything is trained
    # abbreviations are not flags: argparse would take them, or --resume would ignore them
    ('train.py', ['--resume', '{run}/last.pt', '--epoch', '3'], 2, ['unrecognized arguments: --epoch']),
    ('train.py', ['--resume', '{run}/last.pt', '--mid', '16'], 2, ['unrecognized arguments: --mid']),
    # nothing to do, or a checkpoint path that is not one
    ('train.py', ['--resume', '{run}/last.pt'], 2, ['--epochs 2 is not past', 'nothing to train']),
    ('train.py', ['--resume', '{run}/last.pt', '--out-dir', '{tmp}/new'], 2, ['nothing to train']),
    ('train.py', ['--resume', '{tmp}'], 2, ['is a folder', 'last.pt']),
    # outputs that cannot be written are said before the work, not after it
    ('evaluate.py', ['--ckpt', '{best}', '--data-dir', '{data}', '--per-image', '{afile}/x.csv'], 2, ['is a file']),
    ('evaluate.py', ['--ckpt', '{best}', '--data-dir', '{data}', '--per-image', '{tmp}'], 2, ['is a folder']),
    ('evaluate.py', ['--ckpt', '{best}', '--data-dir', '{data}', '--worst', '4', '--out-dir', '{afile}'], 2,
     ['is a file']),
    ('sample.py', ['--ckpt', '{best}', '--out', '{tmp}/' + 'x' * 300 + '.png'], 2, ['longer than the 255 bytes']),
    ('train.py', ['--data-dir', '{data}', '--out-dir', '{tmp}/' + 'r' * 300, *TINY_RUN], 2, ['longer than the 255']),
    ('train.py', ['--data-dir', '{data}', '--out-dir', '/proc/realnvp-run', *TINY_RUN], 1, ['cannot use /proc']),
    ('train.py', ['--data-dir', '{data}', '--out-dir', '{lockdir}', *TINY_RUN], 1, ['cannot use', 'directory']),
    ('sample.py', ['--ckpt', '{best}', '--temperature', '1e300'], 1, ['not finite', 'smaller --temperature']),
    # memory: said before it is taken
    ('sample.py', ['--ckpt', '{best}', '--scale', '3000'], 2, ['GB', '--scale']),
    ('bench.py', ['--batch-size', '1000000000'], 2, ['GB', '--batch-size']),
    ('sample.py', ['--ckpt', '{huge}'], 1, ['GB', 'another checkpoint']),
    ('time_to_bpd.py', ['{tmp}', '--lecture', '{best}'], 2, ['exists']),
    # hand-edited checkpoints: a saved flag passes the same check as a typed one
    ('train.py', ['--resume', '{batch0}', '--epochs', '3'], 2, ['cannot be resumed', '--batch-size', 'positive']),
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
    torch.save({k: v for k, v in load(best).items() if k in ('format', 'config', 'model')}, tmp / 'weightsonly.pt')
    (tmp / 'afile').write_text('not a folder')
    badgz = make_mnist(str(tmp / 'badgz'), n=20, gz=True)
    path = os.path.join(badgz, 'MNIST', 'raw', 't10k-images-idx3-ubyte.gz')
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])   # a truncated download
    notest = make_mnist(str(tmp / 'notest'), n=20)
    write_idx(os.path.join(notest, 'MNIST', 'raw', 't10k-images-idx3-ubyte'), np.zeros((0, 28, 28)))
    write_idx(os.path.join(notest, 'MNIST', 'raw', 't10k-labels-idx1-ubyte'), np.zeros((0,)))
    garbage = tmp / 'garbage'
    shutil.copytree(full_run, garbage)
    (garbage / 'metrics.csv').write_text('\x00\x01 not, a csv\nat all')
    badmetrics = tmp / 'badmetrics'
    shutil.copytree(full_run, badmetrics)
    rows = [line.split(',') for line in (badmetrics / 'metrics.csv').read_text().splitlines()]
    (badmetrics / 'metrics.csv').write_text('\n'.join(','.join(row[:-1]) for row in rows) + '\n')
    metricsdir = tmp / 'metricsdir'   # metrics.csv a folder: refused before any work, not after an epoch
    shutil.copytree(full_run, metricsdir)
    (metricsdir / 'metrics.csv').unlink()
    (metricsdir / 'metrics.csv').mkdir()
    (tmp / 'lockdir' / '.lock').mkdir(parents=True)
    huge = load(best)
    huge['config']['mid_channels'] = 100000
    torch.save(huge, tmp / 'huge.pt')
    batch0 = load(os.path.join(full_run, 'last.pt'))
    batch0['args']['batch_size'] = 0
    torch.save(batch0, tmp / 'batch0.pt')
    return dict(badmetrics=str(badmetrics), metricsdir=str(metricsdir), lockdir=str(tmp / 'lockdir'),
                huge=str(tmp / 'huge.pt'), batch0=str(tmp / 'batch0.pt'),
                best=best, run=full_run, data=data_dir, tmp=str(tmp),
                corrupt=str(tmp / 'corrupt.pt'),
                misfit=str(tmp / 'misfit.pt'), empty=str(tmp / 'empty'), nonfinite=str(tmp / 'nonfinite.pt'),
                weightsonly=str(tmp / 'weightsonly.pt'), afile=str(tmp / 'afile'), badgz=badgz, notest=notest,
                garbage=str(garbage))


def folder_bytes(path):
    """Every file of a folder (its lock aside: that holds the pid of the last process that took it)."""
    return {name: open(os.path.join(path, name), 'rb').read() for name in sorted(os.listdir(path)) if name != '.lock'}


@pytest.mark.slow   # its fixture trains a run in a subprocess
@pytest.mark.parametrize('name,args,code,words', BAD_INPUT, ids=[f'{n}-{i}' for i, (n, *_) in enumerate(BAD_INPUT)])
def test_bad_input_gives_one_clear_line(name, args, code, words, bad_files, monkeypatch, capsys):
    runs = ('run', 'garbage', 'badmetrics')
    before = {run: folder_bytes(bad_files[run]) for run in runs}
    result = run_main(name, [a.format(**bad_files) for a in args], monkeypatch, capsys)
    assert result.returncode == code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert all(word in last for word in words), last
    assert {run: folder_bytes(bad_files[run]) for run in runs} == before   # nothing saved is touched
    assert not os.path.exists(os.path.join(bad_files['tmp'], 'new'))   # a failed start leaves no run folder


