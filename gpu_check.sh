#!/usr/bin/env bash
# The one-command GPU check: how fast this project and the lecture's code train on one GPU, and what
# 10 epochs of the default model reach there.
#
#     bash gpu_check.sh [--notebook PATH] DATA_DIR [OUT_DIR [model flags for bench.py and train.py ...]]
#
# DATA_DIR holds MNIST/raw/ (torchvision layout, plain or .gz files). The lecture notebook (its text file,
# ../shared/seed/000_*.txt in the course folder) is --notebook PATH or $GPU_CHECK_NOTEBOOK; without it the
# lecture's code is not timed, and the summary says so. The data copy, the run and each stage's output go to a
# scratch folder ($GPU_CHECK_WORK, default a new one under /tmp); OUT_DIR (default gpu_check_out) gets four
# files, each far under 16 MB: summary.json (every stage's exit code, seconds and limit, its JSON output, the
# end of its messages, and the figures), and the run's train.log, metrics.csv and last sample grid.
#
# Stages, each under its own time limit (with 5 s of grace each, 505 s in all), the first three bench
# stages compiling nothing and bench_compiled and train compiling the model once:
#   copy            the data to the scratch folder                                         20 s
#   versions        torch, CUDA, cuDNN, the GPU                                            20 s
#   bench_fp32      bench.py: FLOPs, the fp32 / TF32 peaks, images/s, launches a step,     90 s
#                   the overhead at a narrow width; with the notebook, the lecture's code
#   bench_amp       the same with bf16 autocast (and the bf16 peaks)                       60 s
#   bench_compiled  --amp --compile: CUDA graphs; its first step is the compilation       120 s
#   train           train.py, --epochs (10) of the default model, --amp --compile         120 s
#   evaluate        evaluate.py on the run's best.pt, the whole test split                 40 s
# A stage that fails or runs out of time (exit 124) is recorded as such and the next one runs; the check
# exits 1 when any stage failed. It installs nothing and needs no network.
#
# For a try on a CPU with a tiny model (as the tests do): GPU_CHECK_DEVICE=cpu, GPU_CHECK_EPOCHS=1,
# GPU_CHECK_COMPILE=0 (skips the compiled stage and trains uncompiled).
set -u
usage='usage: bash gpu_check.sh [--notebook PATH] DATA_DIR [OUT_DIR [model flags ...]]'
notebook=${GPU_CHECK_NOTEBOOK-}
if [ "${1-}" = --notebook ]; then
    if [ $# -lt 2 ]; then echo "gpu_check.sh: --notebook needs a path; $usage" >&2; exit 2; fi
    notebook=$2
    shift 2
fi
if [ $# -lt 1 ]; then echo "$usage" >&2; exit 2; fi
data=$1
out=${2:-gpu_check_out}
shift $(( $# < 2 ? $# : 2 ))
device=${GPU_CHECK_DEVICE:-cuda}
epochs=${GPU_CHECK_EPOCHS:-10}
compile=${GPU_CHECK_COMPILE:-1}
here=$(cd "$(dirname "$0")" && pwd)
python=$(command -v python || command -v python3) || { echo 'gpu_check.sh: neither python nor python3 found' >&2; exit 2; }

if [ ! -d "$data/MNIST/raw" ]; then echo "gpu_check.sh: $data/MNIST/raw not found; $usage" >&2; exit 2; fi
if [ -n "$notebook" ] && [ ! -f "$notebook" ]; then echo "gpu_check.sh: --notebook $notebook: no such file" >&2; exit 2; fi
if [ -e "$out/summary.json" ]; then echo "gpu_check.sh: $out holds an earlier check; give another OUT_DIR" >&2; exit 2; fi
mkdir -p "$out" || exit 1
work=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$work/data" || exit 1
printf 'stage\texit\tseconds\tlimit\n' > "$work/stages.tsv"
printf '%s\n' "$notebook" > "$work/notebook.txt"

stage() {  # stage NAME SECONDS COMMAND...: stdout -> NAME.out, stderr -> NAME.log, a row in stages.tsv
    local name=$1 limit=$2 start rc
    shift 2
    echo "gpu_check.sh: $name (at most ${limit}s)" >&2
    start=$(date +%s%N)
    timeout --kill-after=5 "$limit" "$@" > "$work/$name.out" 2> "$work/$name.log"
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))e-3" "$limit" \
        >> "$work/stages.tsv"
}

lecture=()
if [ -n "$notebook" ]; then lecture=(--lecture "$notebook"); fi
compiled=()
if [ "$compile" = 1 ]; then compiled=(--compile); fi

stage copy 20 cp -r "$data/MNIST" "$work/data/"
stage versions 20 "$python" -c 'import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version() if cuda else None,
                      gpu=torch.cuda.get_device_name() if cuda else None,
                      capability=".".join(map(str, torch.cuda.get_device_capability())) if cuda else None)))'
stage bench_fp32 90 "$python" "$here/bench.py" --device "$device" --json --steps 20 --warmup 5 "${lecture[@]}" "$@"
stage bench_amp 60 "$python" "$here/bench.py" --device "$device" --json --steps 20 --warmup 5 --amp "$@"
if [ "$compile" = 1 ]; then
    stage bench_compiled 120 "$python" "$here/bench.py" --device "$device" --json --steps 20 --warmup 5 --amp \
        --compile "$@"
fi
stage train 120 "$python" "$here/train.py" --data-dir "$work/data" --out-dir "$work/run" --epochs "$epochs" --amp \
    "${compiled[@]}" --device "$device" --log-every 50 "$@"
ckpt="$work/run/best.pt"
if [ ! -f "$ckpt" ]; then ckpt="$work/run/last.pt"; fi
stage evaluate 40 "$python" "$here/evaluate.py" --ckpt "$ckpt" --data-dir "$work/data" --device "$device" --json
"$python" "$here/bench.py" --summarize "$work"
rc=$?
cp "$work/summary.json" "$out/" 2>/dev/null
for f in train.log metrics.csv; do cp "$work/run/$f" "$out/" 2>/dev/null; done
grid=$(ls "$work/run"/samples_epoch*.png 2>/dev/null | tail -n 1)
if [ -n "$grid" ]; then cp "$grid" "$out/samples.png"; fi
echo "gpu_check.sh: summary in $out/summary.json; stage outputs, data and run in $work" >&2
exit $rc
