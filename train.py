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
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import realnvp as R

# On --resume, settings that define the model, the data or the optimisation come from the checkpoint
# (giving another value is an error); these others also come from it unless given again.
FROZEN_ON_RESUME = ('batch_size', 'lr', 'weight_decay', 'max_grad_norm', 'num_scales', 'mid_channels',
                    'num_blocks', 'image_size', 'digits', 'dataset', 'seed', 'amp')
KEPT_ON_RESUME = ('epochs', 'sample_every', 'log_every', 'max_bad_steps', 'data_dir')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--epochs', type=R.non_negative_int, default=10, help='passes over the training set (default 10)')
    a('--batch-size', type=R.positive_int, default=128, help='images per optimizer step, over all processes (default 128)')
    a('--lr', type=R.positive_float, default=1e-3, help='Adam learning rate (default 1e-3)')
    a('--weight-decay', type=R.non_negative_float, default=5e-5,
      help='L2 penalty on the weight-norm scales only, as in the RealNVP paper (default 5e-5)')
    a('--max-grad-norm', type=R.positive_float, default=100.0, help='clip the gradient norm to this (default 100)')
    a('--num-scales', type=R.positive_int, default=2, help='scales of the multi-scale architecture (default 2)')
    a('--mid-channels', type=R.positive_int, default=64, help='channels of the first scale\'s s/t ResNets (default 64)')
    a('--num-blocks', type=R.positive_int, default=8, help='residual blocks per s/t ResNet (default 8)')
    a('--image-size', type=R.positive_int, default=14,
      help='images are resized to this; must be a multiple of 2^(num_scales-1) (default 14)')
    a('--digits', type=int, nargs='+', default=None, metavar='D',
      help='keep only these labels, e.g. --digits 0 2 as in the lecture (default: all)')
    a('--dataset', choices=R.DATASETS, default='mnist', help='data set (default mnist)')
    a('--data-dir', default='./data', help='folder holding MNIST/raw/ (torchvision layout) (default ./data)')
    a('--out-dir', default=None, help='run folder (default: runs/<date-time>, or the folder of --resume)')
    a('--seed', type=int, default=0, help='seed for weights, batches and dequantisation noise (default 0)')
    a('--resume', default=None, metavar='PATH', help='continue from a last.pt (or best.pt) of an earlier run')
    a('--max-steps', type=R.positive_int, default=None, metavar='N',
      help='stop once N optimizer steps are done in all (for quick runs; counts across --resume)')
    a('--sample-every', type=R.positive_int, default=1, metavar='N',
      help='write a sample grid after the first epoch and every N epochs (default 1)')
    a('--log-every', type=R.positive_int, default=10, metavar='N',
      help='refresh the progress bar\'s bpd every N steps (reading it costs a device sync) (default 10)')
    a('--max-bad-steps', type=R.positive_int, default=20, metavar='N',
      help='stop when N steps in a row had a non-finite loss or gradient (default 20)')
    a('--device', default=None, help='cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU)')
    a('--amp', action='store_true', help='bf16 autocast for the s/t networks; couplings, log-dets and loss stay fp32')
    a('--compile', action='store_true', help='torch.compile the model (GPU)')
    a('--num-threads', type=R.positive_int, default=None, help='CPU threads for PyTorch (default: its own choice)')
    return p


# -----------------------------------------------------------------------------
# run folder: log, metrics, plots


class Run:
    """The run folder. Only rank 0 writes; every other rank gets a Run that writes nothing."""

    def __init__(self, out_dir, active):
        self.dir, self.active = out_dir, active
        if active:
            os.makedirs(out_dir, exist_ok=True)

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

    def metrics(self):
        if not os.path.isfile(self.path('metrics.csv')):
            return []
        with open(self.path('metrics.csv')) as f:
            return list(csv.DictReader(f))

    def write_metrics(self, rows):
        if not self.active or not rows:
            return
        with open(self.path('metrics.csv.tmp'), 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(self.path('metrics.csv.tmp'), self.path('metrics.csv'))
        plot_curves(rows, self.path('curves.png'))


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


def save_grid(images, path, nrow=None):
    from torchvision.utils import save_image
    save_image(images, path, nrow=nrow or math.ceil(math.sqrt(len(images))), padding=1, pad_value=1.0)


# -----------------------------------------------------------------------------
# the training step


def train_step(model, optimizer, loss_fn, x, max_grad_norm, autocast, sync_flag=None):
    """One optimizer step: a non-finite loss or gradient skips the update.

    A fused Adam (CUDA, CPU) reads `found_inf` on the device and leaves weights and moments untouched
    when it is 1, so the step needs no host sync; any other optimizer asks the host. Returns (loss, bad)
    as 0-dim tensors on the device."""
    with autocast:
        z, sldj = model(x, validate=False)
    loss = loss_fn(z.float(), sldj.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for g in optimizer.param_groups for p in g['params']], max_grad_norm)
    bad = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
    if sync_flag is not None:
        sync_flag(bad)  # under DDP every rank must skip the same steps
    if optimizer.defaults.get('fused'):
        optimizer.found_inf = bad
        optimizer.step()
    elif not bad.item():
        optimizer.step()
    return loss.detach(), bad


