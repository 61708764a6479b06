"""Full OGFR on the embedded synthetic occluded-ReID benchmark (tiny ViT, CPU friendly).

Command:
  python -m ogfr_jax.main --config configs/synthetic.py --workdir runs/synthetic

Args (`configs/synthetic.py:ARG`): `runlocal` shrinks everything further for smoke tests.
"""

from ogfr_jax import config_defaults


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, runlocal=False)
  c = config_defaults.base_config()
  c.dataset.name = 'synthetic'

  c.input.height, c.input.width = 128, 64
  c.input.ids_per_batch, c.input.images_per_id = 8, 4
  c.input.pad = 6
  c.input.eval_batch_size = 128

  c.model.size = 'tiny'
  c.model.patch_size = 16
  c.model.stride = 12
  c.model.drop_path = 0.0

  c.optim.lr = 0.02
  c.optim.warmup_epochs = 2
  c.train.epochs = 20
  c.train.eval_every_epochs = 10
  c.train.log_every = 20

  if arg.runlocal:
    c.synthetic.num_train_ids, c.synthetic.num_test_ids = 16, 8
    c.synthetic.images_per_id = 8
    c.train.epochs = 2
    c.train.eval_every_epochs = 1
    c.input.num_workers = 0
  return c
