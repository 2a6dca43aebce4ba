"""Draw samples from a trained RealNVP, or interpolate between test images in latent space.

    python sample.py --n 16                      # newest run's best.pt -> a 4x4 grid PNG
    python sample.py --ckpt runs/x/best.pt --n 64 --temperature 0.7
    python sample.py --n 8 --digit 7 3           # a --conditional run: 8 sevens, then 8 threes, a row each
    python sample.py --interpolate --pairs 4 --steps 8
"""
import argparse
import math
import os
import sys

import torch

import plumbing as P
from realnvp import DataNotFoundError, to_unit


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a('--ckpt', default=None, help='checkpoint from train.py (default: the newest run\'s best.pt under --runs-dir)')
    a('--runs-dir', default='runs', help='where to look for the newest run (default runs)')
    a('--n', type=P.positive_int, default=16, help='number of samples (default 16)')
    a('--temperature', type=P.positive_float, default=1.0,
      help='z ~ N(0, T^2 I); with a learned prior, N(mean, T^2 diag(scale)^2) (default 1.0)')
    a('--digit', type=int, nargs='+', choices=range(10), metavar='D',
      help='with a class-conditional checkpoint (train.py --conditional): draw these digits, --n of each, a row '
           'each (default: a row of each of the ten)')
    a('--seed', type=P.seed, default=0, help='seed for z (default 0)')
    a('--out', default=None,
      help='PNG (or .jpg) to write (default: samples_n<N>_t<T>_s<seed>.png beside the checkpoint)')
    a('--device', default=None, help='cpu, cuda, cuda:N or mps (default: the best there is)')
    a('--interpolate', action='store_true', help='latent interpolations between pairs of test images instead')
    a('--pairs', type=P.positive_int, default=4,
      help='with --interpolate: pairs of test images, one per row (default 4)')
    a('--steps', type=P.positive_int, default=8, help='with --interpolate: images per row, ends included (default 8)')
    a('--data-dir', default=None, help='with --interpolate: data folder (default: the one the run trained on)')
    a('--scale', type=P.positive_int, default=None,
      help='enlarge the PNG this many times, nearest-neighbour (default: so each image is at least 56 pixels)')
    return p


@torch.no_grad()
def interpolate(model, x_a, x_b, steps, labels=None):
    """Decode (1 - a) z_a + a z_b for a in [0, 1] (B pairs -> (B * steps) images, row-major).

    Images are encoded with the dequantisation noise at the middle of each 8-bit bin (u = 1/2)
    and every factored-out latent is kept, so the ends decode back to the inputs exactly. A class-conditional
    model takes each pair's one label (B,), which encodes both images and decodes the whole row."""
    model.eval()
    half = torch.full_like(x_a, 0.5)
    z_a, _ = model.flows(*model.preprocess(x_a, half), labels=labels)   # the flow's latent (before a class prior)
    z_b, _ = model.flows(*model.preprocess(x_b, half), labels=labels)
    alphas = torch.linspace(0, 1, steps, dtype=z_a.dtype, device=z_a.device).view(1, steps, 1, 1, 1)
    z = (1 - alphas) * z_a.unsqueeze(1) + alphas * z_b.unsqueeze(1)   # (B, steps, C, H, W)
    parts = z.flatten(0, 1).split(256)
    rows = [None] * len(parts) if labels is None else labels.repeat_interleave(steps).split(256)
    return to_8bit(torch.cat([model.postprocess(model.flows(part, None, reverse=True, labels=y)[0])
                              for part, y in zip(parts, rows)]))


def pick_pairs(data, pairs, conditional):
    """Indices (a, b) of `pairs` random pairs of test images; for a class-conditional model, each b of a's digit
    (None where the split has no second image of it)."""
    order = torch.randperm(len(data))
    if not conditional:
        return order[:pairs], order[pairs:2 * pairs]
    a = order[:pairs]
    partners = [order[(data.labels[order] == data.labels[i]) & (order != i)][:1] for i in a.tolist()]
    return a, (torch.cat(partners) if all(len(p) for p in partners) else None)


def to_8bit(v):
    """Undo the u = 1/2 dequantisation, v = (255 x + 1/2) / 256, onto the 1/255 grid."""
    return ((256 * v - 0.5).round().clamp(0, 255)) / 255


MAX_GRID = 4096  # images in one PNG: a 64x64 grid, 3,600 pixels a side at 14x14 and 4x


