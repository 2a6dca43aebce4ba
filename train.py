"""Train RealNVP on MNIST (or CIFAR-10) by maximum likelihood.

    python train.py --epochs 10                       # the lecture's model, MNIST 14x14, all digits
    python train.py --digits 0 2 --epochs 1           # the lecture's subset
    python train.py --resume runs/<run>/last.pt       # continue exactly where it stopped
    torchrun --nproc_per_node 2 train.py ...          # several processes (DistributedDataParallel)

Each run writes to its own folder: config.json, train.log, metrics.csv, curves.png,
samples_epochNNN.png, last.pt and best.pt (by test bpd).
"""
import argparse
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
import signal
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from enum import Enum

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import realnvp as R


# The training recipes: settings that --recipe fills in where no flag gives them.
RECIPES = {
    'default': dict(lr=1e-3, weight_decay=5e-5, warmup_steps=0, lr_decay=0.2, ema_decay=0.999, bn_refresh=10,
                    flow_norm=True, t_bound=R.DEFAULT_T_BOUND),
    'lecture': dict(lr=1e-3, weight_decay=0.0, warmup_steps=0, lr_decay=0.0, ema_decay=0.0, bn_refresh=0,
                    flow_norm=False, t_bound=0.0),
}
OLD_RECIPE = 'lecture'  # the recipe of checkpoints written before --recipe existed
BEFORE_FLAGS = dict(lr_decay=0.0)  # what checkpoints written before these flags existed ran with


def unit_interval(text):
    return R._number(float, text, lambda v: 0.0 <= v < 1.0, 'a number in [0, 1)')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--epochs', type=R.non_negative_int, default=10, help='passes over the training set (default 10)')
    a('--batch-size', type=R.positive_int, default=128,
      help='images per optimizer step, over all processes (default 128). Every step gets exactly this many: the '
           'last batch of an epoch is filled up from the start of that epoch\'s shuffled order, so each image is '
           'seen at least once an epoch and a compiled step never meets a second shape')
    a('--recipe', choices=tuple(RECIPES), default=None,
      help='default: the paper\'s batch normalisation of each coupling\'s output (--flow-norm), bounded '
           'translations (--t-bound), a weight average, batch-norm statistics recomputed for it, the paper\'s L2 '
           'penalty and the learning rate lowered to 0 over the last 20%% of the run (see README); lecture: the '
           'lecture notebook\'s model and Adam at 1e-3 and nothing else. The flags below marked [recipe], '
           '--flow-norm and --t-bound override single settings of it (default: default)')
    a('--lr', type=R.positive_float, default=None, help='[recipe] Adam learning rate (default 1e-3; lecture 1e-3)')
    a('--weight-decay', type=R.non_negative_float, default=None,
      help='[recipe] L2 penalty on the weight-norm scales only, as in the RealNVP paper (default 5e-5; lecture 0)')
    a('--warmup-steps', type=R.non_negative_int, default=None, metavar='N',
      help='[recipe] raise the learning rate linearly over the first N steps (default 0; lecture 0)')
    a('--lr-decay', type=unit_interval, default=None, metavar='F',
      help='[recipe] lower the learning rate linearly to 0 over the last fraction F of the run\'s --epochs '
           '(resuming with another --epochs moves it) (default 0.2; lecture 0)')
    a('--ema-decay', type=unit_interval, default=None, metavar='D',
      help='[recipe] evaluate, sample and save the average of the weights over about 1/(1-D) steps; 0 keeps '
           'the trained weights (default 0.999; lecture 0)')
    a('--bn-refresh', type=R.non_negative_int, default=None, metavar='N',
      help='[recipe] before each evaluation, sample grid and checkpoint, recompute the batch-norm statistics of '
           'the weights that are saved over N training batches; 0 keeps the running averages (default 10; '
           'lecture 0)')
    a('--max-grad-norm', type=R.positive_float, default=100.0, help='clip the gradient norm to this (default 100)')
    R.add_model_args(p)
    a('--digits', type=int, nargs='+', default=None, metavar='D',
      help='keep only these labels, e.g. --digits 0 2 as in the lecture (default: all)')
    a('--dataset', choices=R.DATASETS, default='mnist', help='data set (default mnist)')
    a('--data-dir', default='./data', help='folder holding MNIST/raw/ (torchvision layout) (default ./data)')
    a('--out-dir', default=None, help='run folder (default: runs/<date-time>, or the folder of --resume)')
    a('--seed', type=R.seed, default=0, help='seed for weights, batches and dequantisation noise (default 0)')
    a('--resume', default=None, metavar='PATH',
      help='continue from a last.pt (or best.pt) of an earlier run, in its own folder; a checkpoint older than '
           'that folder\'s last.pt is refused there (it would overwrite it): give a new --out-dir to branch')
    a('--max-steps', type=R.positive_int, default=None, metavar='N',
      help='stop once N optimizer steps are done in all (for quick runs; counts across --resume)')
    a('--sample-every', type=R.positive_int, default=1, metavar='N',
      help='write a sample grid after the first epoch and every N epochs (default 1)')
    a('--log-every', type=R.positive_int, default=10, metavar='N',
      help='refresh the progress bar\'s bpd every N steps (reading it costs a device sync); with several '
           'processes, Ctrl-C is also acted on at these steps (default 10)')
    a('--max-bad-steps', type=R.positive_int, default=20, metavar='N',
      help='stop when N steps in a row had a non-finite loss or gradient (default 20)')
    a('--device', default=None, help='cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU)')
    a('--amp', action=argparse.BooleanOptionalAction, default=None,
      help='bf16 autocast for the s/t networks (training, the batch-norm refresh and the test bpd); couplings, '
           'log-dets and loss stay fp32. Faster at the same bpd where the hardware has bf16 (CUDA GPUs of compute '
           'capability 8.0+; CPUs with AVX-512 BF16 or AMX: 1.6x on one). Default: on exactly there; the '
           'choice is printed at start and saved in config.json')
    a('--compile', action='store_true',
      help='torch.compile the model with static shapes; on CUDA with CUDA graphs (mode reduce-overhead), which '
           'takes the launch overhead of its thousands of small kernels away. Compiling takes minutes; on a CPU '
           'it gains little')
    a('--deterministic', action='store_true',
      help='deterministic kernels only (torch.use_deterministic_algorithms, no cuDNN autotuning), so that a '
           '--resume on CUDA continues bit-exactly as it does on a CPU; a little slower')
    a('--num-threads', type=R.positive_int, default=None, help='CPU threads for PyTorch (default: its own choice)')
    return p


