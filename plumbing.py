"""What train.py, sample.py, evaluate.py and bench.py share, and the lecture does not need: command-line types,
devices and processes, checkpoints, and the run folder that one training owns. (The model is in realnvp.py.)"""
import argparse
import fcntl
import hashlib
import io
import json
import math
import os
import re
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from realnvp import (DATASET_CHANNELS, DataNotFoundError, ImageDataset, RealNVP, RealNVPConfig,
                     get_param_groups, one_line, to_unit)

# -----------------------------------------------------------------------------
# Command lines: argparse types (a bad value exits 2 with one line), the model's flags


def _argument_type(kind, ok, what):
    """An argparse type: `kind(text)`, which must satisfy `ok`; else one line saying it must be `what`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f'must be {what}, got {text!r}')
        return value
    return parse


positive_int = _argument_type(int, lambda v: v >= 1, 'a positive integer')
non_negative_int = _argument_type(int, lambda v: v >= 0, 'zero or a positive integer')
positive_float = _argument_type(float, lambda v: 0 < v < math.inf, 'a positive number')
non_negative_float = _argument_type(float, lambda v: 0 <= v < math.inf, 'zero or a positive number')
unit_interval = _argument_type(float, lambda v: 0.0 <= v < 1.0, 'a number in [0, 1)')
seed = _argument_type(int, lambda v: 0 <= v < 2 ** 32, 'an integer from 0 to 2^32 - 1')   # x 1,000,003 fits 2^63


def die(prog, error, code=1):
    """Print `prog: error: <one line>` to stderr and exit with `code`."""
    print(f'{prog}: error: {error}', file=sys.stderr)
    sys.exit(code)


def given_flags(build_parser, argv):
    """The dests of the flags written on `argv`: parsed once more by a new `build_parser()` whose every default is
    replaced by a marker (with allow_abbrev=False, only whole flags count)."""
    probe = build_parser()
    unset = object()
    probe.set_defaults(**dict.fromkeys(vars(probe.parse_args([])), unset))
    return {dest for dest, value in vars(probe.parse_args(argv)).items() if value is not unset}


def model_flags(config):
    """The flags (by dest) that give `config`'s architecture: what a preset sets as the parser's defaults."""
    return dict(image_size=config.img_size, num_scales=config.num_scales, mid_channels=config.mid_channels,
                num_blocks=config.num_blocks, flow_norm=config.flow_norm, t_bound=config.t_bound,
                conditional=config.num_classes > 0, learned_prior=config.learned_prior)


def add_model_args(parser):
    """The architecture's flags, shared by train.py and bench.py, with RealNVPConfig()'s values as defaults;
    `config_from_args` reads them back."""
    a = parser.add_argument
    default = RealNVPConfig()
    a('--num-scales', type=positive_int, help=f'scales of the multi-scale architecture (default {default.num_scales})')
    a('--mid-channels', type=positive_int, help=f'channels of the first scale\'s s/t ResNets (default '
                                                 f'{default.mid_channels})')
    a('--num-blocks', type=positive_int, help=f'residual blocks per s/t ResNet (default {default.num_blocks})')
    a('--image-size', type=positive_int,
      help=f'images are resized to this; must be a multiple of 2^(num_scales-1) (default {default.img_size})')
    a('--flow-norm', action=argparse.BooleanOptionalAction,
      help='batch normalisation of every coupling\'s output as a layer of the flow, with its log-det (RealNVP '
           'paper, Section 3.7); the lecture has none (default: on; off in the lecture\'s model)')
    a('--t-bound', type=non_negative_float, metavar='B',
      help='bound every coupling\'s translation t to (-B, B) by B tanh(t / B); t is not in the log-det, so the '
           'flow stays exact, and one unusual image cannot be carried far out of the range the later couplings '
           f'know; 0: unbounded, as in the lecture (default {default.t_bound:g}; 0 in the lecture\'s model)')
    a('--conditional', action=argparse.BooleanOptionalAction,
      help='a class-conditional model (10 classes): a learned bias per label in every s/t network (and, with the '
           'learned prior, a Gaussian prior per label), so that log p(x | y) is exact and sample.py can draw a '
           'given digit (default: off)')
    a('--learned-prior', action=argparse.BooleanOptionalAction,
      help='the prior N(mean, diag(scale)^2) with a mean and a scale per latent dimension, learned (one more exact '
           'invertible layer; one per label with --conditional); off: N(0, I), the lecture\'s '
           f'(default: {"on" if default.learned_prior else "off"}; off in the lecture\'s model)')
    parser.set_defaults(**model_flags(default))


NUM_CLASSES = 10   # MNIST's digits, CIFAR-10's classes: the labels of --conditional


def class_labels(classes, per_class, device=None):
    """Labels for a class-conditional model's images: `per_class` of each of `classes` in turn, (K * per_class,)."""
    return torch.tensor(list(classes), device=device).repeat_interleave(per_class)


def labels_in_turn(classes, n, device=None):
    """n labels taking `classes` in turn (0, 1, ..., 9, 0, 1, ...): each as often as n allows, (n,)."""
    classes = torch.tensor(list(classes), device=device)
    return classes[torch.arange(n, device=device) % len(classes)]


