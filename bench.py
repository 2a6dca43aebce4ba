"""Measure RealNVP's speed and size: training, sampling and evaluation throughput, peak memory,
FLOPs per image (torch.utils.flop_counter) and the FLOP/s achieved against a matmul measured in the same run.

    python bench.py --num-threads 2                  # the default config (MNIST 14x14, batch 128) on the CPU
    python bench.py --device cuda --amp --compile    # the fast GPU path
    python bench.py --flops-only --image-size 28     # parameters and FLOPs only (used by answers.md)

Run one benchmark at a time: two heavy jobs on the same cores slow each other down.
"""
import argparse
import json
import re
import resource
import statistics
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import realnvp as R
from train import train_step


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--image-size', type=R.positive_int, default=14, help='image side (default 14)')
    a('--in-channels', type=R.positive_int, default=1, help='image channels (default 1)')
    a('--num-scales', type=R.positive_int, default=2, help='scales (default 2)')
    a('--mid-channels', type=R.positive_int, default=64, help='s/t channels at the first scale (default 64)')
    a('--num-blocks', type=R.positive_int, default=8, help='residual blocks per s/t net (default 8)')
    a('--batch-size', type=R.positive_int, default=128, help='images per step (default 128)')
    a('--steps', type=R.positive_int, default=5, help='timed training steps (default 5)')
    a('--warmup', type=R.non_negative_int, default=2, help='untimed steps first (default 2)')
    a('--device', default=None, help='cpu, cuda, cuda:N or mps (default: the best there is)')
    a('--num-threads', type=R.positive_int, default=None, help='CPU threads (set it: the default varies by machine)')
    a('--amp', action='store_true', help='bf16 autocast for the s/t nets, as train.py --amp')
    a('--compile', action='store_true', help='torch.compile the model, as train.py --compile')
    a('--flops-only', action='store_true', help='print parameters and FLOPs per image, time nothing')
    a('--lecture', default=None, metavar='NOTEBOOK',
      help='also time the lecture notebook\'s own code (its text file, e.g. ../shared/seed/000_*.txt) on the same '
           'config, device and data, for comparison')
    a('--json', action='store_true', help='print one JSON object instead of a table')
    return p


def count_flops(config, batch_size=1):
    """(parameters, forward FLOPs per image, training-step FLOPs per image) of a RealNVPConfig.

    Counts convolutions and matmuls (torch.utils.flop_counter); element-wise ops and batch norm are not counted."""
    model = R.RealNVP.from_config(config)
    x = torch.rand(batch_size, config.in_channels, config.img_size, config.img_size)
    loss_fn = R.RealNVPLoss()
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            loss_fn(*model(x))
    forward = counter.get_total_flops() / batch_size
    with FlopCounterMode(display=False) as counter:
        loss_fn(*model(x)).backward()
    step = counter.get_total_flops() / batch_size
    return sum(p.numel() for p in model.parameters()), forward, step


def lecture_code(notebook):
    """The lecture's own definitions (squeeze_2x2 ... RealNVP, RealNVPLoss), by running its code cells 2-7 as they are."""
    text = open(notebook).read()
    cells = re.findall(r'^In \[(\d+)\]:\n(.*?)(?=^In \[|^#{2,3} |\Z)', text, flags=re.S | re.M)
    code = '\n'.join(body for number, body in cells if 2 <= int(number) <= 7)
    if 'class _RealNVP' not in code or 'class RealNVPLoss' not in code:
        raise ValueError(f'{notebook} does not hold the lecture\'s RealNVP code cells')
    namespace = {}
    exec(compile(code, notebook, 'exec'), namespace)
    return namespace


def lecture_model(lecture, config, device):
    """The lecture's RealNVP for a RealNVPConfig, on `device`."""
    hyper = SimpleNamespace(num_scales=config.num_scales, mid_channels=config.mid_channels, num_blocks=config.num_blocks)
    model = lecture['RealNVP'](config.img_size, config.in_channels, hyper)
    model.to(device)  # its own constructor picks CUDA when there is one; follow --device instead
    model.device = device
    return model


def lecture_train_step(notebook, config, batch_size, device):
    """A training step of the lecture's own code: forward, its loss, backward, its clipping, Adam."""
    lecture = lecture_code(notebook)
    model = lecture_model(lecture, config, device)
    loss_fn, clip = lecture['RealNVPLoss'](), lecture['clip_grad_norm']
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (batch_size, config.in_channels, config.img_size, config.img_size), device=device) / 255.0

    def step():
        optimizer.zero_grad()
        z, sldj = model(x, reverse=False)
        loss_fn(z, sldj).backward()
        clip(optimizer, 100.0)
        optimizer.step()
    return step


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Median seconds of `repeats` calls of fn, each bracketed by a device sync."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops_per_s(device, dtype, n=2048, repeats=5):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats)


