"""Train/eval transforms and the occlusion synthesiser on tiny images."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ogfr_jax import config_defaults
from ogfr_jax.data import augment
from ogfr_jax.data import occlusion

H, W = 32, 16


def _images(n, h=H, w=W, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Augmentations


def test_train_augment_shape_and_dtype_from_any_input_size():
  spec = augment.AugmentSpec(height=H, width=W, pad=2)
  out = augment.train_augment(_images(1, 50, 21)[0], spec, np.random.default_rng(0))
  assert out.shape == (H, W, 3) and out.dtype == np.uint8


def test_train_augment_is_a_function_of_the_generator():
  spec = augment.AugmentSpec(height=H, width=W, pad=3, erase_prob=1.0)
  image = _images(1)[0]
  a = augment.train_augment(image, spec, np.random.default_rng(4))
  b = augment.train_augment(image, spec, np.random.default_rng(4))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, augment.train_augment(image, spec, np.random.default_rng(5)))


def _mask_image(seed, h=H, w=W):
  """A random blob mask and an image whose pixels are that mask (255 on it, 0 elsewhere)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((h, w), bool)
  for _ in range(3):
    y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
    mask[y:y + int(rng.integers(3, h // 2)), x:x + int(rng.integers(3, w // 2))] = True
  return mask, np.repeat(mask[..., None] * np.uint8(255), 3, axis=-1)


@pytest.mark.parametrize('stored', [(H, W), (2 * H, 2 * W), (45, 19)])
def test_the_mask_follows_resize_flip_and_crop_exactly(stored):
  spec = augment.AugmentSpec(height=H, width=W, pad=4, flip_prob=0.5, erase_prob=0.0)
  flipped = shifted = 0
  for seed in range(24):
    mask, image = _mask_image(seed, *stored)
    x, m = augment.train_augment_pair(image, mask, spec, np.random.default_rng(seed))
    assert m.shape == (H, W) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    # The image is its own mask: wherever its pixels went, the mask went with them.
    np.testing.assert_array_equal(m, x[..., 0] >= 128)
    # And exactly as the draws say: flip, then the window of the zero-padded mask.
    rng = np.random.default_rng(seed)
    flip = rng.random() < 0.5
    dy, dx = (int(v) - 4 for v in rng.integers(0, 9, size=2))
    want = np.pad(augment.resize_mask(mask, H, W)[:, ::-1 if flip else 1], 4)
    np.testing.assert_array_equal(m, want[4 + dy:4 + dy + H, 4 + dx:4 + dx + W])
    flipped += flip
    shifted += (dy, dx) != (0, 0)
  assert 0 < flipped < 24 and shifted  # both transforms were exercised


def test_the_pair_draws_exactly_what_train_augment_draws():
  spec = augment.AugmentSpec(height=H, width=W, pad=3, erase_prob=1.0)
  mask, _ = _mask_image(0)
  image = _images(1)[0]
  for seed in range(6):
    a_rng, b_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    x, m = augment.train_augment_pair(image, mask, spec, a_rng)
    np.testing.assert_array_equal(x, augment.train_augment(image, spec, b_rng))
    assert a_rng.random() == b_rng.random()  # the same number of draws
    assert augment.train_augment_pair(image, None, spec, np.random.default_rng(seed))[1] is None


def test_random_erasing_leaves_the_mask_alone():
  mask, image = _mask_image(1)
  erase = augment.AugmentSpec(height=H, width=W, pad=2, erase_prob=1.0, erase_area=(.2, .4))
  keep = augment.AugmentSpec(height=H, width=W, pad=2, erase_prob=0.0)
  for seed in range(6):
    xe, me = augment.train_augment_pair(image, mask, erase, np.random.default_rng(seed))
    xk, mk = augment.train_augment_pair(image, mask, keep, np.random.default_rng(seed))
    np.testing.assert_array_equal(me, mk)
    assert not np.array_equal(xe, xk)  # the image was erased


def test_resize_is_bilinear_to_height_width():
  image = np.zeros((4, 2, 3), np.uint8)
  image[2:] = 200
  out = augment.resize(image, 8, 4)
  assert out.shape == (8, 4, 3)
  assert out[0, 0, 0] == 0 and out[-1, 0, 0] == 200
  assert 0 < out[4, 0, 0] < 200  # interpolated across the edge, not nearest-neighbour


def test_flip_mirrors_columns():
  image = _images(1)[0]
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(augment.random_flip(image, 1.0, rng), image[:, ::-1])
  np.testing.assert_array_equal(augment.random_flip(image, 0.0, rng), image)


def test_pad_crop_is_a_window_of_the_zero_padded_image():
  image = _images(1, seed=1)[0] | 1  # no zero pixels, so padding is recognisable
  pad = 3
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  for seed in range(10):
    out = augment.pad_crop(image, pad, np.random.default_rng(seed))
    matches = [(y, x) for y in range(2 * pad + 1) for x in range(2 * pad + 1)
               if np.array_equal(out, padded[y:y + H, x:x + W])]
    assert len(matches) == 1
  np.testing.assert_array_equal(augment.pad_crop(image, 0, np.random.default_rng(0)), image)


def test_random_erase_fills_one_box_within_area_and_aspect_bounds():
  h, w = 64, 32
  image = np.full((h, w, 3), 128, np.uint8)
  area, min_aspect = (0.05, 0.3), 0.4
  for seed in range(20):
    out = augment.random_erase(image, 1.0, area, min_aspect, np.random.default_rng(seed))
    changed = np.argwhere((out != image).any(-1))
    assert changed.size, 'erase_prob=1 must erase'
    (y0, x0), (y1, x1) = changed.min(0), changed.max(0) + 1
    bh, bw = y1 - y0, x1 - x0
    # Changed pixels fill their bounding box (random values almost never equal 128 in all
    # three channels), and the box respects the configured area and aspect range up to the
    # rounding of its sides.
    assert len(changed) >= 0.95 * bh * bw
    assert area[0] * h * w * 0.8 <= bh * bw <= area[1] * h * w * 1.2
    assert min_aspect * 0.8 <= bh / bw <= 1.25 / min_aspect
  untouched = augment.random_erase(image, 0.0, area, min_aspect, np.random.default_rng(0))
  np.testing.assert_array_equal(untouched, image)


def test_normalize_maps_0_255_through_mean_and_std():
  image = np.array([[[0, 255, 51]]], np.uint8)
  out = augment.normalize(image, (0.5, 0.4, 0.2), (0.5, 0.25, 0.1))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], [(0 - 0.5) / 0.5, (1 - 0.4) / 0.25, (0.2 - 0.2) / 0.1],
                             atol=1e-6)
  same = augment.normalize(image, (0.5,) * 3, (0.25,) * 3)  # the scalar fast path
  np.testing.assert_allclose(same[0, 0], [-2.0, 2.0, 0.2 / 0.25 - 2.0], atol=1e-6)


def test_eval_transform_is_resize_then_normalize():
  spec = augment.AugmentSpec(height=H, width=W)
  image = _images(1, 40, 20)[0]
  out = augment.eval_transform(image, spec)
  assert out.shape == (H, W, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out, augment.normalize(augment.resize(image, H, W), spec.mean,
                                                       spec.std))


def test_augment_spec_reads_config_and_names_bad_fields():
  spec = augment.augment_spec(config_defaults.base_config())
  assert (spec.height, spec.width, spec.pad) == (256, 128, 10)
  with pytest.raises(ValueError, match='config.input.erase_area'):
    augment.AugmentSpec(height=H, width=W, erase_area=(0.5, 0.1))
  with pytest.raises(ValueError, match='config.input.flip_prob'):
    augment.AugmentSpec(height=H, width=W, flip_prob=1.5)


# ---------------------------------------------------------------------------------------------
# Occlusion


@pytest.mark.parametrize('pattern', [p for p in occlusion.PATTERN_TYPES if p != 'bank'])
def test_each_pattern_covers_the_configured_area_and_nothing_else(pattern):
  spec = occlusion.OcclusionSpec(prob=1.0, patterns=(pattern,), area=(0.2, 0.4))
  images = _images(40)
  occ, ids, masks = occlusion.synthesise_batch(images, np.arange(40), spec,
                                               np.random.default_rng(0))
  assert occ.dtype == np.uint8 and masks.dtype == np.uint8 and ids.dtype == np.int32
  assert (ids == 1).all()
  frac = masks.reshape(40, -1).mean(1)
  tol = 1.0 / W  # sides are rounded to whole pixels
  assert frac.min() >= 0.2 - tol and frac.max() <= 0.4 + tol
  outside = masks == 0
  np.testing.assert_array_equal(occ[outside], images[outside])
  assert (occ[masks == 1] != images[masks == 1]).any(-1).mean() > 0.9


def test_donor_patterns_paste_pixels_of_an_image_with_another_identity():
  spec = occlusion.OcclusionSpec(prob=1.0, patterns=('crop', 'person'))
  pids = np.array([0, 0, 1, 1, 2, 2])
  images = _images(6, seed=2)
  for seed in range(5):
    rngs = [np.random.default_rng([seed, i]) for i in range(6)]
    plans = [occlusion.plan_occlusion(spec, pids, i, r) for i, r in enumerate(rngs)]
    rngs = [np.random.default_rng([seed, i]) for i in range(6)]
    occ, _, masks = occlusion.synthesise_batch(images, pids, spec, rngs)
    for i, plan in enumerate(plans):
      assert plan.donor >= 0 and pids[plan.donor] != pids[i]
      ys, xs = np.nonzero(masks[i])
      patch = occ[i, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
      ph, pw = patch.shape[:2]
      donor = images[plan.donor]
      found = any(np.array_equal(patch, donor[y:y + ph, x:x + pw])
                  for y in range(H - ph + 1) for x in range(W - pw + 1))
      assert found, 'the occluder is a crop of the donor image'


def test_batch_of_one_identity_never_uses_donor_patterns():
  spec = occlusion.OcclusionSpec(prob=1.0)
  _, ids, _ = occlusion.synthesise_batch(_images(30), np.zeros(30, int), spec,
                                         np.random.default_rng(0))
  assert set(ids.tolist()) <= {spec.pattern_id('object'), spec.pattern_id('texture')}


def test_pattern_ids_follow_config_order_and_prob():
  spec = occlusion.OcclusionSpec(prob=0.5)
  _, ids, masks = occlusion.synthesise_batch(_images(400), np.arange(400), spec,
                                             np.random.default_rng(1))
  assert set(ids.tolist()) == {0, 1, 2, 3, 4}
  assert 0.4 < (ids == 0).mean() < 0.6
  assert (masks[ids == 0] == 0).all() and (masks[ids > 0].reshape(-1, H * W).sum(1) > 0).all()


def test_holdout_types_never_appear_and_other_ids_do_not_move():
  spec = occlusion.OcclusionSpec(prob=1.0, holdout=('texture', 'crop'))
  assert spec.train_ids == (1, 3)
  _, ids, _ = occlusion.synthesise_batch(_images(200), np.arange(200), spec,
                                         np.random.default_rng(2))
  assert set(ids.tolist()) == {1, 3}


def test_disabled_or_zero_prob_gives_identical_views_and_pattern_zero():
  images = _images(10)
  for spec in (occlusion.OcclusionSpec(enabled=False), occlusion.OcclusionSpec(prob=0.0)):
    occ, ids, masks = occlusion.synthesise_batch(images, np.arange(10), spec,
                                                 np.random.default_rng(0))
    np.testing.assert_array_equal(occ, images)
    assert (ids == 0).all() and (masks == 0).all()


def test_synthesis_is_deterministic_given_the_generator():
  spec = occlusion.OcclusionSpec(prob=1.0)
  images, pids = _images(12), np.arange(12) // 2
  a = occlusion.synthesise_batch(images, pids, spec, np.random.default_rng(9))
  b = occlusion.synthesise_batch(images, pids, spec, np.random.default_rng(9))
  c = occlusion.synthesise_batch(images, pids, spec, np.random.default_rng(10))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])


