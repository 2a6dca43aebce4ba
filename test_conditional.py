"""The class-conditional model through the scripts: train.py --conditional, sample.py --digit, evaluate.py
--classify and --judge, an exact resume, and the digit judge's cache."""
import json
import math
import os

import pytest
import torch

import plumbing
from conftest import TINY_RUN, assert_one_line_error, assert_same_weights, load, make_mnist
from realnvp import ImageDataset, RealNVP, class_nll


@pytest.fixture(scope='module')
def conditional_run(data_dir, tmp_path_factory):
    import train
    out = str(tmp_path_factory.mktemp('conditional') / 'run')
    assert train.main(['--data-dir', data_dir, '--out-dir', out, '--epochs', '1', '--conditional', *TINY_RUN]) == 0
    return out


def test_a_conditional_run_saves_its_prior_and_says_so(conditional_run):
    ckpt = load(os.path.join(conditional_run, 'best.pt'))
    assert ckpt['config']['num_classes'] == 10 and ckpt['args']['conditional']
    assert ckpt['model']['prior.mean'].shape == (10, 1, 8, 8)
    assert not torch.equal(ckpt['train_model']['prior.mean'], torch.zeros(10, 1, 8, 8))   # it trained
    assert 'class-conditional' in open(os.path.join(conditional_run, 'train.log')).read()


def test_sample_draws_the_asked_digits_a_row_each(conditional_run, tmp_path, in_process, monkeypatch):
    from PIL import Image
    asked = []
    sample = RealNVP.sample
    monkeypatch.setattr(RealNVP, 'sample', lambda self, n, t, g, labels=None: asked.append(labels) or
                        sample(self, n, t, g, labels))
    out = str(tmp_path / 'digits.png')
    result = in_process('sample.py', '--ckpt', os.path.join(conditional_run, 'best.pt'), '--n', 3, '--digit', 7, 3,
                        '--out', out, '--scale', 1)
    assert result.returncode == 0, result.stderr
    assert asked[-1].tolist() == [7, 7, 7, 3, 3, 3]
    assert Image.open(out).size == (3 * 9 + 1, 2 * 9 + 1)    # 3 a row, a row a digit
    every = str(tmp_path / 'every.png')
    assert in_process('sample.py', '--ckpt', os.path.join(conditional_run, 'best.pt'), '--n', 2, '--out', every,
                      '--scale', 1).returncode == 0
    assert asked[-1].tolist() == [d for d in range(10) for _ in range(2)]
    assert Image.open(every).size == (2 * 9 + 1, 10 * 9 + 1)


def test_an_unconditional_checkpoint_asked_for_a_digit_or_to_classify_is_one_line(full_run, tmp_path, in_process):
    result = in_process('sample.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--digit', 3,
                        '--out', str(tmp_path / 'x.png'))
    assert_one_line_error(result, 2, '--digit needs a class-conditional checkpoint')
    result = in_process('evaluate.py', '--ckpt', os.path.join(full_run, 'best.pt'), '--classify')
    assert_one_line_error(result, 2, '--classify needs a class-conditional checkpoint')
    assert not os.path.exists(tmp_path / 'x.png')


def test_a_hand_made_checkpoint_of_five_classes_is_refused_in_one_line(conditional_run, data_dir, tmp_path,
                                                                         in_process):
    """A checkpoint whose weights fit a model of 5 classes: train.py makes none, and its labels would not be the
    data's; sample.py and evaluate.py refuse it with one line (exit 1) rather than fail on a digit past 4."""
    ckpt = load(os.path.join(conditional_run, 'best.pt'))
    ckpt['config']['num_classes'] = 5
    ckpt['model'] = RealNVP(**ckpt['config']).state_dict()
    path = str(tmp_path / 'five.pt')
    torch.save(ckpt, path)
    for command in (['sample.py', '--digit', 7, '--out', str(tmp_path / 'x.png')],
                    ['evaluate.py', '--classify', '--data-dir', data_dir]):
        result = in_process(command[0], '--ckpt', path, *command[1:])
        assert_one_line_error(result, 1, 'has 5 classes')
    assert not os.path.exists(tmp_path / 'x.png')


