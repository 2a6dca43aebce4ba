"""train.py: its pieces in process (flags, recipes, the resume policy, the skip guard, the schedule, compiling),
then whole runs in subprocesses: what a run writes, exact resume after a stop, Ctrl-C or a kill at any write, one
run per folder, nothing non-finite saved, and two processes under torchrun. Tests marked `slow` start
subprocesses."""
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import plumbing
import train
from conftest import (HERE, OFFLINE, TINY, TINY_RUN, assert_one_line_error, assert_same_weights, load, make_mnist,
                      run_main, script, script_killed_after_writes, tiny_model)
from realnvp import BatchNormFlow, RealNVP, RealNVPConfig, RealNVPLoss, checkerboard_mask, get_param_groups
from train import SkipGuard, make_optimizer, train_step


def folder_bytes(path):
    """Every file of a folder (its lock aside: that holds the pid of the last process that took it)."""
    return {name: open(os.path.join(path, name), 'rb').read() for name in sorted(os.listdir(path)) if name != '.lock'}



def nan_loss(z, sldj):
    """The loss of a step gone wrong."""
    return RealNVPLoss()(z, sldj) * float('nan')


@pytest.mark.parametrize('fused', [True, False])
def test_non_finite_step_leaves_weights_and_optimizer_untouched(fused):
    torch.manual_seed(0)
    model = RealNVP(img_size=4, num_scales=2, **TINY)
    opt = torch.optim.Adam(get_param_groups(model, 5e-5), lr=1e-2, fused=fused)
    guard = SkipGuard(model, opt, 100.0)
    x = torch.rand(8, 1, 4, 4)
    loss, bad = train_step(model, guard, RealNVPLoss(), x, nullcontext())
    assert bad is False and torch.isfinite(loss)
    weights = {k: v.clone() for k, v in model.state_dict().items()}   # batch-norm statistics included
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}

    loss, bad = train_step(model, guard, nan_loss, x, nullcontext())
    assert bad is True and torch.isnan(loss)
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, moments[id(p)][k]), k
    loss, bad = train_step(model, guard, RealNVPLoss(), x, nullcontext())
    assert bad is False
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in weights.items())



def test_resume_policy_classifies_every_flag():
    """Each flag of train.py is frozen, kept or per-run on --resume: a new flag cannot slip through."""
    dests = set(vars(train.build_parser().parse_args([])))
    assert set(train.RESUME_POLICY) == dests
    assert set(train.RESUME_POLICY.values()) == {train.FROZEN, train.KEPT, train.PER_RUN}



@pytest.mark.slow
def test_train_writes_checkpoints_metrics_plot_and_grid(full_run):
    for name in ('last.pt', 'best.pt', 'metrics.csv', 'curves.png', 'samples_epoch001.png', 'samples_epoch002.png',
                 'train.log', 'config.json'):
        assert os.path.isfile(os.path.join(full_run, name)), name
    ckpt = load(os.path.join(full_run, 'last.pt'))
    s = ckpt['state']
    assert s['step'] == 14 and s['epoch'] == 2 and s['skipped'] == 0 and ckpt['format'] == plumbing.CHECKPOINT_FORMAT
    assert ckpt['config'] == dict(in_channels=1, img_size=8, num_scales=2, mid_channels=4, num_blocks=1,
                                  data_constraint=0.9, flow_norm=True, t_bound=10.0, num_classes=0,
                                  learned_prior=True)   # the default's
    assert ckpt['args']['seed'] == 0 and 'state' in ckpt['optimizer']
    last_lr = train.learning_rate(SimpleNamespace(**ckpt['args']), 13, 14)   # step 14 of 14 ran at this lr
    assert 0 < last_lr < 1e-3 and all(g['lr'] == last_lr for g in ckpt['optimizer']['param_groups'])
    rows = open(os.path.join(full_run, 'metrics.csv')).read().strip().splitlines()
    assert rows[0].startswith('epoch,step,train_bpd,test_bpd') and len(rows) == 3
    best_bpd = min(float(r.split(',')[3]) for r in rows[1:])
    assert abs(load(os.path.join(full_run, 'best.pt'))['state']['best_bpd'] - best_bpd) < 1e-4
    log = open(os.path.join(full_run, 'train.log')).read()
    assert 'seed 0' in log and 'epoch 2: train bpd' in log
    assert 'bf16 autocast off' in log   # --no-amp, said at the start
    with open(os.path.join(full_run, 'config.json')) as f:
        config = json.load(f)
    assert config['model']['mid_channels'] == 4 and config['args']['amp'] is False


@pytest.mark.slow
def test_resume_under_amp_equals_the_uninterrupted_run(data_dir, tmp_path, in_process):
    """bf16 autocast (training, refresh and evaluation) resumes bit-exactly too."""
    runs = {}
    for name, steps in (('full', []), ('stopped', ['--max-steps', 10])):
        runs[name] = str(tmp_path / name)
        result = in_process('train.py', '--data-dir', data_dir, '--out-dir', runs[name], '--epochs', 2, *steps,
                            *TINY_RUN, '--amp')
        assert result.returncode == 0, result.stderr
    assert 'bf16 autocast on' in open(os.path.join(runs['full'], 'train.log')).read()
    second = in_process('train.py', '--resume', os.path.join(runs['stopped'], 'last.pt'), '--data-dir', data_dir,
                    '--num-threads', 1)
    assert second.returncode == 0, second.stderr
    assert_same_weights(os.path.join(runs['stopped'], 'last.pt'), os.path.join(runs['full'], 'last.pt'))


