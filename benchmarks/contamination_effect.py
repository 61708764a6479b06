"""What the gallery's planted contamination costs a trained model at test time.

The synthetic benchmark draws every image from its own random stream, and the gallery's
contamination from streams of its own, so the same config with
`synthetic.contaminated_gallery_fraction=0` is the clean twin of the dataset: the same
images, except that the contaminated gallery images are drawn without their contamination.
This script evaluates a trained run's student on the run's own test set and on that twin
(queries unchanged), in the protocol of training (`evaluate.evaluate_dataset`), and prints
both with their difference, and the same over the contaminated gallery images' identities'
queries only.

  .venv/bin/python -m ogfr_jax.main --config configs/ablations.py:step=vit_baseline \\
      --workdir /tmp/cb/base --config.train.epochs=20
  .venv/bin/python benchmarks/contamination_effect.py --workdir /tmp/cb/base

Writes the figures as JSON to --out (default WORKDIR/contamination_effect.json); the run's
own files are not touched. The twin is generated into the synthetic cache like any dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ogfr_jax.tools import common  # noqa: E402

_KEYS = ('mAP', 'rank1', 'rank5', 'mINP')


def variant_config(config, **synthetic_fields):
  """The run's config with some synthetic fields replaced (the test split it gives)."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    for key, value in synthetic_fields.items():
      out.synthetic[key] = value
  return out


def clean_twin_config(config):
  """The run's config with the gallery drawn without contamination."""
  return variant_config(config, contaminated_gallery_fraction=0.0)


def _scores(trained, data, config, mesh) -> dict:
  from ogfr_jax import evaluate  # pylint: disable=g-import-not-at-top
  result = evaluate.evaluate_dataset(trained.model, trained.variables, data, config, mesh)
  return {k: round(float(result[k]), 4) for k in _KEYS if k in result}


def measure(workdir: str, step: int | None = None, per_kind: bool = False) -> dict:
  from ogfr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  config = common.workdir_config(workdir)
  if config.dataset.name != 'synthetic':
    raise ValueError(f'{workdir} trained on {config.dataset.name!r}; the clean twin exists '
                     'only for the synthetic benchmark')
  trained = common.load_trained(workdir, step, config=config)
  mesh = common.local_mesh()
  data = common.read_split(config, 'test')
  twin_config = clean_twin_config(config)
  twin = common.read_split(twin_config, 'test')
  side = synthetic.load_side_info(data.root, splits=('gallery',))
  contaminated = sum(e['clutter_mask'] is not None for e in side.values())
  out = {'workdir': os.path.abspath(workdir), 'step': trained.step,
         'synthetic': synthetic.resolve_config(config.synthetic),
         'gallery_images': len(data.gallery), 'contaminated_gallery_images': contaminated,
         'contaminated': _scores(trained, data, config, mesh),
         'clean_twin': _scores(trained, twin, twin_config, mesh)}
  out['difference'] = {k: round(out['contaminated'][k] - out['clean_twin'][k], 4)
                       for k in out['contaminated']}
  if [os.path.basename(p) for p in data.gallery.paths] != [os.path.basename(p)
                                                         for p in twin.gallery.paths]:
    raise RuntimeError('the clean twin does not list the same gallery files')
  if per_kind:
    # The same gallery images contaminated, each time with one kind only.
    out['per_kind'] = {}
    for kind in synthetic.CONTAMINATION_TYPES:
      cfg = variant_config(config, contamination_types=(kind,))
      scores = _scores(trained, common.read_split(cfg, 'test'), cfg, mesh)
      out['per_kind'][kind] = {k: round(scores[k] - out['clean_twin'][k], 4) for k in scores}
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--workdir', required=True, help='a training workdir on the synthetic set')
  ap.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  ap.add_argument('--out', default='', help='JSON output (default: WORKDIR/'
                                            'contamination_effect.json)')
  ap.add_argument('--per-kind', action='store_true',
                  help='also each contamination kind alone on the same gallery images '
                       '(differences to the clean twin)')
  args = ap.parse_args()
  result = measure(args.workdir, args.step, args.per_kind)
  out = args.out or os.path.join(args.workdir, 'contamination_effect.json')
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: result[k] for k in ('step', 'contaminated_gallery_images',
                                           'gallery_images', 'contaminated', 'clean_twin',
                                           'difference', 'per_kind') if k in result},
                   indent=1))


if __name__ == '__main__':
  main()
