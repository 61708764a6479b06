"""The real-data recipe: TransReID's optimizer groups and schedule, the bicubic train resize,
the camera embedding of unseen test cameras, and a cross-domain run end to end (the weights
line of its header, rank-3 in its results)."""

import importlib
import io
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ogfr_jax import config_defaults
from ogfr_jax import console
from ogfr_jax import evaluate
from ogfr_jax import optim
from ogfr_jax import run_config
from ogfr_jax import train
from ogfr_jax.data import augment
from ogfr_jax.models import vit as vit_lib

import dataset_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = ('occluded_duke', 'market1501', 'dukemtmc', 'msmt17', 'occluded_reid', 'partial_reid',
        'partial_ilids')
CROSS_DOMAIN = ('occluded_reid', 'partial_reid', 'partial_ilids')
TINY_TIMM = os.path.join(ROOT, 'tests', 'fixtures', 'parity', 'vit_tiny.safetensors')


def load_config(name, arg=None):
  return importlib.import_module(f'configs.{name}').get_config(arg)


@pytest.mark.parametrize('name', REAL)
def test_real_configs_take_the_transreid_recipe(name):
  c = load_config(name)
  assert not c.optim.no_decay_norm_and_embed and c.optim.bias_lr_factor == 2.0
  assert c.optim.weight_decay == 1e-4
  assert (c.optim.schedule, c.optim.lr_floor) == ('transreid', 0.002)
  assert c.input.train_resize == 'bicubic' and tuple(c.input.erase_area) == (0.02, 1 / 3)
  assert not c.model.jpm and c.loss.student_triplet_views == 'unoccluded'
  assert evaluate.unseen_test_cameras(c) == (name in CROSS_DOMAIN)
  doc = importlib.import_module(f'configs.{name}').__doc__
  assert '--config.init_from=/weights/jx_vit_base_p16_224-80ecf9dd.pth' in doc
  assert 'vit_base_patch16_224.augreg2_in21k_ft_in1k' in doc


def test_base_defaults_keep_the_previous_recipe():
  c = config_defaults.base_config()
  assert c.optim.no_decay_norm_and_embed and c.optim.schedule == 'warmup_cosine'
  assert c.optim.lr_floor == 0.01 and c.input.train_resize == 'bilinear'
  assert tuple(c.input.erase_area) == (0.02, 0.4)
  c.eval.unseen_camera = 'index'
  c.dataset.test_name = 'occluded_reid'
  assert not evaluate.unseen_test_cameras(c)


def _timm_lr(epoch, peak, factor, floor, warmup, epochs):
  """TransReID's per-epoch rate, written out from timm's CosineLRScheduler._get_lr with the
  arguments of TransReID's scheduler_factory (warmup_lr_init = 0.01 base, lr_min = floor x
  base, t_initial = epochs, no warm-up prefix) for a group whose base rate is factor x peak."""
  init, low, top = 0.01 * peak, floor * peak, factor * peak
  if epoch < warmup:
    return init + epoch * (top - init) / warmup
  return low + 0.5 * (top - low) * (1 + math.cos(math.pi * epoch / epochs))


def test_transreid_schedule_is_per_epoch_with_a_shared_start_and_floor():
  c = config_defaults.base_config()
  config_defaults.transreid_recipe(c)
  spe, epochs = 3, 12
  total = spe * epochs
  peak = c.optim.lr * 128 / c.optim.base_batch_size  # linear scaling with the batch
  weights = optim.lr_schedule(c.optim, 128, spe, total)
  bias = optim.lr_schedule(c.optim, 128, spe, total, factor=2.0)
  for step in range(total):
    epoch = step // spe + 1  # TransReID steps its scheduler with epoch = 1, 2, ...
    for fn, factor in ((weights, 1.0), (bias, 2.0)):
      want = _timm_lr(epoch, peak, factor, 0.002, c.optim.warmup_epochs, epochs)
      # float32 arithmetic of a few operations on values of order peak.
      np.testing.assert_allclose(float(fn(step)), want, rtol=1e-5, err_msg=f'step {step}')
  assert float(weights(0)) == float(weights(spe - 1))  # constant within an epoch
  np.testing.assert_allclose(float(weights(total - 1)), 0.002 * peak, rtol=1e-5)
  np.testing.assert_allclose(float(bias(total - 1)), 0.002 * peak, rtol=1e-5)  # shared floor