@pytest.mark.slow
def test_resume_continues_and_equals_the_uninterrupted_run(full_run, data_dir, tmp_path, in_process):
    out = str(tmp_path / 'stopped')
    first = in_process('train.py', '--data-dir', data_dir, '--out-dir', out, '--epochs', 2, '--max-steps', 10,
                       *TINY_RUN)
    assert first.returncode == 0, first.stderr
    assert load(os.path.join(out, 'last.pt'))['state']['step'] == 10   # mid-way through epoch 2
    second = in_process('train.py', '--resume', os.path.join(out, 'last.pt'), '--data-dir', data_dir,
                        '--num-threads', 1)
    assert second.returncode == 0, second.stderr
    assert 'resumed from' in second.stdout
    assert_same_weights(os.path.join(out, 'last.pt'), os.path.join(full_run, 'last.pt'))
    rows = open(os.path.join(out, 'metrics.csv')).read().strip().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['1', '2']


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_equals_the_uninterrupted_run(full_run, data_dir, tmp_path, in_process):
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
    step = load(os.path.join(out, 'last.pt'))['state']['step']
    assert 1 <= step < 14
    resumed = in_process('train.py', '--resume', os.path.join(out, 'last.pt'), '--data-dir', data_dir,
                         '--num-threads', 1)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(os.path.join(out, 'last.pt'), os.path.join(full_run, 'last.pt'))


@pytest.mark.slow
def test_persistent_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(full_run, data_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    out = str(tmp_path / 'nan')
    shutil.copytree(full_run, out)
    before = open(os.path.join(out, 'last.pt'), 'rb').read()
    monkeypatch.setattr(RealNVPLoss, 'forward', lambda self, z, sldj: (z.sum() + sldj.sum()) * float('nan'))
    code = train.main(['--resume', os.path.join(out, 'last.pt'), '--data-dir', data_dir, '--epochs', '4',
                       '--max-bad-steps', '3', '--log-every', '1'])
    assert code == 1
    assert 'steps in a row had a non-finite loss' in capsys.readouterr().out
    assert open(os.path.join(out, 'last.pt'), 'rb').read() == before



@pytest.mark.slow
def test_resume_takes_the_architecture_from_the_checkpoint(full_run, tmp_path):
    """A resumed run keeps its model: its flow norm and translation bound come from the checkpoint, the same value
    given again is accepted, another one is refused (exit 2), whichever recipe is given or not."""
    run = tmp_path / 'run'
    shutil.copytree(full_run, run)
    resume = ['--resume', str(run / 'last.pt'), '--device', 'cpu', '--epochs', '3']
    args = train.parse_args(resume)[0]
    assert (args.flow_norm, args.t_bound, args.recipe) == (True, 10.0, 'default')
    assert train.parse_args(resume + ['--t-bound', '10'])[0].t_bound == 10.0
    for other in (['--no-flow-norm'], ['--t-bound', '5'], ['--recipe', 'lecture'], ['--mid-channels', '8']):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(resume + other)
        assert exit_info.value.code == 2, other


@pytest.mark.slow
def test_a_checkpoint_of_another_format_is_refused_naming_both(full_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / 'run'
    shutil.copytree(full_run, run)
    ckpt = load(run / 'last.pt')
    del ckpt['format']   # as checkpoints were before the format was written
    torch.save(ckpt, run / 'last.pt')
    result = script('train.py', '--resume', run / 'last.pt', '--epochs', 3)   # the command line, once
    assert_one_line_error(result, 2, 'format 1', f'format {plumbing.CHECKPOINT_FORMAT}')
    for name, flags in (('sample.py', ['--n', '1']), ('evaluate.py', [])):
        assert_one_line_error(run_main(name, ['--ckpt', run / 'last.pt', *flags], monkeypatch, capsys), 1, 'format 1')


# -----------------------------------------------------------------------------
# train.py: one run folder, one run; crash order; nothing non-finite is saved


def copy_run(full_run, path, run_id=None):
    """A copy of the full run's folder; with `run_id`, it (config.json and checkpoints) belongs to another run."""
    shutil.copytree(full_run, path)
    if run_id:
        for name in ('last.pt', 'best.pt'):
            ckpt = load(os.path.join(path, name))
            ckpt['run_id'] = run_id
            torch.save(ckpt, os.path.join(path, name))
        config = json.load(open(os.path.join(path, 'config.json')))
        json.dump({**config, 'run_id': run_id}, open(os.path.join(path, 'config.json'), 'w'))
    return str(path)


@pytest.mark.slow
def test_resuming_an_older_checkpoint_never_overwrites_a_newer_one(full_run, data_dir, tmp_path, in_process):
    run = copy_run(full_run, tmp_path / 'run')
    older = load(os.path.join(run, 'last.pt'))
    older['state']['step'], older['state']['epoch'] = 7, 1          # as a best.pt from epoch 1 would be
    torch.save(older, os.path.join(run, 'best.pt'))
    before = folder_bytes(run)
    refused = in_process('train.py', '--resume', os.path.join(run, 'best.pt'), '--data-dir', data_dir)
    assert_one_line_error(refused, 2, 'step 14, past', '--out-dir')
    assert folder_bytes(run) == before
    # branching into a new folder is the way: a new run, that says where it came from
    branch = str(tmp_path / 'branch')
    result = in_process('train.py', '--resume', os.path.join(run, 'best.pt'), '--out-dir', branch,
                        '--data-dir', data_dir)
    assert result.returncode == 0, result.stderr
    assert folder_bytes(run) == before
    config = json.load(open(os.path.join(branch, 'config.json')))
    assert config['branched_from'] == load(os.path.join(run, 'last.pt'))['run_id'] != config['run_id']
    assert load(os.path.join(branch, 'last.pt'))['run_id'] == config['run_id']


@pytest.mark.slow
def test_a_folder_holding_another_run_is_never_written_into(full_run, data_dir, tmp_path, in_process):
    a = copy_run(full_run, tmp_path / 'a')
    b = copy_run(full_run, tmp_path / 'b', run_id='another')
    before = folder_bytes(b)
    result = in_process('train.py', '--resume', os.path.join(a, 'last.pt'), '--out-dir', b, '--epochs', 3,
                    '--data-dir', data_dir)
    assert_one_line_error(result, 2, 'holds run another', 'branch into a new --out-dir')
    assert folder_bytes(b) == before


@pytest.mark.slow
def test_resuming_on_other_data_is_refused(full_run, tmp_path, in_process):
    run = copy_run(full_run, tmp_path / 'run')
    other = make_mnist(str(tmp_path / 'other'), n=100, seed=1)   # same sizes, other pixels
    before = folder_bytes(run)
    result = in_process('train.py', '--resume', os.path.join(run, 'last.pt'), '--epochs', 3, '--data-dir', other)
    assert_one_line_error(result, 1, 'not the data this run trained on', '--data-dir')
    assert folder_bytes(run) == before


@pytest.mark.slow
def test_a_second_training_into_a_folder_in_use_is_refused_and_a_killed_ones_lock_is_not(data_dir, tmp_path,
                                                                                       in_process):
    out = str(tmp_path / 'busy')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **OFFLINE}
    first = subprocess.Popen([sys.executable, os.path.join(HERE, 'train.py'), '--data-dir', data_dir, '--out-dir',
                              out, '--epochs', '50', *TINY_RUN], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=env, cwd=HERE)
    try:
        for line in first.stdout:
            if line.startswith('epoch 1:'):   # last.pt exists
                break
        second = in_process('train.py', '--resume', os.path.join(out, 'last.pt'), '--data-dir', data_dir)
        assert_one_line_error(second, 1, f'{out} is in use by another training (pid {first.pid})')
    finally:
        first.kill()
        first.wait()
    open(os.path.join(out, 'last.pt.realnvp-tmp999999'), 'wb').close()   # as a process killed mid-write leaves
    open(os.path.join(out, 'thesis.tmp2024'), 'wb').close()   # a file of the user's, with a name like a temporary
    live = f'samples_n4_t1_s0.png.realnvp-tmp{os.getppid()}'      # a write in progress of a process still alive
    open(os.path.join(out, live), 'wb').close()
    step = load(os.path.join(out, 'last.pt'))['state']['step']
    third = in_process('train.py', '--resume', os.path.join(out, 'last.pt'), '--max-steps', step + 1,
                   '--data-dir', data_dir)
    assert third.returncode == 0, third.stderr
    assert load(os.path.join(out, 'last.pt'))['state']['step'] == step + 1
    assert sorted(n for n in os.listdir(out) if 'tmp' in n) == sorted(['thesis.tmp2024', live])   # not the dead one's


@pytest.mark.slow
def test_a_kill_while_config_json_is_written_leaves_a_folder_the_same_command_starts_again(data_dir, tmp_path,
                                                                                           in_process):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'config.json.realnvp-tmp999999').write_bytes(b'{"run_id": ')   # the kill's leftover, its process gone
    result = in_process('train.py', '--data-dir', data_dir, '--out-dir', out, '--epochs', 1, *TINY_RUN)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ['.lock', 'best.pt', 'config.json', 'curves.png', 'last.pt', 'metrics.csv',
                                       'samples_epoch001.png', 'train.log']


