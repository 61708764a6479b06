"""Time and peak memory of the chunked on-device evaluation at real benchmark sizes.

    .venv/bin/python benchmarks/eval_scale.py [--problem msmt17] [--dim 768]
        [--query-chunk 256] [--modes device reference rerank_approx rerank_exact] [--json]

Features are random but shaped like a trained model's: one centre per identity, a shift per
camera, noise per image, L2-normalised (so that the ranking is neither trivial nor hopeless),
with the datasets' test-split sizes and label structure (see benchmarks/metrics_speed.py):
  msmt17:        11,659 queries x 82,161 gallery, 3,060 ids, 15 cameras
  occluded_duke:  2,210 queries x 17,661 gallery, 519 (+591 gallery-only) ids, 8 cameras

Modes, each in a fresh subprocess so that its peak memory is its own:
  device         `evaluate.rank_on_device`: distances and match ranks on the devices in query
                 chunks, from features to CMC/mAP (what training and `--mode eval` run).
  reference      the numpy path: `metrics.pairwise_distance` (the dense query x gallery
                 matrix) then `metrics.evaluate_rank`. WORKSPACE.md's figure for evaluate_rank
                 alone (14.2 s, 4.3 GB at MSMT17 scale) leaves the distances out.
  rerank_approx  `evaluate.rerank_and_rank` in 'approx' mode (config.eval.rerank_topn
                 neighbours per image, found on the devices); needs all (q+g)^2 distances
                 computed once, so it is slow on CPU at MSMT17 scale.
  rerank_exact   the dense host re-ranking (`metrics.re_ranking`), refused above 4 GiB.

Reported per mode: eval_s (wall time of the evaluation call, compilation included),
compile_s (XLA compilation inside it), peak RSS of the process (`ru_maxrss`; on the CPU
backend device buffers live in host memory and count here), the device's own peak where the
backend reports it (GPU/TPU `memory_stats`), and the figures (which the modes must share).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEMS = {
    # name: (num_query, num_gallery, query ids, extra gallery-only ids, cameras)
    'occluded_duke': (2210, 17661, 519, 591, 8),
    'msmt17': (11659, 82161, 3060, 0, 15),
}
MODES = ('device', 'reference', 'rerank_approx', 'rerank_exact')


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_now_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def make_problem(name: str, dim: int, seed: int = 0):
  """(qf, gf float32 L2-normalised, q_pids, g_pids, q_camids, g_camids)."""
  num_q, num_g, q_ids, extra_ids, cams = PROBLEMS[name]
  rng = np.random.default_rng(seed)
  q_pids = rng.integers(1, q_ids + 1, num_q)
  g_pids = rng.integers(1, q_ids + extra_ids + 1, num_g)
  g_pids[rng.random(num_g) < 0.02] = 0  # a few distractors
  q_camids = rng.integers(0, cams, num_q)
  g_camids = rng.integers(0, cams, num_g)
  centres = rng.standard_normal((q_ids + extra_ids + 1, dim), dtype=np.float32)
  shifts = 0.8 * rng.standard_normal((cams, dim), dtype=np.float32)

  def feats(pids, camids):
    out = np.empty((pids.size, dim), np.float32)
    for start in range(0, pids.size, 8192):  # bounded temporaries
      sl = slice(start, start + 8192)
      block = centres[pids[sl]] + shifts[camids[sl]]
      block += 1.6 * rng.standard_normal(block.shape, dtype=np.float32)
      block /= np.linalg.norm(block, axis=1, keepdims=True)
      out[sl] = block
    return out

  return feats(q_pids, q_camids), feats(g_pids, g_camids), q_pids, g_pids, q_camids, g_camids


def run_worker(name: str, mode: str, dim: int, query_chunk: int, topn: int) -> dict:
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from ogfr_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ogfr_jax import metrics  # pylint: disable=g-import-not-at-top
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import records  # pylint: disable=g-import-not-at-top

  compile_s = [0.0]
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: compile_s.__setitem__(0, compile_s[0] + secs)
      if event.endswith('backend_compile_duration') else None)
  t0 = time.perf_counter()
  qf, gf, q_pids, g_pids, q_cams, g_cams = make_problem(name, dim)
  build_s = time.perf_counter() - t0
  rss_before = _rss_now_mb()
  mesh = parallel.make_mesh(config_defaults.base_config().mesh)
  eval_cfg = config_defaults.base_config().eval
  eval_cfg.query_chunk, eval_cfg.rerank_topn = query_chunk, topn

  t0 = time.perf_counter()
  if mode == 'device':
    result = evaluate.rank_on_device(qf, gf, q_pids, g_pids, q_cams, g_cams, mesh,
                                     max_rank=eval_cfg.max_rank, query_chunk=query_chunk)
  elif mode == 'reference':
    dist = metrics.pairwise_distance(qf, gf)
    result = metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams,
                                   max_rank=eval_cfg.max_rank, query_chunk=1024)
  else:
    split = lambda p, c: records.Split.from_lists([''] * len(p), list(p), list(c))
    result = evaluate.rerank_and_rank(qf, gf, split(q_pids, q_cams), split(g_pids, g_cams),
                                      eval_cfg, mesh, mode.split('_')[1])
  eval_s = time.perf_counter() - t0
  stats = jax.devices()[0].memory_stats() or {}
  return {
      'problem': name, 'mode': mode, 'num_query': int(qf.shape[0]),
      'num_gallery': int(gf.shape[0]), 'dim': dim, 'query_chunk': query_chunk,
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'build_s': round(build_s, 2), 'eval_s': round(eval_s, 2),
      'compile_s': round(compile_s[0], 2),
      'rss_before_eval_mb': round(rss_before), 'peak_rss_mb': round(_peak_rss_mb()),
      'device_peak_mb': (round(stats['peak_bytes_in_use'] / 2**20)
                         if 'peak_bytes_in_use' in stats else None),
      'mAP': round(float(result['mAP']), 6), 'rank1': round(float(result['cmc'][0]), 6),
      'num_valid_queries': int(result['num_valid_queries']),
      'load_average_1min': round(os.getloadavg()[0], 2),
  }


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--problem', default='msmt17', choices=sorted(PROBLEMS))
  p.add_argument('--modes', nargs='+', default=['device'], choices=MODES)
  p.add_argument('--dim', type=int, default=768)
  p.add_argument('--query-chunk', type=int, default=256)
  p.add_argument('--topn', type=int, default=100, help='rerank_approx: neighbours per image')
  p.add_argument('--json', action='store_true')
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(run_worker(args.problem, args.worker, args.dim, args.query_chunk,
                                args.topn)))
    return []
  rows = []
  for mode in args.modes:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', mode, '--problem',
           args.problem, '--dim', str(args.dim), '--query-chunk', str(args.query_chunk),
           '--topn', str(args.topn)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f'{mode} failed:\n{proc.stderr[-3000:]}')
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if not args.json:
      r = rows[-1]
      device = f", device peak {r['device_peak_mb']} MB" if r['device_peak_mb'] else ''
      print(f"{r['problem']} {r['num_query']} x {r['num_gallery']} (dim {r['dim']}) {mode:>13}: "
            f"{r['eval_s']:7.1f} s (compile {r['compile_s']:.1f} s), peak RSS "
            f"{r['peak_rss_mb'] / 1024:.2f} GB (features etc. before: "
            f"{r['rss_before_eval_mb'] / 1024:.2f} GB){device}; mAP {r['mAP']:.4f} rank-1 "
            f"{r['rank1']:.4f}; {r['devices']}, load {r['load_average_1min']}", flush=True)
  if args.json:
    print(json.dumps(rows, indent=2))
  return rows


if __name__ == '__main__':
  main()
