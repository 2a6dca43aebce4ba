"""Measure RealNVP's speed and size: training, sampling and evaluation throughput, peak memory, FLOPs per image
(torch.utils.flop_counter), kernel launches a step, and the FLOP/s achieved against a ceiling measured in the same
run on the step's own kind of work (the best of a large matmul and each of the model's convolution shapes, per
dtype), with the share of step time spent outside convolutions (torch.profiler). The step timed is train.py's own
`train_step`.

    python bench.py --num-threads 2                  # the default config (MNIST 14x14, batch 128) on the CPU
    python bench.py --device cuda --amp --compile    # the fast GPU path
    python bench.py --flops-only --image-size 28     # parameters, FLOPs, saved activations (used by answers.md)
    bash gpu_check.sh DATA_DIR                       # the whole GPU check

Run one benchmark at a time: two heavy jobs on the same cores slow each other down.
"""
import argparse
import json
import os
import re
import resource
import statistics
import time
from collections import Counter
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import plumbing as P
from realnvp import RealNVP, RealNVPLoss, WNConv2d, nll_per_image, to_unit
from train import SkipGuard, WeightAverage, make_optimizer, refresh_batch_norm, train_step


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    P.add_model_args(p)
    a('--in-channels', type=P.positive_int, default=1, help='image channels (default 1)')
    a('--batch-size', type=P.positive_int, default=128, help='images per step (default 128)')
    a('--steps', type=P.positive_int, default=5, help='timed training steps (default 5)')
    a('--warmup', type=P.non_negative_int, default=2, help='untimed steps first (default 2)')
    a('--device', default=None, help='cpu, cuda, cuda:N or mps (default: the best there is)')
    a('--num-threads', type=P.positive_int, default=None, help='CPU threads (set it: the default varies by machine)')
    a('--amp', action='store_true', help='bf16 autocast for the s/t nets, as train.py --amp')
    a('--compile', action='store_true', help='torch.compile the model, as train.py --compile')
    a('--flops-only', action='store_true',
      help='print parameters, FLOPs per image and the memory a step keeps for its backward pass; time nothing')
    a('--lecture', default=None, metavar='NOTEBOOK',
      help='also time the lecture notebook\'s own code (its text file, e.g. ../shared/seed/000_*.txt) on the same '
           'config, device and data, for comparison')
    a('--json', action='store_true', help='print one JSON object instead of a table')
    return p


def example_labels(config, n, device=None):
    """Labels for n images of a class-conditional model, the classes in turn; None for an unconditional one."""
    return P.labels_in_turn(range(config.num_classes), n, device) if config.num_classes else None


def count_flops(config, batch_size=1):
    """(parameters, forward FLOPs per image, training-step FLOPs per image) of a RealNVPConfig.

    Counts convolutions and matmuls (torch.utils.flop_counter); element-wise ops and batch norm are not counted."""
    model = RealNVP(config)
    x = torch.rand(batch_size, config.in_channels, config.img_size, config.img_size)
    loss_fn = RealNVPLoss()
    labels = example_labels(config, batch_size)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            loss_fn(*model(x, labels=labels))
    forward = counter.get_total_flops() / batch_size
    with FlopCounterMode(display=False) as counter:
        loss_fn(*model(x, labels=labels)).backward()
    step = counter.get_total_flops() / batch_size
    return sum(p.numel() for p in model.parameters()), forward, step


def lecture_code(notebook):
    """The lecture's own definitions (squeeze_2x2 ... RealNVP, RealNVPLoss), by running its code cells 2-7 as they
    are."""
    text = open(notebook).read()
    cells = re.findall(r'^In \[(\d+)\]:\n(.*?)(?=^In \[|^#{2,3} |\Z)', text, flags=re.S | re.M)
    code = '\n'.join(body for number, body in cells if 2 <= int(number) <= 7)
    if 'class _RealNVP' not in code or 'class RealNVPLoss' not in code:
        raise ValueError(f'{notebook} does not hold the lecture\'s RealNVP code cells')
    namespace = {}
    exec(compile(code, notebook, 'exec'), namespace)
    return namespace


