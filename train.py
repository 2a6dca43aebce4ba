"""Train RealNVP on MNIST (or CIFAR-10) by maximum likelihood.

    python train.py --epochs 10                       # the default model and recipe, MNIST 14x14, all digits
    python train.py --recipe lecture --digits 0 2     # the lecture notebook's model and training, its subset
    python train.py --resume runs/<run>/last.pt       # continue exactly where it stopped
    torchrun --nproc_per_node 2 train.py ...          # several processes (DistributedDataParallel)

The default model is RealNVPConfig(): the lecture's architecture with the paper's batch normalisation after
every coupling, bounded translations and a learned prior. The default recipe trains it with Adam at 1e-3, the
paper's L2 penalty on the weight-norm scales, a weight average whose batch-norm statistics are recomputed before
each evaluation, and the learning rate lowered to 0 over the last 20% of the run. `--recipe lecture` is the
lecture's model trained as the lecture trains it.

Each run writes to its own folder: config.json, train.log, metrics.csv, curves.png,
samples_epochNNN.png, last.pt and best.pt (by test bpd).
"""
import argparse
import copy
import math
import os
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from tqdm import tqdm

import plumbing as P
from realnvp import (DATASETS, BatchNormFlow, RealNVP, RealNVPConfig, RealNVPLoss, bits_per_dim, get_param_groups,
                     in_mode, nll_per_image, to_unit)

# The two recipes, each complete: every training setting and the model it trains.
RECIPES = {
    'default': dict(lr=1e-3, weight_decay=5e-5, warmup_steps=0, lr_decay=0.2, ema_decay=0.999, bn_refresh=10,
                    **P.model_flags(RealNVPConfig())),
    'lecture': dict(lr=1e-3, weight_decay=0.0, warmup_steps=0, lr_decay=0.0, ema_decay=0.0, bn_refresh=0,
                    **P.model_flags(RealNVPConfig.lecture())),
}

EVAL_BATCH = 1024   # test images a forward pass of the end-of-epoch evaluation takes