# What --resume does with each flag: FROZEN ones define the model, the data or the optimisation and come from
# the checkpoint (giving another value is an error); KEPT ones also come from it unless given again; PER_RUN
# ones belong to this invocation alone. Every flag of build_parser() is in exactly one (tested).
FROZEN, KEPT, PER_RUN = 'frozen', 'kept', 'per-run'
RESUME_POLICY = {
    **dict.fromkeys(('batch_size', 'recipe', 'lr', 'weight_decay', 'warmup_steps', 'lr_decay', 'ema_decay',
                     'max_grad_norm', 'num_scales', 'mid_channels', 'num_blocks', 'image_size', 'flow_norm',
                     't_bound', 'digits', 'dataset', 'seed', 'amp'),
                    FROZEN),
    **dict.fromkeys(('epochs', 'sample_every', 'log_every', 'max_bad_steps', 'data_dir', 'bn_refresh'), KEPT),
    **dict.fromkeys(('out_dir', 'resume', 'max_steps', 'device', 'compile', 'deterministic', 'num_threads'),
                    PER_RUN),
}


def given_flags(parser, argv):
    """The dests of the options written on the command line."""
    words = {w.split('=', 1)[0] for w in argv if w.startswith('--')}
    return {a.dest for a in parser._actions if words & set(a.option_strings)}