# -----------------------------------------------------------------------------
# main


def setup_distributed():
    """(rank, world_size, local_rank); starts the process group when launched by torchrun."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        return 0, 1, 0
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    dist.init_process_group(backend)
    return dist.get_rank(), world, int(os.environ.get('LOCAL_RANK', '0'))


def new_run_dir():
    stamp = time.strftime('%Y%m%d-%H%M%S')
    path, k = os.path.join('runs', stamp), 1
    while os.path.exists(path):
        path, k = os.path.join('runs', f'{stamp}-{k}'), k + 1
    return path


def given_flags(parser, argv):
    """The dests of the options written on the command line."""
    words = {w.split('=', 1)[0] for w in argv if w.startswith('--')}
    return {a.dest for a in parser._actions if words & set(a.option_strings)}


def resolve_args(parser, args, argv):
    """Apply --resume (settings from the checkpoint) and check what argparse cannot."""
    ckpt = None
    if args.resume:
        _, ckpt = R.load_checkpoint(args.resume)  # one-line errors for a missing, corrupt or misfitting file
        saved, given = ckpt.get('args', {}), given_flags(parser, argv)
        for key in FROZEN_ON_RESUME:
            if key in given and getattr(args, key) != saved.get(key):
                raise ValueError(f'--{key.replace("_", "-")} differs from the checkpoint\'s ({saved.get(key)!r}); '
                                 f'a resumed run keeps its settings: drop the flag or start a new run')
        for key in FROZEN_ON_RESUME + KEPT_ON_RESUME:
            if key in saved and key not in given:
                setattr(args, key, saved[key])
        if args.out_dir is None:
            args.out_dir = os.path.dirname(os.path.abspath(args.resume))
    R.RealNVPConfig(in_channels=3 if args.dataset == 'cifar10' else 1, img_size=args.image_size,
                    num_scales=args.num_scales, mid_channels=args.mid_channels, num_blocks=args.num_blocks).validate()
    if args.out_dir and not args.resume:
        for name in ('last.pt', 'best.pt'):
            if os.path.exists(os.path.join(args.out_dir, name)):
                raise ValueError(f'{args.out_dir} already holds {name}; pass --resume {os.path.join(args.out_dir, name)} '
                                 f'to continue it, or another --out-dir')
    return ckpt


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        ckpt = resolve_args(parser, args, argv)
        device = R.pick_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    rank, world, local_rank = setup_distributed()
    if device.type == 'cuda' and world > 1:
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if args.batch_size % world != 0:
        parser.error(f'--batch-size {args.batch_size} must be divisible by the {world} processes')
    if args.out_dir is None:
        args.out_dir = new_run_dir()
    if world > 1:
        holder = [args.out_dir]
        dist.broadcast_object_list(holder, src=0)
        args.out_dir = holder[0]
    # Data: the whole split as uint8 on the device; batches are drawn there.
    try:
        train_set = R.ImageDataset(args.dataset, args.data_dir, train=True, img_size=args.image_size, digits=args.digits)
        test_set = R.ImageDataset(args.dataset, args.data_dir, train=False, img_size=args.image_size, digits=args.digits)
    except (R.DataNotFoundError, ValueError) as e:
        R.die('train.py', e)
    run = Run(args.out_dir, active=rank == 0)

    train_images = train_set.images.to(device)
    test_images = test_set.images[rank::world].to(device)

    # Model, optimizer, state.
    torch.manual_seed(args.seed)
    model = R.RealNVP(in_channels=train_images.shape[1], img_size=args.image_size, num_scales=args.num_scales,
                      mid_channels=args.mid_channels, num_blocks=args.num_blocks).to(device)
    optimizer = R.make_optimizer(model, args.lr, args.weight_decay, device)
    state = dict(epoch=0, step=0, best_bpd=float('inf'), skipped=0, epoch_loss=0.0, epoch_count=0)
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        state.update({k: ckpt[k] for k in state})
    torch.manual_seed(args.seed + rank)  # dequantisation noise differs per rank
    if ckpt is not None:
        rng = ckpt['rng'][min(rank, len(ckpt['rng']) - 1)]   # a run resumed on fewer processes takes rank 0's
        torch.set_rng_state(rng['cpu'])
        if device.type == 'cuda' and rng['cuda'] is not None:
            torch.cuda.set_rng_state(rng['cuda'], device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    net = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        net = torch.compile(net)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    loss_fn = R.RealNVPLoss()
    sync_flag = (lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX)) if world > 1 else None
    fixed_z = torch.randn((64, *model.shape), generator=torch.Generator().manual_seed(args.seed)).to(device)

    config = model.config
    if ckpt is None:
        run.write_json('config.json', dict(args=vars(args), model=asdict(config), world_size=world))
        run.log(f'run folder {run.dir}; seed {args.seed}; device {device}; {world} process(es)')
    else:
        run.log(f'resumed from {args.resume} at epoch {state["epoch"]}, step {state["step"]}')
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f'{args.dataset} {args.image_size}x{args.image_size}: {len(train_set)} train, {len(test_set)} test images; '
            f'{n_params / 1e6:.2f}M parameters')
    rows = [r for r in run.metrics() if int(r['epoch']) <= state['epoch']] if rank == 0 else []

    sampler = DistributedSampler(range(len(train_set)), num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    local_batch = args.batch_size // world
    steps_per_epoch = math.ceil(len(sampler) / local_batch)
    D = model.shape[0] * model.shape[1] * model.shape[2]

    stop = {'signal': None}

    def request_stop(signum, frame):
        stop['signal'] = signum

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint(*paths):
        sync_buffers()
        rng = {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None}
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if rank == 0:
            obj = dict(config=asdict(config), model=model.state_dict(), optimizer=optimizer.state_dict(),
                       args=vars(args), rng=rngs, world_size=world, **state)
            for path in paths:
                R.save_checkpoint(obj, path)

    def stop_requested():
        if sync_flag is None:
            return stop['signal'] is not None
        flag = torch.tensor(float(stop['signal'] is not None), device=device)
        sync_flag(flag)  # every rank stops at the same step
        return flag.item() > 0

    def sync_buffers():
        """Average the batch-norm running statistics over the ranks: each saw only its own batches."""
        if world > 1:
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer, op=dist.ReduceOp.AVG)

    def test_bpd():
        sync_buffers()
        nll = R.nll_per_image(model, test_images, batch_size=512).double()
        total = torch.stack([nll.sum(), torch.tensor(float(len(nll)), device=device, dtype=torch.float64)])
        if world > 1:
            dist.all_reduce(total)
        return (total[0] / total[1]).item() / (D * math.log(2))

    run.log('training')
    try:
        exit_code = train_loop(args, state, run, net, model, optimizer, loss_fn, autocast, sync_flag, sampler,
                               train_images, local_batch, steps_per_epoch, world, rank, device, D,
                               checkpoint, stop_requested, test_bpd, fixed_z, rows)
        if world > 1:
            check_ranks_agree(model, run, world)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if world > 1:
            dist.destroy_process_group()
    return exit_code


def check_ranks_agree(model, run, world):
    """Under DDP every rank must hold the same weights and statistics: compare digests, say so in the log."""
    import hashlib
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    digests = [None] * world
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) == 1:
        run.log(f'weights identical across {world} ranks (sha256 {digests[0][:12]})')
    else:
        run.log(f'warning: the {world} ranks ended with different weights ({", ".join(d[:12] for d in digests)})')


def train_loop(args, state, run, net, model, optimizer, loss_fn, autocast, sync_flag, sampler, train_images,
               local_batch, steps_per_epoch, world, rank, device, D, checkpoint, stop_requested, test_bpd,
               fixed_z, rows):
    consecutive_bad = torch.zeros((), device=device)
    skipped = torch.zeros((), device=device)  # skipped steps not yet added to state['skipped']

    def fold_skipped():
        state['skipped'] += int(skipped.item())
        skipped.zero_()
    while state['epoch'] < args.epochs:
        epoch = state['epoch']
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        first = state['step'] - epoch * steps_per_epoch   # batches of this epoch already done (resume)
        epoch_loss = torch.tensor(state['epoch_loss'], device=device, dtype=torch.float64)
        epoch_count = torch.tensor(state['epoch_count'], device=device, dtype=torch.float64)
        model.train()
        bar = tqdm(range(first, steps_per_epoch), desc=f'epoch {epoch + 1}/{args.epochs}', disable=rank != 0,
                   initial=first, total=steps_per_epoch, dynamic_ncols=True)
        t0, seen = time.time(), 0
        for i in bar:
            idx = order[i * local_batch:(i + 1) * local_batch]
            x = train_images[idx].float() / 255.0                  # (b, C, H, W) in [0, 1]
            loss, bad = train_step(net, optimizer, loss_fn, x, args.max_grad_norm, autocast, sync_flag)
            good = 1.0 - bad
            epoch_loss += torch.where(bad > 0, 0.0, loss.double() * len(idx))
            epoch_count += good * len(idx)
            consecutive_bad = (consecutive_bad + 1) * bad
            skipped += bad
            state['step'] += 1
            seen += len(idx) * world
            if state['step'] % args.log_every == 0 or i == steps_per_epoch - 1:
                bar.set_postfix(bpd=f'{epoch_loss.item() / max(epoch_count.item(), 1) / (D * math.log(2)):.3f}',
                                img_s=f'{seen / (time.time() - t0):.1f}')
                if consecutive_bad.item() >= args.max_bad_steps:
                    bar.close()
                    run.log(f'stopping: {int(consecutive_bad.item())} steps in a row had a non-finite loss or '
                            f'gradient (step {state["step"]}); lower --lr or --max-grad-norm. '
                            f'The last good checkpoint is untouched.')
                    return 1
            interrupted = stop_requested()
            if interrupted or (args.max_steps and state['step'] >= args.max_steps):
                bar.close()
                state.update(epoch_loss=epoch_loss.item(), epoch_count=epoch_count.item())
                fold_skipped()
                checkpoint(run.path('last.pt'))
                why = 'interrupted' if interrupted else f'reached --max-steps {args.max_steps}'
                run.log(f'{why} at step {state["step"]}: saved {run.path("last.pt")}; '
                        f'continue with --resume {run.path("last.pt")}')
                return 130 if interrupted else 0
        bar.close()

        # End of epoch: evaluate, checkpoint, log, plot, sample.
        totals = torch.stack([epoch_loss, epoch_count])
        if world > 1:
            dist.all_reduce(totals)
        train_bpd = (totals[0] / totals[1]).item() / (D * math.log(2))
        bpd = test_bpd()
        epoch_time = time.time() - t0
        state.update(epoch=epoch + 1, epoch_loss=0.0, epoch_count=0.0)
        fold_skipped()
        is_best = bpd < state['best_bpd']
        if is_best:
            state['best_bpd'] = bpd
        checkpoint(run.path('last.pt'), *([run.path('best.pt')] if is_best else []))
        rows.append(dict(epoch=epoch + 1, step=state['step'], train_bpd=f'{train_bpd:.5f}', test_bpd=f'{bpd:.5f}',
                         skipped_steps=state['skipped'], seconds=f'{epoch_time:.1f}',
                         images_per_s=f'{seen / epoch_time:.1f}'))
        run.write_metrics(rows)
        run.log(f'epoch {epoch + 1}: train bpd {train_bpd:.4f}, test bpd {bpd:.4f}{" (best)" if is_best else ""}, '
                f'{epoch_time:.0f}s, {seen / epoch_time:.1f} images/s, {state["skipped"]} skipped steps')
        if rank == 0 and (epoch == 0 or (epoch + 1) % args.sample_every == 0):
            save_grid(model.decode(fixed_z).cpu(), run.path(f'samples_epoch{epoch + 1:03d}.png'))
    run.log(f'done: step {state["step"]}, best test bpd {state["best_bpd"]:.4f}; checkpoints in {run.dir}')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print('train.py: interrupted before training started; nothing was saved', file=sys.stderr)
        sys.exit(130)