def test_classify_reports_accuracy_and_a_marginal_within_log2_10_bits_an_image(conditional_run, data_dir, tmp_path,
                                                                               in_process):
    """-log p(x) = -log sum_y p(x | y) / 10 <= -log p(x | y_true) + log 10: the marginal bpd is at most the
    conditional one plus log2(10) / D (the other way there is no bound: a model may prefer a wrong digit); the
    confusion PNG is written."""
    result = in_process('evaluate.py', '--ckpt', os.path.join(conditional_run, 'best.pt'), '--data-dir', data_dir,
                        '--classify', '--json', '--out-dir', str(tmp_path))
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r['conditional']
    model, _ = plumbing.load_checkpoint(os.path.join(conditional_run, 'best.pt'))
    data = ImageDataset('mnist', data_dir, train=False, img_size=8, download=False)
    torch.manual_seed(0)   # evaluate.py's --seed: the same dequantisation draws
    predicted = class_nll(model, data.images).argmin(1)
    assert r['accuracy'] == (predicted == data.labels).double().mean().item()   # the Bayes classifier is the argmin
    assert r['marginal_bpd'] <= r['bpd'] + torch.log2(torch.tensor(10.0)).item() / 64 + 1e-9
    assert os.path.getsize(r['confusion_png']) > 1000


def test_a_conditional_run_resumes_exactly(conditional_run, data_dir, tmp_path):
    import train
    stopped = str(tmp_path / 'stopped')
    args = ['--data-dir', data_dir, '--conditional', '--epochs', '1', *TINY_RUN]
    assert train.main(['--out-dir', stopped, '--max-steps', '3', *args]) == 0
    assert train.main(['--resume', os.path.join(stopped, 'last.pt'), '--data-dir', data_dir]) == 0
    assert_same_weights(os.path.join(stopped, 'last.pt'), os.path.join(conditional_run, 'last.pt'))


def test_judge_reports_the_distance_its_floor_and_the_asked_digits_and_caches_the_judge(conditional_run, data_dir,
                                                                                       tmp_path, in_process):
    runs = str(tmp_path / 'runs')
    args = ['--ckpt', os.path.join(conditional_run, 'best.pt'), '--data-dir', data_dir, '--judge', '--n', 30,
            '--runs-dir', runs, '--temperature', 0.8]
    first = in_process('evaluate.py', *args)
    assert first.returncode == 0, first.stderr
    assert 'digit judge trained' in first.stdout and 'Frechet distance' in first.stdout
    [cached] = os.listdir(os.path.join(runs, 'judges'))
    result = in_process('evaluate.py', *args, '--json')
    assert result.returncode == 0 and 'training the digit judge' not in result.stderr   # the cache, not a new one
    r = json.loads(result.stdout)
    assert sum(r['label_histogram']) == 30 and len(r['judge_accuracy_per_digit']) == 10   # 3 samples a digit
    assert r['judge_accuracy'] == pytest.approx(sum(r['judge_accuracy_per_digit'].values()) / 10, abs=1e-12)
    assert os.listdir(os.path.join(runs, 'judges')) == [cached]


def test_a_cached_judge_of_other_data_is_refused_and_left_alone(tmp_path):
    """A judge file whose recorded data are not these (copied under these data's name) is not used: a judge is
    trained for the call, and the file stays as it was."""
    sets = {}
    for seed in (0, 1):
        root = make_mnist(str(tmp_path / f'data{seed}'), n=40, seed=seed)
        sets[seed] = [ImageDataset('mnist', root, train=t, img_size=8) for t in (True, False)]
    cache = str(tmp_path / 'judges')
    logs = []
    plumbing.load_judge(*sets[0], cache, torch.device('cpu'), logs.append)
    [name] = os.listdir(cache)
    other = plumbing.data_fingerprint(sets[1][0].images, sets[1][1].images)['sha256']
    os.rename(os.path.join(cache, name), os.path.join(cache, f'judge-{other}.pt'))
    before = open(os.path.join(cache, f'judge-{other}.pt'), 'rb').read()
    judge, accuracy = plumbing.load_judge(*sets[1], cache, torch.device('cpu'), logs.append)
    assert any('trained on other data: not used' in line for line in logs)
    assert open(os.path.join(cache, f'judge-{other}.pt'), 'rb').read() == before