def parse_args(parser, argv=None):
    """(args, checkpoint or None, device): the flags with --resume's policy applied; bad input exits 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.digits = sorted(set(args.digits)) if args.digits else None
    try:
        ckpt = apply_resume_policy(args, given_flags(parser, argv))
        fill_recipe(args)
        device = R.pick_device(args.device)
        if args.amp is None:
            args.amp = R.native_bf16(device)[0]
        config = R.config_from_args(args)  # the architecture can take these sizes
        R.check_memory(config.activation_bytes(args.batch_size), f'a training step of {args.batch_size} images '
                       f'at {args.image_size}x{args.image_size}', 'a smaller --batch-size or --image-size')
        if ckpt is not None and args.max_steps and args.max_steps <= ckpt['step']:
            raise ValueError(f'--max-steps {args.max_steps} is not past the checkpoint\'s step {ckpt["step"]}: '
                             f'there is nothing to train')
        if args.out_dir:
            R.check_writable_folder(args.out_dir, f'--out-dir {args.out_dir}')
            check_run_folder(args, ckpt)
        name_run(args, ckpt)
        return args, ckpt, device
    except ValueError as e:
        parser.error(str(e))


def check_run_folder(args, ckpt):
    """A run folder holds one run: a new run only starts in a folder without checkpoints, and a resumed run only
    writes into its own folder, never over a newer last.pt. A resume into a new folder branches: a new run."""
    last = os.path.join(args.out_dir, 'last.pt')
    held = [n for n in ('last.pt', 'best.pt') if os.path.exists(os.path.join(args.out_dir, n))]
    if ckpt is None:
        if held:
            raise ValueError(f'{args.out_dir} already holds {held[0]}; pass --resume '
                             f'{os.path.join(args.out_dir, held[0])} to continue it, or another --out-dir')
        return
    if not held:
        return  # a branch into a fresh folder
    if not os.path.exists(last):
        raise ValueError(f'{args.out_dir} holds best.pt but no last.pt: another run\'s folder; pass another --out-dir')
    if os.path.samefile(last, args.resume):
        return  # the folder's own newest checkpoint
    theirs = torch.load(last, map_location='cpu', weights_only=True)
    if not same_run(theirs, ckpt, last, args.resume):
        raise ValueError(f'{args.out_dir} holds another run (id {theirs.get("run_id", "none")}) than {args.resume} '
                         f'(id {ckpt.get("run_id", "none")}); resume into the checkpoint\'s own folder, or branch '
                         f'with a new --out-dir')
    if theirs['step'] > ckpt['step']:
        raise ValueError(f'{last} is at step {theirs["step"]}, past {args.resume} (step {ckpt["step"]}); resuming '
                         f'would overwrite it: to branch from this checkpoint pass a new --out-dir')


def name_run(args, ckpt):
    """args.run_id: the checkpoint's when resuming in its own folder, a new one for a new run or a branch
    (which records in args.branched_from the run, or for older checkpoints the file, it came from)."""
    own_folder = ckpt is not None and os.path.exists(os.path.join(args.out_dir, 'last.pt'))
    args.run_id = ckpt.get('run_id') if own_folder and ckpt.get('run_id') else uuid.uuid4().hex[:12]
    args.branched_from = ckpt.get('run_id', args.resume) if ckpt is not None and not own_folder else None


def same_run(theirs, ckpt, last, resume):
    """Whether the checkpoint at `last` and the one being resumed belong to one run: by run id, or, for
    checkpoints from before run ids, by being in the same folder."""
    if theirs.get('run_id') and ckpt.get('run_id'):
        return theirs['run_id'] == ckpt['run_id']
    return os.path.samefile(os.path.dirname(os.path.abspath(last)), os.path.dirname(os.path.abspath(resume)))


def apply_resume_policy(args, given):
    """With --resume: load the checkpoint, refuse changed FROZEN flags, take FROZEN and KEPT ones from it."""
    if not args.resume:
        return None
    model, ckpt = R.load_checkpoint(args.resume)  # one-line errors for a missing, corrupt or misfitting file
    recipe = ckpt.get('args', {}).get('recipe') or OLD_RECIPE
    saved = {**RECIPES[recipe], **BEFORE_FLAGS, **ckpt.get('args', {}), 'recipe': recipe,
             'flow_norm': model.config.flow_norm, 't_bound': model.config.t_bound}   # the checkpoint's model
    saved['digits'] = sorted(set(saved['digits'])) if saved.get('digits') else None
    if 'optimizer' not in ckpt or 'rng' not in ckpt or 'step' not in ckpt:
        raise ValueError(f'{args.resume} holds weights but not the state to resume from (optimizer, step, random '
                         f'numbers); sample.py and evaluate.py can use it, or start a new run')
    for key, policy in RESUME_POLICY.items():
        if policy == FROZEN and key in given and getattr(args, key) != saved.get(key):
            raise ValueError(f'--{key.replace("_", "-")} differs from the checkpoint\'s ({saved.get(key)!r}); '
                             f'a resumed run keeps its settings: drop the flag or start a new run')
        if policy != PER_RUN and key in saved and key not in given:
            setattr(args, key, saved[key])
    if args.out_dir is None:
        args.out_dir = os.path.dirname(os.path.abspath(args.resume))
    return ckpt


def fill_recipe(args):
    """Settings no flag (and no checkpoint) gave come from --recipe."""
    args.recipe = args.recipe or 'default'
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def new_run_dir():
    stamp = time.strftime('%Y%m%d-%H%M%S')
    path, k = os.path.join('runs', stamp), 1
    while os.path.exists(path):
        path, k = os.path.join('runs', f'{stamp}-{k}'), k + 1
    return path


# -----------------------------------------------------------------------------
# processes: one, or several under torchrun


class Dist:
    """One process: rank 0 of 1, and every collective is the identity. `Dist.start` returns the
    multi-process `TorchDist` under torchrun, so the training code never asks how many processes there are."""

    def __init__(self, device):
        self.rank, self.world, self.device = 0, 1, device
        self.sync_every = 1  # steps between stop checks; one process checks its own flag every step

    @staticmethod
    def start(device, log_every):
        return TorchDist(device, log_every) if int(os.environ.get('WORLD_SIZE', '1')) > 1 else Dist(device)

    def all_reduce(self, tensor, op='sum'):
        return tensor

    def any(self, flag):
        return flag

    def broadcast(self, obj):
        return obj

    def gather(self, obj):
        return [obj]

    def shard(self, tensor):
        return tensor

    def wrap(self, model):
        return model

    def average_buffers(self, model):
        pass

    def check_ranks_agree(self, model, log):
        pass

    def close(self):
        pass


class TorchDist(Dist):
    """Several processes started by torchrun: gloo on the CPU, NCCL on CUDA (one GPU a process)."""

    def __init__(self, device, log_every):
        super().__init__(device)
        if device.type == 'cuda':
            self.device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
            torch.cuda.set_device(self.device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                device_id=self.device if device.type == 'cuda' else None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sync_every = log_every  # agreeing on a stop costs an all-reduce and a host sync

    def all_reduce(self, tensor, op='sum'):
        dist.all_reduce(tensor, op={'sum': dist.ReduceOp.SUM, 'max': dist.ReduceOp.MAX}[op])
        return tensor

    def any(self, flag):
        return self.all_reduce(torch.tensor(float(flag), device=self.device), 'max').item() > 0

    def broadcast(self, obj):
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def shard(self, tensor):
        return tensor[self.rank::self.world]

    def wrap(self, model):
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == 'cuda' else None)

    def average_buffers(self, model):
        """Average the batch-norm running statistics over the ranks: each saw only its own batches."""
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.AVG)

    def check_ranks_agree(self, model, log):
        """Every rank must hold the same weights and statistics: compare digests, say so in the log."""
        digest = hashlib.sha256()
        for value in model.state_dict().values():
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        digests = self.gather(digest.hexdigest())
        if len(set(digests)) == 1:
            log(f'weights identical across {self.world} ranks (sha256 {digests[0][:12]})')
        else:
            log(f'warning: the {self.world} ranks ended with different weights ({", ".join(d[:12] for d in digests)})')

    def close(self):
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# run folder: log, metrics, plots


class Run:
    """The run folder. Only rank 0 writes; every other rank gets a Run that writes nothing."""

    def __init__(self, out_dir, active):
        """Rank 0 creates the folder and holds an exclusive lock on it for the run's lifetime (the kernel drops
        it when the process ends, however it ends); a second training into the same folder exits with one line."""
        self.dir, self.active, self.writes = out_dir, active, 0
        if active:
            os.makedirs(out_dir, exist_ok=True)
            self.lock = open(self.path('.lock'), 'a+')
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.lock.seek(0)
                R.die('train.py', f'{out_dir} is in use by another training (pid {self.lock.read().strip() or "?"}); '
                                  f'wait for it to end, or pass another --out-dir')
            self.lock.truncate(0)
            self.lock.write(f'{os.getpid()}\n')
            self.lock.flush()
            for name in os.listdir(out_dir):   # temporaries of a process that died mid-write (we hold the lock)
                if re.fullmatch(r'.+\.tmp\d+', name):
                    os.remove(self.path(name))

    def path(self, name):
        return os.path.join(self.dir, name)

    def log(self, message):
        if self.active:
            tqdm.write(message)
            with open(self.path('train.log'), 'a') as f:
                f.write(message + '\n')

    def write_json(self, name, obj):
        if self.active:
            with open(self.path(name), 'w') as f:
                json.dump(obj, f, indent=2)

    def metrics(self, upto_epoch):
        """The rows of metrics.csv up to `upto_epoch` (rows past it belong to epochs a resume redoes)."""
        if not self.active or not os.path.isfile(self.path('metrics.csv')):
            return []
        try:
            with open(self.path('metrics.csv')) as f:
                return [row for row in csv.DictReader(f) if int(row['epoch']) <= upto_epoch]
        except (KeyError, ValueError, TypeError, UnicodeDecodeError):
            R.die('train.py', f'{self.path("metrics.csv")} is not a metrics file of train.py; move it away to resume '
                              f'(a new one is written from this point on)')

    def write_metrics(self, rows):
        if not self.active or not rows:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
        R.write_atomically(text.getvalue().encode(), self.path('metrics.csv'))
        self._wrote()
        plot_curves(rows, self.path('curves.png'))
        self._wrote()

    def write_checkpoint(self, blob, name):
        if self.active:
            R.write_atomically(blob, self.path(name))
            self._wrote()

    def write_grid(self, images, name):
        R.save_grid(images, self.path(name))
        self._wrote()

    def _wrote(self):
        """Test hook for the crash-order tests: with REALNVP_KILL_AFTER_WRITES=N in the environment, the process
        kills itself (SIGKILL, as a crash would) right after the N-th file it writes."""
        self.writes += 1
        if self.writes == int(os.environ.get('REALNVP_KILL_AFTER_WRITES', '0')):
            os.kill(os.getpid(), signal.SIGKILL)


def plot_curves(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [int(r['epoch']) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [float(r['train_bpd']) for r in rows], 'o-', label='train')
    ax.plot(epochs, [float(r['test_bpd']) for r in rows], 's-', label='test')
    ax.set_xlabel('epoch')
    ax.set_ylabel('bits per dimension')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the training step


class Update:
    """What a training step does after its backward pass: clip the gradient norm, decide whether the step is bad
    (a non-finite loss or gradient, on any process), put the batch-norm buffers back if it is, and step the
    optimizer unless it is.

    A fused Adam (CUDA, CPU) reads the decision from `found_inf`, one device buffer kept for the whole run, and
    leaves weights and moments untouched when it is 1, so nothing here asks the host; any other optimizer asks
    it whether to step. `compile=True` compiles the two halves around the processes' agreement (clip and
    decide; put back and hand over the decision), with CUDA graphs on CUDA as the net (`compile_model`). The
    optimizer step itself stays outside: torch does not trace into fused optimizers (it is one multi-tensor
    launch per parameter group), and its capturable non-fused form, the one torch can compile, runs only on
    accelerators, where it could not be tested here."""

    def __init__(self, optimizer, max_grad_norm, dist=None, compile=False):
        self.optimizer, self.max_grad_norm, self.dist = optimizer, max_grad_norm, dist or Dist(None)
        self.params = [p for g in optimizer.param_groups for p in g['params']]
        self.fused = bool(optimizer.defaults.get('fused'))
        if self.fused:
            optimizer.found_inf = torch.zeros((), device=self.params[0].device)
        self.check, self.commit = self._check, self._commit
        if compile:
            mode = 'reduce-overhead' if self.params[0].is_cuda else None
            self.check, self.commit = (torch.compile(f, mode=mode, dynamic=False)
                                       for f in (self._check, self._commit))

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group['lr'] = lr

    def apply(self, loss, buffers, before):
        """Returns bad: 1.0 when the step was skipped, as a 0-dim device tensor."""
        bad = self.dist.all_reduce(self.check(loss), 'max')
        self.commit(bad, buffers, before)
        if self.fused or not bad.item():
            self.optimizer.step()
        return bad

    def _check(self, loss):
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        return (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()

    def _commit(self, bad, buffers, before):
        for buffer, old in zip(buffers, before):
            buffer.copy_(torch.where(bad > 0, old, buffer))
        if self.fused:
            self.optimizer.found_inf.copy_(bad)


def train_step(model, update, loss_fn, x, autocast):
    """One optimizer step: a non-finite loss or gradient skips the update (an `Update`) and leaves every piece of
    state (weights, optimizer moments, batch-norm statistics) as it was. Returns (loss, bad) as 0-dim device
    tensors."""
    buffers = list(model.buffers())
    before = [b.clone() for b in buffers]
    with autocast:
        z, sldj = model(x, validate=False)
    loss = loss_fn(z.float(), sldj.float())
    update.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loss = loss.detach()
    return loss, update.apply(loss, buffers, before)


# -----------------------------------------------------------------------------
# the run


def compile_model(net, device):
    """torch.compile for training: static shapes (every batch is full, `fill_batches`); on CUDA, CUDA graphs,
    with each call of the compiled net starting a new step (the last step's graph outputs are no longer needed)."""
    compiled = torch.compile(net, mode='reduce-overhead' if device.type == 'cuda' else None, dynamic=False)
    if device.type == 'cuda':
        compiled.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
    return compiled


def set_determinism(deterministic, device):
    """cuDNN autotuning on CUDA unless --deterministic, which asks torch for deterministic kernels everywhere
    (a kernel without one warns and runs; cuBLAS needs its workspace setting before CUDA starts)."""
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = device.type == 'cuda' and not deterministic
    torch.backends.cudnn.deterministic = deterministic


def learning_rate(args, step, total):
    """--lr for optimizer step `step` (from 0) of a run of `total` steps: raised linearly over the first
    --warmup-steps, lowered linearly to 0 over the last --lr-decay of the run, constant between."""
    warmup = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    decay_steps = args.lr_decay * total
    decay = min(1.0, max(0.0, (total - step) / decay_steps)) if decay_steps else 1.0
    return args.lr * warmup * decay


def fill_batches(order, steps, batch_size):
    """The first steps * batch_size entries of `order` repeated: the last batch is filled up from the start."""
    needed = steps * batch_size
    return order.repeat(math.ceil(needed / len(order)))[:needed]


@dataclass
class TrainState:
    """Where a run is: saved in every checkpoint as plain top-level entries, restored by --resume."""
    epoch: int = 0
    step: int = 0
    best_bpd: float = float('inf')
    skipped: int = 0         # non-finite steps skipped so far
    epoch_loss: float = 0.0  # the current epoch's summed loss (nats x images) and image count, for a
    epoch_count: float = 0.0  # resume in the middle of an epoch

    @classmethod
    def from_checkpoint(cls, ckpt):
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})