@pytest.mark.slow
@pytest.mark.parametrize('kill_after', [2, 5, 10, 11])
def test_a_kill_at_each_write_of_an_epoch_end_loses_nothing(full_run, data_dir, tmp_path, kill_after, in_process):
    """A run writes config.json, then 5 files an epoch (metrics.csv, curves.png, the grid, best.pt, last.pt: the
    commit point); a SIGKILL right after a write of epoch 1's or 2's, then the way forward the folder points to
    (--resume from last.pt, or from best.pt, or the same command again), gives the uninterrupted run's files."""
    out = str(tmp_path / 'killed')
    command = ['--data-dir', data_dir, '--out-dir', out, '--epochs', '2', *TINY_RUN]
    killed = script_killed_after_writes(kill_after, 'train.py', *command)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last, best = os.path.join(out, 'last.pt'), os.path.join(out, 'best.pt')
    killed_run = json.load(open(os.path.join(out, 'config.json')))['run_id']
    if kill_after < 11:
        start = ['--resume', last] if os.path.exists(last) else ['--resume', best] if os.path.exists(best) else command
        assert start[1] == {2: data_dir, 4: data_dir, 5: best}.get(kill_after, last)
        if start[1] == best:   # the same command again is pointed there
            assert_one_line_error(new_run(data_dir, out), 2, f'--resume {best}')
        resumed = in_process('train.py', *start, *(['--data-dir', data_dir, '--num-threads', 1]
                                                    if start[0] == '--resume' else []))
        assert resumed.returncode == 0, resumed.stderr
    # a run killed before its first checkpoint is restarted as a new run, which config.json and the files name
    run_id = json.load(open(os.path.join(out, 'config.json')))['run_id']
    assert (run_id != killed_run) == (kill_after == 2) and load(last)['run_id'] == load(best)['run_id'] == run_id
    assert_same_weights(last, os.path.join(full_run, 'last.pt'))
    assert_same_weights(best, os.path.join(full_run, 'best.pt'))

    def rows(run):
        return [r.split(',')[:4] for r in open(os.path.join(run, 'metrics.csv')).read().strip().splitlines()]
    assert rows(out) == rows(full_run) and len(rows(out)) == 3
    assert all(os.path.isfile(os.path.join(out, f'samples_epoch00{e}.png')) for e in (1, 2))


@pytest.mark.slow
@pytest.mark.parametrize('flags', [['--lr', '1e10'], ['--weight-decay', '1e300']])
def test_a_run_that_goes_non_finite_stops_and_saves_nothing_non_finite(data_dir, tmp_path, flags, in_process):
    out = str(tmp_path / 'bad')
    result = in_process('train.py', '--data-dir', data_dir, '--out-dir', out, '--epochs', 3, *flags, *TINY_RUN)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'not finite' in result.stdout or 'non-finite' in result.stdout
    for name in ('last.pt', 'best.pt'):
        if os.path.exists(os.path.join(out, name)):
            ckpt = load(os.path.join(out, name))
            assert plumbing.non_finite_tensor({k: ckpt[k] for k in ('model', 'train_model', 'optimizer')}) is None


def test_a_write_removes_the_temporaries_of_killed_writers_beside_it_and_nothing_else(tmp_path):
    """A kill mid-write leaves <file>.realnvp-tmp<pid> beside a grid, a CSV or a cached judge: the next write into
    that folder removes it; a live process's temporary (its write in progress) and other files stay."""
    dead = subprocess.Popen(['true'])
    dead.wait()
    names = [f'grid.png{plumbing.TMP_MARK}{dead.pid}', f'judge.pt{plumbing.TMP_MARK}{os.getpid()}', 'notes.tmp1']
    for name in names:
        (tmp_path / name).write_bytes(b'x')
    plumbing.write_atomically(b'new', str(tmp_path / 'bpd.csv'))
    assert sorted(os.listdir(tmp_path)) == sorted(['bpd.csv', *names[1:]])


