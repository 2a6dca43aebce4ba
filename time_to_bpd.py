"""Test bpd against training time: the lecture notebook's own code, `train.py --recipe lecture` and train.py's
default, on MNIST, each evaluated at the same steps with the clock stopped.

    python time_to_bpd.py runs/curves --data-dir ../shared/data --lecture ../shared/seed/000_*.txt --amp --num-threads 2

Writes DIR/time_to_bpd.csv, .json (with the time each curve takes to reach the lecture code's last figure) and .png.
Each recipe's curve is one train.py run, stopped by --max-steps at every point and resumed (which continues exactly
as one run); its seconds are those its checkpoints record for the training loop.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import redirect_stdout

import torch

import bench
import plumbing as P
import train
from realnvp import ImageDataset, bits_per_dim, nll_per_image, to_unit

CURVE_TEST_IMAGES = 2000   # test images at every point but the last, which takes the whole split


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a('out', metavar='DIR', help='a new folder for the curves and the two recipes\' runs')
    a('--lecture', required=True, metavar='NOTEBOOK', help='the lecture notebook\'s text file, whose code is a curve')
    a('--data-dir', default='./data', help='the folder holding MNIST/raw/ (default ./data)')
    a('--steps', type=P.positive_int, nargs='+', default=[25, 50, 100, 150, 200, 250, 300], metavar='N',
      help='the steps at which each training is evaluated, rising (default 25 50 100 150 200 250 300)')
    a('--batch-size', type=P.positive_int, default=128, help='images per step (default 128)')
    a('--amp', action='store_true', help='bf16 autocast for the recipes, as train.py --amp')
    a('--device', default=None, help='cpu, cuda, cuda:N or mps (default: the best there is)')
    a('--num-threads', type=P.positive_int, default=None, help='CPU threads')
    P.add_model_args(p)
    return p


def curve_bpd(nll_fn, images, last):
    """Test bpd from `nll_fn` (uint8 batch -> NLL in nats per image) on the first CURVE_TEST_IMAGES test images,
    or all of them at the `last` point."""
    images = images if last else images[:CURVE_TEST_IMAGES]
    return bits_per_dim(images, torch.cat([nll_fn(batch) for batch in images.split(500)]).double().mean()).item()


def lecture_curve(args, config, train_images, test_images, device):
    """[(step, training seconds, test bpd)] of the lecture's own code (bench.lecture_training) on batches of a seeded
    permutation of the training images; evaluated in eval mode with the clock stopped."""
    torch.manual_seed(0)
    model, loss_fn, step = bench.lecture_training(args.lecture, config, device)
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
    order = order.repeat(math.ceil(args.steps[-1] * args.batch_size / len(order)))

    def nll(batch):   # each image gets its batch's mean NLL (the lecture's loss): the mean over images stays exact
        return loss_fn(*model(to_unit(batch.to(device)), reverse=False)).expand(len(batch))
    points = []
    seconds = 0.0
    done = 0
    for steps in args.steps:
        model.train()
        start = time.perf_counter()
        for i in range(done, steps):
            step(to_unit(train_images[order[i * args.batch_size:(i + 1) * args.batch_size]].to(device)))
        bench.synchronize(device)
        seconds += time.perf_counter() - start
        done = steps
        model.eval()
        with torch.no_grad():
            points.append((steps, seconds, curve_bpd(nll, test_images, steps == args.steps[-1])))
    return points


def recipe_curve(recipe, args, folder, test_images, epochs):
    """[(step, training seconds, test bpd)] of `python train.py --recipe RECIPE --epochs EPOCHS`, stopped by
    --max-steps at each point and resumed; the bpd is the saved model's (fp32, as evaluate.py). train.py's
    messages go to stderr."""
    settings = ['--recipe', recipe, '--data-dir', args.data_dir, '--epochs', str(epochs), '--seed', '0',
                '--batch-size', str(args.batch_size), '--image-size', str(args.image_size),
                '--num-scales', str(args.num_scales), '--mid-channels', str(args.mid_channels),
                '--num-blocks', str(args.num_blocks), '--amp' if args.amp else '--no-amp',
                *(['--device', args.device] if args.device else []),
                *(['--num-threads', str(args.num_threads)] if args.num_threads else [])]
    points = []
    last = os.path.join(folder, 'last.pt')
    for steps in args.steps:
        where = ['--resume', last] if points else ['--out-dir', folder, *settings]
        with redirect_stdout(sys.stderr):
            code = train.main([*where, '--max-steps', str(steps)])
        if code != 0:
            raise ValueError(f'train.py --recipe {recipe} stopped before step {steps}: see {folder}/train.log')
        model, ckpt = P.load_checkpoint(last)
        bpd = curve_bpd(lambda batch: nll_per_image(model, batch), test_images, steps == args.steps[-1])
        points.append((steps, ckpt['state']['seconds'], bpd))
    return points


def time_to_reach(points, bpd):
    """The training seconds at which a curve first reaches `bpd`, by linear interpolation between its points
    (None if it does not)."""
    previous = (0, 0.0, math.inf)
    for point in points:
        if point[2] <= bpd:
            (_, t0, b0), (_, t1, b1) = previous, point
            return t1 if math.isinf(b0) else t0 + (t1 - t0) * (b0 - bpd) / (b0 - b1)
        previous = point
    return None


def plot(result, path, title):
    """Test bpd against training minutes, one line a curve, the lecture code's last figure dashed. The axis stops
    1.5 bpd above that figure: a point beyond it (an unstable evaluation) is drawn at the top as a triangle."""
    target = result['target_bpd']
    top = target + 1.5
    fig, ax = P.pyplot().subplots(figsize=(7, 4.5))
    for name, points in result['curves'].items():
        minutes = [p['seconds'] / 60 for p in points]
        line, = ax.plot(minutes, [min(p['bpd'], top) for p in points], marker='o', label=name)
        beyond = [m for m, p in zip(minutes, points) if p['bpd'] > top]
        ax.plot(beyond, [top] * len(beyond), linestyle='none', marker='^', markersize=10, color=line.get_color())
    ax.axhline(target, color='gray', linestyle='--', linewidth=1,
               label=f"the lecture code at {result['steps'][-1]} steps")
    lowest = min(p['bpd'] for points in result['curves'].values() for p in points)
    ax.set_ylim(lowest - 0.2, top + 0.1)
    ax.plot([], [], linestyle='none', marker='^', color='gray', label=f'beyond {top:.2f}')
    ax.set(xlabel='training time, minutes (evaluation excluded)', ylabel='test bpd', title=title)
    ax.legend()
    fig.tight_layout()
    P.save_figure(fig, path)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isfile(args.lecture):
        parser.error(f'--lecture {args.lecture}: no such file (the lecture notebook is ../shared/seed/000_*.txt)')
    if os.path.exists(args.out):
        parser.error(f'{args.out} exists; give a new folder')
    if sorted(set(args.steps)) != args.steps:
        parser.error('--steps must rise, each step once')
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        bench.lecture_code(args.lecture)   # a file without the lecture's code fails now
        device = P.pick_device(args.device)
        config = P.config_from_args(args)
        train_set, test_set = (ImageDataset('mnist', args.data_dir, train=t, img_size=args.image_size, download=False)
                               for t in (True, False))
    except ValueError as e:   # DataNotFoundError is not: it exits 1 below
        parser.error(str(e))
    except FileNotFoundError as e:
        P.die('time_to_bpd.py', e)
    curves = {'lecture code': lecture_curve(args, config, train_set.images, test_set.images, device)}
    # at least the 10 epochs of `python train.py`, whose learning rate comes down over the last 2
    epochs = max(10, math.ceil(args.steps[-1] / math.ceil(len(train_set) / args.batch_size)))
    for recipe in ('lecture', 'default'):
        curves[f'--recipe {recipe}'] = recipe_curve(recipe, args, os.path.join(args.out, f'recipe-{recipe}'),
                                                    test_set.images, epochs)
    target = curves['lecture code'][-1][2]
    listed = {name: [dict(step=s, seconds=t, bpd=b) for s, t, b in points] for name, points in curves.items()}
    result = dict(target_bpd=target, steps=args.steps, test_images=CURVE_TEST_IMAGES, epochs=epochs, curves=listed,
                  seconds_to_target={name: time_to_reach(points, target) for name, points in curves.items()})
    rows = ['curve,step,seconds,test_bpd'] + [f'{name},{s},{t:.1f},{b:.5f}' for name, points in curves.items()
                                               for s, t, b in points]
    P.write_atomically(('\n'.join(rows) + '\n').encode(), os.path.join(args.out, 'time_to_bpd.csv'))
    P.write_atomically(json.dumps(result, indent=1).encode(), os.path.join(args.out, 'time_to_bpd.json'))
    plot(result, os.path.join(args.out, 'time_to_bpd.png'), f'MNIST {args.image_size}x{args.image_size}, batch '
         f'{args.batch_size}, {device.type}, {torch.get_num_threads()} threads')
    print(json.dumps(result))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