def test_a_conditional_interpolation_pairs_images_of_one_digit_and_its_ends_are_the_images(conditional_run, data_dir):
    """The couplings see the label, so a row is one digit: each pair's images share it, both are encoded and the
    row decoded with it, and the ends decode back to the images exactly."""
    import sample
    from realnvp import to_unit
    model, _ = plumbing.load_checkpoint(os.path.join(conditional_run, 'best.pt'))
    data = ImageDataset('mnist', data_dir, train=False, img_size=8, download=False)
    torch.manual_seed(0)
    a, b = sample.pick_pairs(data, 3, conditional=True)
    assert torch.equal(data.labels[a], data.labels[b]) and not (a == b).any()
    x_a, x_b = to_unit(data.images[a]), to_unit(data.images[b])
    out = sample.interpolate(model, x_a, x_b, 4, data.labels[a]).reshape(3, 4, 1, 8, 8)
    assert torch.equal(out[:, 0], x_a) and torch.equal(out[:, -1], x_b)
    other = sample.interpolate(model, x_a, x_b, 4, (data.labels[a] + 1) % 10).reshape(3, 4, 1, 8, 8)
    assert not torch.equal(out[:, 1:-1], other[:, 1:-1])   # the label is an input of the row's decoding


def test_the_frechet_distance_matches_the_closed_form_and_is_zero_for_one_set():
    """Features whose sample covariances are diagonal (orthogonal zero-mean columns of a Hadamard matrix): the
    distance is |mu_a - mu_b|^2 + sum (s_a - s_b)^2, in float64; 0 between a set and itself; symmetric."""
    h = torch.tensor([[1.0]], dtype=torch.float64)
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])           # 8 x 8 Sylvester-Hadamard
    columns = h[:, 1:4]                                                        # zero mean, orthogonal
    s_a, s_b, mu_a, mu_b = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 5.0], [0.5, -1.0, 2.0], [0.0, 1.0, 2.0]],
                                        dtype=torch.float64)
    a, b = columns * s_a + mu_a, columns * s_b + mu_b
    scale = math.sqrt(8 / 7)                                                   # the unbiased covariance's
    expected = (mu_a - mu_b).square().sum() + ((s_a - s_b) * scale).square().sum()
    assert abs(plumbing.frechet_distance(a, b) - expected.item()) < 1e-9
    assert abs(plumbing.frechet_distance(b, a) - expected.item()) < 1e-9
    features = torch.randn(200, 16, dtype=torch.float64)
    assert abs(plumbing.frechet_distance(features, features)) < 1e-8