def config_from_args(args):
    """The RealNVPConfig of parsed flags: `add_model_args`'s, and the channels of --dataset (or --in-channels)."""
    in_channels = getattr(args, 'in_channels', None) or DATASET_CHANNELS[getattr(args, 'dataset', 'mnist')]
    return RealNVPConfig(in_channels=in_channels, img_size=args.image_size, num_scales=args.num_scales,
                         mid_channels=args.mid_channels, num_blocks=args.num_blocks, flow_norm=args.flow_norm,
                         t_bound=args.t_bound, num_classes=NUM_CLASSES if args.conditional else 0,
                         learned_prior=args.learned_prior)


# -----------------------------------------------------------------------------
# Devices and memory


def pick_device(name=None):
    """torch.device for `name`, or the best there is: CUDA, then MPS, then CPU."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device('cuda')
        if torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f'unknown device {name!r}; use cpu, cuda, cuda:N or mps')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {name!r} asked for, but CUDA is not available here; use --device cpu')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f'device {name!r} asked for, but MPS is not available here; use --device cpu')
    return device


def native_bf16(device):
    """(bool, why): whether `device` runs bf16 matrix work in hardware, so that --amp is the faster default: a
    CUDA GPU of compute capability 8.0 or later, a CPU with AMX or AVX-512 BF16; not MPS. torch has no public
    question for the CPU's bf16 instructions: these are its private ones (a torch without them says no)."""
    device = torch.device(device)
    if device.type == 'cuda':
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f'a CUDA GPU of compute capability {major}.{minor}'
    if device.type == 'cpu':
        for what, check in (('AMX', '_is_amx_tile_supported'), ('AVX-512 BF16', '_is_avx512_bf16_supported')):
            if getattr(torch.cpu, check, lambda: False)():
                return True, f'a CPU with {what}'
        return False, 'a CPU without AVX-512 BF16 or AMX'
    return False, f'{device.type}'


def set_determinism(deterministic, device):
    """cuDNN autotuning on CUDA unless --deterministic, which asks torch for deterministic kernels everywhere
    (a kernel without one warns and runs; cuBLAS needs its workspace setting before CUDA starts)."""
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = device.type == 'cuda' and not deterministic
    torch.backends.cudnn.deterministic = deterministic


def compile_model(net, device):
    """torch.compile for training: static shapes (every batch is full); on CUDA, CUDA graphs (the options of mode
    'reduce-overhead'), with each call of the compiled net starting a new step (the last step's graph outputs are
    no longer needed). Without inductor's layout optimisation, which would store the convolutions' weights
    channels-last inside the graphs: their gradients would come channels-last, and autograd would copy each into
    its parameter's layout, a launch a weight outside the graphs (the activations are channels-last already)."""
    options = {'triton.cudagraphs': device.type == 'cuda', 'layout_optimization': False}
    compiled = torch.compile(net, options=options, dynamic=False)
    if device.type == 'cuda':
        compiled.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
    return compiled


def check_output_file(path, what, extensions=None):
    """Raise a one-line ValueError unless a file can be written at `path` (checked before the work that makes it):
    not a folder, one of `extensions` if given, a name that fits, in a folder that is or can be made writable."""
    if os.path.isdir(path):
        raise ValueError(f'{what}: {path} is a folder; give a file name')
    if extensions and os.path.splitext(path)[1].lower() not in extensions:
        raise ValueError(f'{what}: {path} needs one of the extensions {", ".join(extensions)}')
    name = os.path.basename(path)
    if len(name.encode()) > 255:
        raise ValueError(f'{what}: the name {name[:40]}... is longer than the 255 bytes a file name can have')
    check_writable_folder(os.path.dirname(os.path.abspath(path)), what)   # a file there is replaced atomically


def memory_needed(config, train_batch=0, eval_batch=0):
    """Bytes (fp32, a rough upper estimate) that a model of `config` needs: its weights (counted on the meta device,
    nothing allocated), five times over when training (the gradient, Adam's two moments, the weight average); what a
    training step of `train_batch` images keeps for its backward pass (each coupling's s/t ResNet keeps about 6 maps
    per residual block and 8 more); and the largest maps a forward pass without gradients holds at once for
    `eval_batch` images (evaluation, sampling)."""
    with torch.device('meta'):
        params = sum(p.numel() for p in RealNVP(config).parameters())
    maps, widest, pixels, mid = 0, 0, config.img_size ** 2, config.mid_channels
    for scale in range(config.num_scales):   # channels x pixels of every coupling's s/t net, scale by scale
        last = scale == config.num_scales - 1
        maps += (4 if last else 3) * mid * pixels + (0 if last else 3 * 2 * mid * pixels // 4)
        widest = max(widest, mid * pixels)
        pixels, mid = pixels // 4, 2 * mid
    training = train_batch * (6 * config.num_blocks + 8) * maps
    forward = eval_batch * (12 * widest + 16 * config.in_channels * config.img_size ** 2)
    return 4 * (params * (5 if train_batch else 1) + training + forward)


def check_memory(needed, what, advice):
    """Raise a one-line ValueError when `needed` bytes would not fit in 90% of this machine's memory."""
    try:
        total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return  # the OS does not say: go ahead
    if needed > 0.9 * total:
        raise ValueError(f'{what} needs about {needed / 1e9:.1f} GB, and this machine has {total / 1e9:.1f} GB of '
                         f'memory; choose {advice}')


def check_writable_folder(folder, what):
    """Raise a one-line ValueError unless `folder` is, or can be created as, a folder this process can write in:
    every name in it fits the file system, and its nearest existing ancestor is a writable folder, not a file."""
    path = os.path.abspath(folder)
    long = [name for name in path.split(os.sep) if len(name.encode()) > 255]
    if long:
        raise ValueError(f'{what}: the name {long[0][:40]}... is longer than the 255 bytes a file name can have')
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f'{what}: {path} is a file, not a folder')
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f'{what}: {path} is not writable')


