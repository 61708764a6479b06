r"""Evaluate a trained run again under another test protocol, without touching the run.

  python -m ogfr_jax.tools.reevaluate --workdir runs/oduke --set eval.feature=post_bn \
      [--set eval.feature=post_bn] [--set eval.rerank=true] [--step N] \
      [--out runs/oduke/results_post_bn.json]

Loads the run's config.json and its latest checkpoint (or --step), applies the --set
overrides, evaluates the student on the run's test set exactly as training does
(`evaluate.evaluate_dataset`), prints the figures and writes them as JSON ({workdir, step,
overrides, dataset, metrics}) to --out
(default: WORKDIR/results_<overrides>.json; the run's own results.json is never written).

Only fields that act at test time may be set: `eval.*`. Any
other field would describe a model that was not trained, and is refused with its name. Values
are JSON (`true`, `3`, `"x"`) or, failing that, plain strings.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Sequence

from ogfr_jax import paths
from ogfr_jax.tools import cli
from ogfr_jax.tools import common

# Fields that change what the evaluation computes from a trained state, not the state.
TEST_TIME_FIELDS = ()
TEST_TIME_PREFIXES = ('eval.',)


def parse_override(text: str) -> tuple[str, Any]:
  """'a.b=value' -> ('a.b', value parsed as JSON, else the string)."""
  field, sep, raw = text.partition('=')
  field = field.strip()
  if not sep or not field:
    raise ValueError(f'--set {text!r}: expected FIELD=VALUE, e.g. eval.feature=post_bn')
  if not (field in TEST_TIME_FIELDS or field.startswith(TEST_TIME_PREFIXES)):
    raise ValueError(f'--set {field}: only test-time fields can change after training '
                     f"(eval.*, {', '.join(TEST_TIME_FIELDS)})")
  try:
    value = json.loads(raw)
  except json.JSONDecodeError:
    value = raw
  return field, value


def apply_overrides(config, overrides: Sequence[tuple[str, Any]]):
  """A copy of `config` with the overrides set; an unknown field or a value of the wrong type
  is an error naming the field."""
  config = config.copy_and_resolve_references()
  for field, value in overrides:
    *parents, leaf = field.split('.')
    node = config
    for name in parents:
      if name not in node:
        raise ValueError(f'--set {field}: the run\'s config has no {name!r}')
      node = node[name]
    if leaf not in node:
      raise ValueError(f'--set {field}: the run\'s config has no such field')
    old = node[leaf]
    if isinstance(old, bool) != isinstance(value, bool) or (
        old is not None and not isinstance(value, type(old))
        and not (isinstance(old, float) and isinstance(value, int))):
      raise ValueError(f'--set {field}={value!r}: expected a value like {old!r}')
    node[leaf] = float(value) if isinstance(old, float) else value
  return config


def default_out(workdir: str, overrides: Sequence[tuple[str, Any]]) -> str:
  tag = '_'.join(f'{f.split(".")[-1]}-{v}' for f, v in overrides) or 'again'
  return paths.join(workdir, 'results_' + re.sub(r'[^A-Za-z0-9_.-]+', '-', tag) + '.json')


def reevaluate(workdir: str, overrides: Sequence[tuple[str, Any]],
               step: Optional[int] = None) -> dict[str, Any]:
  from ogfr_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ogfr_jax import run_config  # pylint: disable=g-import-not-at-top
  config = apply_overrides(common.workdir_config(workdir), overrides)
  run_config.validate(config)
  trained = common.load_trained(workdir, step, config=config)
  data = common.read_split(config, 'test')
  result = evaluate.evaluate_dataset(trained.model, trained.variables, data, config,
                                     common.local_mesh())
  return {'workdir': paths.resolve(workdir, '--workdir'), 'step': trained.step,
          'overrides': dict(overrides), 'dataset': data.name, 'metrics': result}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  p = common.ArgumentParser(prog='python -m ogfr_jax.tools.reevaluate',
                            description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='test-time override (repeatable)')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  p.add_argument('--out', default='', help='JSON output (default: WORKDIR/results_<...>.json)')
  args = p.parse_args(argv)  # a bad command line is a common.UsageError
  overrides = [parse_override(s) for s in args.set]
  out = args.out or default_out(args.workdir, overrides)
  own = paths.join(paths.resolve(args.workdir, '--workdir'), 'results.json')
  if paths.resolve(out, '--out') == own:
    raise ValueError(f'--out {out} is the run\'s own results.json: choose another file')
  result = reevaluate(args.workdir, overrides, args.step)
  common.write_json(out, result)
  scores = result['metrics']
  print(f"{result['dataset']} step {result['step']} {result['overrides']}: "
        + ', '.join(f'{k}={scores[k]:.4f}' for k in ('mAP', 'rank1', 'rank5', 'mINP')
                    if k in scores) + f' -> {out}')
  return result


if __name__ == '__main__':
  cli.run_cli(main)
