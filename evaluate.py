"""Bits per dimension of a trained RealNVP on a whole data split, with its standard error, and tools to see
where the bits go.

    python evaluate.py --ckpt runs/x/best.pt                  # test split, K = 1
    python evaluate.py --ckpt runs/x/best.pt --dequant-samples 8 --json
    python evaluate.py --breakdown                            # bpd = prior + flow + logit + 8 dequantisation
    python evaluate.py --worst 16 --per-image bpd.csv         # the least likely images, a histogram, every image
    python evaluate.py --classify                             # a --conditional model as a Bayes classifier
    python evaluate.py --judge --temperature 0.7              # samples judged by a digit classifier: FD, labels

With K = --dequant-samples > 1 the estimate is -log mean_k p(x + u_k) over K uniform
dequantisation draws: a lower bound on the discrete log-likelihood that tightens as K grows.
"""
import argparse
import csv
import io
import json
import math
import os
import sys

import torch

import plumbing as P
from realnvp import DataNotFoundError, bits_per_dim, class_nll, in_mode, nll_per_image, nll_terms, to_unit


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a('--ckpt', default=None, help='checkpoint from train.py (default: the newest run\'s best.pt under --runs-dir)')
    a('--runs-dir', default='runs', help='where to look for the newest run (default runs)')
    a('--split', choices=('test', 'train'), default='test', help='which split (default test)')
    a('--limit', type=P.positive_int, default=None, help='only the first N images of the split')
    a('--batch-size', type=P.positive_int, default=512, help='images per forward pass (default 512)')
    a('--dequant-samples', type=P.positive_int, default=1, metavar='K',
      help='dequantisation draws per image for the importance-weighted bound (default 1)')
    a('--breakdown', action='store_true',
      help='split the bpd into the prior\'s -log N(z), the flow\'s -log|det|, the logit pre-processing\'s '
           '-log|det| and the 8 bits of the 1/256 dequantisation (one draw: K = 1)')
    a('--worst', type=P.positive_int, default=None, metavar='N',
      help='write worst<N>_<split>.png (the N least likely images with their bpd) and bpd_hist_<split>.png')
    a('--per-image', default=None, metavar='CSV', help='write every image\'s index, label and bpd to this CSV file')
    a('--out-dir', default=None, help='folder for --worst\'s PNGs (default: the checkpoint\'s folder)')
    a('--data-dir', default=None, help='data folder (default: the one the run trained on)')
    a('--seed', type=P.seed, default=0, help='seed for the dequantisation noise (default 0)')
    a('--device', default=None, help='cpu, cuda, cuda:N or mps (default: the best there is)')
    a('--classify', action='store_true',
      help='a --conditional model as the Bayes classifier argmax_y log p(x | y) + log p(y) (uniform p(y)): '
           'accuracy and a confusion-matrix PNG, the bpd given the true label and the marginal bpd '
           '-log sum_y p(x | y) p(y) (comparable with an unconditional model\'s); one dequantisation draw')
    a('--judge', action='store_true',
      help='draw --n samples at --temperature and judge them with a digit classifier trained on the training '
           'split (the first time; cached under --runs-dir): the Frechet distance of its features to the test '
           'images\' (fd), the same for training images (fd_floor), the labels it gives, and for a '
           '--conditional model how often it sees the asked digit')
    a('--n', type=P.positive_int, help='with --judge: samples to draw, at least 2 (default 10000)')
    a('--temperature', type=P.positive_float, help='with --judge: z ~ N(0, T^2 I) (default 1)')
    a('--json', action='store_true', help='print one JSON object instead of sentences')
    return p


def per_image_bpd(model, images, batch_size=512, dequant_samples=1, labels=None):
    """Each uint8 image's bpd (N,), float64 on the CPU; a class-conditional model's given each image's label."""
    return bits_per_dim(images, nll_per_image(model, images, batch_size, dequant_samples,
                                              labels=labels).double().cpu())


def standard_error(values):
    return values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float('nan')