# -----------------------------------------------------------------------------
# Files: one atomic writer, checkpoints, pictures

CHECKPOINT_FORMAT = 4   # the layout train.py writes; a checkpoint of another format is refused
TMP_MARK = '.realnvp-tmp'   # temporaries are <file>.realnvp-tmp<pid>: the only files the project ever removes


class CheckpointError(ValueError):
    """A file that cannot be read or written, or a checkpoint that does not fit; the message says what to do."""


def write_atomically(data, path):
    """Write bytes through a temporary file beside `path` (its folder made if need be), flushed to disk (file and
    folder) before the rename: a crash or a power cut never leaves half a file, and a failed write (a full disk)
    leaves the old file as it was and no temporary behind. The temporaries that killed writers left beside it go."""
    tmp = f'{path}{TMP_MARK}{os.getpid()}'
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        remove_dead_temporaries(os.path.dirname(os.path.abspath(path)))   # what an earlier kill left there
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException as e:   # a full disk, or Ctrl-C: no temporary left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        raise CheckpointError(f'could not write {path}: {e.strerror or e}; the file there before is '
                              f'untouched') from None


def remove_dead_temporaries(folder):
    """Remove the project's temporaries (<file>.realnvp-tmp<pid>) in `folder` whose process is gone: what a kill
    mid-write leaves. A live process's temporary is its write in progress, and is left alone."""
    for name in os.listdir(folder):
        match = re.fullmatch(r'.+' + re.escape(TMP_MARK) + r'(\d+)', name)
        if match and not process_alive(int(match.group(1))):
            os.remove(os.path.join(folder, name))


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def checkpoint_bytes(obj):
    """`obj` serialised by torch.save, once, for as many files as need it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    pyplot().close(fig)
    write_atomically(buffer.getbuffer(), path)


def save_grid(images, path, nrow=None, scale=None):
    """Images (n, C, H, W) in [0, 1] as one PNG (or JPEG, by `path`'s extension) grid, `nrow` to a row (default: as
    square as it gets), enlarged `scale` times with nearest-neighbour pixels (default: the least whole factor that
    makes a cell at least 56 pixels high, so a 14x14 digit can be seen)."""
    from torchvision.utils import make_grid, save_image
    grid = make_grid(images, nrow=nrow or math.ceil(math.sqrt(len(images))), padding=1, pad_value=1.0)
    scale = scale or max(1, math.ceil(56 / images.shape[-2]))
    buffer = io.BytesIO()
    image_format = 'jpeg' if path.lower().endswith(('.jpg', '.jpeg')) else 'png'
    save_image(grid.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1), buffer, format=image_format)
    write_atomically(buffer.getbuffer(), path)


def floating_tensors(tensors, prefix=''):
    """(name, tensor) for every floating-point tensor of a {name: tensor} mapping, nested dicts and lists too."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for name, value in items:
        if isinstance(value, (dict, list, tuple)):
            yield from floating_tensors(value, f'{prefix}{name}.')
        elif torch.is_tensor(value) and value.is_floating_point():
            yield f'{prefix}{name}', value


def non_finite_tensor(tensors):
    """The name of the first tensor of a {name: tensor} mapping (nested dicts and lists too) holding a NaN or an
    infinity, or None. One reduction and one host sync per device, however many tensors there are."""
    named = list(floating_tensors(tensors))
    by_device = {}
    for i, (_, value) in enumerate(named):
        by_device.setdefault(value.device, []).append(i)
    bad = []
    for indices in by_device.values():
        finite = torch.stack([torch.isfinite(named[i][1]).all() for i in indices])
        if not bool(finite.all()):   # the one sync
            bad.append(indices[int((~finite).nonzero()[0])])
    return named[min(bad)][0] if bad else None