def test_default_schedule_is_unchanged():
  c = config_defaults.base_config().optim
  import optax  # pylint: disable=g-import-not-at-top
  peak = c.lr * 32 / c.base_batch_size
  before = optax.warmup_cosine_decay_schedule(0.01 * peak, peak, 50, 400, 0.01 * peak)
  weights = optim.lr_schedule(c, 32, 10, 400)
  bias = optim.lr_schedule(c, 32, 10, 400, factor=c.bias_lr_factor)
  for step in (0, 1, 49, 50, 51, 200, 399):
    assert float(weights(step)) == float(before(step))
    assert float(bias(step)) == float(c.bias_lr_factor * before(step))


def test_transreid_groups_decay_everything_and_double_every_bias():
  c = config_defaults.base_config()
  config_defaults.transreid_recipe(c)
  c.optim.momentum = 0.0
  tx, lr = optim.make_optimizer(c, global_batch=64, steps_per_epoch=10, total_steps=100)
  params = {'vit': {'norm': {'scale': jnp.full(3, 2.0), 'bias': jnp.full(3, 2.0)},
                    'pos_embed': jnp.full(3, 2.0),
                    'fc1': {'kernel': jnp.full(3, 2.0), 'bias': jnp.full(3, 2.0)}}}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  base = float(lr(0))
  bias_lr = float(optim.lr_schedule(c.optim, 64, 10, 100, factor=2.0)(0))
  decayed = 1.0 + 1e-4 * 2.0  # coupled decay: the gradient plus wd x parameter
  for path in (('norm', 'scale'), ('pos_embed',), ('fc1', 'kernel')):
    leaf = updates['vit']
    for p in path:
      leaf = leaf[p]
    np.testing.assert_allclose(leaf, -base * decayed, rtol=1e-6, err_msg=str(path))
  for path in (('norm', 'bias'), ('fc1', 'bias')):
    np.testing.assert_allclose(updates['vit'][path[0]]['bias'], -bias_lr * decayed, rtol=1e-6)
  assert bias_lr > 1.5 * base  # the warm-up of the x2 group rises to twice the peak


def test_bicubic_train_resize():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)
  cubic = augment.resize(image, 64, 32, 'bicubic')
  want = np.asarray(Image.fromarray(image).resize((32, 64), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(cubic, want)
  assert not np.array_equal(cubic, augment.resize(image, 64, 32))
  spec = augment.AugmentSpec(height=64, width=32, pad=0, flip_prob=0.0, erase_prob=0.0,
                             train_resize='bicubic')
  out = augment.train_augment(image, spec, np.random.default_rng(0))
  np.testing.assert_array_equal(out, want)
  with pytest.raises(ValueError, match='config.input.train_resize'):
    augment.AugmentSpec(height=64, width=32, train_resize='nearest')


def test_unseen_cameras_get_the_mean_camera_embedding():
  model = vit_lib.ViT(dim=8, depth=1, num_heads=2, grid=(2, 2), patch_size=4, stride=4,
                      num_cameras=3, sie=True, sie_weight=3.0)
  image = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), image, jnp.zeros(2, jnp.int32))
  table = variables['params']['sie_embed']
  unseen = model.apply(variables, image, vit_lib.UNSEEN_CAMERA, method=vit_lib.ViT.embed)
  # The same tokens as a table whose every row is the mean, indexed by any camera.
  flat = jax.tree_util.tree_map(lambda x: x, variables)
  flat['params']['sie_embed'] = jnp.broadcast_to(table.mean(0), table.shape)
  want = model.apply(flat, image, jnp.array([0, 2]), method=vit_lib.ViT.embed)
  np.testing.assert_allclose(unseen, want, rtol=1e-6, atol=1e-6)
  given = model.apply(variables, image, jnp.array([0, 2]), method=vit_lib.ViT.embed)
  assert not np.allclose(unseen, given)
  with pytest.raises(ValueError, match='camid'):
    model.apply(variables, image, 'mean', method=vit_lib.ViT.embed)