@dataclass
class Learner:
    """What training changes: the model, its optimizer, and the average of its weights."""
    model: R.RealNVP
    optimizer: torch.optim.Optimizer
    average: R.WeightAverage


@dataclass
class Data:
    """The data as uint8 on the device: the whole training split, and this process's share of the test split."""
    train: torch.Tensor
    test: torch.Tensor
    n_test: int        # images in the whole test split
    fingerprint: dict  # sizes and a hash of both splits, kept in checkpoints: a resume must see the same data


class Stop(Enum):
    """Why a run leaves before its last epoch ends (None: it did not)."""
    NON_FINITE = 'non-finite loss or gradient'
    INTERRUPTED = 'interrupted'
    MAX_STEPS = 'reached --max-steps'


class Trainer:
    """The steps of a run: train epochs, end each one (evaluate, checkpoint, log, plot, sample), save, stop."""

    def __init__(self, args, run, dist, learner, data, state):
        self.args, self.run, self.dist, self.state, self.data = args, run, dist, state, data
        self.model, self.average = learner.model, learner.average
        model = self.model
        self.device = dist.device
        net = dist.wrap(model)
        self.net = compile_model(net, self.device) if args.compile else net
        self.update = Update(learner.optimizer, args.max_grad_norm, dist, compile=args.compile)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
        self.loss_fn = R.RealNVPLoss()
        self.sampler = DistributedSampler(range(len(data.train)), num_replicas=dist.world, rank=dist.rank,
                                          shuffle=True, seed=args.seed)
        self.local_batch = args.batch_size // dist.world
        self.steps_per_epoch = math.ceil(len(self.sampler) / self.local_batch)
        self.nats_per_bpd = model.shape[0] * model.shape[1] * model.shape[2] * math.log(2)
        self.fixed_z = torch.randn((64, *model.shape), generator=torch.Generator().manual_seed(args.seed)).to(self.device)
        self.rows = run.metrics(upto_epoch=state.epoch)
        self.signal = None
        self.non_finite = None  # the name of a tensor that went non-finite, when one did
        zero = torch.zeros((), device=self.device)
        self.consecutive_bad, self.skipped = zero.clone(), zero.clone()  # skipped: not yet in state.skipped

    def fit(self):
        """Train to --epochs (or an early stop) and return the exit code."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.announce()
            stop = None
            while stop is None and self.state.epoch < self.args.epochs:
                stop = self.train_epoch()
                if stop is None:
                    stop = self.end_epoch()
            code = self.leave(stop)
            self.dist.check_ranks_agree(self.model, self.run.log)
            return code
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame):
        self.signal = signum  # acted on at the next stop check, after the current step

    def announce(self):
        args, s = self.args, self.state
        if not os.path.exists(self.run.path('config.json')):
            self.run.write_json('config.json', dict(run_id=args.run_id, branched_from=args.branched_from,
                                                    args=vars(args), model=asdict(self.model.config),
                                                    data=self.data.fingerprint, world_size=self.dist.world))
        if args.resume:
            self.run.log(f'resumed from {args.resume} at epoch {s.epoch}, step {s.step}'
                         + (f', branching into {self.run.dir} as run {args.run_id}' if args.branched_from else ''))
        else:
            self.run.log(f'run folder {self.run.dir}; run {args.run_id}; seed {args.seed}; device {self.device}; '
                         f'{self.dist.world} process(es)')
        native, hardware = R.native_bf16(self.device)
        self.run.log(f'bf16 autocast {"on" if args.amp else "off"} (the default on {hardware}: '
                     f'{"on" if native else "off"}; --amp or --no-amp chooses)')
        n_params = sum(p.numel() for p in self.model.parameters())
        self.run.log(f'{args.dataset} {args.image_size}x{args.image_size}: {len(self.data.train)} train, '
                     f'{self.data.n_test} test images; {n_params / 1e6:.2f}M parameters')
        self.run.log('training')

    def train_epoch(self):
        """Train the rest of the current epoch; return why it stopped early, or None."""
        s, args = self.state, self.args
        self.sampler.set_epoch(s.epoch)
        order = fill_batches(torch.tensor(list(self.sampler), device=self.device), self.steps_per_epoch,
                             self.local_batch)
        first = s.step - s.epoch * self.steps_per_epoch   # batches of this epoch already done (resume)
        self.totals = torch.tensor([s.epoch_loss, s.epoch_count], device=self.device, dtype=torch.float64)
        self.model.train()
        bar = tqdm(range(first, self.steps_per_epoch), desc=f'epoch {s.epoch + 1}/{args.epochs}',
                   disable=not self.run.active, initial=first, total=self.steps_per_epoch, dynamic_ncols=True)
        self.t0, self.seen = time.time(), 0
        for i in bar:
            self.step(order[i * self.local_batch:(i + 1) * self.local_batch])
            stop = self.stop_check(bar, last=i == self.steps_per_epoch - 1)
            if stop is not None:
                bar.close()
                s.epoch_loss, s.epoch_count = self.totals.tolist()
                self._fold_skipped()
                return stop
        bar.close()
        return None

    def step(self, idx):
        x = self.data.train[idx].float() / 255.0                     # (b, C, H, W) in [0, 1]
        self.update.set_lr(learning_rate(self.args, self.state.step, self.args.epochs * self.steps_per_epoch))
        loss, bad = train_step(self.net, self.update, self.loss_fn, x, self.autocast)
        self.average.update(self.model, self.state.step + 1)
        self.totals += torch.stack([torch.where(bad > 0, 0.0, loss.double() * len(idx)),
                                    (1.0 - bad).double() * len(idx)])
        self.consecutive_bad = (self.consecutive_bad + 1) * bad
        self.skipped += bad
        self.state.step += 1
        self.seen += len(idx) * self.dist.world

    def stop_check(self, bar, last):
        """Refresh the progress bar every --log-every steps; return why training must stop now, or None."""
        s, args = self.state, self.args
        if s.step % args.log_every == 0 or last:
            loss, count = self.totals.tolist()
            bar.set_postfix(bpd=f'{loss / max(count, 1) / self.nats_per_bpd:.3f}',
                            img_s=f'{self.seen / (time.time() - self.t0):.1f}')
            if self.consecutive_bad.item() >= args.max_bad_steps:
                return Stop.NON_FINITE
        if (s.step % self.dist.sync_every == 0 or last) and self.dist.any(self.signal is not None):
            return Stop.INTERRUPTED
        if args.max_steps and s.step >= args.max_steps:
            return Stop.MAX_STEPS
        return None

    def _fold_skipped(self):
        self.state.skipped += int(self.skipped.item())
        self.skipped.zero_()

    def end_epoch(self):
        """Evaluate, checkpoint, log, plot and sample at the end of an epoch, with last.pt written last: it is
        the commit point, so a crash before it is redone by --resume and a crash after it has lost nothing.
        Returns Stop.NON_FINITE when there is nothing finite to save."""
        s = self.state
        loss, count = self.dist.all_reduce(self.totals).tolist()
        train_bpd = loss / count / self.nats_per_bpd
        users = self.users_model()
        bpd = self.test_bpd(users)
        epoch_time = time.time() - self.t0
        s.epoch, s.epoch_loss, s.epoch_count = s.epoch + 1, 0.0, 0.0
        self._fold_skipped()
        is_best = bpd < s.best_bpd
        if is_best:
            s.best_bpd = bpd
        blob = self.checkpoint(users)
        if self.non_finite:
            return Stop.NON_FINITE
        if is_best:
            self.run.write_checkpoint(blob, 'best.pt')
        self.rows.append(dict(epoch=s.epoch, step=s.step, train_bpd=f'{train_bpd:.5f}', test_bpd=f'{bpd:.5f}',
                              skipped_steps=s.skipped, seconds=f'{epoch_time:.1f}',
                              images_per_s=f'{self.seen / epoch_time:.1f}'))
        self.run.write_metrics(self.rows)
        if self.run.active and (s.epoch == 1 or s.epoch % self.args.sample_every == 0):
            self.run.write_grid(users.decode(self.fixed_z).cpu(), f'samples_epoch{s.epoch:03d}.png')
        self.run.write_checkpoint(blob, 'last.pt')
        self.run.log(f'epoch {s.epoch}: train bpd {train_bpd:.4f}, test bpd {bpd:.4f}{" (best)" if is_best else ""}, '
                     f'{epoch_time:.0f}s, {self.seen / epoch_time:.1f} images/s, {s.skipped} skipped steps')
        return None

    def users_model(self):
        """The model that evaluation, sample grids and checkpoints get: the weight average, with batch-norm
        statistics recomputed for its weights over --bn-refresh training batches (with 0, the trained model's
        running statistics). The trained model itself is left as it is, so training goes on unchanged."""
        self.dist.average_buffers(self.model)
        users = self.average.model
        if self.args.bn_refresh:
            with self.autocast:   # the statistics of the density training optimises
                R.refresh_batch_norm(users, self.refresh_batches())
        else:
            for mine, trained in zip(users.buffers(), self.model.buffers()):
                mine.copy_(trained)
        return users

    def refresh_batches(self):
        """--bn-refresh batches of training images with their dequantisation noise, drawn from a generator
        seeded by the seed and the step: the same on every rank and after a resume, and the training
        random numbers are not touched."""
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.step)
        n = min(len(self.data.train), self.args.bn_refresh * self.args.batch_size)
        for idx in torch.randperm(len(self.data.train), generator=g)[:n].split(self.args.batch_size):
            x = self.data.train[idx.to(self.device)].float() / 255.0
            yield x, torch.rand(x.shape, generator=g).to(self.device)

    def test_bpd(self, users):
        """Test bpd of the users' model over the whole test split (each process evaluates its share), under
        --amp's autocast: the density function training optimised."""
        with self.autocast:
            nll = R.nll_per_image(users, self.data.test, batch_size=1024).double()
        total = self.dist.all_reduce(torch.stack([nll.sum(), torch.tensor(float(len(nll)), device=self.device,
                                                                          dtype=torch.float64)]))
        return (total[0] / total[1]).item() / self.nats_per_bpd

    def checkpoint(self, users):
        """The checkpoint, serialised (None on ranks other than 0): the config, the users' model (`model`: what
        sample.py and evaluate.py load), the trained model and optimizer, the arguments, every rank's RNG and
        the TrainState. When anything is not finite it sets `self.non_finite` to the tensor's name on every rank
        (they hold the same tensors) instead: such a checkpoint is never written."""
        rng = {'cpu': torch.get_rng_state(),
               'cuda': torch.cuda.get_rng_state(self.device) if self.device.type == 'cuda' else None}
        rngs = self.dist.gather(rng)
        obj = dict(config=asdict(self.model.config), model=users.state_dict(), train_model=self.model.state_dict(),
                   optimizer=self.update.optimizer.state_dict(), args=vars(self.args), rng=rngs,
                   run_id=self.args.run_id, data=self.data.fingerprint, world_size=self.dist.world,
                   **asdict(self.state))
        bad = R.non_finite_tensor({k: obj[k] for k in ('model', 'train_model', 'optimizer')})
        if bad is not None:
            self.non_finite = bad
            return None
        return R.checkpoint_bytes(obj) if self.run.active else None

    def leave(self, stop):
        """The one way out of `fit`: log why, save where there is something to keep, return the exit code."""
        s, last = self.state, self.run.path('last.pt')
        if stop is None:
            self.run.log(f'done: step {s.step}, best test bpd {s.best_bpd:.4f}; checkpoints in {self.run.dir}'
                         if s.epoch > 0 else f'done: --epochs {self.args.epochs} trains nothing; no checkpoint written')
            return 0
        if stop == Stop.NON_FINITE:
            why = (f'{self.non_finite} is not finite' if self.non_finite else
                   f'{int(self.consecutive_bad.item())} steps in a row had a non-finite loss or gradient')
            self.run.log(f'stopping at step {s.step}: {why}; lower --lr or --max-grad-norm. '
                         f'Nothing was saved: the last checkpoint is untouched.')
            return 1
        blob = self.checkpoint(self.users_model())
        if self.non_finite:
            return self.leave(Stop.NON_FINITE)
        self.run.write_checkpoint(blob, 'last.pt')
        why = 'interrupted' if stop == Stop.INTERRUPTED else f'reached --max-steps {self.args.max_steps}'
        self.run.log(f'{why} at step {s.step}: saved {last}; continue with --resume {last}')
        return 130 if stop == Stop.INTERRUPTED else 0