def load_checkpoint(path, device='cpu'):
    """(model in eval mode on `device`, checkpoint dict) from a file written by train.py: the one reader of
    checkpoints, for --resume, sample.py and evaluate.py. Anything wrong with it is one CheckpointError."""
    if os.path.isdir(path):
        raise CheckpointError(f'{path} is a folder; give the path of a checkpoint in it (its last.pt or best.pt)')
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} not found; give the path of a best.pt or last.pt from train.py')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'checkpoint {path} cannot be read ({one_line(e, 0)}); it may be truncated or not '
                              f'from train.py') from None
    if not isinstance(ckpt, dict) or 'config' not in ckpt or 'model' not in ckpt:
        raise CheckpointError(f'{path} is not a train.py checkpoint (no model config and weights inside)')
    if ckpt.get('format') != CHECKPOINT_FORMAT:
        raise CheckpointError(f'{path} is a checkpoint of format {ckpt.get("format", 1)}, and this version of '
                              f'train.py reads format {CHECKPOINT_FORMAT} only; train it again with this version')
    try:
        config = RealNVPConfig(**ckpt['config'])
        check_memory(memory_needed(config), f'the model in {path}', 'another checkpoint')
        model = RealNVP(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'the config in {path} cannot build a model: {one_line(e, 0)}') from None
    saved = ckpt.get('args', {})
    dataset = saved.get('dataset', 'mnist') if isinstance(saved, dict) else None
    if DATASET_CHANNELS.get(dataset) != config.in_channels:
        raise CheckpointError(f'{path} is not a train.py checkpoint: its flags (data set {dataset!r}) do not go with '
                              f'its model of {config.in_channels} channels')
    if config.num_classes not in (0, NUM_CLASSES):
        raise CheckpointError(f'{path} is not a train.py checkpoint: its model has {config.num_classes} classes, and '
                              f'a class-conditional model of train.py has {NUM_CLASSES}, the data set\'s labels')
    bad = non_finite_tensor(ckpt['model']) if isinstance(ckpt['model'], dict) else None
    if bad is not None:
        raise CheckpointError(f'checkpoint {path} is not finite: its weight {bad} holds NaN or infinite values, '
                              f'so it cannot be used; take an earlier checkpoint')
    try:
        model.load_state_dict(ckpt['model'])
    except (RuntimeError, TypeError, AttributeError) as e:   # torch's message: a line a kind of misfit
        problems = [line.strip() for line in str(e).splitlines()[1:]] or [one_line(e)]
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        first = problems[0] if len(problems[0]) <= 200 else problems[0][:200] + '...'
        raise CheckpointError(f'the weights in {path} do not fit its config: {first}{more}') from None
    return model.to(device).eval(), ckpt


def open_checkpoint(prog, args):
    """(model, checkpoint, path) for sample.py and evaluate.py: --ckpt (or the newest run's under --runs-dir) on
    --device; anything wrong exits 1 with one line."""
    try:
        path = args.ckpt or find_checkpoint(args.runs_dir)
        return (*load_checkpoint(path, pick_device(args.device)), path)
    except ValueError as e:
        die(prog, e)


def check_resumable(ckpt, model, path, flags, recipes, state_fields):
    """A one-line CheckpointError unless everything a resume takes from `ckpt` is there, of the right kind and
    finite: the flags in `flags` ({name: a value of its parsed type, or None for a list of ints or None}), a recipe
    of `recipes`, the run id, the training state (numbers, named `state_fields`), the trained weights and the
    optimizer's state (loaded into `model`, a throwaway, and an Adam over its groups), and the random-number
    states. `restore` then loads them without a check of its own."""
    needed = ('train_model', 'optimizer', 'rng', 'state', 'args', 'run_id', 'data')
    if not all(key in ckpt for key in needed):
        raise CheckpointError(f'{path} holds weights but not the state to resume from (optimizer, step, random '
                              f'numbers); sample.py and evaluate.py can use it, or start a new run')
    try:
        for key, example in flags.items():
            value = ckpt['args'][key]
            ints_or_none = value is None or isinstance(value, list) and all(isinstance(v, int) for v in value)
            if not (ints_or_none if example is None else isinstance(value, type(example))):
                raise TypeError(f'its flag {key} is {value!r}')
        if ckpt['args']['recipe'] not in recipes or not isinstance(ckpt['run_id'], str):
            raise ValueError('its recipe or run id is not one of this version')
        state = ckpt['state']
        if sorted(state) != sorted(state_fields) or not all(type(v) in (int, float) for v in state.values()):
            raise ValueError(f'its training state is not {", ".join(state_fields)} as numbers')
        model.load_state_dict(ckpt['train_model'])
        torch.optim.Adam(get_param_groups(model, 0.0)).load_state_dict(ckpt['optimizer'])
        if not all(torch.is_tensor(r['cpu']) and r['cpu'].dtype == torch.uint8 for r in ckpt['rng']):
            raise ValueError('its random-number states are not torch\'s')
        floating = sum(b.numel() for b in model.buffers() if b.is_floating_point())
        if not all(torch.is_tensor(flat) and flat.numel() == floating for flat in ckpt.get('rank_buffers') or []):
            raise ValueError('its per-rank batch-norm statistics are not the model\'s')
        bad = non_finite_tensor({k: ckpt[k] for k in ('train_model', 'optimizer')})
        if bad is not None:
            raise ValueError(f'{bad} holds NaN or infinite values')
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f'{path} cannot be resumed: {one_line(e)}; sample.py and evaluate.py can use its '
                              f'weights, or start a new run') from None