def test_a_full_disk_while_saving_leaves_the_old_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    plumbing.write_atomically(b'old', path)

    def full(fd):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(plumbing.CheckpointError, match='could not write .*No space left on device.*untouched'):
        plumbing.write_atomically(b'new', path)
    assert open(path, 'rb').read() == b'old' and os.listdir(tmp_path) == ['last.pt']


def test_learning_rate_warms_up_holds_and_decays_to_zero_over_the_last_fraction():
    lr = lambda step, warmup=0, decay=0.2: train.learning_rate(
        SimpleNamespace(lr=1e-3, warmup_steps=warmup, lr_decay=decay), step, 100)
    assert [lr(s) for s in (0, 50, 80)] == [1e-3] * 3           # constant until the last 20 of 100 steps
    assert lr(90) == pytest.approx(0.5e-3) and lr(99) == pytest.approx(0.05e-3) and lr(100) == 0.0
    assert lr(0, warmup=10) == pytest.approx(1e-4) and lr(9, warmup=10) == 1e-3
    assert lr(95, warmup=10) == pytest.approx(0.25e-3)
    assert lr(99, decay=0.0) == 1e-3


def test_every_batch_is_full_and_every_image_is_seen_each_epoch():
    """100 images in batches of 16: 7 steps, the last filled up from the start of the epoch's permutation, which
    is the same for a given seed and epoch and another for the next epoch; two ranks share it out."""
    one = plumbing.Dist(torch.device('cpu'), log_every=1)
    order = train.epoch_order(100, 0, 3, 7, 16, one)
    assert len(order) == 7 * 16 and sorted(order[:100].tolist()) == list(range(100))
    assert torch.equal(order[100:], order[:12]) and torch.equal(order, train.epoch_order(100, 0, 3, 7, 16, one))
    assert not torch.equal(order, train.epoch_order(100, 0, 4, 7, 16, one))
    two = [SimpleNamespace(shard=lambda t, r=r: t[r::2]) for r in range(2)]   # what Dist.shard is on ranks 0 and 1
    halves = [train.epoch_order(100, 0, 3, 7, 8, d) for d in two]
    assert sorted(halves[0][:50].tolist() + halves[1][:50].tolist()) == list(range(100))
    assert torch.equal(torch.stack(halves, 1).flatten()[:100], order[:100])


@pytest.mark.parametrize('amp, flow_norm, classes', [(False, False, 0), (True, True, 10)])
def test_the_model_traces_into_one_graph_forward_and_reverse(amp, flow_norm, classes):
    """torch.compile sees the whole flow: the lecture's model in fp32, and the default one with its flow norm and a
    class prior under --amp's autocast. No graph breaks."""
    model = RealNVP(img_size=8, flow_norm=flow_norm, num_classes=classes, **TINY)
    labels = torch.tensor([0, 3, 9, 3]) if classes else None
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        forward = torch._dynamo.explain(model)(torch.rand(4, 1, 8, 8), labels=labels)
        model.eval()
        reverse = torch._dynamo.explain(model)(torch.randn(4, 1, 8, 8), reverse=True, labels=labels)
    for explained in (forward, reverse):
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def counting_compile(monkeypatch):
    """torch.compile with a backend that runs each graph as dynamo built it (no C++ compiler needed) and keeps
    a list of the graphs compiled, which it returns."""
    import functools
    graphs = []

    def backend(graph_module, example_inputs, options=None):   # inductor's options: none apply here
        graphs.append(graph_module)
        return graph_module.forward
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend=backend))
    return graphs


def test_a_compiled_run_never_recompiles(data_dir, tmp_path, monkeypatch, fresh_dynamo):
    """Two epochs of 100 images in batches of 16 (the last one filled up) under --compile, through the
    learning rate's decay: the net's graphs are compiled in the first step, none after."""
    graphs, after_step = counting_compile(monkeypatch), []

    def counted_step(*args):
        result = train_step(*args)
        after_step.append(len(graphs))
        return result
    monkeypatch.setattr(train, 'train_step', counted_step)
    out = str(tmp_path / 'compiled')   # class-conditional: the labels are one more input of the same graph
    assert train.main(['--data-dir', data_dir, '--out-dir', out, '--epochs', '2', '--compile', '--conditional',
                       *TINY_RUN]) == 0
    assert load(os.path.join(out, 'last.pt'))['state']['step'] == len(after_step) == 14
    assert after_step[0] >= 1 and after_step == after_step[:1] * 14, after_step


def test_a_model_compiled_for_cuda_starts_a_cuda_graph_step_at_every_call(monkeypatch, fresh_dynamo):
    """Under CUDA graphs each training step must tell torch that the last step's outputs are free: the compiled
    net does it itself before each call (checked here with dynamo's eager backend on the CPU)."""
    compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda net, options, dynamic: compile(net, backend='eager', dynamic=dynamic))
    marks = []
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: marks.append(1))
    net = torch.nn.Linear(2, 2)
    cuda = plumbing.compile_model(net, torch.device('cuda'))
    for _ in range(3):
        cuda(torch.randn(1, 2))
    assert len(marks) == 3
    plumbing.compile_model(net, torch.device('cpu'))(torch.randn(1, 2))
    assert len(marks) == 3


@pytest.mark.parametrize('native', [True, False])
def test_amp_is_on_by_default_exactly_where_bf16_is_native(monkeypatch, native):
    monkeypatch.setattr(plumbing, 'native_bf16', lambda device: (native, 'a test CPU'))
    parse = lambda *flags: train.parse_args(['--device', 'cpu', *flags])[0].amp
    assert parse() is native
    assert parse('--amp') is True and parse('--no-amp') is False


def test_digits_are_a_set_and_epochs_0_says_nothing_was_saved(data_dir, tmp_path, capsys):
    args, _, _ = train.parse_args(['--digits', '2', '0', '2'])
    assert args.digits == [0, 2]
    out = str(tmp_path / 'zero')
    assert train.main(['--data-dir', data_dir, '--out-dir', out, '--epochs', '0', *TINY_RUN]) == 0
    assert 'trains nothing; no checkpoint written' in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, 'last.pt'))



