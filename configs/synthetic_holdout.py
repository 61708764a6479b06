"""Held-out occlusion types on the embedded benchmark: queries are occluded only by occluder
types that training never sees.

What: the benchmark and recipe of configs/synthetic.py, with `synthetic.holdout_occluders =
('vehicle', 'board')`: every query is occluded by a vehicle or a board, while the occluded
training images (14%) and the occluded gallery images use only the other types (pole,
pedestrian, foliage). Occlusion synthesis pastes from the occluder bank (<dataset>/occluders),
which is cut from the occluded training images and so holds no held-out type. The
contamination of training and gallery images is that of configs/synthetic.py.

Command:
  python -m ogfr_jax.main --config configs/synthetic_holdout.py --workdir runs/synthetic_holdout

Machine and wall time: the project's 2-core CPU VM, about 2 min alone (40 epochs, the size of
the README run); about 4 min on one core with the other busy.

Expected (seeds 0-2, one XLA:CPU thread each): student mAP 0.350 +- 0.006, rank-1 0.326 +- 0.007; occlusion synthesis
alone 0.341 +- 0.008, with the teacher and distillation 0.355 +- 0.004 (the whole ladder:
docs/results.md, "The ladder at the README recipe").

Args (`configs/synthetic_holdout.py:ARG`): `holdout=vehicle+board` names the held-out types
(any of the generator's OCCLUDER_TYPES: vehicle, pole, pedestrian, foliage, board, joined by
'+'); `runlocal` shrinks everything for smoke tests, as in configs/synthetic.py.
"""


def get_config(arg=None):
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  arg = config_defaults.parse_arg(arg, holdout='vehicle+board', runlocal=False)
  c = config_defaults.sibling_config(__file__, 'synthetic.py',
                                     'runlocal' if arg.runlocal else None)
  holdout = tuple(v for v in arg.holdout.split('+') if v)
  # Checks the names (and that some type is left for training) now, naming the field.
  synthetic.resolve_config(dict(c.synthetic.to_dict(), holdout_occluders=holdout))
  with c.unlocked():
    c.synthetic.holdout_occluders = holdout
  return c