def restore(ckpt, model, average, optimizer, rank, device):
    """Load a checkpoint that `check_resumable` passed: the trained weights and the weight average, the optimizer,
    this rank's batch-norm statistics and RNG; returns its training state (TrainState's fields), with the epoch's
    totals so far on rank 0 alone: they are saved summed over the ranks."""
    model.load_state_dict(ckpt['train_model'])
    average.model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    rank_buffers = ckpt.get('rank_buffers')   # a run of several processes: each rank's own statistics
    if rank_buffers:
        floating = [b for b in model.buffers() if b.is_floating_point()]
        flat = rank_buffers[min(rank, len(rank_buffers) - 1)]
        with torch.no_grad():
            for b, part in zip(floating, flat.split([b.numel() for b in floating])):
                b.copy_(part.view_as(b))
    rng = ckpt['rng'][min(rank, len(ckpt['rng']) - 1)]   # a run resumed on fewer processes takes rank 0's
    torch.set_rng_state(rng['cpu'])
    if device.type == 'cuda' and rng['cuda'] is not None:
        torch.cuda.set_rng_state(rng['cuda'], device)
    state = dict(ckpt['state'])
    if rank > 0:
        state['epoch_loss'] = state['epoch_count'] = 0.0
    return state


def checkpoint_dataset(ckpt, train=False, data_dir=None, every_label=False):
    """The data set a checkpoint's run trained on (its name, digits and image size), from `data_dir` or the run's;
    with `every_label`, all of that data set's labels, whatever digits the run kept."""
    saved = ckpt.get('args', {})
    return ImageDataset(saved.get('dataset', 'mnist'), data_dir or saved.get('data_dir', './data'), train=train,
                        img_size=ckpt['config']['img_size'], digits=None if every_label else saved.get('digits'))


def trained_labels(ckpt):
    """The labels a class-conditional checkpoint's model was trained on: its run's --digits, or all its classes."""
    return ckpt.get('args', {}).get('digits') or list(range(ckpt['config']['num_classes']))


def data_fingerprint(train, test):
    """Sizes and a hash of both splits (uint8 tensors), kept in checkpoints: a resume must see the same data."""
    digest = hashlib.sha256()
    for images in (train, test):
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images.contiguous().numpy().tobytes())
    return dict(train=len(train), test=len(test), sha256=digest.hexdigest()[:16])


# -----------------------------------------------------------------------------
# Judging samples: a digit classifier and the Fréchet distance between feature sets


class DigitJudge(nn.Module):
    """A small convolutional digit classifier for one image size, trained on the training split: an independent
    judge of samples. Its penultimate layer's 128 features give the Fréchet distance between samples and real
    images (as FID does with Inception's); its labels say which digits the samples show."""

    def __init__(self, in_channels=1, img_size=14, num_classes=10):
        super().__init__()
        block = lambda c_in, c_out: (nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
        self.body = nn.Sequential(
            *block(in_channels, 32), *block(32, 32), nn.MaxPool2d(2),                 # (B, 32, H/2, W/2)
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),                          # (B, 64, H/4, W/4)
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * (img_size // 4) ** 2, 128), nn.ReLU())   # (B, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x):
        """x in [0, 1], (B, C, H, W) -> (B, 128)."""
        return self.body(2.0 * x - 1.0)

    def forward(self, x):
        return self.head(self.features(x))   # (B, num_classes) logits


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F), in float64:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). tr (S_a S_b)^(1/2) is the sum of the square roots of
    the eigenvalues of S_a^(1/2) S_b S_a^(1/2), a symmetric matrix with the same eigenvalues as S_a S_b."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f'the Frechet distance needs at least 2 samples a set, got {len(a)} and {len(b)}')
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError('the features are not finite: the judge, or the samples, hold NaN or infinite values')
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


JUDGE_EPOCHS = 3