def check_args(parser, args, rows):
    """What argparse cannot check: the grid's size (`rows` of --n samples, or the interpolations), in images and in
    memory (exit 2 with one line)."""
    count = args.pairs * args.steps if args.interpolate else args.n * rows
    if count > MAX_GRID:
        what = f'--pairs {args.pairs} x --steps {args.steps}' if args.interpolate else f'--n {args.n}'
        parser.error(f'{what} asks for {count} images in one grid; at most {MAX_GRID} fit a PNG')
    side = math.isqrt(count) + 1   # the grid is about this many images a side, each at most 64 pixels here
    try:
        P.check_memory(12 * (side * 65 * (args.scale or 1)) ** 2, f'a grid enlarged --scale {args.scale} times',
                       'a smaller --scale')
    except ValueError as e:
        parser.error(str(e))


def output_path(args, ckpt_path):
    """Where the grid goes: --out, or a name that says what it holds beside the checkpoint; checked before the work
    (exit 2 with one line when it cannot be written)."""
    if args.interpolate:
        name = f'interpolate_p{args.pairs}_s{args.seed}.png'
    else:
        digits = f'_d{"".join(map(str, args.digit))}' if args.digit else ''
        name = f'samples_n{args.n}{digits}_t{args.temperature:g}_s{args.seed}.png'
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), name)
    try:
        P.check_output_file(out, f'--out {out}' if args.out else f'the default output {out} (give --out)',
                            ('.png', '.jpg', '.jpeg'))
    except ValueError as e:
        P.die('sample.py', e, 2)
    return out


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.interpolate and args.digit:
        parser.error('--digit draws samples of a digit, --interpolate pairs test images: give one of them')
    model, ckpt, ckpt_path = P.open_checkpoint('sample.py', args)
    classes = model.config.num_classes
    if args.digit and not classes:
        P.die('sample.py', f'--digit needs a class-conditional checkpoint (train.py --conditional); {ckpt_path} is '
                           f'unconditional', 2)
    digits = (args.digit or P.trained_labels(ckpt)) if classes else None
    untrained = sorted(set(digits or ()) - set(P.trained_labels(ckpt) if classes else ()))
    if untrained:
        P.die('sample.py', f'--digit {" ".join(map(str, untrained))}: the model of {ckpt_path} was trained on the '
                           f'digits {" ".join(map(str, P.trained_labels(ckpt)))} only', 2)
    check_args(parser, args, len(digits) if digits else 1)
    out = output_path(args, ckpt_path)
    try:
        P.check_memory(P.memory_needed(model.config, eval_batch=256), 'decoding 256 latents at a time', 'a machine '
                       'with more memory')
    except ValueError as error:
        P.die('sample.py', error)
    device = model.device
    torch.manual_seed(args.seed)
    if args.interpolate:
        try:
            data = P.checkpoint_dataset(ckpt, train=False, data_dir=args.data_dir)
        except (DataNotFoundError, ValueError) as e:
            P.die('sample.py', e)
        if len(data) < 2 * args.pairs:
            P.die('sample.py', f'--pairs {args.pairs} needs {2 * args.pairs} test images, the split has {len(data)}', 2)
        a, b = pick_pairs(data, args.pairs, bool(classes))
        if b is None:
            P.die('sample.py', 'a class-conditional model interpolates between two images of one digit, and the '
                               'split has a digit only once', 2)
        labels = data.labels[a].to(device) if classes else None
        images = interpolate(model, to_unit(data.images[a].to(device)), to_unit(data.images[b].to(device)),
                             args.steps, labels)
        nrow = args.steps
    else:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        labels = P.class_labels(digits, args.n, device) if classes else None
        images = model.sample(args.n if labels is None else len(labels), args.temperature, generator, labels)
        nrow = math.ceil(math.sqrt(args.n)) if labels is None else args.n
    if not torch.isfinite(images).all():
        P.die('sample.py', f'the samples at --temperature {args.temperature:g} are not finite (the flow overflows '
                           f'there); choose a smaller --temperature. Nothing was written')
    try:
        P.save_grid(images.cpu(), out, nrow=nrow, scale=args.scale)
    except P.CheckpointError as e:   # a full disk: the file there before is untouched
        P.die('sample.py', e)
    print(f'wrote {out} ({len(images)} images from {ckpt_path})')
    return 0


if __name__ == '__main__':
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print('sample.py: interrupted; nothing was written', file=sys.stderr)
        raise SystemExit(130)