def test_recipes_are_complete_and_flags_override_single_settings():
    """Each recipe gives every setting it names (the model's included); a flag given overrides that one alone."""
    default = train.parse_args(['--device', 'cpu'])[0]
    assert default.recipe == 'default'
    assert {k: getattr(default, k) for k in train.RECIPES['default']} == train.RECIPES['default']
    lecture = train.parse_args(['--device', 'cpu', '--recipe', 'lecture', '--lr', '3e-4'])[0]
    assert {k: getattr(lecture, k) for k in train.RECIPES['lecture']} == {**train.RECIPES['lecture'], 'lr': 3e-4}
    assert plumbing.config_from_args(lecture) == RealNVPConfig.lecture()
    assert train.RECIPES['default'].keys() == train.RECIPES['lecture'].keys()


def test_abbreviated_flags_are_refused():
    for script_name in ('train', 'sample', 'evaluate', 'bench'):
        parser = __import__(script_name).build_parser()
        flag = {'train': '--epoch', 'sample': '--temp', 'evaluate': '--dequant', 'bench': '--step'}[script_name]
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([flag, '3'])
        assert exit_info.value.code == 2, script_name


# multi-process training (torchrun, gloo on the CPU) and the benchmark script




# -----------------------------------------------------------------------------
# The run folder's guarantees: one owner (config.json), one writer, refusals that point at a way that works


def nan_training_loss(monkeypatch):
    """Every training step's loss is NaN; evaluation's per-image losses stay as they are."""
    forward = RealNVPLoss.forward
    monkeypatch.setattr(RealNVPLoss, 'forward', lambda self, z, sldj: forward(self, z, sldj) * (
        float('nan') if self.reduction == 'mean' else 1.0))


def new_run(data_dir, out, *flags):
    return script('train.py', '--data-dir', data_dir, '--out-dir', out, '--epochs', 2, *TINY_RUN, *flags)


@pytest.mark.slow
def test_a_folder_the_project_did_not_make_is_refused_and_left_as_it_was(data_dir, tmp_path):
    mine = tmp_path / 'mine'
    mine.mkdir()
    for name in ('thesis.tmp2024', 'backup.tar.tmp1'):
        (mine / name).write_text('precious')
    before = folder_bytes(mine)
    assert_one_line_error(new_run(data_dir, mine, '--epochs', 0), 2, 'not a run of train.py', 'another --out-dir')
    assert folder_bytes(mine) == before


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['random bytes', 'truncated', 'empty', 'a folder', 'a tensor', 'no state'])
def test_a_damaged_last_pt_does_not_block_resuming_from_best(full_run, data_dir, tmp_path, damage, monkeypatch,
                                                              capsys):
    run = copy_run(full_run, tmp_path / 'run')
    last = os.path.join(run, 'last.pt')
    good = open(last, 'rb').read()
    os.remove(last)
    if damage == 'a folder':
        os.mkdir(last)
    elif damage in ('a tensor', 'no state'):
        torch.save(torch.zeros(3) if damage == 'a tensor' else {k: v for k, v in load(os.path.join(run, 'best.pt'))
                                                               .items() if k != 'state'}, last)
    else:
        open(last, 'wb').write({'random bytes': os.urandom(5000), 'truncated': good[:len(good) // 2],
                                'empty': b''}[damage])
    result = run_main('train.py', ['--resume', os.path.join(run, 'best.pt'), '--epochs', '3', '--data-dir',
                                   data_dir], monkeypatch, capsys)
    if damage == 'a folder':   # not a file the run can replace: one line, nothing touched
        assert_one_line_error(result, 2, 'last.pt is not a file')
        return
    assert result.returncode == 0, result.stderr
    assert load(last)['state']['epoch'] == 3


@pytest.mark.slow
def test_another_runs_checkpoint_copied_into_a_folder_is_refused_there(full_run, data_dir, tmp_path, in_process):
    a = copy_run(full_run, tmp_path / 'a', run_id='run-a')
    b = copy_run(full_run, tmp_path / 'b', run_id='run-b')
    shutil.copy(os.path.join(b, 'last.pt'), os.path.join(a, 'from_b.pt'))
    before = folder_bytes(a)
    result = in_process('train.py', '--resume', os.path.join(a, 'from_b.pt'), '--epochs', 3, '--data-dir', data_dir)
    assert_one_line_error(result, 2, 'holds run run-a', 'run-b')
    assert folder_bytes(a) == before


def test_an_epoch_of_only_skipped_steps_is_saved_with_its_weights_untouched(data_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'skipped')
    assert train.main(['--data-dir', data_dir, '--out-dir', out, '--epochs', '1', *TINY_RUN]) == 0
    before = load(os.path.join(out, 'last.pt'))
    nan_training_loss(monkeypatch)
    assert train.main(['--resume', os.path.join(out, 'last.pt'), '--epochs', '2', '--max-bad-steps', '100']) == 0
    after = load(os.path.join(out, 'last.pt'))
    assert after['state']['skipped'] == 7 and after['state']['epoch'] == 2
    for part in ('train_model', 'model'):   # neither the trained weights nor their average moved
        for key, value in before[part].items():
            if 'running' not in key and 'num_batches' not in key:
                assert torch.equal(after[part][key], value), (part, key)
    rows = open(os.path.join(out, 'metrics.csv')).read().strip().splitlines()
    assert rows[-1].split(',')[2] == 'nan' and len(rows) == 3


def test_a_full_disk_or_an_unwritable_log_is_one_line_and_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    out = str(tmp_path / 'run')
    assert train.main(['--data-dir', data_dir, '--out-dir', out, '--epochs', '1', *TINY_RUN]) == 0
    before = folder_bytes(out)
    real = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: (_ for _ in ()).throw(OSError(28, 'No space left on device')))
    with pytest.raises(SystemExit) as exit_info:
        train.main(['--resume', os.path.join(out, 'last.pt'), '--epochs', '2'])
    assert exit_info.value.code == 1
    assert 'No space left on device' in capsys.readouterr().err.strip().splitlines()[-1]
    monkeypatch.setattr(os, 'fsync', real)
    after = folder_bytes(out)
    assert {k: after[k] for k in before if k != 'train.log'} == {k: v for k, v in before.items() if k != 'train.log'}
    assert not [n for n in os.listdir(out) if 'realnvp-tmp' in n]
    os.rename(os.path.join(out, 'train.log'), os.path.join(out, 'old.log'))
    os.mkdir(os.path.join(out, 'train.log'))   # a log that cannot be appended to
    with pytest.raises(SystemExit) as exit_info:
        train.main(['--resume', os.path.join(out, 'last.pt'), '--epochs', '2'])
    last_line = capsys.readouterr().err.strip().splitlines()[-1]   # refused before any work, as bad input
    assert exit_info.value.code == 2 and 'train.log is not a file' in last_line, last_line
    assert load(os.path.join(out, 'last.pt'))['state']['epoch'] == 1