def train_judge(train_set, test_set, device, epochs=JUDGE_EPOCHS, seed=0):
    """A DigitJudge trained on `train_set` (Adam, batch 128, one-pixel random shifts, the learning rate lowered
    to 0 along a cosine), with a progress bar; returns it in eval mode and its accuracy on `test_set`."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = DigitJudge(train_set.images.shape[1], train_set.images.shape[-1]).to(device)
    optimizer = torch.optim.Adam(judge.parameters(), lr=2e-3)
    steps = epochs * math.ceil(len(train_set) / 128)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    with tqdm(total=steps, desc='training the digit judge', dynamic_ncols=True) as bar:
        for _ in range(epochs):
            for idx in torch.randperm(len(train_set), generator=g).split(128):
                x = to_unit(train_set.images[idx]).to(device)
                dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
                x = torch.roll(x, (dx, dy), dims=(2, 3))
                loss = torch.nn.functional.cross_entropy(judge(x), train_set.labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
    judge.eval()
    return judge, judge_accuracy(judge, test_set.images, test_set.labels)


@torch.no_grad()
def judge_features(judge, images, batch_size=1024):
    """The judge's features (N, 128, float64 on the CPU) and labels (N,) of images in [0, 1] (float) or uint8."""
    device = next(judge.parameters()).device
    feats, labels = [], []
    for x in images.split(batch_size):
        f = judge.features((to_unit(x) if x.dtype == torch.uint8 else x).to(device))
        feats.append(f.double().cpu())
        labels.append(judge.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(labels)


def judge_accuracy(judge, images, labels):
    return (judge_features(judge, images)[1] == labels).double().mean().item() if len(labels) else 0.0


def load_judge(train_set, test_set, cache_dir, device, log=print):
    """The digit judge for these data: from `cache_dir`/judge-<data hash>.pt, or trained and cached there the
    first time. The file is keyed by the data's fingerprint (which covers the image size); one whose recorded
    data are not these is refused and left as it is, and a judge is trained for this call alone. A file that
    cannot be read is set aside as <file>.damaged and replaced; a cache that cannot be written is said in one line,
    and the judge is used all the same."""
    fingerprint = data_fingerprint(train_set.images, test_set.images)
    path = os.path.join(cache_dir, f'judge-{fingerprint["sha256"]}.pt')
    foreign = False
    if os.path.exists(path):
        try:
            cached = torch.load(path, map_location='cpu', weights_only=True)
            foreign = cached['data'] != fingerprint
            if not foreign:
                judge = DigitJudge(*cached['shape']).to(device)
                judge.load_state_dict(cached['model'])
                if non_finite_tensor(cached['model']) is not None:
                    raise ValueError('its weights are not finite')
                log(f'digit judge {path}: test accuracy {cached["test_accuracy"]:.2%}')
                return judge.eval(), cached['test_accuracy']
            log(f'{path} was trained on other data: not used; training a judge for these')
        except Exception as e:   # anything torch.load or a damaged file can raise: EOFError, pickle's errors, ...
            log(f'{path} cannot be used ({one_line(e)}): set aside as {path}.damaged; training a judge')
            try:
                os.replace(path, path + '.damaged')
            except OSError:
                pass   # the write below says what it can
    judge, accuracy = train_judge(train_set, test_set, device)
    note = ''
    if not foreign:
        shape = (train_set.images.shape[1], train_set.images.shape[-1])
        try:
            write_atomically(checkpoint_bytes(dict(model=judge.state_dict(), shape=shape, data=fingerprint,
                                                   test_accuracy=accuracy)), path)
            note = f'; cached in {path}'
        except CheckpointError as e:
            note = f'; not cached ({one_line(e)})'
    log(f'digit judge trained: test accuracy {accuracy:.2%}{note}')
    return judge, accuracy


def find_checkpoint(runs_dir='runs'):
    """The best.pt (or last.pt) of the run under `runs_dir` that wrote a checkpoint last: what else was written into
    a run folder since (a sample grid, an evaluation's PNG) does not make it newer."""
    candidates = []
    if os.path.isdir(runs_dir):
        for run in os.listdir(runs_dir):
            saved = [os.path.join(runs_dir, run, name) for name in ('best.pt', 'last.pt')]
            saved = [path for path in saved if os.path.isfile(path)]
            if saved:
                candidates.append((max(map(os.path.getmtime, saved)), saved[0]))
    if not candidates:
        raise CheckpointError(f'no checkpoint found under {runs_dir}/; train one with train.py or pass --ckpt PATH')
    return max(candidates)[1]


# -----------------------------------------------------------------------------
# Processes: one, or several under torchrun; the run's data on each


class Dist:
    """The processes of a run: one (rank 0 of 1, every collective the identity), or several started by torchrun
    (gloo on the CPU, NCCL on CUDA, one GPU a process). The training code never asks how many there are."""

    def __init__(self, device, log_every):
        self.rank = 0
        self.world = int(os.environ.get('WORLD_SIZE', '1'))
        self.device = device
        self.sync_every = 1   # steps between stop checks: one process checks its own flag every step
        if self.world > 1:
            die_with_parent()
            if device.type == 'cuda':
                self.device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
                torch.cuda.set_device(self.device)
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                    device_id=self.device if device.type == 'cuda' else None)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.sync_every = log_every  # agreeing on a stop costs an all-reduce and a host sync

    def all_reduce(self, tensor, op='sum'):
        if self.world > 1:
            dist.all_reduce(tensor, op={'sum': dist.ReduceOp.SUM, 'max': dist.ReduceOp.MAX}[op])
        return tensor

    def reduce_max(self, tensor):
        return self.all_reduce(tensor, 'max')

    def any(self, flag):
        return flag if self.world == 1 else self.reduce_max(torch.tensor(float(flag), device=self.device)).item() > 0

    def broadcast(self, obj):
        holder = [obj]
        if self.world > 1:
            dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, obj):
        out = [obj] * self.world
        if self.world > 1:
            dist.all_gather_object(out, obj)
        return out

    def shard(self, tensor):
        return tensor[self.rank::self.world]

    def wrap(self, model):
        if self.world == 1:
            return model
        # broadcast_buffers=False: no broadcast of every batch-norm buffer before each forward. A training
        # forward normalises by its own batch's statistics, so the running ones never touch the gradients;
        # each rank keeps its own through an epoch, they are averaged at its end (average_buffers), and a
        # checkpoint taken in between keeps every rank's (`rank_buffers`).
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                                       broadcast_buffers=False)

    def gather_buffers(self, model):
        """Every rank's floating-point buffers (the batch-norm statistics), one flat CPU tensor a rank, for a
        checkpoint of several processes (None for one: the model's state holds them)."""
        if self.world == 1:
            return None
        return self.gather(torch.cat([b.reshape(-1) for b in model.buffers() if b.is_floating_point()]).cpu())

    def average_buffers(self, model):
        """Average the batch-norm running statistics over the ranks: each saw only its own batches."""
        for buffer in model.buffers() if self.world > 1 else []:
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.AVG)

    def check_ranks_agree(self, model, log):
        """Every rank must hold the same weights and statistics: compare digests, say so in the log."""
        if self.world == 1:
            return
        digest = hashlib.sha256()
        for value in model.state_dict().values():
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        digests = self.gather(digest.hexdigest())
        if len(set(digests)) == 1:
            log(f'weights identical across {self.world} ranks (sha256 {digests[0][:12]})')
        else:
            log(f'warning: the {self.world} ranks ended with different weights ({", ".join(d[:12] for d in digests)})')

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def die_with_parent():
    """Have Linux kill this process when its parent, torchrun's agent, dies (prctl PR_SET_PDEATHSIG): torchrun starts
    each worker in a session of its own, so a SIGKILL to torchrun's process group would leave the workers training,
    and rank 0 holding the run folder's lock. Elsewhere, nothing."""
    if not sys.platform.startswith('linux'):
        return
    import ctypes
    parent = os.getppid()
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:   # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Data:
    """The data as uint8 on the device: the whole training split, and this process's share of the test split;
    their labels for a class-conditional model (None otherwise)."""
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    n_test: int        # images in the whole test split
    fingerprint: dict  # sizes and a hash of both splits, kept in checkpoints: a resume must see the same data


