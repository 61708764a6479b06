r"""Whether the README's example output is what the current commit prints, and its update.

  python tools/readme_example.py                  # run the README command, compare, exit 0/1
  python tools/readme_example.py --update         # ... and write the new block into README.md
  python tools/readme_example.py --log run.txt    # compare a saved (piped) console output

The README command (`python -m ogfr_jax.main --config configs/synthetic.py --workdir ...`)
runs in a fresh temporary workdir with its console piped, pinned to --cpus (default 0: one
core; as `taskset -c 0`). The README block is built from that output by one rule (`example_block`): the
header, the first and last progress lines and those just before each evaluation, each
evaluation, the results and the paths written, with `...` where lines are left out. The
comparison leaves out what a rerun cannot repeat (images/s, ETA, wall time) and nothing
else: every loss term, metric and count must be equal.

Bitwise reruns need the same layout: the same device count (1 CPU device here; XLA_FLAGS'
--xla_force_host_platform_device_count changes it) and the same XLA:CPU thread count, which
is the number of cores the process may use (XLA sizes its thread pool from the CPU
affinity); `taskset -c 0` pins it to one on any machine. Another thread count sums in
another order and training amplifies the float rounding (tests/test_tools.py holds a rerun
check at a tiny scale). The same package versions (requirements/constraints.txt) are
assumed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
CONFIG = 'configs/synthetic.py'
WORKDIR = 'runs/synthetic'  # as the README writes it
# The README's example block: the fenced block after this heading.
SECTION = '## What a run prints'
# Figures that differ between identical runs: throughput, time left, wall time.
_VOLATILE = (
    (re.compile(r'\s+\d+(\.\d+)?(e[+-]?\d+)? img/s'), ' <img/s>'),
    (re.compile(r'\s+ETA \d+:\d\d:\d\d'), ' <ETA>'),
    (re.compile(r'\(\d+:\d\d:\d\d wall time\)'), '(<wall time>)'),
)
_STEP = re.compile(r'^(\[[#.]+\]\s+\d+%\s+)?step\s+(\d+)/(\d+)')
_LINE_COUNT = re.compile(r'\((\d+) lines in all')


def normalise(line: str) -> str:
  """The line without the figures that a rerun cannot repeat."""
  for pattern, repl in _VOLATILE:
    line = pattern.sub(repl, line)
  return line.rstrip()


def example_block(output: str) -> list[str]:
  """The README's example lines of a piped console output: every line but the progress
  lines, of which the first, the last, and each one just before an evaluation stay; '...'
  stands for lines left out."""
  lines = output.splitlines()
  steps = [j for j, line in enumerate(lines) if _STEP.match(line)]
  keep = []
  for i, line in enumerate(lines):
    if not _STEP.match(line):
      keep.append(True)
      continue
    following = lines[i + 1] if i + 1 < len(lines) else ''
    keep.append(i in (steps[0], steps[-1]) or not _STEP.match(following))
  block = []
  for line, kept in zip(lines, keep):
    if kept:
      block.append(line)
    elif block[-1:] != ['...']:
      block.append('...')
  return block


def readme_block(text: str) -> tuple[int, int]:
  """(first, end) line indices of the example block's lines inside its ``` fence."""
  lines = text.splitlines()
  try:
    start = lines.index(SECTION)
    first = next(i for i in range(start, len(lines)) if lines[i].startswith('```')) + 1
    end = next(i for i in range(first, len(lines)) if lines[i].startswith('```'))
  except (ValueError, StopIteration):
    raise ValueError(f'{README}: no fenced example block under "{SECTION}"') from None
  return first, end


def compare(readme: list[str], current: list[str]) -> list[str]:
  """Differences of the two blocks after `normalise`, one line each ([] when the same)."""
  a, b = [normalise(x) for x in readme], [normalise(x) for x in current]
  if a == b:
    return []
  import difflib  # pylint: disable=g-import-not-at-top
  return [d for d in difflib.unified_diff(a, b, 'README.md', 'current commit', lineterm='', n=0)
          if not d.startswith('@@')]


def parse_cpus(cpus: str) -> set[int]:
  """'0', '0,2' or '0-3' (taskset's list form) as a set of CPU numbers."""
  out = set()
  try:
    for part in cpus.split(','):
      lo, _, hi = part.partition('-')
      out.update(range(int(lo), int(hi or lo) + 1))
  except ValueError:
    raise ValueError(f'--cpus {cpus!r}: give a list such as 0, 0,1 or 0-3') from None
  return out


def run_readme_command(cpus: str, workdir: str, extra: tuple[str, ...] = ()) -> str:
  """The console output of the README command, piped, with `workdir` shown as the README's."""
  args = ['--config', CONFIG, '--workdir', workdir, *extra]
  if cpus:
    # As `taskset -c CPUS`: the affinity is set before jax starts, which sizes XLA:CPU's
    # thread pool from it.
    start = (f'import os, runpy, sys; os.sched_setaffinity(0, {sorted(parse_cpus(cpus))}); '
             "sys.argv[0] = 'ogfr_jax.main'; "
             "runpy.run_module('ogfr_jax.main', run_name='__main__', alter_sys=True)")
    command = [sys.executable, '-c', start, *args]
  else:
    command = [sys.executable, '-m', 'ogfr_jax.main', *args]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'the README command failed (status {proc.returncode}):\n'
                       f'{proc.stderr[-3000:]}')
  rel = os.path.relpath(workdir, REPO)
  shown = workdir if rel.startswith('..') else rel
  # The run's own folders as the README writes them: the workdir, and the home folder (the
  # dataset cache lies below it) as '~'.
  return proc.stdout.replace(shown, WORKDIR).replace(os.path.expanduser('~') + '/', '~/')


def update_readme(text: str, block: list[str], total_lines: int) -> str:
  lines = text.splitlines()
  first, end = readme_block(text)
  lines[first:end] = block
  out = '\n'.join(lines) + ('\n' if text.endswith('\n') else '')
  return _LINE_COUNT.sub(f'({total_lines} lines in all', out, count=1)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--log', help='a saved console output of the README command (piped) to '
                 'compare instead of running it')
  p.add_argument('--cpus', default='0', help='taskset CPU list for the run ("" : unpinned)')
  p.add_argument('--update', action='store_true', help='write the new block into README.md')
  p.add_argument('--save-log', help='also write the console output here')
  args = p.parse_args(argv)
  if args.log:
    output = open(args.log).read()
  else:
    with tempfile.TemporaryDirectory(prefix='readme_example_') as tmp:
      output = run_readme_command(args.cpus, os.path.join(tmp, 'synthetic'))
  if args.save_log:
    with open(args.save_log, 'w') as f:
      f.write(output)
  text = open(README).read()
  first, end = readme_block(text)
  current = example_block(output)
  diffs = compare(text.splitlines()[first:end], current)
  if args.update:
    with open(README, 'w') as f:
      f.write(update_readme(text, current, len(output.splitlines())))
    print(f'README.md: example block written ({len(current)} lines, '
          f'{len(output.splitlines())} in the output)')
    return 0
  if not diffs:
    print('README example is current (every figure but images/s, ETA and wall time equal)')
    return 0
  print('README example is NOT current:')
  for d in diffs:
    print('  ' + d)
  return 1


if __name__ == '__main__':
  sys.exit(main())
