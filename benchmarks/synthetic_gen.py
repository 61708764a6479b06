"""Times the synthetic benchmark's generation and checks that it is not trivially solvable.

Generates a dataset (default: the size of config.synthetic), reports the seconds it took
(wall clock, and CPU seconds of this process, which a busy machine inflates less), and scores
occluded queries against the gallery with features that need no deep training:
  - raw pixels (image downsized to 32x16, mean-removed, L2-normalised),
  - mean colour of 8 horizontal stripes (a classic hand-crafted ReID descriptor),
  - a joint RGB colour histogram (8x8x8 bins, square-rooted),
  - the last two after a Fisher LDA learnt on the train split ('+lda'): how much identity
    signal a linear learner finds,
and, for reference, holistic gallery images used as queries ('_gallery_as_query'; same-camera
matches dropped as always), which shows what the occluders cost. With --twin the same scores
are computed on the dataset's clean twin too (the same config with
contaminated_gallery_fraction=0: every image identical except that the contaminated gallery
images are drawn without their contamination), which shows what the gallery contamination
costs.
A useful benchmark scores low without learning (raw pixels well under 0.5 mAP) yet has signal
to learn. Optionally writes a contact sheet of train / query / gallery images to look at.

  .venv/bin/python benchmarks/synthetic_gen.py --sheet /tmp/sheet.png
  .venv/bin/python benchmarks/synthetic_gen.py --set num_train_ids=160 --twin
  .venv/bin/python benchmarks/synthetic_gen.py --set num_train_ids=750 --set num_test_ids=750 \
      --set images_per_id=20 --set height=256 --set width=128 --no-eval
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ogfr_jax import config_defaults  # noqa: E402
from ogfr_jax.data import synthetic  # noqa: E402


def _parse_sets(items: list[str]) -> dict:
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise SystemExit(f'--set expects key=value, got {item!r}')
    if key in ('contamination_types', 'holdout_occluders'):
      out[key] = [v for v in value.split(',') if v]
    else:
      out[key] = float(value) if key.endswith('fraction') else int(value)
  return out


def _read_split(root: str, folder: str):
  names = sorted(f for f in os.listdir(os.path.join(root, folder)) if f.endswith('.jpg'))
  images = np.stack([np.asarray(Image.open(os.path.join(root, folder, n)).convert('RGB'))
                     for n in names])
  pids = np.array([int(n[:4]) for n in names])
  cams = np.array([int(n.split('_')[1][1]) - 1 for n in names])
  return names, images, pids, cams


def _raw_pixels(images: np.ndarray) -> np.ndarray:
  small = np.stack([np.asarray(Image.fromarray(im).resize((16, 32), Image.BILINEAR))
                    for im in images]).astype(np.float32)
  return small.reshape(len(images), -1) - small.reshape(len(images), -1).mean(1, keepdims=True)


def _stripe_colours(images: np.ndarray, stripes: int = 8) -> np.ndarray:
  n, h = images.shape[:2]
  rows = np.array_split(np.arange(h), stripes)
  return np.concatenate([images[:, r].reshape(n, -1, 3).mean(1) for r in rows], 1)


def _histogram(images: np.ndarray, bins: int = 8) -> np.ndarray:
  q = (images.astype(np.int32) * bins) // 256
  code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
  hist = np.stack([np.bincount(c.ravel(), minlength=bins ** 3) for c in code])
  return np.sqrt(hist.astype(np.float32))


def _lda(train: np.ndarray, labels: np.ndarray, dims: int = 64, reg: float = 1e-2):
  """A linear metric learnt on the train split (Fisher LDA): the signal a learner can find."""
  mu = train.mean(0)
  x = train - mu
  classes = np.unique(labels)
  means = np.stack([x[labels == c].mean(0) for c in classes])
  within = x - means[np.searchsorted(classes, labels)]
  sw = within.T @ within / len(x)
  sb = means.T @ means / len(classes)
  sw += reg * np.trace(sw) / len(sw) * np.eye(len(sw))
  import scipy.linalg  # noqa: PLC0415
  vals, vecs = scipy.linalg.eigh(sb, sw)
  proj = vecs[:, np.argsort(vals)[::-1][:dims]]
  return lambda f: (f - mu) @ proj


def _distance(q: np.ndarray, g: np.ndarray) -> np.ndarray:
  q = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-12)
  g = g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-12)
  return np.sqrt(np.maximum(2 - 2 * q @ g.T, 0))


def _map(dist, q_pids, g_pids, q_cams, g_cams) -> tuple[float, float]:
  """(mAP, rank-1) under the Market protocol; uses the project's metric when present."""
  try:
    from ogfr_jax.metrics import evaluate_rank  # noqa: PLC0415
    r = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=1)
    return float(r['mAP']), float(r['cmc'][0])
  except ImportError:
    aps, r1 = [], []
    for i in range(len(q_pids)):
      keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
      match = (g_pids[keep] == q_pids[i])[np.argsort(dist[i, keep], kind='stable')]
      if not match.any():
        continue
      hits = np.cumsum(match)
      aps.append(float((hits[match] / (np.nonzero(match)[0] + 1)).mean()))
      r1.append(float(match[0]))
    return float(np.mean(aps)), float(np.mean(r1))