def test_a_model_of_some_digits_draws_only_those_and_is_judged_by_a_judge_of_all_ten(data_dir, tmp_path,
                                                                                      in_process):
    """A conditional model trained on --digits 0 1: asking it for a 7 is one line (exit 2), its default grid has a
    row of each of its two digits, and --judge asks for those two only, judged by a judge trained and tested on all
    ten digits of the split."""
    import train
    run = str(tmp_path / 'run')
    assert train.main(['--data-dir', data_dir, '--out-dir', run, '--epochs', '1', '--conditional', '--digits', '0',
                       '1', *TINY_RUN]) == 0
    best = os.path.join(run, 'best.pt')
    assert_one_line_error(in_process('sample.py', '--ckpt', best, '--digit', '7'), 2, '--digit 7',
                          'trained on the digits 0 1 only')
    drawn = in_process('sample.py', '--ckpt', best, '--n', 3, '--scale', 1, '--out', tmp_path / 'grid.png')
    assert drawn.returncode == 0 and '(6 images' in drawn.stdout, drawn.stdout
    judged = in_process('evaluate.py', '--ckpt', best, '--judge', '--n', 10, '--runs-dir', tmp_path / 'runs',
                        '--json')
    assert judged.returncode == 0, judged.stderr
    r = json.loads(judged.stdout)
    assert sorted(r['judge_accuracy_per_digit']) == ['0', '1'] and sum(r['label_histogram']) == 10
    everything = [ImageDataset('mnist', data_dir, train=t, img_size=8, download=False) for t in (True, False)]
    judge, accuracy = plumbing.load_judge(*everything, str(tmp_path / 'runs' / 'judges'), torch.device('cpu'),
                                          lambda line: None)
    assert r['judge_test_accuracy'] == accuracy   # the cached judge of all ten digits, not of 0 and 1


def test_a_damaged_judge_cache_is_set_aside_and_replaced_and_an_unwritable_one_is_said(data_dir, tmp_path):
    sets = [ImageDataset('mnist', data_dir, train=t, img_size=8, download=False) for t in (True, False)]
    cache = tmp_path / 'judges'
    logs = []
    plumbing.load_judge(*sets, str(cache), torch.device('cpu'), logs.append)
    [name] = os.listdir(cache)
    (cache / name).write_bytes(b'')   # empty: torch.load raises EOFError
    logs.clear()
    plumbing.load_judge(*sets, str(cache), torch.device('cpu'), logs.append)
    assert any('cannot be used' in line and f'{name}.damaged' in line for line in logs), logs
    assert sorted(os.listdir(cache)) == [name, f'{name}.damaged']
    assert torch.load(cache / name, weights_only=True)['data'] == plumbing.data_fingerprint(sets[0].images,
                                                                                          sets[1].images)
    blocked = tmp_path / 'afile'
    blocked.write_text('not a folder')
    logs.clear()
    judge, _ = plumbing.load_judge(*sets, str(blocked / 'judges'), torch.device('cpu'), logs.append)
    assert judge is not None and any('not cached' in line for line in logs), logs


def test_the_frechet_distance_of_too_few_or_non_finite_features_is_one_line(conditional_run, data_dir, in_process):
    assert_one_line_error(in_process('evaluate.py', '--ckpt', os.path.join(conditional_run, 'best.pt'), '--judge',
                                     '--n', 1), 2, '--n 1', 'at least 2')
    with pytest.raises(ValueError, match='not finite'):
        plumbing.frechet_distance(torch.full((5, 3), float('nan')), torch.zeros(5, 3))
    with pytest.raises(ValueError, match='at least 2'):
        plumbing.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


@pytest.mark.slow
def test_ctrl_c_in_evaluate_is_one_line_and_exit_130(conditional_run, tmp_path):
    """SIGINT while evaluate.py draws samples for --judge (after the judge is trained and said): exit 130, one line,
    no traceback, and nothing written."""
    import signal
    import subprocess
    import sys
    from conftest import HERE, OFFLINE
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **OFFLINE}
    parent = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))

    def as_from_a_shell():   # Ctrl-C handled by default and not blocked, whatever this test process has
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    process = subprocess.Popen([sys.executable, os.path.join(HERE, 'evaluate.py'), '--ckpt',
                                os.path.join(conditional_run, 'best.pt'), '--judge', '--n', '1000000', '--runs-dir',
                                str(tmp_path / 'runs')], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=HERE, preexec_fn=as_from_a_shell)
    for line in process.stdout:
        if line.startswith('digit judge'):
            break
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130 and 'Traceback' not in stderr, (stderr, parent)
    assert stderr.strip().splitlines()[-1] == 'evaluate.py: interrupted; nothing was written'