# What --resume does with each flag: FROZEN ones define the model, the data or the optimisation and come from
# the checkpoint (giving another value is an error); KEPT ones also come from it unless given again; PER_RUN
# ones belong to this invocation alone. Every flag of build_parser() is in exactly one (tested).
FROZEN, KEPT, PER_RUN = 'frozen', 'kept', 'per-run'
RESUME_POLICY = {
    **dict.fromkeys(('batch_size', 'recipe', 'lr', 'weight_decay', 'warmup_steps', 'lr_decay', 'ema_decay',
                     'max_grad_norm', 'num_scales', 'mid_channels', 'num_blocks', 'image_size', 'flow_norm',
                     't_bound', 'conditional', 'learned_prior', 'digits', 'dataset', 'seed', 'amp'), FROZEN),
    **dict.fromkeys(('epochs', 'sample_every', 'log_every', 'max_bad_steps', 'data_dir', 'bn_refresh'), KEPT),
    **dict.fromkeys(('out_dir', 'resume', 'max_steps', 'device', 'compile', 'deterministic', 'num_threads'), PER_RUN),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a('--epochs', type=P.non_negative_int, default=10, help='passes over the training set (default 10)')
    a('--batch-size', type=P.positive_int, default=128, help='images per optimizer step, over all processes; the '
      'last batch of an epoch is filled up from the start of the epoch\'s order (default 128)')
    a('--recipe', choices=tuple(RECIPES), default='default',
      help='default: the model and training described above; lecture: the lecture notebook\'s model and Adam at '
           '1e-3, nothing else. The flags marked [recipe] and the model\'s flags override single settings of it')
    a('--lr', type=P.positive_float, help='[recipe] Adam learning rate (default 1e-3; lecture 1e-3)')
    a('--weight-decay', type=P.non_negative_float,
      help='[recipe] L2 penalty on the weight-norm scales only, as in the RealNVP paper (default 5e-5; lecture 0)')
    a('--warmup-steps', type=P.non_negative_int, metavar='N', help='[recipe] raise the learning rate linearly over '
      'the first N steps (default 0; lecture 0)')
    a('--lr-decay', type=P.unit_interval, metavar='F',
      help='[recipe] lower the learning rate linearly to 0 over the last fraction F of the run\'s --epochs '
           '(default 0.2; lecture 0)')
    a('--ema-decay', type=P.unit_interval, metavar='D',
      help='[recipe] evaluate, sample and save the average of the weights over about 1/(1-D) steps; 0 keeps '
           'the trained weights (default 0.999; lecture 0)')
    a('--bn-refresh', type=P.non_negative_int, metavar='N',
      help='[recipe] before each evaluation, sample grid and checkpoint, recompute the batch-norm statistics of '
           'the saved weights over N training batches; 0 keeps the running averages (default 10; lecture 0)')
    a('--max-grad-norm', type=P.positive_float, default=100.0, help='clip the gradient norm to this (default 100)')
    P.add_model_args(p)
    p.set_defaults(**RECIPES['default'])
    add_run_flags(p)
    return p


def add_run_flags(p):
    a = p.add_argument
    a('--digits', type=int, nargs='+', metavar='D', help='keep only these labels, e.g. --digits 0 2 as in the '
      'lecture (default: all)')
    a('--dataset', choices=DATASETS, default='mnist', help='data set (default mnist)')
    a('--data-dir', default='./data', help='folder holding MNIST/raw/ (torchvision layout) (default ./data)')
    a('--out-dir', help='run folder (default: runs/<date-time>-<run id>, or the folder of --resume)')
    a('--seed', type=P.seed, default=0, help='seed for weights, batches and dequantisation noise (default 0)')
    a('--resume', metavar='PATH',
      help='continue from a last.pt (or best.pt) of an earlier run, in its own folder; a checkpoint older than '
           'that folder\'s last.pt is refused there (it would overwrite it): give a new --out-dir to branch')
    a('--max-steps', type=P.positive_int, metavar='N', help='stop once N optimizer steps are done in all (for quick '
      'runs; counts across --resume)')
    a('--sample-every', type=P.positive_int, default=1, metavar='N', help='write a sample grid after the first '
      'epoch and every N epochs (default 1)')
    a('--log-every', type=P.positive_int, default=10, metavar='N',
      help='refresh the progress bar\'s bpd every N steps (reading it costs a device sync); with several '
           'processes, Ctrl-C is also acted on at these steps (default 10)')
    a('--max-bad-steps', type=P.positive_int, default=20, metavar='N', help='stop when N steps in a row had a '
      'non-finite loss or gradient (default 20)')
    a('--device', help='cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU)')
    a('--amp', action=argparse.BooleanOptionalAction, default=None,
      help='bf16 autocast for the s/t networks (training, the batch-norm refresh and the test bpd); couplings, '
           'log-dets and loss stay fp32. Faster at the same bpd where the hardware has bf16 (CUDA GPUs of compute '
           'capability 8.0+; CPUs with AVX-512 BF16 or AMX). Default: on exactly there; the choice is printed at '
           'start and saved in config.json')
    a('--compile', action='store_true',
      help='torch.compile the model with static shapes; on CUDA with CUDA graphs (mode reduce-overhead), which '
           'takes the launch overhead of its thousands of small kernels away. Compiling takes minutes')
    a('--deterministic', action='store_true',
      help='deterministic kernels only (no cuDNN autotuning), so that a --resume on CUDA continues bit-exactly '
           'as it does on a CPU; a little slower')
    a('--num-threads', type=P.positive_int, help='CPU threads for PyTorch (default: its own choice)')


def parse_args(argv=None):
    """(args, checkpoint or None, device): the flags, with the recipe's and --resume's settings; bad input exits 2."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    given = P.given_flags(build_parser, argv)
    args.digits = sorted(set(args.digits)) if args.digits else None
    try:
        for key, value in RECIPES[args.recipe].items():
            if key not in given:
                setattr(args, key, value)
        ckpt = resume_settings(args, given) if args.resume else None
        device = P.pick_device(args.device)
        if args.amp is None:
            args.amp = P.native_bf16(device)[0]
        config = P.config_from_args(args)  # the architecture can take these sizes
        P.check_memory(P.memory_needed(config, args.batch_size, EVAL_BATCH), f'training {args.batch_size} images a '
                       f'step at {args.image_size}x{args.image_size}', 'a smaller --batch-size or --image-size')
        if ckpt is not None and args.max_steps and args.max_steps <= ckpt['state']['step']:
            raise ValueError(f'--max-steps {args.max_steps} is not past the checkpoint\'s step '
                             f'{ckpt["state"]["step"]}: there is nothing to train')
        if ckpt is not None and args.epochs <= ckpt['state']['epoch']:
            raise ValueError(f'--epochs {args.epochs} is not past the checkpoint\'s epoch {ckpt["state"]["epoch"]}: '
                             f'there is nothing to train; give a larger --epochs')
        if args.out_dir:
            P.check_writable_folder(args.out_dir, f'--out-dir {args.out_dir}')
        return args, ckpt, device
    except ValueError as e:
        parser.error(str(e))


def resume_settings(args, given):
    """With --resume: load the checkpoint, refuse changed FROZEN flags, take FROZEN and KEPT ones from it."""
    model, ckpt = P.load_checkpoint(args.resume)  # one-line errors for a missing, corrupt or misfitting file
    defaults = {**vars(build_parser().parse_args([])), 'amp': True}   # the types the flags have once parsed
    P.check_resumable(ckpt, model, args.resume, {k: defaults[k] for k, p in RESUME_POLICY.items() if p != PER_RUN},
                      RECIPES, [f.name for f in fields(TrainState)])
    saved = ckpt['args']
    check_saved_values(saved, args.resume)
    for key, policy in RESUME_POLICY.items():
        if policy == FROZEN and key in given and getattr(args, key) != saved[key]:
            raise ValueError(f'--{key.replace("_", "-")} differs from the checkpoint\'s ({saved[key]!r}); '
                             f'a resumed run keeps its settings: drop the flag or start a new run')
        if policy != PER_RUN and key not in given:
            setattr(args, key, saved[key])
    args.out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.resume))
    return ckpt


def check_saved_values(saved, path):
    """Each saved flag that a resume takes passes the parser's own check, as if typed on the command line: a
    hand-edited checkpoint's batch size of 0 is refused here, in one line, before the folder is taken."""
    parser = build_parser()

    def refuse(message):
        raise P.CheckpointError(f'{path} cannot be resumed: its saved {message}; sample.py and evaluate.py can use '
                                f'its weights, or start a new run')
    parser.error = refuse   # argparse's documented way to handle errors otherwise than by exiting
    for key, policy in RESUME_POLICY.items():
        value = saved[key]
        if policy != PER_RUN and value is not None and not isinstance(value, bool):
            flag = '--' + key.replace('_', '-')
            parser.parse_args([flag, *map(str, value)] if isinstance(value, list) else [f'{flag}={value}'])


# -----------------------------------------------------------------------------
# The pieces of a run


@dataclass
class TrainState:
    """Where a run is: saved in every checkpoint (as `state`), restored by --resume."""
    epoch: int = 0
    step: int = 0
    best_bpd: float = float('inf')
    skipped: int = 0          # non-finite steps skipped so far
    epoch_loss: float = 0.0   # the current epoch's summed loss (nats x images) and image count, for a
    epoch_count: float = 0.0  # resume in the middle of an epoch
    seconds: float = 0.0      # spent in the training loop so far (evaluations and checkpoints aside)


class Stop(Exception):
    """Leave the training loop: why, the exit code, and whether there is something to save."""

    def __init__(self, why, code, save):
        self.why, self.code, self.save = why, code, save


def learning_rate(args, step, total):
    """--lr for optimizer step `step` (from 0) of a run of `total` steps: raised linearly over the first
    --warmup-steps, lowered linearly to 0 over the last --lr-decay of the run, constant between."""
    warmup = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    decay = min(1.0, max(0.0, (total - step) / (args.lr_decay * total))) if args.lr_decay and total else 1.0
    return args.lr * warmup * decay


def epoch_order(n, seed, epoch, steps, batch_size, dist):
    """This process's image indices for one epoch: a permutation seeded by the seed and the epoch (the same on
    every rank and after a resume), dealt out to the ranks, and repeated from its start to fill `steps` batches."""
    order = dist.shard(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)))
    return order.repeat(math.ceil(steps * batch_size / len(order)))[:steps * batch_size]


