"""Prints what a dataset reader finds in a folder, before any training time is spent on it.

  python -m ogfr_jax.data.inspect --dataset market1501 --root /data/Market-1501-v15.09.15
  python -m ogfr_jax.data.inspect --dataset msmt17 --root /data/MSMT17_V1 --merge_train_val --json

Prints the usual table (ids / images / cameras for train, query and gallery) and the ignored-file
counts per folder. For the synthetic benchmark (a folder with its side files masks.npz and
clutter.npz) it adds, per split, the images with an occluder and with planted contamination,
and their types. With --json the last line of stdout is one JSON object
{"train": {"ids": N, "images": N, "cameras": N}, "query": {...}, "gallery": {...}} for scripts;
with side files each split also holds "occluded", "contaminated" (image counts),
"occluder_types" and "contamination_types" ({type: count}).
Expected problems (a bad argument, an unknown dataset, a missing folder, file names that do not
match the layout, a bad list line, an empty split, unreadable side files) print one line
`error: ...` to stderr and exit with status 2, like the other tools (tools/cli.py); with
OGFR_TRACEBACK=1 the traceback is printed above it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import os

from ogfr_jax.data import datasets
from ogfr_jax.data import synthetic
from ogfr_jax.data.records import DatasetSplits
from ogfr_jax.tools import cli

_SUBSETS = ('train', 'query', 'gallery')


def format_table(splits: DatasetSplits) -> str:
  """The torchreid-style statistics table plus the ignored-file counts."""
  stats = splits.stats()
  rule = '  ' + '-' * 44
  lines = [f'Dataset statistics: {splits.name} ({splits.root})', rule,
           f'  {"subset":<8} | {"# ids":>7} | {"# images":>9} | {"# cameras":>9}', rule]
  for subset in _SUBSETS:
    s = stats[subset]
    lines.append(f'  {subset:<8} | {s["ids"]:>7} | {s["images"]:>9} | {s["cameras"]:>9}')
  lines.append(rule)
  if splits.ignored:
    lines.append('  ignored files (stray or unparseable names):')
    for folder, count in sorted(splits.ignored.items()):
      lines.append(f'    {folder}: {count}')
  else:
    lines.append('  ignored files: none')
  return '\n'.join(lines)


def side_counts(root: str) -> dict | None:
  """Per split: images with an occluder / with planted contamination and their types, from
  the synthetic side files in root; None where root has none."""
  if not all(os.path.isfile(os.path.join(root, f)) for f in ('masks.npz', 'clutter.npz')):
    return None
  out = {s: {'occluded': 0, 'contaminated': 0, 'occluder_types': {},
             'contamination_types': {}} for s in _SUBSETS}
  for entry in synthetic.load_side_info(root).values():
    c = out.get(entry['split'])
    if c is None:
      continue
    if entry['occluder_type'] is not None:
      c['occluded'] += 1
      c['occluder_types'][entry['occluder_type']] = c['occluder_types'].get(
          entry['occluder_type'], 0) + 1
    if entry['clutter_type'] is not None:
      c['contaminated'] += 1
      c['contamination_types'][entry['clutter_type']] = c['contamination_types'].get(
          entry['clutter_type'], 0) + 1
  for c in out.values():
    c['occluder_types'] = dict(sorted(c['occluder_types'].items()))
    c['contamination_types'] = dict(sorted(c['contamination_types'].items()))
  return out


def format_side_counts(counts: dict, version: str | None) -> str:
  rule = '  ' + '-' * 44
  lines = [f'  planted by the generator (version {version or "unknown"}):', rule,
           f'  {"subset":<8} | {"# occluded":>10} | {"# contaminated":>14}', rule]
  for subset in _SUBSETS:
    c = counts[subset]
    lines.append(f'  {subset:<8} | {c["occluded"]:>10} | {c["contaminated"]:>14}')
  lines.append(rule)
  for subset in _SUBSETS:
    c = counts[subset]
    for what in ('occluder_types', 'contamination_types'):
      if c[what]:
        lines.append(f'  {subset} {what.replace("_", " ")}: '
                     + ', '.join(f'{k} {v}' for k, v in c[what].items()))
  return '\n'.join(lines)


def _version(root: str) -> str | None:
  try:
    with open(os.path.join(root, 'meta.json')) as f:
      return str(json.load(f).get('generator_version'))
  except (OSError, ValueError):
    return None


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are ValueError (one 'error:' line through cli.run_cli)."""

  def error(self, message: str):
    raise ValueError(f'{self.prog}: {message}')


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = _Parser(
      prog='python -m ogfr_jax.data.inspect',
      description='Per-subset statistics of a re-identification dataset folder.')
  parser.add_argument('--dataset', required=True,
                      help='one of: ' + ', '.join(datasets.dataset_names()))
  parser.add_argument('--root', required=True,
                      help="the dataset's own folder (the one holding bounding_box_train/ ...)")
  parser.add_argument('--json', action='store_true',
                      help='end the output with one line of JSON holding the statistics')
  parser.add_argument('--merge_train_val', action='store_true',
                      help='msmt17 only: count list_val.txt as training data')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Prints the statistics; user-facing errors are raised (ValueError, OSError) for
  cli.run_cli to print as one line."""
  args = _parse_args(argv)
  options = {'merge_train_val': True} if args.merge_train_val else {}
  splits = datasets.get_dataset(args.dataset, args.root, **options)
  stats = splits.stats()
  print(format_table(splits))
  try:
    counts = side_counts(args.root)
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f'unreadable synthetic side files in {args.root}: '
                     f'{cli.one_line(e)}') from e
  if counts is not None:
    version = _version(args.root)
    print(format_side_counts(counts, version))
    for subset in _SUBSETS:
      stats[subset].update(counts[subset])
  if args.json:
    print(json.dumps(stats, sort_keys=False))
  return 0


if __name__ == '__main__':
  cli.run_cli(main)