def load_run_data(args, dist, ckpt):
    """The run's data on the device; missing, empty or (on --resume) other data exits 1 with one line."""
    try:
        train_set, test_set = (ImageDataset(args.dataset, args.data_dir, train=train, img_size=args.image_size,
                                            digits=args.digits) for train in (True, False))
    except (DataNotFoundError, ValueError) as e:
        die('train.py', e)
    fingerprint = data_fingerprint(train_set.images, test_set.images)
    if ckpt is not None and ckpt['data'] != fingerprint:
        die('train.py', f'the data in {args.data_dir} ({fingerprint["train"]} train, {fingerprint["test"]} test '
                          f'images) are not the data this run trained on ({ckpt["data"]["train"]} train, '
                          f'{ckpt["data"]["test"]} test images, another hash); point --data-dir at those')
    labelled = args.conditional
    return Data(train=train_set.images.to(dist.device), test=dist.shard(test_set.images).to(dist.device),
                train_labels=train_set.labels.to(dist.device) if labelled else None,
                test_labels=dist.shard(test_set.labels).to(dist.device) if labelled else None,
                n_test=len(test_set), fingerprint=fingerprint)


class Interrupt:
    """Ctrl-C and SIGTERM while a run trains: noted in `caught`, so that the loop stops after the current step
    and saves; the handlers before it are put back on exit."""

    def __enter__(self):
        self.caught = False
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum, frame):
        self.caught = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# The run folder


METRICS_COLUMNS = ('epoch', 'step', 'train_bpd', 'test_bpd', 'skipped_steps', 'seconds', 'images_per_s')

def folder_owner(out_dir):
    """The run id of the run a folder belongs to (its config.json's), or None for a folder that is not there or
    holds nothing but a lock. A folder with anything else in it and no config.json of train.py is refused."""
    if not os.path.isdir(out_dir):
        return None
    names = [n for n in os.listdir(out_dir) if n != '.lock']
    try:
        with open(os.path.join(out_dir, 'config.json')) as f:
            return str(json.load(f)['run_id'])
    except (OSError, ValueError, KeyError, TypeError):
        if names:
            raise ValueError(f'{out_dir} holds files that are not a run of train.py (e.g. {sorted(names)[0]}); pass '
                             f'another --out-dir') from None
        return None


def check_run_folder(out_dir, ckpt, resume):
    """One run per folder, and nothing of it overwritten. Returns the run id of the checkpoint's run when it is
    resumed in its own folder; None when this start is a new run (a fresh start or a branch from `ckpt`).

    A new run starts in an empty folder, or one whose run saved no checkpoint (it is restarted); a resume writes
    only into its own run's folder (its config.json names the run), never over a newer last.pt; a resume into
    an empty or new folder branches. Raises a one-line ValueError with a way forward that works."""
    owner = folder_owner(out_dir)
    held = [n for n in ('last.pt', 'best.pt') if os.path.isfile(os.path.join(out_dir, n))]
    for name in ('last.pt', 'best.pt', 'config.json', 'metrics.csv', 'curves.png', 'train.log'):
        path = os.path.join(out_dir, name)
        if os.path.exists(path) and not os.path.isfile(path):
            raise ValueError(f'{path} is not a file, so the run cannot write its {name} there; move it away')
    if ckpt is None:
        if owner is not None and held:
            raise ValueError(f'{out_dir} holds run {owner}; continue it with --resume '
                             f'{os.path.join(out_dir, held[0])}, or pass another --out-dir')
        return None
    if owner is None:
        return None
    if owner != ckpt['run_id']:
        raise ValueError(f'{out_dir} holds run {owner}, not the run of {resume} ({ckpt["run_id"]}); resume into that '
                         f'run\'s own folder, or branch into a new --out-dir')
    last = os.path.join(out_dir, 'last.pt')
    if 'last.pt' in held and not os.path.samefile(last, resume):
        try:
            theirs = load_checkpoint(last)[1]['state']['step']
        except (CheckpointError, KeyError, TypeError):
            theirs = -1   # a damaged last.pt: resuming from the run's best.pt is the way back
        if theirs > ckpt['state']['step']:
            raise ValueError(f'{last} is at step {theirs}, past {resume} (step {ckpt["state"]["step"]}); resuming '
                             f'would overwrite it: to branch from this checkpoint pass a new --out-dir')
    return owner