# -----------------------------------------------------------------------------
# The training step, the weight average and the batch-norm refresh


def make_optimizer(model, lr, weight_decay):
    """Adam over the lecture's `get_param_groups`, fused where PyTorch has a fused kernel (CUDA, CPU)."""
    return torch.optim.Adam(get_param_groups(model, weight_decay), lr=lr, fused=model.device.type in ('cuda', 'cpu'))


class SkipGuard:
    """A step whose loss or gradient is not finite, on any process (`reduce_max` takes the maximum over them),
    changes nothing: not the weights, not Adam's moments, not the batch-norm statistics its forward pass moved.
    Deciding costs one host sync a step."""

    def __init__(self, model, optimizer, max_grad_norm, reduce_max=lambda t: t):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.reduce_max = reduce_max
        self.params = [p for group in optimizer.param_groups for p in group['params']]
        self.buffers = {}   # {dtype: [buffer]}: each dtype's saved as one flat copy, a launch or two a step
        for buffer in model.buffers():
            self.buffers.setdefault(buffer.dtype, []).append(buffer)

    def snapshot(self):
        return [torch.cat([b.reshape(-1) for b in group]) for group in self.buffers.values()]

    def step(self, loss, before):
        """Clip the gradient norm, then step, or put the statistics back; returns True for a skipped step."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        bad = self.reduce_max((~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float())
        if not bad.item():
            self.optimizer.step()
            return False
        with torch.no_grad():
            for group, old in zip(self.buffers.values(), before):
                for buffer, part in zip(group, old.split([b.numel() for b in group])):
                    buffer.copy_(part.view_as(buffer))
        return True


def train_step(net, guard, loss_fn, x, autocast, labels=None):
    """One optimizer step of `net` (the model, or its DDP or compiled wrapper) on images x in [0, 1]: the s/t
    networks under `autocast`, the loss in fp32. Returns (the loss as a 0-dim tensor, whether it was skipped)."""
    before = guard.snapshot()
    with autocast:
        z, sldj = net(x, labels=labels)
    loss = loss_fn(z.float(), sldj.float())
    guard.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loss = loss.detach()
    return loss, guard.step(loss, before)


class WeightAverage:
    """Polyak averaging of a model's weights (Polyak & Juditsky 1992). `model` is a copy of the trained model whose
    parameters follow, after optimizer step t,
        a <- d_t a + (1 - d_t) w,   d_t = min(decay, (1 + t) / (10 + t)),
    so early on it averages over the few steps there are, later over about 1 / (1 - decay) steps. With decay 0 it
    is the trained weights. Its batch-norm statistics are not averaged: `refresh_batch_norm` sets them.

    torch's `swa_utils.AveragedModel` takes the weights of its first update as they are and has no warm-up; its
    EMA update function is used as it is."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        get_ema_multi_avg_fn(d)(list(self.model.parameters()), list(model.parameters()), None)