@torch.no_grad()
def breakdown(model, images, batch_size=512):
    """(per-image bpd, {term: mean bpd}) from one dequantisation draw; the terms (`nll_terms`) add up to the bpd."""
    parts = []
    with in_mode(model, False):
        for batch in images.split(batch_size):
            parts.append(nll_terms(model, to_unit(batch.to(model.device)).to(model.dtype)))
    terms = {k: bits_per_dim(images, torch.cat([p[k] for p in parts]).double().cpu()) for k in parts[0]}
    return sum(terms.values()), {k: v.mean().item() for k, v in terms.items()}


def write_worst(images, bpd, n, path):
    """A PNG grid of the n images with the largest bpd, each titled with its bpd, worst first."""
    plt = P.pyplot()
    order = bpd.argsort(descending=True)[:n]
    cols = min(8, len(order))
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 2.0 * rows), squeeze=False, layout='constrained')
    for ax in axes.flat:
        ax.axis('off')
    for ax, i in zip(axes.flat, order.tolist()):
        image = images[i].permute(1, 2, 0).squeeze(-1).numpy()
        ax.imshow(image, cmap='gray', vmin=0, vmax=255, interpolation='nearest')
        ax.set_title(f'#{i}: {bpd[i]:.2f}', fontsize=9)
    fig.suptitle(f'the {len(order)} least likely images (index: bpd)', fontsize=10)
    P.save_figure(fig, path)
    return order


def write_histogram(bpd, path):
    fig, ax = P.pyplot().subplots(figsize=(6, 3.5))
    ax.hist(bpd.numpy(), bins=60, log=True)
    ax.axvline(bpd.mean().item(), color='k', linestyle='--', label=f'mean {bpd.mean().item():.3f}')
    ax.set_xlabel('bits per dimension')
    ax.set_ylabel('images (log scale)')
    ax.legend()
    fig.tight_layout()
    P.save_figure(fig, path)


def write_per_image(labels, bpd, path):
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(['index', 'label', 'bpd'])
    writer.writerows((i, int(label), f'{b:.6f}') for i, (label, b) in enumerate(zip(labels.tolist(), bpd.tolist())))
    P.write_atomically(text.getvalue().encode(), path)


def judge_samples(args, model, ckpt, device):
    """--judge: the Fréchet distance of --n samples to the test images in the judge's features, its floor
    (training against test images), the histogram of the judge's labels, and for a conditional model the share
    of each asked digit (the digits it was trained on, in turn) that the judge labels as that digit. The judge is
    trained on every digit of the data set, whatever digits the run kept."""
    try:
        train = P.checkpoint_dataset(ckpt, train=True, data_dir=args.data_dir, every_label=True)
        test = P.checkpoint_dataset(ckpt, train=False, data_dir=args.data_dir, every_label=True)
    except (ValueError, DataNotFoundError) as e:
        P.die('evaluate.py', e)
    log = (lambda line: None) if args.json else print
    judge, accuracy = P.load_judge(train, test, os.path.join(args.runs_dir, 'judges'), device, log)
    digits = P.trained_labels(ckpt) if model.config.num_classes else None
    asked = P.labels_in_turn(digits, args.n, device) if digits else None
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = torch.cat([model.sample(len(part), args.temperature, generator, None if digits is None else asked[part])
                         for part in torch.arange(args.n, device=device).split(1024)])
    test_feats, _ = P.judge_features(judge, test.images)
    sample_feats, seen = P.judge_features(judge, samples.float())
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:len(test)]
    train_feats, _ = P.judge_features(judge, train.images[pick])
    try:
        fd = P.frechet_distance(sample_feats, test_feats)
        fd_floor = P.frechet_distance(train_feats, test_feats)
    except ValueError as e:   # the judge's weights, or the samples, are not finite
        P.die('evaluate.py', e)
    result = dict(fd=fd, fd_floor=fd_floor, judge_test_accuracy=accuracy, temperature=args.temperature, samples=args.n,
                  label_histogram=torch.bincount(seen, minlength=10).tolist())
    if digits:
        hit = seen == asked.cpu()
        result['judge_accuracy'] = hit.double().mean().item()
        result['judge_accuracy_per_digit'] = {d: hit[asked.cpu() == d].double().mean().item() for d in digits}
    return result


