"""Evaluation of a train state inside a run: the student on the test protocol (evaluate.py),
logged and written to WORKDIR/results.json."""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from ogfr_jax import evaluate


def write_results(workdir: str, results: dict) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'results.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def run_evaluation(model, state, test_data, config, mesh, step: int, writer=None) -> dict:
  """The student's metrics on test_data ({name: {..., 'step'}}), logged and written to the
  writer (writers.Writer or None)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  metrics = evaluate.evaluate_dataset(model, variables, test_data, config, mesh)
  result = {test_data.name: {**metrics, 'step': int(step)}}
  logging.info('eval @ step %d on %s: %s', step, test_data.name,
               ', '.join(f'{k}={v:.4f}' for k, v in metrics.items() if isinstance(v, float)))
  if writer is not None:
    writer.scalars(step, {f'eval/{test_data.name}/{k}': v for k, v in metrics.items()
                          if isinstance(v, float)})
  return result