def test_config_errors_name_the_field():
  config = config_defaults.base_config()
  assert occlusion.occlusion_spec(config).num_patterns == 4
  config.occlusion.patterns = ('object', 'umbrella')
  with pytest.raises(ValueError, match=r"config\.occlusion\.patterns.*umbrella"):
    occlusion.occlusion_spec(config)
  with pytest.raises(ValueError, match=r"config\.occlusion\.holdout.*car"):
    occlusion.OcclusionSpec(holdout=('car',))
  with pytest.raises(ValueError, match=r"config\.occlusion\.holdout.*nothing is left"):
    occlusion.OcclusionSpec(patterns=('object',), holdout=('object',))
  with pytest.raises(ValueError, match=r"config\.occlusion\.placements"):
    occlusion.OcclusionSpec(placements=('under',))
  with pytest.raises(ValueError, match=r"config\.occlusion\.area"):
    occlusion.OcclusionSpec(area=(0.0, 0.5))


# ---------------------------------------------------------------------------------------------
# Occluder bank


def _write_bank(folder, shapes, index=None):
  """Solid-colour cut-outs: name -> (h, w, colour); opaque in an inner rectangle."""
  os.makedirs(folder, exist_ok=True)
  for name, (h, w, colour) in shapes.items():
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = colour
    rgba[1:-1, 1:-1, 3] = 255
    Image.fromarray(rgba, 'RGBA').save(os.path.join(folder, name))
  if index is not None:
    with open(os.path.join(folder, 'index.json'), 'w') as f:
      json.dump(index, f)
  occlusion.load_bank.cache_clear()
  return str(folder)