class FolderRefused(Exception):
    """A run folder that this start cannot take: one line, and the exit code (2: bad input; 1: in use, or the
    file system)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class RunFolder:
    """The folder of one training run. Only rank 0 writes; every other rank gets one that writes nothing.

    Every file goes through `write_atomically`, so a crash leaves each one whole, old or new; config.json, which
    names the run, is written first, and last.pt, the commit point of an epoch, last."""

    def __init__(self, out_dir, active):
        self.dir = out_dir
        self.active = active
        self.lock = None
        self.made = False   # whether take() made the folder

    def take(self, ckpt, resume):
        """Rank 0 takes the folder: makes it, locks it while the run lives (the kernel drops the lock however the
        process ends), checks under the lock that this start may write there (`check_run_folder`), and removes the
        project's own temporaries of a process that died mid-write. Returns what `check_run_folder` returns (the
        run id when `ckpt` resumes its own run here); raises FolderRefused, with one line and an exit code."""
        try:
            self.made = not os.path.isdir(self.dir)
            os.makedirs(self.dir, exist_ok=True)
            self.lock = open(self.path('.lock'), 'a+')
        except OSError as e:
            raise FolderRefused(f'cannot use {self.dir} as the run folder: {e.strerror or e}; pass another '
                                f'--out-dir', 1) from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            raise FolderRefused(f'{self.dir} is in use by another training (pid {self.lock.read().strip() or "?"}); '
                                f'wait for it to end, or pass another --out-dir', 1) from None
        try:
            self.lock.truncate(0)
            self.lock.write(f'{os.getpid()}\n')
            self.lock.flush()
            remove_dead_temporaries(self.dir)   # before the check: a kill mid-write of config.json leaves one
            own = check_run_folder(self.dir, ckpt, resume)
        except ValueError as e:   # the folder holds another run, or files that are not a run's
            raise FolderRefused(str(e), 2) from None
        except OSError as e:
            raise FolderRefused(f'cannot write in {self.dir}: {e.strerror or e}', 1) from None
        return own

    def record(self, record):
        """Write config.json, which names the run (`record`: its id, flags, data, model), unless it does already."""
        if self.active and folder_owner(self.dir) != record['run_id']:
            self.write('config.json', json.dumps(record, indent=2))

    def close(self):
        """Let the folder go: the lock is dropped (as it is, anyway, when the process ends), and a folder this start
        made and wrote nothing into (it stopped before: bad data, say) is removed."""
        if self.lock is not None:
            self.lock.close()
            if self.made and os.listdir(self.dir) == ['.lock']:
                os.remove(self.path('.lock'))
                os.rmdir(self.dir)

    def path(self, name):
        return os.path.join(self.dir, name)

    def log(self, message):
        if self.active:
            tqdm.write(message)
            try:
                with open(self.path('train.log'), 'a') as f:
                    f.write(message + '\n')
            except OSError as e:
                raise CheckpointError(f'could not write {self.path("train.log")}: {e.strerror or e}; the files there '
                                      f'before are untouched') from None

    def write(self, name, data):
        """Write bytes (or a str) as the file `name`, atomically."""
        if self.active:
            write_atomically(data.encode() if isinstance(data, str) else data, self.path(name))

    def write_grid(self, images, name):
        if self.active:   # 8 a row: a class-conditional model's grid has a row a class
            save_grid(images, self.path(name), nrow=8)

    def read_metrics(self, upto_epoch):
        """The rows of metrics.csv up to `upto_epoch` (rows past it belong to epochs a resume redoes); a file
        that is not train.py's, with METRICS_COLUMNS, exits with one line before anything is trained."""
        path = self.path('metrics.csv')
        if not self.active or not os.path.isfile(path):
            return []
        try:
            with open(path) as f:
                lines = [line.rstrip('\n').split(',') for line in f if line.strip()]
            if tuple(lines[0]) != METRICS_COLUMNS:
                raise ValueError('other columns')
            rows = [dict(zip(METRICS_COLUMNS, line, strict=True)) for line in lines[1:]]
            return [row for row in rows if int(row['epoch']) <= upto_epoch]
        except (ValueError, IndexError, UnicodeDecodeError, OSError):
            die('train.py', f'{path} is not a metrics file of train.py; move it away to resume (a new one is '
                            f'written from this point on)')

    def write_metrics(self, rows):
        """metrics.csv, and curves.png: the train and test bpd of each epoch."""
        if not self.active:
            return
        self.write('metrics.csv', '\n'.join([','.join(METRICS_COLUMNS)] + [','.join(str(r[c]) for c in METRICS_COLUMNS)
                                                                           for r in rows]) + '\n')
        fig, ax = pyplot().subplots(figsize=(5, 3.5))
        epochs = [int(r['epoch']) for r in rows]
        ax.plot(epochs, [float(r['train_bpd']) for r in rows], 'o-', label='train')
        ax.plot(epochs, [float(r['test_bpd']) for r in rows], 's-', label='test')
        ax.set(xlabel='epoch', ylabel='bits per dimension')
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, self.path('curves.png'))