# -----------------------------------------------------------------------------
# main


def load_data(args, dist, ckpt):
    """The run's data on the device; missing, empty or (on --resume) other data exits 1 with one line."""
    try:
        train_set, test_set = (R.ImageDataset(args.dataset, args.data_dir, train=train, img_size=args.image_size,
                                              digits=args.digits) for train in (True, False))
    except (R.DataNotFoundError, ValueError) as e:
        R.die('train.py', e)
    for name, split in (('training', train_set), ('test', test_set)):
        if len(split) == 0:
            R.die('train.py', f'the {name} split in {args.data_dir} has no images')
    fingerprint = data_fingerprint(train_set.images, test_set.images)
    if ckpt is not None and ckpt.get('data', fingerprint) != fingerprint:
        R.die('train.py', f'the data in {args.data_dir} ({fingerprint["train"]} train, {fingerprint["test"]} test '
                          f'images) are not the data this run trained on ({ckpt["data"]["train"]} train, '
                          f'{ckpt["data"]["test"]} test images, another hash); point --data-dir at those')
    return Data(train=train_set.images.to(dist.device), test=dist.shard(test_set.images).to(dist.device),
                n_test=len(test_set), fingerprint=fingerprint)


def data_fingerprint(train, test):
    digest = hashlib.sha256()
    for images in (train, test):
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images.contiguous().numpy().tobytes())
    return dict(train=len(train), test=len(test), sha256=digest.hexdigest()[:16])