def test_bank_cutouts_go_back_to_their_box_and_paste_only_opaque_pixels(tmp_path):
  bank = _write_bank(tmp_path / 'bank', {'car.png': (12, 16, (250, 0, 0))},
                     {'car.png': {'type': 'vehicle', 'box': [0.5, 0.0, 1.0, 1.0]}})
  spec = occlusion.OcclusionSpec(prob=1.0, patterns=('bank',), bank_dir=bank)
  images = np.zeros((30, H, W, 3), np.uint8)
  occ, ids, masks = occlusion.synthesise_batch(images, np.arange(30), spec,
                                               np.random.default_rng(0))
  assert (ids == 1).all()
  for o, m in zip(occ, masks):
    ys, xs = np.nonzero(m)
    assert ys.size
    # The box is the bottom half: centre at 0.75 H (+- 5% jitter), scale 0.85-1.15.
    assert abs(ys.mean() - 0.75 * H) <= 0.05 * H + 1.5
    assert 0.85 ** 2 * 0.5 * 0.7 <= m.mean() <= 1.15 * 0.5 + 1.0 / W
    np.testing.assert_array_equal(o[m == 1], np.broadcast_to([250, 0, 0], (ys.size, 3)))
    assert (o[m == 0] == 0).all()


def test_bank_cutouts_without_a_box_follow_the_drawn_area(tmp_path):
  bank = _write_bank(tmp_path / 'bank', {'a.png': (20, 10, (0, 200, 0)),
                                         'b.png': (8, 30, (0, 0, 200))})
  spec = occlusion.OcclusionSpec(prob=1.0, patterns=('bank',), bank_dir=bank, area=(0.2, 0.4))
  occ, _, masks = occlusion.synthesise_batch(_images(40), np.arange(40), spec,
                                             np.random.default_rng(1))
  frac = masks.reshape(40, -1).mean(1)
  # The cut-out's box covers the drawn area (clamped to the image); its opaque part is less.
  assert frac.max() <= 0.4 + 2.0 / W and frac.min() > 0.05


