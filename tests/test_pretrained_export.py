"""Pretrained-weight export: timm safetensors round trips, the student export from a workdir
and its command line, features reproduced by a numpy timm forward, lossy parts refused, and
file modes."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save

from ogfr_jax import checkpoints
from ogfr_jax.models import build
from ogfr_jax import train_state
from ogfr_jax import config_defaults
from ogfr_jax import pretrained
from ogfr_jax import run_config
from ogfr_jax.tools import convert
from helpers import float32_feature_tol, make_config
from pretrained_fixtures import ROOT, WEIGHTS, PARITY, NARROW, ERASE, zero_params, random_params, flat, timm_tensors, rows_by_key


def test_safetensors_round_trip(tmp_path):
  config = make_config(NARROW)
  params = random_params(config, seed=3)
  path = str(tmp_path / 'student.safetensors')
  meta = pretrained.export_timm_safetensors(params, config, path, fold_pattern_embed=False)
  assert meta['ogfr.grid'] == '5x3' and meta['ogfr.timm_img_size'] == '80x48'
  assert meta['reid.sie_weight'] == '3.0' and meta['ogfr.lossy'] == 'no'
  exported = load_file(path)
  extras = {'reid.sie_embed', 'reid.pattern_embed_0'}  # SIE on, E[0] not folded
  assert set(exported) == set(timm_tensors()) - {'head.weight', 'head.bias'} | extras
  np.testing.assert_array_equal(exported['reid.sie_embed'], params['student_vit']['sie_embed'])
  np.testing.assert_array_equal(exported['reid.pattern_embed_0'], params['pattern_embed'][0])
  back, report = pretrained.load_backbone(zero_params(config), path, config)
  assert report.count('missing') == 0
  assert {r.key for r in report.rows if r.status == 'unexpected'} == extras
  ours, orig = flat(back['student_vit']), flat(params['student_vit'])
  for key in orig:
    if key != 'sie_embed':
      np.testing.assert_array_equal(ours[key], orig[key], err_msg=key)

  # Folded: E[0] (the test-time pattern embedding) is added to every position.
  folded = str(tmp_path / 'folded.safetensors')
  pretrained.export_timm_safetensors(params, config, folded)
  np.testing.assert_array_equal(
      load_file(folded)['pos_embed'],
      params['student_vit']['pos_embed'] + params['pattern_embed'][0])
  assert 'reid.pattern_embed_0' not in load_file(folded)
  # Without SIE there is no camera table to export.
  no_sie = make_config({**NARROW, 'model.sie': False})
  meta = pretrained.export_timm_safetensors(random_params(no_sie), no_sie, folded)
  assert 'reid.sie_embed' not in load_file(folded) and meta['ogfr.sie'] == 'off'

  # The recorded grid (5x3) is used to resample for another config, not a guess.
  other = make_config(PARITY)
  _, report = pretrained.load_backbone(zero_params(other), path, other)
  assert rows_by_key(report)['pos_embed'].note == 'grid 5x3 -> 4x4 (bilinear)'


def test_export_of_a_student_with_its_own_occluder_classifier(tmp_path, capfd):
  config = make_config({**NARROW, 'student_erase.enabled': True,
                        'student_erase.detector': 'separate'}, extend=ERASE)
  params = random_params(config, seed=4)
  path = str(tmp_path / 'student.safetensors')
  with pytest.raises(pretrained.LossyExportError, match='student_erase.*allow-lossy'):
    pretrained.export_timm_safetensors(params, config, path)
  assert not os.path.exists(path)
  meta = pretrained.export_timm_safetensors(params, config, path, fold_pattern_embed=False,
                                            allow_lossy=True)
  assert meta['ogfr.student_erase'] == 'not exported'
  assert meta['ogfr.lossy'].startswith('student_erase')
  assert 'warning: the export leaves out student_erase' in capfd.readouterr().err
  np.testing.assert_array_equal(load_file(path)['blocks.0.mlp.fc2.weight'],
                                params['student_vit']['blocks_0']['fc2']['kernel'].T)


def test_convert_then_load(tmp_path):
  config = make_config(NARROW)
  out = str(tmp_path / 'converted')
  report = convert.convert(WEIGHTS, out, config)
  assert rows_by_key(report)['pos_embed'].status == 'resampled'
  assert pretrained.detect_format(out) == 'orbax'
  assert 'blocks.0.attn.qkv.weight' in open(os.path.join(out, 'import_report.txt')).read()
  with pytest.raises(FileExistsError, match='--output'):
    convert.convert(WEIGHTS, out, config)
  direct, _ = pretrained.load_backbone(zero_params(config), WEIGHTS, config)
  via, report = pretrained.load_backbone(zero_params(config), out, config)
  assert report.fmt == 'orbax' and report.count('resampled') == 0
  for key, value in flat(direct['student_vit']).items():
    np.testing.assert_array_equal(flat(via['student_vit'])[key], value, err_msg=key)


def make_workdir(tmp_path, config, params, step=7, batch_stats=None, name='run'):
  """A training workdir as train.py leaves it: config.json and an orbax train state."""
  state = train_state.TrainState(step=jnp.array(step), params=params,
                                 batch_stats=batch_stats or {}, opt_state={},
                                 rng=jax.random.PRNGKey(0))
  wd = str(tmp_path / name)
  run_config.prepare_workdir(wd, config)
  manager = checkpoints.make_manager(wd)
  checkpoints.save(manager, step, state, {}, force=True)
  manager.wait_until_finished()
  manager.close()
  return wd


def test_export_student_from_a_workdir(tmp_path):
  config = make_config(NARROW)
  params = random_params(config, seed=5)
  wd = make_workdir(tmp_path, config, params)
  out = str(tmp_path / 'model.safetensors')
  meta = convert.export_student(wd, out)  # the config comes from WORKDIR/config.json
  assert meta['ogfr.step'] == '7'
  exported = load_file(out)
  np.testing.assert_array_equal(exported['blocks.1.attn.qkv.weight'],
                                params['student_vit']['blocks_1']['attn']['qkv']['kernel'].T)
  np.testing.assert_array_equal(exported['pos_embed'], params['student_vit']['pos_embed']
                                + params['pattern_embed'][0])
  with pytest.raises(FileNotFoundError, match='no checkpoint|not found'):
    convert.export_student(str(tmp_path), str(tmp_path / 'x.safetensors'), config)


def test_command_line(tmp_path):
  # A fresh process on one device: the workdir below is written with 8 (see conftest).
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  tool = [sys.executable, '-m', 'ogfr_jax.tools.convert']
  run = lambda args: subprocess.run(tool + args, capture_output=True, text=True, cwd=ROOT,  # noqa
                                    env=env, timeout=120)
  out = str(tmp_path / 'cli')
  args = ['--input', WEIGHTS, '--output', out, '--config',
          os.path.join(ROOT, 'configs', 'synthetic.py'), '--config.model.stride=16']
  res = run(args)
  assert res.returncode == 0, res.stderr[-2000:]
  assert 'grid 4x4 -> 8x4 (bilinear)' in res.stdout and f'wrote {out}' in res.stdout
  res = run(args + ['--overwrite', '--config.model.size=small'])
  assert res.returncode == 2
  assert "error: cls_token: shape (1, 1, 64) cannot be mapped to the model's cls_token of " \
      'shape (1, 1, 384)' in res.stderr

  config = make_config(NARROW)
  params = random_params(config, seed=6)
  wd = make_workdir(tmp_path, config, params)
  model = str(tmp_path / 'model.safetensors')
  res = run(['--export-student', wd, '--output', model, '--no-fold-pattern-embed'])
  assert res.returncode == 0, res.stderr[-2000:]
  assert 'img_size=80x48 and patch_embed.proj.stride=12' in res.stdout
  np.testing.assert_array_equal(load_file(model)['pos_embed'], params['student_vit']['pos_embed'])


# ---------------------------------------------------------------------------------------------
# The export as a timm user reads it: features, lossy parts, file mode


def timm_vit_features(state, meta, images, camid):
  """timm's VisionTransformer.forward_features(x)[:, 0] with the extras added as the recipe in
  tools/convert.py says, written out in float64 numpy from the exported tensors alone (torch
  layouts: Linear weights [out, in], the patch conv OIHW). images: [B, H, W, 3] model input."""
  sd = {k: np.asarray(v, np.float64) for k, v in state.items()}
  p, s = int(meta['ogfr.patch_size']), int(meta['ogfr.stride'])
  gh, gw = map(int, meta['ogfr.grid'].split('x'))
  heads = int(meta['ogfr.num_heads'])
  x = np.asarray(images, np.float64)
  b = x.shape[0]
  w = sd['patch_embed.proj.weight']
  tokens = np.stack([np.einsum('buvc,dcuv->bd', x[:, i * s:i * s + p, j * s:j * s + p], w)
                     for i in range(gh) for j in range(gw)], axis=1)
  tokens = tokens + sd['patch_embed.proj.bias']
  tokens = np.concatenate([np.broadcast_to(sd['cls_token'], (b, 1, w.shape[0])), tokens], 1)
  tokens = tokens + sd['pos_embed']
  if 'reid.sie_embed' in sd:  # the recipe's hook on norm_pre
    tokens = tokens + float(meta['reid.sie_weight']) * sd['reid.sie_embed'][camid][:, None]
  tokens = tokens + sd.get('reid.pattern_embed_0', 0.0)

  def ln(v, name):
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * sd[f'{name}.weight'] + sd[f'{name}.bias']

  def linear(v, name):
    return v @ sd[f'{name}.weight'].T + sd[f'{name}.bias']

  erf = np.vectorize(math.erf)
  depth = int(meta['ogfr.depth'])
  n, d = tokens.shape[1], tokens.shape[2]
  for i in range(depth):
    blk = f'blocks.{i}'
    qkv = linear(ln(tokens, f'{blk}.norm1'), f'{blk}.attn.qkv')
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) * (d // heads) ** -0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = attn / attn.sum(-1, keepdims=True)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    tokens = tokens + linear(out, f'{blk}.attn.proj')
    h = linear(ln(tokens, f'{blk}.norm2'), f'{blk}.mlp.fc1')
    tokens = tokens + linear(0.5 * h * (1.0 + erf(h / math.sqrt(2.0))), f'{blk}.mlp.fc2')
  feat = ln(tokens, 'norm')[:, 0]
  if meta['ogfr.eval_normalize'] == 'true':
    feat = feat / np.linalg.norm(feat, axis=-1, keepdims=True)
  return feat


def init_variables(config, num_cameras, seed=0):
  """The OGFR variables at initialisation, with the camera and pattern tables drawn at unit
  scale so that leaving either out changes the features far beyond rounding."""
  model = build.build_model(config, 3, num_cameras)
  variables = jax.tree.map(np.asarray, dict(model.init(
      {'params': jax.random.PRNGKey(seed)}, train_state.dummy_batch(config, 1), train=False)))
  rng = np.random.default_rng(seed)
  params = dict(variables['params'])
  params['student_vit'] = dict(params['student_vit'])
  for tree, key in ((params['student_vit'], 'sie_embed'), (params, 'pattern_embed')):
    tree[key] = rng.normal(0.0, 0.3, tree[key].shape).astype(np.float32)
  return params, dict(variables.get('batch_stats', {}))


def test_export_reproduces_the_extract_tools_features(tmp_path):
  from PIL import Image
  from ogfr_jax.tools import extract
  config = make_config(NARROW)
  params, batch_stats = init_variables(config, num_cameras=4)
  wd = make_workdir(tmp_path, config, params, batch_stats=batch_stats)
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (5, 64, 48, 3), dtype=np.uint8)
  for i, image in enumerate(pixels):  # PNG at the input size: read back unchanged, no resize
    Image.fromarray(image).save(folder / f'{i}.png')
  camid = 2
  extracted = extract.main(['--workdir', wd, '--images', str(folder), '--out',
                            str(tmp_path / 'f.npz'), '--camera', str(camid), '--no-progress'])
  assert extracted.names == [f'{i}.png' for i in range(5)]

  path = str(tmp_path / 'student.safetensors')
  meta = convert.export_student(wd, path)
  from safetensors import safe_open
  with safe_open(path, 'np') as f:
    assert f.metadata() == {k: v for k, v in meta.items() if k != 'ogfr.step'}
  state = load_file(path)
  extras = {k: state.pop(k) for k in list(state) if k.startswith('reid.')}
  assert set(extras) == {'reid.sie_embed'}  # E[0] is folded into pos_embed by default
  mean, std = np.array(config.input.mean), np.array(config.input.std)
  x = (pixels / 255.0 - mean) / std
  cams = np.full(len(pixels), camid)
  ours = timm_vit_features({**state, **extras}, meta, x, cams)

  # The reference is float64, so the difference is the float32 rounding of the extract path
  # (5e-8 when this was written), bounded from the arithmetic in float32_feature_tol.
  tol = float32_feature_tol(config)
  err = float(np.abs(extracted.features - ours).max())
  print(f'max |extract - export read as timm| = {err:.3g} (bound {tol:.3g})')
  assert err <= tol, (err, tol)
  # The extras matter: without the camera embedding, or at another camera, or without E[0],
  # the features are far outside the bound (so the comparison above can fail).
  no_sie = timm_vit_features(state, meta, x, cams)
  other_cam = timm_vit_features({**state, **extras}, meta, x, cams - 1)
  assert float(np.abs(extracted.features - no_sie).max()) > 100 * tol
  assert float(np.abs(extracted.features - other_cam).max()) > 100 * tol
  unfolded = str(tmp_path / 'unfolded.safetensors')
  meta = convert.export_student(wd, unfolded, fold_pattern_embed=False)
  state = load_file(unfolded)
  assert meta['ogfr.pattern_embed_folded'].startswith('no: E[0] is reid.pattern_embed_0')
  # Same model; only the float32 rounding of the folded pos_embed + E[0] differs.
  np.testing.assert_allclose(timm_vit_features(state, meta, x, cams), ours, rtol=0, atol=tol)
  del state['reid.pattern_embed_0']
  assert float(np.abs(timm_vit_features(state, meta, x, cams) - ours).max()) > 100 * tol


@pytest.mark.parametrize('field,value,part', [
    ('model.jpm', True, 'model.jpm'),
    ('eval.feature', 'post_bn', 'eval.feature=post_bn'),
    ('student_erase.enabled', True, 'student_erase')])
def test_lossy_exports_are_refused_unless_allowed(tmp_path, capfd, field, value, part):
  config = make_config(NARROW, extend=ERASE)
  section, name = field.split('.')
  config[section][name] = value
  params = random_params(config)
  path = str(tmp_path / 'student.safetensors')
  with pytest.raises(pretrained.LossyExportError) as e:
    pretrained.export_timm_safetensors(params, config, path)
  assert part in str(e.value) and '--allow-lossy' in str(e.value)
  assert not os.path.exists(path)
  capfd.readouterr()
  meta = pretrained.export_timm_safetensors(params, config, path, allow_lossy=True)
  assert meta['ogfr.lossy'].startswith(part)
  assert f'warning: the export leaves out {part}' in capfd.readouterr().err
  from safetensors import safe_open
  with safe_open(path, 'np') as f:
    assert f.metadata()['ogfr.lossy'] == meta['ogfr.lossy']
  # The same config without the part exports silently, and says so.
  default = config_defaults.extend(config_defaults.base_config(), 'student_erase')
  config[section][name] = default[section][name]
  assert pretrained.lossy_parts(config) == []
  assert pretrained.export_timm_safetensors(params, config, path)['ogfr.lossy'] == 'no'
  assert 'warning' not in capfd.readouterr().err


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_exports_honour_the_umask(tmp_path, umask):
  config = make_config(NARROW)
  params = random_params(config)
  wd = make_workdir(tmp_path, config, params)
  old = os.umask(umask)
  try:
    paths = [str(tmp_path / 'direct.safetensors'), str(tmp_path / 'via_tool.safetensors')]
    pretrained.export_timm_safetensors(params, config, paths[0])
    convert.export_student(wd, paths[1])
    convert.export_student(wd, paths[1], overwrite=True)  # replacing keeps the rule
  finally:
    os.umask(old)
  for path in paths:
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, (path, oct(os.stat(path).st_mode))
  assert sorted(os.listdir(tmp_path)) == sorted(['direct.safetensors', 'via_tool.safetensors',
                                                 'run'])  # no temporary file left behind