def _scores(root: str) -> dict:
  _, t_img, t_pid, _ = _read_split(root, 'bounding_box_train')
  _, q_img, q_pid, q_cam = _read_split(root, 'query')
  g_names, g_img, g_pid, g_cam = _read_split(root, 'bounding_box_test')
  side = synthetic.load_side_info(root, splits=('gallery',))
  occluded = {n for n, e in side.items() if e['occluder_mask'] is not None}
  holistic = np.array([p > 0 and n not in occluded for n, p in zip(g_names, g_pid)])
  scores = {}
  for label, feat in (('raw_pixels', _raw_pixels), ('stripe_colours', _stripe_colours),
                      ('colour_histogram', _histogram)):
    fq, fg = feat(q_img), feat(g_img)
    variants = [(label, fq, fg)]
    if label != 'raw_pixels':
      proj = _lda(feat(t_img), t_pid)
      variants.append((label + '+lda', proj(fq), proj(fg)))
    for name, vq, vg in variants:
      m, r1 = _map(_distance(vq, vg), q_pid, g_pid, q_cam, g_cam)
      scores[name] = {'mAP': round(m, 3), 'rank1': round(r1, 3)}
      # Holistic gallery images as queries (same-camera matches dropped): occlusion's cost.
      m, r1 = _map(_distance(vg[holistic], vg), g_pid[holistic], g_pid, g_cam[holistic], g_cam)
      scores[name + '_gallery_as_query'] = {'mAP': round(m, 3), 'rank1': round(r1, 3)}
  # Expected mAP of a random ranking is about the share of true matches in the gallery.
  scores['chance_mAP_estimate'] = round(float(np.mean([np.mean(g_pid == p) for p in q_pid])), 3)
  return scores


def _sheet(root: str, path: str, per_row: int = 12) -> None:
  """Rows: train images of a few ids (two rows, contamination outlined), queries, gallery."""
  rows = []
  for folder, count in (('bounding_box_train', 2 * per_row), ('query', per_row),
                        ('bounding_box_test', 2 * per_row)):
    names = sorted(os.listdir(os.path.join(root, folder)))
    if folder == 'query':  # one query per identity, so each tile is a different person
      seen, picked = set(), []
      for n in names:
        if n[:4] not in seen:
          seen.add(n[:4])
          picked.append(n)
      names = picked
    rows.append((folder, names[:count]))
  side = synthetic.load_side_info(root)
  first = Image.open(os.path.join(root, rows[0][0], rows[0][1][0]))
  w, h = first.size
  total_rows = sum((len(n) + per_row - 1) // per_row for _, n in rows)
  sheet = Image.new('RGB', (per_row * (w + 4), total_rows * (h + 16)), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  r = 0
  for folder, names in rows:
    for k, name in enumerate(names):
      x, y = (k % per_row) * (w + 4), (r + k // per_row) * (h + 16)
      img = Image.open(os.path.join(root, folder, name)).convert('RGB')
      info = side.get(name)
      label = name[:4] + ' c' + name.split('_')[1][1]
      if info and info['occluder_mask'] is not None:
        label += ' ' + info['occluder_type'][:4]
      if info and info['clutter_mask'] is not None:
        label += ' +' + info['clutter_type'][:2]
        edge = info['clutter_mask'] ^ np.roll(info['clutter_mask'], 1, 1)
        arr = np.asarray(img).copy()
        arr[edge] = (255, 0, 255)
        img = Image.fromarray(arr)
      sheet.paste(img, (x, y + 14))
      draw.text((x, y), label, fill=(0, 0, 0))
    r += (len(names) + per_row - 1) // per_row
  sheet.save(path)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--set', action='append', default=[], help='synthetic field=value')
  ap.add_argument('--out', default='', help='dataset folder (default: a temporary one)')
  ap.add_argument('--sheet', default='', help='write a PNG contact sheet here')
  ap.add_argument('--no-eval', action='store_true', help='skip the hand-crafted feature mAP')
  ap.add_argument('--twin', action='store_true',
                  help='also score the clean twin (contaminated_gallery_fraction=0)')
  ap.add_argument('--workers', type=int, default=None,
                  help='generation processes (default: the generator decides)')
  args = ap.parse_args()

  cfg = synthetic.section(config_defaults.base_config()).to_dict()
  cfg.update(_parse_sets(args.set))
  tmp = None
  if args.out:
    root = args.out
  else:
    tmp = tempfile.TemporaryDirectory()
    root = os.path.join(tmp.name, 'synthetic')
  t0, c0 = time.perf_counter(), time.process_time()
  synthetic.generate(root, cfg, workers=args.workers)
  seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
  with open(os.path.join(root, 'meta.json')) as f:
    meta = json.load(f)
  report = {'config': synthetic.resolve_config(cfg), 'generate_seconds': round(seconds, 2),
            'generate_cpu_seconds_this_process': round(cpu, 2),
            'counts': meta['counts']}
  images = sum(c['images'] for c in meta['counts'].values())
  report['images_per_second'] = round(images / seconds, 1)
  report['disk_mb'] = round(sum(os.path.getsize(os.path.join(d, f))
                                for d, _, fs in os.walk(root) for f in fs) / 2 ** 20, 1)

  if not args.no_eval:
    report['query_vs_gallery'] = _scores(root)
    if args.twin:
      twin_root = root.rstrip('/') + '_clean_twin'
      synthetic.generate(twin_root, dict(cfg, contaminated_gallery_fraction=0.0),
                         workers=args.workers)
      report['query_vs_gallery_clean_twin'] = _scores(twin_root)
      if tmp is None:
        report['clean_twin'] = twin_root
  if args.sheet:
    _sheet(root, args.sheet)
    report['sheet'] = args.sheet
  print(json.dumps(report, indent=1))
  if tmp is not None:
    tmp.cleanup()


if __name__ == '__main__':
  main()