def test_bank_errors_name_the_folder_file_or_field(tmp_path):
  with pytest.raises(ValueError, match=r'config\.occlusion\.bank_dir'):
    occlusion.OcclusionSpec(patterns=('object', 'bank'))
  occlusion.OcclusionSpec(patterns=('object', 'bank'), holdout=('bank',))  # never synthesised
  occlusion.OcclusionSpec(enabled=False, patterns=('object', 'bank'))
  with pytest.raises(FileNotFoundError, match='nowhere'):
    occlusion.load_bank(str(tmp_path / 'nowhere'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(ValueError, match='no .png'):
    occlusion.load_bank(str(tmp_path / 'empty'))
  os.makedirs(tmp_path / 'rgb')
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'rgb' / 'flat.png')
  with pytest.raises(ValueError, match=r'flat\.png.*no alpha'):
    occlusion.load_bank(str(tmp_path / 'rgb'))
  bad = _write_bank(tmp_path / 'bad', {'x.png': (5, 5, (1, 2, 3))},
                    {'x.png': {'box': [0.6, 0.0, 0.2, 1.0]}})
  with pytest.raises(ValueError, match=r"index\.json.*'x\.png'"):
    occlusion.load_bank(bad)
  config = config_defaults.base_config()
  config.dataset.name, config.dataset.root = 'market1501', str(tmp_path / 'market')
  config.occlusion.patterns = ('bank',)
  with pytest.raises(FileNotFoundError, match=r'market/occluders'):
    occlusion.occlusion_spec(config)
