"""Prints what a dataset reader finds in a folder, before any training time is spent on it.

  python -m ogfr_jax.data.inspect --dataset market1501 --root /data/Market-1501-v15.09.15
  python -m ogfr_jax.data.inspect --dataset msmt17 --root /data/MSMT17_V1 --merge_train_val --json

Prints the usual table (ids / images / cameras for train, query and gallery) and the ignored-file
counts per folder. With --json the last line of stdout is one JSON object
{"train": {"ids": N, "images": N, "cameras": N}, "query": {...}, "gallery": {...}} for scripts.
Expected problems (unknown dataset, missing folder, bad list line, empty split) print one line
to stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ogfr_jax.data import datasets
from ogfr_jax.data.records import DatasetSplits

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


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
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
  args = _parse_args(argv)
  options = {'merge_train_val': True} if args.merge_train_val else {}
  try:
    splits = datasets.get_dataset(args.dataset, args.root, **options)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(format_table(splits))
  if args.json:
    print(json.dumps(splits.stats(), sort_keys=False))
  return 0


if __name__ == '__main__':
  sys.exit(main())