def benchmark(args):
    device = R.pick_device(args.device)
    config = R.RealNVPConfig(args.in_channels, args.image_size, args.num_scales, args.mid_channels, args.num_blocks)
    config.validate()
    params, flops_forward, flops_step = count_flops(config)
    result = dict(config=vars(args) | {'device': str(device), 'threads': torch.get_num_threads()},
                  parameters=params, gflop_forward_per_image=flops_forward / 1e9,
                  gflop_train_step_per_image=flops_step / 1e9)
    if args.flops_only:
        return result

    torch.manual_seed(0)
    model = R.RealNVP.from_config(config).to(device)
    net = torch.compile(model) if args.compile else model
    optimizer = R.make_optimizer(model, 1e-3, 5e-5, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    images = torch.randint(0, 256, (args.batch_size, *model.shape), dtype=torch.uint8, device=device)
    loss_fn = R.RealNVPLoss()
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        train_step(net, optimizer, loss_fn, images.float() / 255.0, 100.0, autocast)

    model.train()
    for _ in range(args.warmup):
        step()
    train_s = timed(step, device, args.steps)
    with autocast:
        sample_s = timed(lambda: model.sample(args.batch_size), device, max(2, args.steps // 2))
        eval_s = timed(lambda: R.nll_per_image(model, images, batch_size=args.batch_size), device,
                       max(2, args.steps // 2))
    if device.type == 'cuda':
        peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process, Linux KiB
    matmul_fp32 = matmul_flops_per_s(device, torch.float32)
    achieved = flops_step * args.batch_size / train_s
    result.update(train_images_per_s=args.batch_size / train_s, train_step_s=train_s,
                  sample_images_per_s=args.batch_size / sample_s, eval_images_per_s=args.batch_size / eval_s,
                  peak_memory_mb=peak_mb, peak_memory_kind='cuda allocated' if device.type == 'cuda' else 'process RSS',
                  achieved_gflop_per_s=achieved / 1e9, matmul_fp32_gflop_per_s=matmul_fp32 / 1e9,
                  ratio_to_fp32_matmul=achieved / matmul_fp32)
    if args.amp:
        matmul_bf16 = matmul_flops_per_s(device, torch.bfloat16)
        result.update(matmul_bf16_gflop_per_s=matmul_bf16 / 1e9, ratio_to_bf16_matmul=achieved / matmul_bf16)
    if args.lecture:
        del model, net, optimizer
        lecture_step = lecture_train_step(args.lecture, config, args.batch_size, device)
        for _ in range(args.warmup):
            lecture_step()
        lecture_s = timed(lecture_step, device, args.steps)
        result.update(lecture_train_images_per_s=args.batch_size / lecture_s,
                      speedup_over_lecture=lecture_s / train_s)
    return result


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        result = benchmark(args)
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(result))
        return 0
    c = result['config']
    print(f'RealNVP {c["in_channels"]}x{c["image_size"]}x{c["image_size"]}, {c["num_scales"]} scales, '
          f'{c["mid_channels"]} mid channels, {c["num_blocks"]} blocks, batch {c["batch_size"]} on {c["device"]} '
          f'({c["threads"]} threads{", bf16 autocast" if c["amp"] else ""}{", compiled" if c["compile"] else ""})')
    rows = [('parameters', f'{result["parameters"]:,}'),
            ('GFLOP per image, forward', f'{result["gflop_forward_per_image"]:.3f}'),
            ('GFLOP per image, training step', f'{result["gflop_train_step_per_image"]:.3f}')]
    if not args.flops_only:
        rows += [('training images/s (median)', f'{result["train_images_per_s"]:.1f}'),
                 ('sampling images/s', f'{result["sample_images_per_s"]:.1f}'),
                 ('evaluation images/s', f'{result["eval_images_per_s"]:.1f}'),
                 (f'peak memory, MiB ({result["peak_memory_kind"]})', f'{result["peak_memory_mb"]:.0f}'),
                 ('achieved GFLOP/s in training', f'{result["achieved_gflop_per_s"]:.1f}'),
                 ('fp32 matmul GFLOP/s (2048^2, same run)', f'{result["matmul_fp32_gflop_per_s"]:.1f}'),
                 ('achieved / fp32 matmul', f'{result["ratio_to_fp32_matmul"]:.2f}')]
        if args.amp:
            rows += [('bf16 matmul GFLOP/s (same run)', f'{result["matmul_bf16_gflop_per_s"]:.1f}'),
                     ('achieved / bf16 matmul', f'{result["ratio_to_bf16_matmul"]:.2f}')]
        if args.lecture:
            rows += [('lecture code: training images/s', f'{result["lecture_train_images_per_s"]:.1f}'),
                     ('speed-up over the lecture code', f'{result["speedup_over_lecture"]:.2f}x')]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f'  {key:<{width}}  {value:>12}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
