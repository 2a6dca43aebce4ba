#!/usr/bin/env bash
# The one-command GPU check: how fast this project and the lecture's code train on one GPU, and what
# 10 epochs of the default model reach there.
#
#     bash gpu_check.sh DATA_DIR [OUT_DIR [model flags for bench.py and train.py ...]]
#
# DATA_DIR holds MNIST/raw/ (torchvision layout); it is copied to OUT_DIR/data first (default OUT_DIR:
# gpu_check_out). Stages, each under its own time limit (about 9 minutes in all), each writing
# OUT_DIR/<stage>.out (what it printed: JSON for all but copy and train) and OUT_DIR/<stage>.log (its
# messages), and a row of OUT_DIR/stages.tsv (exit code, seconds, limit):
#   versions        torch, CUDA, cuDNN, the GPU
#   bench_fp32      bench.py: FLOPs, the fp32 / TF32 matmul and convolution peaks, training images/s,
#                   kernels per step; with the lecture notebook found, the lecture's code on the same GPU
#   bench_amp       the same with bf16 autocast (and the bf16 peaks)
#   bench_compiled  --amp --compile: CUDA graphs; its first step is the compilation, reported apart
#   train           train.py, 10 epochs of the default model, --amp --compile (the fastest settings)
#   evaluate        evaluate.py on the run's best.pt, the whole test split
# then OUT_DIR/summary.json, printed: images/s, the ratios to the lecture, the 10-epoch wall time, test bpd.
# It installs nothing and needs no network. A stage that fails or runs out of time (exit 124) is recorded
# as such and the next one runs; the check exits 1 when any stage failed.
#
# For a try on a CPU with a tiny model (as the tests do): GPU_CHECK_DEVICE=cpu, GPU_CHECK_EPOCHS=1,
# GPU_CHECK_COMPILE=0 (skips the compiled stage and trains uncompiled), GPU_CHECK_NOTEBOOK=path or ''.
set -u
usage='usage: bash gpu_check.sh DATA_DIR [OUT_DIR [model flags ...]]'
if [ $# -lt 1 ]; then echo "$usage" >&2; exit 2; fi
data=$1
out=${2:-gpu_check_out}
shift $(( $# < 2 ? $# : 2 ))
device=${GPU_CHECK_DEVICE:-cuda}
epochs=${GPU_CHECK_EPOCHS:-10}
compile=${GPU_CHECK_COMPILE:-1}
notebook=${GPU_CHECK_NOTEBOOK-../shared/seed/000_3ef8c274db9a0617.txt}
here=$(cd "$(dirname "$0")" && pwd)

if [ ! -d "$data/MNIST/raw" ]; then echo "gpu_check.sh: $data/MNIST/raw not found; $usage" >&2; exit 2; fi
if [ -e "$out/stages.tsv" ]; then echo "gpu_check.sh: $out holds an earlier check; give another OUT_DIR" >&2; exit 2; fi
mkdir -p "$out/data" || exit 1
printf 'stage\texit\tseconds\tlimit\n' > "$out/stages.tsv"

stage() {  # stage NAME SECONDS COMMAND...: stdout -> NAME.out, stderr -> NAME.log, a row in stages.tsv
    local name=$1 limit=$2 start rc
    shift 2
    echo "gpu_check.sh: $name (at most ${limit}s)" >&2
    start=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.out" 2> "$out/$name.log"
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))e-3" "$limit" \
        >> "$out/stages.tsv"
}

lecture=()
if [ -n "$notebook" ] && [ -f "$notebook" ]; then lecture=(--lecture "$notebook"); fi
compiled=()
if [ "$compile" = 1 ]; then compiled=(--compile); fi

stage copy 60 cp -r "$data/MNIST" "$out/data/"
stage versions 30 python -c 'import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version() if cuda else None,
                      gpu=torch.cuda.get_device_name() if cuda else None,
                      capability=".".join(map(str, torch.cuda.get_device_capability())) if cuda else None)))'
stage bench_fp32 100 python "$here/bench.py" --device "$device" --json --steps 20 --warmup 5 "${lecture[@]}" "$@"
stage bench_amp 60 python "$here/bench.py" --device "$device" --json --steps 20 --warmup 5 --amp "$@"
if [ "$compile" = 1 ]; then
    stage bench_compiled 150 python "$here/bench.py" --device "$device" --json --steps 20 --warmup 5 --amp --compile "$@"
fi
stage train 150 python "$here/train.py" --data-dir "$out/data" --out-dir "$out/run" --epochs "$epochs" --amp \
    "${compiled[@]}" --device "$device" --log-every 50 "$@"
ckpt="$out/run/best.pt"
if [ ! -f "$ckpt" ]; then ckpt="$out/run/last.pt"; fi
stage evaluate 45 python "$here/evaluate.py" --ckpt "$ckpt" --data-dir "$out/data" --device "$device" --json
python "$here/bench.py" --summarize "$out"