def classify(model, images, labels, batch_size):
    """--classify: per-image bpd given the true label, the marginal bpd, the predictions, the accuracy."""
    nll = class_nll(model, images, batch_size).double().cpu()                         # (N, K) nats
    given = nll.gather(1, labels.view(-1, 1)).squeeze(1)
    marginal = -(torch.logsumexp(-nll, dim=1) - math.log(nll.shape[1]))             # uniform p(y)
    predicted = nll.argmin(1)
    return (bits_per_dim(images, given), bits_per_dim(images, marginal), predicted,
            (predicted == labels).double().mean().item())


def write_confusion(labels, predicted, k, path):
    """A PNG of the confusion matrix: rows the true label, columns the predicted one, counts in the cells."""
    counts = torch.zeros(k, k, dtype=torch.long)
    counts.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    fig, ax = P.pyplot().subplots(figsize=(5.5, 5))
    ax.imshow(counts.numpy(), cmap='Blues')
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(counts[i, j]), ha='center', va='center', fontsize=7,
                    color='white' if counts[i, j] > counts.max() / 2 else 'black')
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel('predicted: argmax_y log p(x | y)')
    ax.set_ylabel('true label')
    ax.set_title(f'Bayes classifier: accuracy {(labels == predicted).double().mean().item():.2%}')
    fig.tight_layout()
    P.save_figure(fig, path)


def output_paths(args, ckpt_path):
    """{what: path} of the files --worst and --per-image ask for, each checked before the evaluation (exit 2 with
    one line when it cannot be written)."""
    paths = {}
    if args.worst:
        out_dir = args.out_dir or os.path.dirname(os.path.abspath(ckpt_path))
        paths['worst_png'] = os.path.join(out_dir, f'worst{args.worst}_{args.split}.png')
        paths['histogram_png'] = os.path.join(out_dir, f'bpd_hist_{args.split}.png')
    if args.classify:
        out_dir = args.out_dir or os.path.dirname(os.path.abspath(ckpt_path))
        paths['confusion_png'] = os.path.join(out_dir, f'confusion_{args.split}.png')
    if args.per_image:
        paths['per_image_csv'] = args.per_image
    for key, path in paths.items():
        try:
            P.check_output_file(path, '--per-image' if key == 'per_image_csv' else
                                f'--{"classify" if key == "confusion_png" else "worst"} writes {path}'
                                + ('' if args.out_dir else ' (give --out-dir)'))
        except ValueError as error:
            P.die('evaluate.py', error, 2)
    return paths


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.breakdown and args.dequant_samples > 1:
        parser.error('--breakdown splits one dequantisation draw; drop --dequant-samples')
    if not args.judge and (args.n is not None or args.temperature is not None):
        parser.error('--n and --temperature set the samples that --judge draws: add --judge, or drop them')
    args.n = 10_000 if args.n is None else args.n
    args.temperature = 1.0 if args.temperature is None else args.temperature
    if args.n < 2:
        parser.error(f'--n {args.n}: the Frechet distance of --judge needs at least 2 samples')
    model, ckpt, ckpt_path = P.open_checkpoint('evaluate.py', args)
    conditional = model.config.num_classes > 0
    if args.classify and not conditional:
        P.die('evaluate.py', f'--classify needs a class-conditional checkpoint (train.py --conditional); {ckpt_path} '
                             f'is unconditional', 2)
    if args.classify and (args.breakdown or args.dequant_samples > 1):
        parser.error('--classify takes one dequantisation draw and no --breakdown')
    if args.breakdown and conditional:
        P.die('evaluate.py', '--breakdown splits an unconditional model\'s bpd; this checkpoint is '
                             'class-conditional', 2)
    paths = output_paths(args, ckpt_path)
    try:
        P.check_memory(P.memory_needed(model.config, eval_batch=args.batch_size * args.dequant_samples),
                       f'evaluating {args.batch_size} images at a time', 'a smaller --batch-size')
    except ValueError as error:
        P.die('evaluate.py', error, 2)
    try:
        data = P.checkpoint_dataset(ckpt, train=args.split == 'train', data_dir=args.data_dir)
    except (ValueError, DataNotFoundError) as e:
        P.die('evaluate.py', e)
    images, labels = data.images[:args.limit], data.labels[:args.limit]
    torch.manual_seed(args.seed)
    terms = None
    extra = {}
    if args.breakdown:
        bpd, terms = breakdown(model, images, args.batch_size)
    elif args.classify:
        bpd, marginal, predicted, accuracy = classify(model, images, labels, args.batch_size)
        extra = dict(accuracy=accuracy, marginal_bpd=marginal.mean().item(), marginal_stderr=standard_error(marginal))
    else:
        bpd = per_image_bpd(model, images, args.batch_size, args.dequant_samples, labels if conditional else None)
    result = dict(bpd=bpd.mean().item(), stderr=standard_error(bpd), worst_bpd=bpd.max().item(), split=args.split,
                  images=len(images), dequant_samples=args.dequant_samples, ckpt=ckpt_path,
                  epoch=ckpt.get('state', {}).get('epoch'), step=ckpt.get('state', {}).get('step'),
                  conditional=conditional, **extra)
    if terms:
        result['breakdown'] = terms
    if args.judge:
        result.update(judge_samples(args, model, ckpt, model.device))
    try:
        result.update(write_outputs(paths, images, labels, bpd, args.worst))
        if args.classify:
            write_confusion(labels, predicted, model.config.num_classes, paths['confusion_png'])
    except P.CheckpointError as error:   # a full disk: the files there before are untouched
        P.die('evaluate.py', error)
    report(args, result)
    return 0