@pytest.mark.slow
def test_max_bad_steps_stops_there_and_says_how_many(data_dir, tmp_path, monkeypatch, capsys):
    nan_training_loss(monkeypatch)
    out = str(tmp_path / 'bad')
    flags = ['--data-dir', data_dir, '--out-dir', out, '--epochs', '2', '--max-bad-steps', '2', *TINY_RUN]
    assert train.main(flags) == 1
    assert 'stopping at step 2: 2 steps in a row had a non-finite loss' in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_agrees_across_ranks_and_a_stop_and_resume_equals_the_uninterrupted_run(data_dir, tmp_path,
                                                                                        in_process):
    """Two processes (gloo on the CPU): the ranks end with the same weights, the checkpoint loads in one process,
    and a stop in the middle of epoch 2 and a resume give the uninterrupted run's weights, average, batch-norm
    statistics, optimizer state and metrics, bit for bit: the default recipe with a class-conditional model (each
    rank its share of the labels), and the lecture's recipe, whose saved model is the trained one with its running
    statistics averaged over the ranks."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **OFFLINE}

    def torchrun(*args):
        result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                                 '2', os.path.join(HERE, 'train.py'), *map(str, args)], capture_output=True,
                                text=True, timeout=300, env=env, cwd=HERE)
        assert result.returncode == 0, result.stderr[-3000:]
        return result
    for recipe, *conditional in (('default', '--conditional'), ('lecture',)):   # labels sharded; no refresh
        full, stopped = (str(tmp_path / f'{recipe}{"".join(conditional)}-{run}') for run in ('full', 'stopped'))
        result = torchrun('--data-dir', data_dir, '--out-dir', full, '--epochs', 2, '--recipe', recipe, *conditional,
                          *TINY_RUN)
        assert 'weights identical across 2 ranks' in result.stdout and '2 process(es)' in result.stdout
        torchrun('--data-dir', data_dir, '--out-dir', stopped, '--epochs', 2, '--recipe', recipe, '--max-steps', 10,
                 *conditional, *TINY_RUN)
        torchrun('--resume', os.path.join(stopped, 'last.pt'), '--data-dir', data_dir, *TINY_RUN[-3:])
        assert_same_weights(os.path.join(stopped, 'last.pt'), os.path.join(full, 'last.pt'))
        rows = [open(os.path.join(run, 'metrics.csv')).read().splitlines() for run in (full, stopped)]
        assert [r.split(',')[:4] for r in rows[0]] == [r.split(',')[:4] for r in rows[1]]
    ckpt = load(os.path.join(full, 'last.pt'))
    assert ckpt['world_size'] == 2 and len(ckpt['rng']) == 2 and ckpt['state']['step'] == 14   # 2 x 8 a step
    evaluated = script('evaluate.py', '--ckpt', os.path.join(full, 'best.pt'), '--data-dir', data_dir, '--json')
    assert evaluated.returncode == 0, evaluated.stderr
    # the same model on the same test images; only the dequantisation draws differ (Monte Carlo noise)
    assert abs(json.loads(evaluated.stdout)['bpd'] - ckpt['state']['best_bpd']) < 0.05
    resumed = in_process('train.py', '--resume', os.path.join(full, 'last.pt'), '--epochs', 3, '--data-dir', data_dir,
                         '--num-threads', 1)
    assert resumed.returncode == 0 and 'saved by 2 process(es) and resumes on 1' in resumed.stdout, resumed.stderr


@pytest.mark.slow
def test_a_sigkill_to_torchruns_process_group_ends_its_workers_and_frees_the_folder(data_dir, tmp_path):
    """torchrun starts its workers in sessions of their own: killing torchrun's process group must end them too,
    so that the folder's lock is free and the run can be resumed."""
    import fcntl
    import time
    out = tmp_path / 'run'
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **OFFLINE}
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             os.path.join(HERE, 'train.py'), '--data-dir', data_dir, '--out-dir', str(out),
                             '--epochs', '200', *TINY_RUN], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=HERE, start_new_session=True)
    for line in proc.stdout:
        if line.startswith('training'):
            break
    worker = int((out / '.lock').read_text())   # rank 0 writes its pid into the lock file
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    try:
        deadline = time.time() + 30
        while plumbing.process_alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not plumbing.process_alive(worker)
        with open(out / '.lock', 'a+') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # free: raises BlockingIOError if a worker holds it
    finally:   # a surviving rank 0 killed; rank 1 then fails at its next collective
        if plumbing.process_alive(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.slow
def test_under_torchrun_a_refusal_is_one_line_on_every_rank(data_dir, tmp_path):
    """The folder's lock is held by another training: both ranks exit with the same one line, no traceback."""
    import fcntl
    out = tmp_path / 'held'
    out.mkdir()
    with open(out / '.lock', 'a+') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **OFFLINE}
        result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                                 '2', os.path.join(HERE, 'train.py'), '--data-dir', data_dir, '--out-dir', str(out),
                                 *TINY_RUN], capture_output=True, text=True, timeout=300, env=env, cwd=HERE)
    assert result.returncode != 0
    assert 'train.py", line' not in result.stderr and 'plumbing.py", line' not in result.stderr   # no traceback of ours
    assert result.stderr.count('is in use by another training') == 2   # rank 0's and rank 1's one line