def lecture_training(notebook, config, device):
    """The lecture's own code, ready to train: (its RealNVP for a RealNVPConfig on `device`, its loss, step(x)), a
    step being the forward pass, its loss, backward, its gradient clipping at 100 and Adam at 1e-3."""
    lecture = lecture_code(notebook)
    hyper = SimpleNamespace(num_scales=config.num_scales, mid_channels=config.mid_channels,
                            num_blocks=config.num_blocks)
    model = lecture['RealNVP'](config.img_size, config.in_channels, hyper).to(device)
    model.device = device   # its own constructor picks CUDA when there is one; follow --device instead
    loss_fn = lecture['RealNVPLoss']()
    clip = lecture['clip_grad_norm']
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x):
        optimizer.zero_grad()
        loss_fn(*model(x, reverse=False)).backward()
        clip(optimizer, 100.0)
        optimizer.step()
    return model, loss_fn, step


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup=0):
    """Median seconds of `repeats` calls of fn, each bracketed by a device sync, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
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


def saved_for_backward(config, batch_sizes=(4, 8)):
    """(MiB an image, MiB whatever the batch) of the tensors a training forward pass keeps for the backward pass
    (fp32; counted by storage with torch.autograd.graph.saved_tensors_hooks, each storage once), from two batch
    sizes: what grows with the batch (the activations) and what does not (the weights, the weight-normed ones)."""
    model = RealNVP(config).train()
    totals = []
    for n in batch_sizes:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.rand(n, config.in_channels, config.img_size, config.img_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            RealNVPLoss()(*model(x, labels=example_labels(config, n)))
        totals.append(sum(storages.values()) / 2 ** 20)
    (n0, n1), (s0, s1) = batch_sizes, totals
    per_image = (s1 - s0) / (n1 - n0)
    return per_image, s0 - n0 * per_image


def measure_training(args, config, device):
    """Training, sampling and evaluation throughput of this project's model, and the peak memory. The step timed
    is train.py's `train_step`, on a model of `config` in train mode."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = RealNVP(config).to(device).train()
    guard = SkipGuard(model, make_optimizer(model, 1e-3, 5e-5), 100.0)
    net = P.compile_model(model, device) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    images = torch.randint(0, 256, (args.batch_size, *model.shape), dtype=torch.uint8, device=device)
    loss_fn = RealNVPLoss()
    labels = example_labels(config, args.batch_size, device)
    step = lambda: train_step(net, guard, loss_fn, to_unit(images), autocast, labels)
    start = time.perf_counter()
    step()   # with --compile: the compilation
    synchronize(device)
    first_s = time.perf_counter() - start
    train_s = timed(step, device, args.steps, args.warmup)
    shares = measure_profile(step, device)
    if args.compile:   # the graphs (each one launch under CUDA graphs) and what runs around them
        shares.update(count_launches_around_graphs(step))
    else:
        shares['launches_per_step'] = count_launches(step)   # the operator calls; what CUDA would launch
    average = WeightAverage(model, 0.999)
    ema_s = timed(lambda: average.update(model, 1000), device, args.steps)
    noise = torch.rand(images.shape, device=device)
    with autocast:   # as train.py refreshes and evaluates
        refresh_s = timed(lambda: refresh_batch_norm(average.model, [(to_unit(images), noise, labels)]), device,
                          max(2, args.steps // 2))
        sample_s = timed(lambda: model.sample(args.batch_size, labels=labels), device, max(2, args.steps // 2))
        eval_s = timed(lambda: nll_per_image(model, images, batch_size=args.batch_size, labels=labels), device,
                       max(2, args.steps // 2))
    if device.type == 'cuda':
        peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux KiB
    return dict(train_images_per_s=args.batch_size / train_s, train_step_s=train_s, first_step_s=first_s, **shares,
                ema_update_share_of_step=ema_s / train_s, bn_refresh_batch_share_of_step=refresh_s / train_s,
                sample_images_per_s=args.batch_size / sample_s, eval_images_per_s=args.batch_size / eval_s,
                peak_memory_mb=peak_mb)


def conv_shapes(config, batch_size):
    """The distinct convolutions of the model, (input shape, weight shape, padding), each with the number of
    times a forward pass runs it: a Counter, found by forward hooks."""
    model = RealNVP(config)
    shapes = Counter()
    hooks = [m.register_forward_hook(lambda mod, args, out: shapes.update(
        [(tuple(args[0].shape), tuple(mod.conv.weight.shape), mod.conv.padding)]))
        for m in model.modules() if isinstance(m, WNConv2d)]
    with torch.no_grad():
        model(torch.rand(batch_size, config.in_channels, config.img_size, config.img_size),
              labels=example_labels(config, batch_size))
    for h in hooks:
        h.remove()
    return shapes


def conv_flops_per_s(shape, device, dtype, warmup=5, repeats=15):
    """FLOP/s of one convolution shape alone, forward and backward (input and weight gradients), channels-last
    as in the model: the kind of work a training step does, at its own sizes."""
    x_shape, w_shape, padding = shape
    x = torch.randn(x_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(w_shape, device=device, dtype=dtype)
    x.requires_grad_()
    w.requires_grad_()
    grad = torch.ones_like(torch.nn.functional.conv2d(x, w, padding=padding))

    def step():   # fresh gradients each time, as in a training step (adding into old ones costs as much here)
        x.grad = w.grad = None
        torch.nn.functional.conv2d(x, w, padding=padding).backward(grad)
    return conv_step_flops(shape) / timed(step, device, repeats, warmup)   # a shape's first calls: up to 2x slower


def conv_step_flops(shape):
    """FLOPs of a convolution's forward and backward: 2 MACs-worth per output and input channel and kernel tap,
    three times (the output, the input's gradient, the weight's gradient)."""
    (n, _, h, w), (c_out, c_in, kh, kw), (ph, pw) = shape
    out_h, out_w = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    return 3 * 2 * n * c_out * out_h * out_w * c_in * kh * kw


def measure_ceiling(args, config, device, train):
    """The peak this device reaches on the training step's own kind of work, per dtype: the best of a large
    matmul and each of the model's convolution shapes timed alone; the step's achieved share of it; and the
    bound the convolutions set: the images/s of a step that did nothing but its convolutions, each as fast as
    it runs alone (`train` holds the step's own figures)."""
    result = {}
    dtypes = [('fp32', torch.float32)] + ([('bf16', torch.bfloat16)] if args.amp else [])
    shapes = conv_shapes(config, args.batch_size)
    rates = {}
    for name, dtype in dtypes:
        matmul = matmul_flops_per_s(device, dtype)
        rates[name] = {shape: conv_flops_per_s(shape, device, dtype) for shape in shapes}
        conv = max(rates[name].values())
        result[f'matmul_{name}_gflop_per_s'] = matmul / 1e9
        result[f'conv_{name}_gflop_per_s'] = conv / 1e9
        result[f'ceiling_{name}_gflop_per_s'] = max(matmul, conv) / 1e9
    step_dtype = dtypes[-1][0]  # the s/t nets run in bf16 under --amp
    conv_s = sum(count * conv_step_flops(shape) / rates[step_dtype][shape] for shape, count in shapes.items())
    result['ceiling_dtype'] = step_dtype
    result['ratio_to_ceiling'] = train['achieved_gflop_per_s'] / result[f'ceiling_{step_dtype}_gflop_per_s']
    result['conv_bound_images_per_s'] = args.batch_size / conv_s
    result['conv_bound_share_of_step'] = conv_s / train['train_step_s']
    return result


NO_KERNEL = (torch.ops.aten.detach, torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.new_empty,
             torch.ops.aten.new_empty_strided)


def is_kernel(op):
    """Whether an operator (an OpOverload, or the profiler's name of one: 'aten::mul') runs a kernel itself: not
    a view, not an allocation."""
    if isinstance(op, str):
        packet = getattr(torch.ops.aten, op.removeprefix('aten::'), None)
        op = packet and (getattr(packet, 'default', None) or getattr(packet, packet.overloads()[0]))
    return op is None or not op.is_view and op.overloadpacket not in NO_KERNEL


class LaunchCounter(TorchDispatchMode):
    """Counts the operator calls that run a kernel, forward and backward, in the order autograd and the optimizer
    make them: every aten call but views (and detach), which only make a new tensor header, and the allocations
    (`empty` and its kin), which take memory from the caching allocator and launch nothing. It sits under autograd,
    where torch's own FlopCounterMode sits: `TorchDispatchMode`, from torch's private _python_dispatch module, is the
    one way to see the backward pass's operators from Python."""

    def __init__(self):
        super().__init__()
        self.ops = []   # the overload packets called, in order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_kernel(func):
            self.ops.append(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def count_launches(fn):
    """The kernels `fn()` launches, eager: its operator calls (`LaunchCounter`)."""
    with LaunchCounter() as counter:
        fn()
    return len(counter.ops)


def count_launches_around_graphs(step):
    """Under --compile: the compiled graphs a step runs (`graphs_per_step`; under CUDA graphs each is one
    launch) and the kernels launched outside them (`launches_outside_graphs`: the optimizer, the loss, autograd
    between the graphs), from the profiler's tree of operators: an operator outside a graph that runs a kernel
    counts one (a multi-tensor `_foreach_*` or fused Adam is one launch on CUDA, whatever it calls on a CPU); a
    view or an allocation counts what it calls (`to` may copy). A dispatch mode cannot do this: torch.compile
    runs a function eagerly while one is active."""
    from torch.profiler import profile
    with profile() as prof:
        step()

    def launches(event):
        inner = [child for child in event.cpu_children if child.name.startswith('aten::')]
        return 1 if is_kernel(event.name) else sum(map(launches, inner))

    def outside(event):   # no operator and no compiled graph (forward or backward) above it
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith('aten::') or 'Compiled' in parent.name:
                return False
            parent = parent.cpu_parent
        return True
    events = [e for e in prof.events() if outside(e)]
    return dict(launches_outside_graphs=sum(launches(e) for e in events if e.name.startswith('aten::')),
                graphs_per_step=sum(e.name.startswith('Torch-Compiled Region') or 'CompiledFunctionBackward' in e.name
                                    for e in events))


def measure_profile(step, device, steps=2):
    """The share of a training step's time spent outside convolutions (torch.profiler, self time by operator)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    ops = prof.key_averages()
    total = sum(getattr(op, key) for op in ops)
    conv = sum(getattr(op, key) for op in ops if 'conv' in op.key)
    # on CUDA the kernels launched (what CUDA graphs replay at once); elsewhere the operators called
    cuda = {'cuda_kernels_per_step': sum(e.device_type == DeviceType.CUDA for e in prof.events()) / steps} \
        if device.type == 'cuda' else {}
    return dict(share_outside_convolutions=1.0 - conv / total, **cuda)


def measure_lecture(args, config, device, train):
    """The lecture code's training step on the same config, device and batch size, against this project's step
    (`train`) and against the bound its convolutions set."""
    step = lecture_training(args.lecture, config, device)[2]
    shape = (args.batch_size, config.in_channels, config.img_size, config.img_size)
    x = torch.randint(0, 256, shape, device=device) / 255.0
    lecture = args.batch_size / timed(lambda: step(x), device, args.steps, args.warmup)
    return dict(lecture_train_images_per_s=lecture, speedup_over_lecture=train['train_images_per_s'] / lecture)


def benchmark(args):
    device = P.pick_device(args.device)
    config = P.config_from_args(args)
    P.check_memory(P.memory_needed(config, args.batch_size, args.batch_size), f'a training step of {args.batch_size} '
                   f'images', 'a smaller --batch-size')
    before_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux KiB: torch and the modules
    params, forward, step = count_flops(config)
    per_image, fixed = saved_for_backward(config)
    result = dict(config=vars(args) | {'device': str(device), 'threads': torch.get_num_threads()},
                  memory_before_model_mb=before_model, parameters=params, gflop_forward_per_image=forward / 1e9,
                  gflop_train_step_per_image=step / 1e9, saved_for_backward_mib_per_image=per_image,
                  saved_for_backward_mib_fixed=fixed)
    if args.flops_only:
        return result
    result.update(measure_training(args, config, device))
    result['achieved_gflop_per_s'] = result['gflop_train_step_per_image'] * result['train_images_per_s']
    result.update(measure_ceiling(args, config, device, result))
    if args.lecture:
        result.update(measure_lecture(args, config, device, result))
    return result


# The printed table: (key of the result, label, format); rows whose key is missing are left out.
TABLE = [
    ('parameters', 'parameters', '{:,}'),
    ('gflop_forward_per_image', 'GFLOP per image, forward', '{:.3f}'),
    ('gflop_train_step_per_image', 'GFLOP per image, training step', '{:.3f}'),
    ('train_images_per_s', 'training images/s (median)', '{:.1f}'),
    ('first_step_s', 'first step, s (with --compile: the compilation)', '{:.1f}'),
    ('launches_per_step', 'operator calls (launches) per step', '{:,.0f}'),
    ('launches_outside_graphs', 'launches per step outside compiled graphs', '{:,.0f}'),
    ('graphs_per_step', 'compiled graphs per step', '{:,.0f}'),
    ('cuda_kernels_per_step', 'CUDA kernels per step', '{:,.0f}'),
    ('ema_update_share_of_step', 'weight-average update / training step', '{:.3f}'),
    ('bn_refresh_batch_share_of_step', 'batch-norm refresh, per batch / training step', '{:.3f}'),
    ('sample_images_per_s', 'sampling images/s', '{:.1f}'),
    ('eval_images_per_s', 'evaluation images/s', '{:.1f}'),
    ('peak_memory_mb', 'peak memory, MiB (CUDA: allocated; else: process RSS)', '{:.0f}'),
    ('memory_before_model_mb', 'process memory before the model is built (RSS), MiB', '{:.0f}'),
    ('saved_for_backward_mib_per_image', 'kept for the backward pass, MiB an image (fp32)', '{:.1f}'),
    ('saved_for_backward_mib_fixed', 'kept for the backward pass, MiB besides (weights)', '{:.0f}'),
    ('achieved_gflop_per_s', 'achieved GFLOP/s in training', '{:.1f}'),
    ('matmul_fp32_gflop_per_s', 'fp32 matmul GFLOP/s (2048^2, same run)', '{:.1f}'),
    ('conv_fp32_gflop_per_s', 'fp32 best model convolution GFLOP/s (fwd+bwd)', '{:.1f}'),
    ('matmul_bf16_gflop_per_s', 'bf16 matmul GFLOP/s (same run)', '{:.1f}'),
    ('conv_bf16_gflop_per_s', 'bf16 best model convolution GFLOP/s (fwd+bwd)', '{:.1f}'),
    ('ratio_to_ceiling', 'achieved / ceiling (the best of those, step dtype)', '{:.2f}'),
    ('share_outside_convolutions', 'share of step time outside convolutions', '{:.2f}'),
    ('conv_bound_images_per_s', 'images/s of the convolutions alone (the bound)', '{:.1f}'),
    ('conv_bound_share_of_step', 'the convolutions alone / training step', '{:.2f}'),
    ('lecture_train_images_per_s', 'lecture code: training images/s', '{:.1f}'),
    ('speedup_over_lecture', 'speed-up over the lecture code', '{:.2f}x'),
]


def print_table(result):
    c = result['config']
    print(f'RealNVP {c["in_channels"]}x{c["image_size"]}x{c["image_size"]}, {c["num_scales"]} scales, '
          f'{c["mid_channels"]} mid channels, {c["num_blocks"]} blocks, batch {c["batch_size"]} on {c["device"]} '
          f'({c["threads"]} threads{", bf16 autocast" if c["amp"] else ""}{", compiled" if c["compile"] else ""})')
    rows = [(label, fmt.format(result[key])) for key, label, fmt in TABLE if key in result]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f'  {label:<{width}}  {value:>12}')


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lecture and not os.path.isfile(args.lecture):
        parser.error(f'--lecture {args.lecture}: no such file (the lecture notebook is ../shared/seed/000_*.txt)')
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        if args.lecture:
            lecture_code(args.lecture)  # a file without the lecture's code fails now, not after the benchmark
        result = benchmark(args)
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
