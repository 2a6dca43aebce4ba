"""Bits per dimension of a trained RealNVP on a whole data split, with its standard error.

    python evaluate.py --ckpt runs/x/best.pt                  # test split, K = 1
    python evaluate.py --ckpt runs/x/best.pt --dequant-samples 8 --json

With K = --dequant-samples > 1 the estimate is -log mean_k p(x + u_k) over K uniform
dequantisation draws: a lower bound on the discrete log-likelihood that tightens as K grows.
"""
import argparse
import json
import math

import torch

import realnvp as R


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--ckpt', default=None, help='checkpoint from train.py (default: the newest run\'s best.pt under --runs-dir)')
    a('--runs-dir', default='runs', help='where to look for the newest run (default runs)')
    a('--split', choices=('test', 'train'), default='test', help='which split (default test)')
    a('--limit', type=R.positive_int, default=None, help='only the first N images of the split')
    a('--batch-size', type=R.positive_int, default=512, help='images per forward pass (default 512)')
    a('--dequant-samples', type=R.positive_int, default=1, metavar='K',
      help='dequantisation draws per image for the importance-weighted bound (default 1)')
    a('--data-dir', default=None, help='data folder (default: the one the run trained on)')
    a('--seed', type=int, default=0, help='seed for the dequantisation noise (default 0)')
    a('--device', default=None, help='cpu, cuda, cuda:N or mps (default: the best there is)')
    a('--json', action='store_true', help='print one JSON object instead of a sentence')
    return p


def evaluate(model, images, batch_size=512, dequant_samples=1):
    """(bpd, its standard error) over uint8 images (N, C, H, W)."""
    D = images[0].numel()
    bpd = R.nll_per_image(model, images, batch_size, dequant_samples).double().cpu() / (D * math.log(2))
    stderr = bpd.std().item() / math.sqrt(len(bpd)) if len(bpd) > 1 else float('nan')
    return bpd.mean().item(), stderr


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        device = R.pick_device(args.device)
        ckpt_path = args.ckpt or R.find_checkpoint(args.runs_dir)
        model, ckpt = R.load_checkpoint(ckpt_path, device)
        data = R.checkpoint_dataset(ckpt, train=args.split == 'train', data_dir=args.data_dir)
    except (ValueError, R.DataNotFoundError) as e:
        R.die('evaluate.py', e)
    if data.images.shape[1] != model.config.in_channels:
        R.die('evaluate.py', f'the data has {data.images.shape[1]} channels, the model {model.config.in_channels}')
    images = data.images[:args.limit]
    torch.manual_seed(args.seed)
    bpd, stderr = evaluate(model, images, args.batch_size, args.dequant_samples)
    result = dict(bpd=bpd, stderr=stderr, split=args.split, images=len(images), dequant_samples=args.dequant_samples,
                  ckpt=ckpt_path, epoch=ckpt.get('epoch'), step=ckpt.get('step'))
    if args.json:
        print(json.dumps(result))
    else:
        print(f'{args.split} bpd {bpd:.4f} ± {stderr:.4f} (standard error, {len(images)} images, '
              f'K = {args.dequant_samples}) for {ckpt_path} (epoch {result["epoch"]}, step {result["step"]})')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