def restore(ckpt, learner, dist, seed):
    """The TrainState to start from: fresh, or the checkpoint's, with its trained weights and weight average,
    optimizer and this rank's RNG. (First-round checkpoints hold only the trained weights: the average starts
    from them.)"""
    torch.manual_seed(seed + dist.rank)  # dequantisation noise differs per rank
    if ckpt is None:
        return TrainState()
    learner.model.load_state_dict(ckpt.get('train_model', ckpt['model']))
    learner.average.model.load_state_dict(ckpt['model'])
    learner.optimizer.load_state_dict(ckpt['optimizer'])
    rng = ckpt['rng'][min(dist.rank, len(ckpt['rng']) - 1)]   # a run resumed on fewer processes takes rank 0's
    torch.set_rng_state(rng['cpu'])
    if dist.device.type == 'cuda' and rng['cuda'] is not None:
        torch.cuda.set_rng_state(rng['cuda'], dist.device)
    return TrainState.from_checkpoint(ckpt)


def main(argv=None):
    parser = build_parser()
    args, ckpt, device = parse_args(parser, argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    set_determinism(args.deterministic, device)
    dist = Dist.start(device, args.log_every)
    try:
        if args.batch_size % dist.world != 0:
            parser.error(f'--batch-size {args.batch_size} must be divisible by the {dist.world} processes')
        args.out_dir = dist.broadcast(args.out_dir or new_run_dir())
        data = load_data(args, dist, ckpt)
        run = Run(args.out_dir, active=dist.rank == 0)   # holds the folder's lock from here on
        if run.active:
            try:
                check_run_folder(args, ckpt)   # again, under the lock: a run may have finished there meanwhile
            except ValueError as e:
                R.die('train.py', e)
        torch.manual_seed(args.seed)
        model = R.RealNVP(R.config_from_args(args)).to(dist.device)
        learner = Learner(model, R.make_optimizer(model, args.lr, args.weight_decay, dist.device),
                          R.WeightAverage(model, args.ema_decay))
        state = restore(ckpt, learner, dist, args.seed)
        return Trainer(args, run, dist, learner, data, state).fit()
    except R.CheckpointError as e:   # a full disk, a folder gone: the files there before are untouched
        R.die('train.py', e)
    finally:
        dist.close()


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print('train.py: interrupted before training started; nothing was saved', file=sys.stderr)
        sys.exit(130)