def batch_norms(model):
    """Every layer of `model` that keeps running statistics: the s/t nets' batch norms and the flow's."""
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, BatchNormFlow))]


@torch.no_grad()
def refresh_batch_norm(model, batches):
    """Recompute every batch-norm running statistic of `model` for its current weights: the plain average of the
    batch statistics over `batches` ((x in [0, 1], noise u, labels or None) triples), in train mode without
    gradients. Not `torch.optim.swa_utils.update_bn`: it calls `model(input)` without the dequantisation noise,
    which must come from the caller's generator, and knows only torch's own batch norms, not the flow's."""
    norms = batch_norms(model)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    try:
        with in_mode(model, True):
            for k, (x, noise, labels) in enumerate(batches, start=1):
                for m in norms:   # the k-th batch's share of a plain average, as momentum=None gives it
                    m.momentum = 1.0 / k
                model.flows(*model.preprocess(x, noise), labels=labels)   # a class prior has no statistics
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


# -----------------------------------------------------------------------------
# The run: train epochs, end each one (evaluate, checkpoint, log), stop


class Trainer:
    def __init__(self, args, run, dist, data, model, average, optimizer, state):
        self.args = args
        self.run = run
        self.dist = dist
        self.data = data
        self.state = state
        self.model = model
        self.average = average
        self.guard = SkipGuard(model, optimizer, args.max_grad_norm, dist.reduce_max)
        net = dist.wrap(model)
        self.net = P.compile_model(net, dist.device) if args.compile else net
        self.autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
        self.rows = run.read_metrics(state.epoch)
        self.loss_fn = RealNVPLoss()

    def fit(self):
        """Train to --epochs (or an early stop) and return the exit code."""
        with P.Interrupt() as interrupt:
            self.announce()
            try:
                while self.state.epoch < self.args.epochs and self.state.step < (self.args.max_steps or math.inf):
                    seconds, images = self.train_epoch(interrupt)
                    self.end_epoch(seconds, images)
            except Stop as stop:
                return self.leave(stop)
        s = self.state
        last = self.run.path('last.pt')
        if s.epoch < self.args.epochs:
            self.run.log(f'reached --max-steps {self.args.max_steps} at step {s.step}: saved {last}; continue with '
                         f'--resume {last}')
        elif s.epoch:
            self.run.log(f'done: step {s.step}, best test bpd {s.best_bpd:.4f}; checkpoints in {self.run.dir}')
        else:
            self.run.log(f'done: --epochs {self.args.epochs} trains nothing; no checkpoint written')
        self.dist.check_ranks_agree(self.model, self.run.log)
        return 0

    def announce(self):
        args = self.args
        s = self.state
        if args.resume:
            self.run.log(f'resumed from {args.resume} at epoch {s.epoch}, step {s.step}'
                         + (f', branching into {self.run.dir} as run {args.run_id}' if args.branched_from else ''))
        else:
            self.run.log(f'run folder {self.run.dir}; run {args.run_id}; seed {args.seed}; device {self.dist.device}; '
                         f'{self.dist.world} process(es)')
        native, hardware = P.native_bf16(self.dist.device)
        self.run.log(f'bf16 autocast {"on" if args.amp else "off"} (the default on {hardware}: '
                     f'{"on" if native else "off"}; --amp or --no-amp chooses)')
        self.run.log(f'{args.dataset} {args.image_size}x{args.image_size}: {len(self.data.train)} train, '
                     f'{self.data.n_test} test images; {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M '
                     f'parameters; recipe {args.recipe}{"; class-conditional" if args.conditional else ""}')
        self.run.log('training')

    def steps_per_epoch(self):
        return math.ceil(math.ceil(len(self.data.train) / self.dist.world) / (self.args.batch_size // self.dist.world))

    def train_epoch(self, interrupt):
        """Train the rest of the current epoch; returns its (seconds, images), or raises Stop."""
        s = self.state
        args = self.args
        steps = self.steps_per_epoch()
        batch = args.batch_size // self.dist.world
        order = epoch_order(len(self.data.train), args.seed, s.epoch, steps, batch, self.dist).to(self.dist.device)
        first = s.step - s.epoch * steps   # batches of this epoch already done (resume)
        totals = torch.tensor([s.epoch_loss, s.epoch_count], device=self.dist.device, dtype=torch.float64)
        bad_run = 0   # bad steps in a row
        self.model.train()
        t0 = time.time()
        images = 0
        with tqdm(range(first, steps), desc=f'epoch {s.epoch + 1}/{args.epochs}', disable=not self.run.active,
                  initial=first, total=steps, dynamic_ncols=True) as bar:
            try:
                for i in bar:
                    idx = order[i * batch:(i + 1) * batch]
                    for group in self.guard.optimizer.param_groups:
                        group['lr'] = learning_rate(args, s.step, args.epochs * steps)
                    labels = None if self.data.train_labels is None else self.data.train_labels[idx]
                    loss, bad = train_step(self.net, self.guard, self.loss_fn, to_unit(self.data.train[idx]),
                                           self.autocast, labels)
                    s.step += 1
                    images += batch * self.dist.world
                    bad_run = bad_run + 1 if bad else 0
                    s.skipped += bad
                    if not bad:
                        self.average.update(self.model, s.step)
                        totals += torch.stack([loss.double() * batch, torch.ones_like(totals[0]) * batch])
                    if s.step % args.log_every == 0 or i == steps - 1:
                        loss_sum, count = totals.tolist()
                        bar.set_postfix(bpd=f'{self.bpd(loss_sum / max(count, 1)):.3f}',
                                        img_s=f'{images / (time.time() - t0):.1f}')
                    self.check_stop(interrupt, bad_run, s.step % self.dist.sync_every == 0, i == steps - 1)
            finally:
                s.epoch_loss, s.epoch_count = totals.tolist()
                s.seconds += time.time() - t0
        return time.time() - t0, images

    def check_stop(self, interrupt, bad_run, sync, last):
        """Raise Stop after this step if --max-bad-steps steps in a row were bad, a signal came (read on all ranks
        when `sync`), or --max-steps is reached before the epoch's last step."""
        if bad_run >= self.args.max_bad_steps:
            raise Stop(f'{bad_run} steps in a row had a non-finite loss or gradient', 1, save=False)
        if sync and self.dist.any(interrupt.caught):
            raise Stop('interrupted', 130, save=True)
        if self.state.step == self.args.max_steps and not last:
            raise Stop(f'reached --max-steps {self.args.max_steps}', 0, save=True)

    def bpd(self, nats_per_image):
        return bits_per_dim(self.data.train[:1], nats_per_image)   # D from one image

    def end_epoch(self, seconds, images):
        """Evaluate, log, plot, sample and checkpoint at the end of an epoch: metrics.csv and the grid first, then
        best.pt, then last.pt, the commit point. A crash before last.pt is redone by --resume from last.pt (or from
        best.pt, which comes after this epoch's other files), and a crash after it has lost nothing."""
        s = self.state
        loss, count = self.dist.all_reduce(torch.tensor([s.epoch_loss, s.epoch_count], device=self.dist.device,
                                                        dtype=torch.float64)).tolist()
        train_bpd = self.bpd(loss / count) if count else float('nan')
        self.dist.average_buffers(self.model)   # each rank's statistics saw only its own batches: agree on them
        averaged = self.averaged_model()
        bpd = self.test_bpd(averaged)
        s.epoch, s.epoch_loss, s.epoch_count = s.epoch + 1, 0.0, 0.0
        is_best, s.best_bpd = bpd < s.best_bpd, min(bpd, s.best_bpd)
        blob = self.checkpoint(averaged)
        self.rows.append(dict(epoch=s.epoch, step=s.step, train_bpd=f'{train_bpd:.5f}', test_bpd=f'{bpd:.5f}',
                              skipped_steps=s.skipped, seconds=f'{seconds:.1f}',
                              images_per_s=f'{images / seconds:.1f}'))
        self.run.write_metrics(self.rows)
        if self.run.active and (s.epoch == 1 or s.epoch % self.args.sample_every == 0):
            classes = self.model.config.num_classes
            labels = P.class_labels(self.args.digits or range(classes), 8, self.dist.device) if classes else None
            z = torch.randn((64 if labels is None else len(labels), *self.model.shape),
                            generator=torch.Generator().manual_seed(self.args.seed)).to(self.dist.device)
            self.run.write_grid(averaged.decode(z, labels=labels).cpu(), f'samples_epoch{s.epoch:03d}.png')
        if is_best:
            self.run.write('best.pt', blob)
        self.run.write('last.pt', blob)
        self.run.log(f'epoch {s.epoch}: train bpd {train_bpd:.4f}, test bpd {bpd:.4f}{" (best)" if is_best else ""}, '
                     f'{seconds:.0f}s, {images / seconds:.1f} images/s, {s.skipped} skipped steps')

    def averaged_model(self):
        """The model that evaluation, sample grids and checkpoints get: the weight average, with batch-norm
        statistics recomputed for its weights over --bn-refresh training batches (with 0, the trained model's,
        averaged over the ranks). The trained model is left as it is: a run stopped here resumes exactly."""
        averaged = self.average.model
        if self.args.bn_refresh:
            with self.autocast:   # the statistics of the density training optimises
                refresh_batch_norm(averaged, self.refresh_batches())
        else:
            for mine, trained in zip(averaged.buffers(), self.model.buffers()):
                mine.copy_(trained)
            self.dist.average_buffers(averaged)
        return averaged

    def refresh_batches(self):
        """--bn-refresh batches of training images with their dequantisation noise (and labels, or None), drawn
        from a generator seeded by the seed and the step: the same on every rank and after a resume, and the
        training random numbers are not touched."""
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.step)
        labels = self.data.train_labels
        n = min(len(self.data.train), self.args.bn_refresh * self.args.batch_size)
        for idx in torch.randperm(len(self.data.train), generator=g)[:n].split(self.args.batch_size):
            x = to_unit(self.data.train[idx.to(self.dist.device)])
            yield x, torch.rand(x.shape, generator=g).to(self.dist.device), None if labels is None else labels[idx]

    def test_bpd(self, averaged):
        """Test bpd of the averaged model over the whole test split (each process evaluates its share), under
        --amp's autocast: the density function training optimised."""
        with self.autocast:
            nll = nll_per_image(averaged, self.data.test, EVAL_BATCH, labels=self.data.test_labels).double()
        total = self.dist.all_reduce(torch.stack([nll.sum(), nll.new_tensor(float(len(nll)))]))
        return self.bpd((total[0] / total[1]).item())

    def checkpoint(self, averaged):
        """The checkpoint, serialised on rank 0 (None elsewhere): the config, the averaged model (`model`: what
        sample.py and evaluate.py load), the trained model and optimizer, the arguments, every rank's RNG and
        batch-norm statistics, and the TrainState. Raises Stop, on every rank, when anything is not finite."""
        cuda = self.dist.device.type == 'cuda'
        rng = {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(self.dist.device) if cuda else None}
        state = asdict(self.state)   # with the epoch's totals so far summed over the ranks
        state['epoch_loss'], state['epoch_count'] = self.dist.all_reduce(torch.tensor(
            [state['epoch_loss'], state['epoch_count']], device=self.dist.device, dtype=torch.float64)).tolist()
        ckpt = dict(format=P.CHECKPOINT_FORMAT, config=asdict(self.model.config), model=averaged.state_dict(),
                    train_model=self.model.state_dict(), optimizer=self.guard.optimizer.state_dict(),
                    rank_buffers=self.dist.gather_buffers(self.model), args=vars(self.args),
                    rng=self.dist.gather(rng), run_id=self.args.run_id, data=self.data.fingerprint,
                    world_size=self.dist.world, state=state)
        bad = P.non_finite_tensor({k: ckpt[k] for k in ('model', 'train_model', 'optimizer')})
        if bad is not None:
            raise Stop(f'{bad} is not finite', 1, save=False)
        return P.checkpoint_bytes(ckpt) if self.run.active else None

    def leave(self, stop):
        """Log why the run stops early, save where there is something to keep, return the exit code."""
        last = self.run.path('last.pt')
        try:
            if stop.save:
                self.run.write('last.pt', self.checkpoint(self.averaged_model()))
                self.run.log(f'{stop.why} at step {self.state.step}: saved {last}; continue with --resume {last}')
                return stop.code
        except Stop as non_finite:
            stop = non_finite
        self.run.log(f'stopping at step {self.state.step}: {stop.why}; lower --lr or --max-grad-norm. Nothing was '
                     f'saved: the last checkpoint is untouched.')
        return stop.code


# -----------------------------------------------------------------------------
# Set-up


def main(argv=None):
    args, ckpt, device = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    P.set_determinism(args.deterministic, device)
    dist = P.Dist(device, args.log_every)
    run = None
    try:
        if args.batch_size % dist.world != 0:
            P.die('train.py', f'--batch-size {args.batch_size} must be divisible by the {dist.world} processes', 2)
        new_id = uuid.uuid4().hex[:12]
        default_dir = os.path.join('runs', time.strftime('%Y%m%d-%H%M%S-') + new_id[:4])
        args.out_dir = dist.broadcast(args.out_dir or default_dir)   # rank 0's, on every rank
        run = P.RunFolder(args.out_dir, active=dist.rank == 0)
        try:
            own = run.take(ckpt, args.resume) if run.active else None   # holds the lock from here on
            refused = None
        except P.FolderRefused as e:
            own = None
            refused = (str(e), e.code)
        own, refused = dist.broadcast((own, refused))
        if refused:
            P.die('train.py', *refused)
        args.run_id = own or dist.broadcast(new_id)
        args.branched_from = ckpt['run_id'] if ckpt is not None and own is None else None
        data = P.load_run_data(args, dist, ckpt)
        run.record(dict(run_id=args.run_id, branched_from=args.branched_from, args=vars(args), data=data.fingerprint,
                        model=asdict(P.config_from_args(args)), world_size=dist.world))
        if ckpt is not None and ckpt.get('world_size', 1) != dist.world:
            run.log(f'note: the run was saved by {ckpt.get("world_size", 1)} process(es) and resumes on {dist.world}: '
                    f'the batches are dealt out and dequantised otherwise from here on, so it will not match an '
                    f'uninterrupted run bit for bit')
        torch.manual_seed(args.seed)
        model = RealNVP(P.config_from_args(args)).to(dist.device)
        optimizer = make_optimizer(model, args.lr, args.weight_decay)
        average = WeightAverage(model, args.ema_decay)
        torch.manual_seed(args.seed + dist.rank)  # dequantisation noise differs per rank
        state = TrainState(**P.restore(ckpt, model, average, optimizer, dist.rank, dist.device) if ckpt else {})
        return Trainer(args, run, dist, data, model, average, optimizer, state).fit()
    except P.CheckpointError as e:   # a full disk, a folder gone: the files there before are untouched
        P.die('train.py', e)
    finally:
        if run is not None:
            run.close()
        dist.close()


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print('train.py: interrupted before training started; nothing was saved', file=sys.stderr)
        sys.exit(130)