@pytest.mark.slow
def test_cross_domain_run_names_its_weights_and_writes_rank3(tmp_path):
  market = fx.make_market1501(tmp_path)
  occluded = fx.make_occluded_reid(tmp_path)
  c = load_config('occluded_reid', 'runlocal')
  c.dataset.root, c.dataset.test_root = str(market.root), str(occluded.root)
  c.init_from = TINY_TIMM  # timm names, tiny ViT (width 64, depth 2, patch 16)
  c.input.height, c.input.width = 64, 32
  c.model.stride = 16
  c.train.steps_per_epoch = 2
  c.eval.evaluators = ('student_ranking',)
  run_config.validate(c)
  wd = str(tmp_path / 'run')
  run_config.prepare_workdir(wd, c)
  out = io.StringIO()
  console.set_stream(out)
  try:
    results = train.train_and_evaluate(c, wd, config_name='configs/occluded_reid.py')
  finally:
    console.set_stream(None)
  lines = out.getvalue().splitlines()
  weights = [l.strip() for l in lines if l.strip().startswith('weights:')]
  assert len(weights) == 1, lines[:20]
  # The tiny fixture: cls, pos_embed (resampled 4x4 -> 4x2), patch embedding, 2 x 12 block
  # tensors and the final norm; its classification head is skipped.
  assert weights[0] == (f'weights: {TINY_TIMM} (safetensors, timm/TransReID names): '
                        f'29 loaded, 1 resampled, 2 skipped')
  assert not any(l.strip().startswith('warning: a ') for l in lines)
  scores = results['occluded_reid']
  assert scores['rank1'] <= scores['rank3'] <= scores['rank5']
  assert json.load(open(os.path.join(wd, 'results.json')))['occluded_reid']['rank3'] == \
      scores['rank3']


def test_results_table_shows_rank3_for_the_partial_protocols():
  scores = {'rank1': 0.5, 'rank3': 0.625, 'rank5': 0.75, 'rank10': 0.875, 'mAP': 0.5,
            'mINP': 0.25, 'step': 4}
  lines = console.results_table({'partial_reid': scores})
  assert lines[0].split() == ['dataset', 'rank1', 'rank3', 'rank5', 'rank10', 'mAP', 'mINP']
  assert lines[1].split() == ['partial_reid', '0.5000', '0.6250', '0.7500', '0.8750', '0.5000',
                              '0.2500']
  assert 'rank3' not in console.results_table({'occluded_duke': scores})[0]


def test_cross_domain_extraction_uses_the_mean_camera_embedding():
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_state  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  c = load_config('occluded_reid', 'runlocal')
  c.input.height, c.input.width, c.model.stride = 64, 32, 16
  model = build.build_model(c, 4, 6)
  variables = model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1),
                          'agent': jax.random.PRNGKey(2)},
                         train_state.dummy_batch(c), train=False)
  mesh = parallel.make_mesh(c.mesh)
  rng = np.random.default_rng(0)
  n = 8  # a multiple of the test session's device count
  images = jnp.asarray(rng.integers(0, 256, (n, 64, 32, 3), dtype=np.uint8))
  camids = jnp.array([0, 1] * (n // 2), jnp.int32)  # Occluded-REID: queries 0, gallery 1
  unseen = evaluate.make_extract_fn(model, c, mesh)(variables, images, camids)
  indexed = evaluate.make_extract_fn(model, c, mesh, unseen_cameras=False)
  params = dict(variables['params'])
  student = dict(params['student_vit'])
  table = student['sie_embed']
  student['sie_embed'] = jnp.broadcast_to(table.mean(0), table.shape)
  params['student_vit'] = student
  mean_table = {**variables, 'params': params}
  np.testing.assert_allclose(unseen, indexed(mean_table, images, camids), rtol=1e-5, atol=1e-6)
  assert not np.allclose(unseen, indexed(variables, images, camids), atol=1e-4)