def resumable_defect(ckpt, defect):
    """`ckpt` with one defect a hand-edited checkpoint may have."""
    if defect == 'rng':
        ckpt['rng'] = 'seed'
    elif defect == 'step':
        ckpt['state']['step'] = '14'
    elif defect == 'args':
        ckpt['args']['lr'] = 'fast'
    elif defect == 'group':
        ckpt['optimizer']['param_groups'] = ckpt['optimizer']['param_groups'][:1]
    elif defect == 'recipe':
        ckpt['args']['recipe'] = 'mine'
    elif defect == 'batch 0':
        ckpt['args']['batch_size'] = 0
    elif defect == 'lr < 0':
        ckpt['args']['lr'] = -1e-3
    elif defect == 'epochs < 0':
        ckpt['args']['epochs'] = -1
    elif defect == 'state key':
        ckpt['state']['momentum'] = 0.5
    elif defect == 'weight':
        ckpt['train_model'][next(iter(ckpt['train_model']))] = 3.0
    elif defect == 'nan train_model':
        next(iter(ckpt['train_model'].values())).fill_(float('nan'))
    elif defect == 'nan optimizer':
        next(iter(ckpt['optimizer']['state'].values()))['exp_avg'].fill_(float('nan'))
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize('defect', ['rng', 'step', 'args', 'group', 'recipe', 'weight', 'nan train_model',
                                    'nan optimizer', 'batch 0', 'lr < 0', 'epochs < 0', 'state key'])
def test_a_hand_made_checkpoint_is_refused_on_resume_in_one_line(full_run, tmp_path, defect, capsys):
    run = copy_run(full_run, tmp_path / 'run')
    torch.save(resumable_defect(load(os.path.join(run, 'last.pt')), defect), os.path.join(run, 'last.pt'))
    before = folder_bytes(run)
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(['--resume', os.path.join(run, 'last.pt'), '--epochs', '3', '--device', 'cpu'])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'cannot be resumed' in last or 'do not fit' in last or 'state to resume' in last, last
    assert folder_bytes(run) == before


def test_the_learned_prior_trains_and_a_resume_keeps_it(full_run, capsys):
    """The default's learned prior: its mean and log-scale train (they start at zero), the checkpoint's model has
    them, and a resume takes the setting from the checkpoint and refuses the other value."""
    ckpt = load(os.path.join(full_run, 'last.pt'))
    assert ckpt['config']['learned_prior'] and ckpt['config']['num_classes'] == 0
    assert ckpt['train_model']['prior.mean'].shape == (1, 1, 8, 8) and ckpt['train_model']['prior.mean'].abs().max() > 0
    resume = ['--resume', os.path.join(full_run, 'last.pt'), '--epochs', '3', '--device', 'cpu']
    assert train.parse_args(resume)[0].learned_prior is True
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(resume + ['--no-learned-prior'])
    assert exit_info.value.code == 2 and '--learned-prior differs' in capsys.readouterr().err


def test_the_largest_seed_fits_every_use_of_it(data_dir, tmp_path):
    out = str(tmp_path / 'seed')
    assert train.main(['--data-dir', data_dir, '--out-dir', out, '--epochs', '1', '--seed', str(2 ** 32 - 1),
                       *TINY_RUN]) == 0
    assert load(os.path.join(out, 'last.pt'))['args']['seed'] == 2 ** 32 - 1


def test_a_process_with_no_test_images_evaluates_to_an_empty_sum():
    """Under torchrun a test split smaller than the processes leaves a rank without images: its share is empty."""
    from realnvp import nll_per_image
    model = RealNVP(img_size=4, **TINY)
    empty = torch.zeros((0, 1, 4, 4), dtype=torch.uint8)
    assert nll_per_image(model, empty).shape == (0,)
    assert nll_per_image(model, torch.zeros((3, 1, 4, 4), dtype=torch.uint8)).shape == (3,)


def test_one_memory_estimate_covers_the_weights_a_training_step_and_the_evaluation_batches(monkeypatch):
    config = RealNVPConfig(img_size=8, **TINY)
    params = sum(p.numel() for p in RealNVP(config).parameters())
    weights = plumbing.memory_needed(config)
    assert weights == 4 * params
    ten, twenty = plumbing.memory_needed(config, eval_batch=10), plumbing.memory_needed(config, eval_batch=20)
    assert twenty - ten == ten - weights > 0   # in proportion to the evaluation batch
    assert plumbing.memory_needed(config, train_batch=10) > 5 * 4 * params   # optimizer state, kept activations
    seen = []
    monkeypatch.setattr(plumbing, 'check_memory', lambda needed, what, advice: seen.append(needed))
    train.parse_args(['--device', 'cpu', *TINY_RUN[:8]])
    tiny = RealNVPConfig(img_size=8, mid_channels=4, num_blocks=1)
    assert seen == [plumbing.memory_needed(tiny, 16, train.EVAL_BATCH)]   # the step and the test batches both


def test_the_skip_guard_saves_every_buffer_in_one_launch_a_dtype_and_puts_all_back_after_a_bad_step():
    """The batch-norm statistics (and counters) are saved as one flat copy per dtype, counted with bench.py's launch
    counter; a skipped step puts all of them back, over the NaN its forward pass left."""
    import bench
    torch.manual_seed(0)
    model = RealNVP(img_size=4, num_scales=2, **TINY)
    guard = SkipGuard(model, make_optimizer(model, 1e-2, 0.0), 100.0)
    assert sum(len(group) for group in guard.buffers.values()) == len(list(model.buffers())) > 20
    assert bench.count_launches(guard.snapshot) == len(guard.buffers) == 2   # float32 statistics, int64 counters
    train_step(model, guard, RealNVPLoss(), torch.rand(8, 1, 4, 4), nullcontext())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan_images = torch.full((8, 1, 4, 4), float('nan'))   # its forward pass leaves NaN in every statistic it moves
    assert train_step(model, guard, RealNVPLoss(), nan_images, nullcontext())[1] is True
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.slow
def test_under_compile_every_gradient_comes_in_its_weights_own_layout(fresh_dynamo):
    """--compile, with the real compiler: every parameter's gradient arrives with its parameter's strides
    (dimensions of size 1 aside), so autograd takes it as it is; a copy into the parameter's layout would be one more
    launch a weight outside the compiled graphs. The 3x3 convolutions' weights are among them."""
    torch.manual_seed(0)
    model = RealNVP(img_size=4, num_scales=1, **TINY)   # one scale: 4 couplings, the quickest to compile
    guard = SkipGuard(model, make_optimizer(model, 1e-3, 0.0), 100.0)
    net = plumbing.compile_model(model, torch.device('cpu'))
    assert train_step(net, guard, RealNVPLoss(), torch.rand(16, 1, 4, 4), nullcontext())[1] is False   # compiles
    strides = lambda t: [s for s, n in zip(t.stride(), t.shape) if n > 1]
    mismatched = []
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name, p=p: mismatched.append(name) if strides(g) != strides(p) else None)
    assert train_step(net, guard, RealNVPLoss(), torch.rand(16, 1, 4, 4), nullcontext())[1] is False
    convolutions = [n for n, p in model.named_parameters() if p.dim() == 4 and p.shape[-1] == 3]
    assert mismatched == [] and len(convolutions) == 12 and all(p.grad is not None for p in model.parameters())


