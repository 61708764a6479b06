"""Speed and memory of `ogfr_jax.metrics.evaluate_rank` at real benchmark sizes.

    .venv/bin/python benchmarks/metrics_speed.py [--json] [--problems occluded_duke msmt17]
        [--query-chunk 1024]

Each problem runs in a fresh subprocess, so its peak memory is its own: the figure reported is
the resident-set high-water mark of that process (`resource.getrusage(RUSAGE_SELF).ru_maxrss`),
which counts everything the process touched, the distance matrix included. The distance matrix
is random (uniform, with same-identity pairs moved closer so that the metrics are not trivial),
built in place row block by row block; building it is timed separately from the
`evaluate_rank` call, which is the only thing in `eval_s`.

Sizes and label distributions follow the datasets' published test splits:
  occluded_duke: 2,210 queries (519 ids) x 17,661 gallery (519 + 591 other ids), 8 cameras.
  msmt17: 11,659 queries x 82,161 gallery, 3,060 ids, 15 cameras (3.8 GB float32 matrix).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

PROBLEMS = {
    # name: (num_query, num_gallery, query ids, extra gallery-only ids, cameras)
    'occluded_duke': (2210, 17661, 519, 591, 8),
    'msmt17': (11659, 82161, 3060, 0, 15),
}
_BUILD_ROWS = 256


def _rss_now_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def _peak_rss_mb() -> float:
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _labels(name: str, seed: int = 0):
  num_q, num_g, q_ids, extra_ids, cams = PROBLEMS[name]
  rng = np.random.default_rng(seed)
  q_pids = rng.integers(1, q_ids + 1, num_q)
  g_pids = rng.integers(1, q_ids + extra_ids + 1, num_g)
  g_pids[rng.random(num_g) < 0.02] = 0  # a few distractors
  q_camids = rng.integers(0, cams, num_q)
  g_camids = rng.integers(0, cams, num_g)
  return q_pids, g_pids, q_camids, g_camids


def _build_distmat(q_pids: np.ndarray, g_pids: np.ndarray, seed: int = 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  dist = np.empty((q_pids.size, g_pids.size), dtype=np.float32)
  for start in range(0, q_pids.size, _BUILD_ROWS):
    rows = dist[start:start + _BUILD_ROWS]
    rng.random(out=rows, dtype=np.float32)
    same = q_pids[start:start + _BUILD_ROWS, None] == g_pids[None, :]
    np.subtract(rows, np.float32(0.25), out=rows, where=same)
  return dist


def run_worker(name: str, query_chunk: int) -> dict:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from ogfr_jax import metrics

  q_pids, g_pids, q_camids, g_camids = _labels(name)
  t0 = time.perf_counter()
  dist = _build_distmat(q_pids, g_pids)
  build_s = time.perf_counter() - t0
  rss_before = _rss_now_mb()
  peak_before = _peak_rss_mb()
  t0 = time.perf_counter()
  result = metrics.evaluate_rank(
      dist, q_pids, g_pids, q_camids, g_camids, max_rank=50, query_chunk=query_chunk
  )
  eval_s = time.perf_counter() - t0
  summary = metrics.cmc_summary(result)
  return {
      'problem': name,
      'num_query': int(dist.shape[0]),
      'num_gallery': int(dist.shape[1]),
      'query_chunk': query_chunk,
      'distmat_mb': round(dist.nbytes / 2**20, 1),
      'build_s': round(build_s, 3),
      'eval_s': round(eval_s, 3),
      'rss_after_build_mb': round(rss_before, 1),
      'peak_rss_before_eval_mb': round(peak_before, 1),
      'peak_rss_mb': round(_peak_rss_mb(), 1),
      'num_valid_queries': result['num_valid_queries'],
      'rank1': round(summary['rank1'], 4),
      'mAP': round(summary['mAP'], 4),
      'mINP': round(summary['mINP'], 4),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', action='store_true', help='print one JSON line')
  parser.add_argument('--problems', nargs='+', default=list(PROBLEMS), choices=list(PROBLEMS))
  parser.add_argument('--query-chunk', type=int, default=1024)
  parser.add_argument('--worker', choices=list(PROBLEMS), help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    print(json.dumps(run_worker(args.worker, args.query_chunk)))
    return

  rows = []
  for name in args.problems:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), '--worker', name,
         '--query-chunk', str(args.query_chunk)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
      sys.exit(f'{name}: worker failed (exit {proc.returncode}):\n{proc.stderr}')
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

  info = {'cpus': os.cpu_count(), 'numpy': np.__version__, 'peak_memory': 'ru_maxrss per subprocess'}
  if args.json:
    print(json.dumps({'results': rows, **info}))
    return
  print(f"evaluate_rank, {info['cpus']} CPUs, numpy {info['numpy']}; "
        'peak = RSS high-water mark of a fresh process per problem (distance matrix included)')
  for r in rows:
    print(f"{r['problem']:>14}: {r['num_query']:,} x {r['num_gallery']:,} "
          f"({r['distmat_mb']:,.0f} MB float32)  build {r['build_s']:.2f} s  "
          f"evaluate_rank {r['eval_s']:.2f} s  RSS after build {r['rss_after_build_mb']:,.0f} MB  "
          f"peak RSS {r['peak_rss_mb']:,.0f} MB  "
          f"(rank1 {r['rank1']:.3f}, mAP {r['mAP']:.3f}, valid queries {r['num_valid_queries']:,})")


if __name__ == '__main__':
  main()
