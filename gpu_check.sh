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
#   bench_fp32      bench.py: FLOPs, the fp32 peaks, images/s, launches a step;            90 s
#                   with the notebook, the lecture's code
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
"$python" - "$work" <<'SUMMARY'
# The summary: every stage's exit code and seconds, the versions, images/s against the lecture's fp32 code, the
# compile time, launches a step, the run's wall time and test bpd, and what each stage printed. Missing parts: null.
import json, os, sys
work = sys.argv[1]
def text(name):
    try:
        with open(os.path.join(work, name), errors='replace') as f:
            return f.read()
    except OSError:
        return ''
def last_json(name):   # the JSON object a stage printed as its last line
    try:
        return json.loads(text(name).strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None
rows = [line.split('\t') for line in text('stages.tsv').splitlines()[1:]]
stages = {name: dict(exit=int(rc), seconds=float(s), limit=int(limit)) for name, rc, s, limit in rows}
runs = {name: last_json(f'bench_{name}.out') or {} for name in ('fp32', 'amp', 'compiled')}
lecture = runs['fp32'].get('lecture_train_images_per_s')
evaluation = last_json('evaluate.out') or {}
summary = dict(stages=stages, versions=last_json('versions.out'), lecture_fp32_images_per_s=lecture)
for name, run in runs.items():
    speed = run.get('train_images_per_s')
    summary[name] = dict(images_per_s=speed, times_lecture=speed / lecture if speed and lecture else None,
                         **{key: run.get(key) for key in ('first_step_s', 'launches_per_step', 'launches_outside_graphs',
                                                          'ratio_to_ceiling')})
summary.update(train_wall_s=stages.get('train', {}).get('seconds'), train_finished=stages.get('train', {}).get('exit') == 0,
               test_bpd=evaluation.get('bpd'), test_bpd_stderr=evaluation.get('stderr'), evaluated_step=evaluation.get('step'),
               lecture_notebook=text('notebook.txt').strip() or 'none given (gpu_check.sh --notebook PATH): '
                                                                 'the lecture code was not timed',
               outputs={name: last_json(f'{name}.out') or text(f'{name}.out').splitlines()[-30:] for name in stages},
               messages={name: text(f'{name}.log').splitlines()[-30:] for name in stages})
with open(os.path.join(work, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
n = lambda v, form='{:.1f}': 'n/a' if v is None else form.format(v)
for name, stage in stages.items():
    print(f'  {name:<15} exit {stage["exit"]:>3}  {stage["seconds"]:7.1f} s of {stage["limit"]}')
print(f'  lecture code, fp32: {n(lecture)} images/s (notebook: {summary["lecture_notebook"]})')
for name in ('fp32', 'amp', 'compiled'):
    s = summary[name]
    launches = (f'{n(s["launches_outside_graphs"], "{:,.0f}")} launches a step outside graphs' if name == 'compiled'
                else f'{n(s["launches_per_step"], "{:,.0f}")} launches a step')
    print(f'  {name:<9} {n(s["images_per_s"])} images/s = {n(s["times_lecture"], "{:.2f}x")} the lecture; '
          f'first step {n(s["first_step_s"])} s, {launches}')
print(f'  training: {n(summary["train_wall_s"])} s ({"finished" if summary["train_finished"] else "NOT finished"}); '
      f'test bpd {n(summary["test_bpd"], "{:.4f}")} ± {n(summary["test_bpd_stderr"], "{:.4f}")} '
      f'at step {summary["evaluated_step"]}')
sys.exit(0 if all(stage['exit'] == 0 for stage in stages.values()) else 1)
SUMMARY
rc=$?
cp "$work/summary.json" "$out/" 2>/dev/null
for f in train.log metrics.csv; do cp "$work/run/$f" "$out/" 2>/dev/null; done
grid=$(ls "$work/run"/samples_epoch*.png 2>/dev/null | tail -n 1)
if [ -n "$grid" ]; then cp "$grid" "$out/samples.png"; fi
echo "gpu_check.sh: summary in $out/summary.json; stage outputs, data and run in $work" >&2
exit $rc
