"""Does the trained purification agent find the clutter planted in the synthetic benchmark?

  python benchmarks/agent_precision.py --workdir runs/synthetic [--untrained-agent] [--json]

For every holistic training image of the embedded benchmark, the teacher's greedy (evaluation)
selection after block L is compared with the planted-clutter token mask (a token counts as
clutter when at least --min-cover of its patch window is clutter). Reports, over all training
images and over those with clutter only: the selection rate, precision (selected tokens that
are clutter), recall (clutter tokens selected), and the chance precision (the clutter fraction
of all tokens: what a selection blind to content would score). It also scores the agent's
token scores as a ranking (R-precision and AUC on the images with clutter), which says whether
they point at the clutter even where the greedy action selects nothing.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import ml_collections
import numpy as np

from ogfr_jax import parallel
from ogfr_jax import train
from ogfr_jax.data import augment
from ogfr_jax.data import image_io
from ogfr_jax.data import synthetic
from ogfr_jax.models import build
from ogfr_jax.models import ogfr as ogfr_model


def _counts(sel: np.ndarray, clutter: np.ndarray) -> dict[str, float]:
  hits = float(np.sum(sel & clutter))
  return {
      'images': int(sel.shape[0]),
      'select_rate': float(sel.mean()),
      'precision': hits / max(float(sel.sum()), 1.0),
      'recall': hits / max(float(clutter.sum()), 1.0),
      'chance_precision': float(clutter.mean()),
      'selected_tokens': int(sel.sum()),
  }


def agent_clutter_stats(workdir: str, *, batch_size: int = 64, min_cover: float = 0.5,
                        untrained_agent: bool = False) -> dict:
  """The figures of the module docstring. `untrained_agent`: the trained teacher with the
  agent's parameters as initialised (seed of the run), the control for the trained agent."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.dataset.name != 'synthetic':
    raise ValueError(f'{workdir} is a run on {config.dataset.name!r}; planted clutter exists '
                     'only in the synthetic benchmark')
  s = train.setup(config, workdir)
  state, _, step = train.restore_latest(s)
  if step == 0:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints')
  split = s['train_data'].train
  root = synthetic.ensure(synthetic.section(config), config.dataset.root or None)
  side = synthetic.load_side_info(root, splits=('train',))
  spec = augment.augment_spec(config)
  gh, gw = build.token_grid(config)
  input_size = (config.input.height, config.input.width)
  params = state.params
  if untrained_agent:
    params = {**params, 'agent': s['state'].params['agent']}
  variables = {'params': params, 'batch_stats': state.batch_stats}
  select = jax.jit(lambda v, x, c: s['model'].apply(
      v, x, c, method=ogfr_model.OGFR.teacher_selection))

  sels, scores, clutters = [], [], []
  for start in range(0, len(split), batch_size):
    idx = np.arange(start, min(start + batch_size, len(split)))
    images = np.stack([augment.eval_transform(image_io.load_image(split.paths[i]), spec)
                       for i in idx])
    clutter = np.zeros((len(idx), gh, gw), bool)
    for row, i in enumerate(idx):
      entry = side.get(os.path.basename(split.paths[i]))
      if entry is not None and entry['clutter_mask'] is not None:
        clutter[row] = synthetic.clutter_token_mask(
            entry['clutter_mask'].astype(np.float32), gh, gw, config.model.patch_size,
            config.model.stride, min_cover=min_cover, input_size=input_size)
    out = parallel.fetch(select(variables, images, split.camids[idx]))
    sels.append(np.asarray(out['mask']).reshape(len(idx), -1))
    scores.append(np.asarray(out['scores'], np.float32).reshape(len(idx), -1))
    clutters.append(clutter.reshape(len(idx), -1))
  sel, score, clutter = np.concatenate(sels), np.concatenate(scores), np.concatenate(clutters)
  has = clutter.any(axis=1)
  return {'step': int(step), 'grid': [gh, gw], 'min_cover': min_cover,
          'all_train_images': _counts(sel, clutter),
          'clutter_images': _counts(sel[has], clutter[has]),
          'scores': _ranking(score[has], clutter[has])}


def _ranking(score: np.ndarray, clutter: np.ndarray) -> dict[str, float]:
  """How the agent's scores order the tokens of images with clutter, whatever the threshold.

  r_precision: per image, the fraction of clutter among its n highest-scoring tokens, where n
  is its number of clutter tokens (chance: its clutter fraction). auc: the chance that a
  clutter token outscores a clean token of the same image (chance 0.5; ties count half).
  """
  if not len(score):
    return {'images': 0, 'r_precision': float('nan'), 'chance_r_precision': float('nan'),
            'auc': float('nan')}
  r_prec, chance, aucs = [], [], []
  for s, c in zip(score, clutter):
    n = int(c.sum())
    top = np.argsort(-s, kind='stable')[:n]
    r_prec.append(float(c[top].mean()))
    chance.append(n / c.size)
    pos, neg = s[c], s[~c]
    if neg.size:
      greater = (pos[:, None] > neg[None, :]).mean()
      ties = (pos[:, None] == neg[None, :]).mean()
      aucs.append(float(greater + 0.5 * ties))
  return {'images': int(len(score)), 'r_precision': float(np.mean(r_prec)),
          'chance_r_precision': float(np.mean(chance)),
          'auc': float(np.mean(aucs)) if aucs else float('nan')}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--min-cover', type=float, default=0.5)
  p.add_argument('--untrained-agent', action='store_true',
                 help='control: the trained teacher with the agent as initialised')
  p.add_argument('--json', action='store_true')
  args = p.parse_args(argv)
  stats = agent_clutter_stats(args.workdir, min_cover=args.min_cover,
                              untrained_agent=args.untrained_agent)
  for name in ('all_train_images', 'clutter_images'):
    r = stats[name]
    print(f"{name:17s} images {r['images']:5d} | select rate {r['select_rate']:.3f} | "
          f"precision {r['precision']:.3f} vs chance {r['chance_precision']:.3f} | "
          f"recall {r['recall']:.3f}")
  r = stats['scores']
  print(f"agent scores on {r['images']} clutter images | R-precision {r['r_precision']:.3f} vs "
        f"chance {r['chance_r_precision']:.3f} | clutter-vs-clean AUC {r['auc']:.3f} "
        "(chance 0.5)")
  if args.json:
    print(json.dumps(stats))
  return stats


if __name__ == '__main__':
  main()