def write_outputs(paths, images, labels, bpd, worst):
    """The files of `output_paths`; returns them, with the worst images' indices."""
    written = dict(paths)
    if 'worst_png' in paths:
        written['worst_indices'] = write_worst(images, bpd, worst, paths['worst_png']).tolist()
        write_histogram(bpd, paths['histogram_png'])
    if 'per_image_csv' in paths:
        write_per_image(labels, bpd, paths['per_image_csv'])
    return written


def report(args, result):
    if args.json:   # a value that is not defined (the standard error of one image) is null
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}))
        return
    print(f'{args.split} bpd {result["bpd"]:.4f} ± {result["stderr"]:.4f} (standard error, {result["images"]} images, '
          f'K = {args.dequant_samples}; worst image {result["worst_bpd"]:.2f}) for {result["ckpt"]} '
          f'(epoch {result["epoch"]}, step {result["step"]})')
    if result['conditional']:
        print('  (the bpd of a class-conditional model: -log2 p(x | y) per dimension, given each image\'s label)')
    if 'accuracy' in result:
        print(f'Bayes classifier accuracy {result["accuracy"]:.2%}; marginal bpd {result["marginal_bpd"]:.4f} '
              f'± {result["marginal_stderr"]:.4f} (-log2 sum_y p(x | y) / 10, comparable with an unconditional model)')
    if 'fd' in result:
        print(f'{result["samples"]} samples at T = {result["temperature"]:g}: Frechet distance {result["fd"]:.2f} in '
              f'the judge\'s features (training vs test images: {result["fd_floor"]:.2f}); the judge\'s labels '
              f'{result["label_histogram"]}' + (f'; the asked digit in {result["judge_accuracy"]:.1%}'
                                                 if 'judge_accuracy' in result else ''))
    for name, value in result.get('breakdown', {}).items():
        print(f'  {name:<15} {value:8.4f} bits/dim')
    for key in ('worst_png', 'histogram_png', 'confusion_png', 'per_image_csv'):
        if key in result:
            print(f'wrote {result[key]}')


if __name__ == '__main__':
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print('evaluate.py: interrupted; nothing was written', file=sys.stderr)
        raise SystemExit(130)