def test_the_finiteness_check_of_a_whole_checkpoint_asks_the_host_once():
    """Hundreds of tensors, one host sync (aten's _local_scalar_dense, counted with bench.py's launch counter) when
    all are finite; the first non-finite one by name when one is not, nested names included."""
    import bench
    model = RealNVP(img_size=4, **TINY)
    opt = make_optimizer(model, 1e-3, 0.0)
    model(torch.rand(2, 1, 4, 4))[0].sum().backward()
    opt.step()
    state = {'model': model.state_dict(), 'optimizer': opt.state_dict()}
    with bench.LaunchCounter() as counter:
        assert plumbing.non_finite_tensor(state) is None
    assert counter.ops.count(torch.ops.aten._local_scalar_dense) == 1
    assert len(list(plumbing.floating_tensors(state))) > 100
    key = list(state['model'])[5]
    state['model'][key][0] = float('inf')
    next(iter(state['optimizer']['state'].values()))['exp_avg'].fill_(float('nan'))
    assert plumbing.non_finite_tensor(state) == f'model.{key}'
    assert plumbing.non_finite_tensor({'optimizer': state['optimizer']}).startswith('optimizer.state.')


def test_weight_average_follows_its_update_rule_exactly():
    torch.manual_seed(0)
    model = RealNVP(img_size=4, **TINY).double()
    average = train.WeightAverage(model, decay=0.9)
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
    plain = train.WeightAverage(model, decay=0.0)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    plain.update(model, 1)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), model.parameters()))


@pytest.mark.parametrize('classes', [0, 3])
def test_a_refresh_over_several_batches_is_their_plain_average_as_momentum_none_makes_it(classes):
    """refresh_batch_norm sets momentum 1/k for the k-th batch: the same statistics, to the bit, as torch's own
    cumulative average (momentum=None), which reads the batch count back from the device at every layer; the
    flow's batch norms (flow_norm) as well; a class-conditional model's s/t nets see each batch's labels."""
    import copy
    model = tiny_model(1, 8, 2, flow_norm=True, num_classes=classes)
    batches = [(torch.rand(16, 1, 8, 8, dtype=torch.float64), torch.rand(16, 1, 8, 8, dtype=torch.float64),
                torch.randint(0, classes, (16,)) if classes else None) for _ in range(3)]
    reference = copy.deepcopy(model).train()
    for m in train.batch_norms(reference):
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for x, u, labels in batches:
            reference(x, noise=u, labels=labels)
    train.refresh_batch_norm(model, batches)
    ours, theirs = list(model.buffers()), list(reference.buffers())
    assert len(ours) == len(theirs) > 10 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize('flow_norm', [False, True])
def test_refreshed_batch_norm_makes_eval_mode_match_train_mode(flow_norm):
    """After a refresh on a batch, eval mode (running statistics) gives the NLL that train mode (batch statistics)
    gives for the same images and noise: exactly, once BatchNorm's unbiased running variance (n / (n - 1)) is
    undone, and within 1% as it is; the stale statistics the model had are far off. With --flow-norm, the flow's
    own batch norms (and their log-dets) are refreshed too."""
    model = tiny_model(1, 8, 2, flow_norm=flow_norm)   # statistics settled on other batches and other weights
    assert any(isinstance(m, BatchNormFlow) for m in train.batch_norms(model)) == flow_norm
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    x = torch.randint(0, 256, (256, 1, 8, 8)).double() / 255
    u = torch.rand_like(x)
    loss_fn = RealNVPLoss(reduction='none')
    counts = {}
    hooks = [m.register_forward_hook(lambda m, inp, out: counts.__setitem__(m, inp[0].numel() // inp[0].shape[1]))
             for m in train.batch_norms(model)]
    with torch.no_grad():
        model.train()
        train_nll = loss_fn(*model(x, noise=u))
        for h in hooks:
            h.remove()
        model.eval()
        stale_nll = loss_fn(*model(x, noise=u))
        momenta = [m.momentum for m in train.batch_norms(model)]
        train.refresh_batch_norm(model, [(x, u, None)])
        assert not model.training and [m.momentum for m in train.batch_norms(model)] == momenta
        eval_nll = loss_fn(*model(x, noise=u))
        for m in train.batch_norms(model):
            m.running_var.mul_((counts[m] - 1) / counts[m])
        biased_nll = loss_fn(*model(x, noise=u))
    assert (biased_nll - train_nll).abs().max() < 1e-9 * train_nll.abs().max()
    assert ((eval_nll - train_nll) / train_nll).abs().max() < 0.01
    # the stale statistics are far off (less so with the flow's own normalisation, which keeps z near unit scale)
    assert ((stale_nll - train_nll) / train_nll).abs().max() > (0.05 if flow_norm else 0.5)
    # several batches: the plain average of their statistics
    halves = [(x[:128], u[:128], None), (x[128:], u[128:], None)]
    train.refresh_batch_norm(model, halves)
    first = train.batch_norms(model)[0]    # the first coupling's s/t net sees the masked logits y * b
    b = checkerboard_mask(8, 8, dtype=torch.float64)
    means = [(model.preprocess(xx, uu)[0] * b).mean() for xx, uu, _ in halves]
    assert torch.allclose(first.running_mean, torch.stack(means).mean().reshape(1), rtol=0, atol=1e-12)
