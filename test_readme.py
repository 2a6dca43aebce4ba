"""README.md and docs/: a newcomer's page. The quick start runs as written from a fresh folder (on a tiny MNIST,
with tiny settings added to train.py), every flag that README.md, answers.md or docs/ give a script exists, and
the README stays short, with the headline command near the top."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
from PIL import Image

from conftest import HERE, OFFLINE, TINY_RUN, make_mnist

README = os.path.join(HERE, 'README.md')
PAGES = [README, os.path.join(HERE, 'answers.md'), *sorted(glob.glob(os.path.join(HERE, 'docs', '*.md')))]
SCRIPTS = ('train.py', 'sample.py', 'evaluate.py', 'bench.py')


def block_commands(path):
    """Each `python <script>.py ...` line of the file's code blocks, in order, as its argument list (a `$ ` prompt
    and a trailing comment dropped)."""
    commands = []
    for block in re.findall(r'```[a-z]*\n(.*?)```', open(path).read(), flags=re.S):
        for line in block.splitlines():
            line = line.removeprefix('$ ')
            if line.startswith('python ') and line.split()[1].endswith('.py'):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def inline_commands(path):
    """Each `python <script>.py ...` written in backquotes in the file's text, as its argument list."""
    text = ' '.join(open(path).read().split())
    return [shlex.split(c)[1:] for c in re.findall(r'`(python [a-z_]+\.py[^`]*)`', text)]


def test_the_readme_is_short_and_starts_with_what_a_student_came_for():
    text = open(README).read()
    assert len(text.split()) <= 1800
    assert 'python train.py --epochs 10' in '\n'.join(text.splitlines()[:40])


def test_every_flag_the_pages_give_a_script_is_one_of_its_flags(in_process):
    flags = {}
    for name in SCRIPTS:
        result = in_process(name, '--help')
        assert result.returncode == 0, result.stderr
        flags[name] = set(re.findall(r'(--[a-z][a-z0-9-]*)', result.stdout))
    seen = 0
    for path in PAGES:
        for name, *args in block_commands(path) + inline_commands(path):
            if name in flags:
                given = {a for a in args if a.startswith('--')}
                assert given <= flags[name], (os.path.basename(path), name, given - flags[name])
                seen += 1
    assert seen > 20


@pytest.mark.slow
def test_the_quick_start_runs_as_written_from_a_fresh_folder(tmp_path):
    """The README's three commands, in a folder holding nothing but data/MNIST/raw/ (train.py's default
    --data-dir): train.py makes a run under runs/, sample.py draws from its best.pt, evaluate.py scores it."""
    make_mnist(str(tmp_path / 'data'), n=100)
    commands = block_commands(README)
    assert [c[0] for c in commands] == ['train.py', 'sample.py', 'evaluate.py']
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **OFFLINE}
    outputs = []
    for name, *args in commands:
        tiny = [*TINY_RUN, '--epochs', '1'] if name == 'train.py' else []   # one epoch: 7 steps of 16 images
        result = subprocess.run([sys.executable, os.path.join(HERE, name), *args, *tiny], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (name, result.stderr)
        outputs.append(result.stdout)
    [run] = os.listdir(tmp_path / 'runs')
    folder = tmp_path / 'runs' / run
    assert {'config.json', 'train.log', 'metrics.csv', 'last.pt', 'best.pt'} <= set(os.listdir(folder))
    [grid] = glob.glob(str(folder / 'samples_n16_*.png'))
    assert Image.open(grid).size[0] == Image.open(grid).size[1]     # 16 images: a 4 x 4 grid
    assert f'runs/{run}/best.pt' in outputs[1] and f'runs/{run}/best.pt' in outputs[2]
    assert re.search(r'test bpd \d+\.\d+ ± \d+\.\d+', outputs[2])
