"""Pretrained-weight import and export: parity with timm, name mappings, the report, safety.

The parity fixtures in tests/fixtures/parity/ come from tools/make_parity_fixtures.py (run with
torch and timm elsewhere); these tests need neither.
"""

import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save, save_file

from ogfr_jax.models import build
from ogfr_jax import pretrained
from helpers import float32_feature_tol, make_config
from pretrained_fixtures import FIXTURES, MANIFEST, WEIGHTS, PARITY, NARROW, ERASE, zero_params, random_params, flat, plain_vit, timm_tensors, rows_by_key


# ---------------------------------------------------------------------------------------------
# Parity with timm


@pytest.mark.parametrize('case', sorted(MANIFEST['cases']))
def test_forward_matches_timm(case):
  spec = MANIFEST['cases'][case]
  config = make_config({**PARITY, 'input.height': spec['height'], 'input.width': spec['width'],
                        'model.stride': spec['stride'], 'model.sie': False,
                        'model.pattern_embed': False, 'model.teacher': False})
  assert list(build.token_grid(config)) == spec['grid']
  params, report = pretrained.load_backbone(zero_params(config), WEIGHTS, config)
  rows = rows_by_key(report)
  assert rows['head.weight'].status == 'unexpected'
  assert rows['pos_embed'].status == ('loaded' if case == 's16' else 'resampled')
  assert report.count('missing') == 0

  out = np.load(os.path.join(FIXTURES, 'outputs.npz'))
  image = out[f'{case}/image_uint8'].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  tokens = plain_vit(config).apply(
      {'params': params['student_vit']}, jnp.asarray(image),
      method=lambda m, x: m.tail(m.embed(x), 0, train=False)[0])
  tokens = np.asarray(tokens)
  # timm ran in float32 elsewhere (another machine, library and summation order): two float32
  # computations of the same normalised tokens, within the bound derived from the arithmetic
  # (measured ~1e-6 here; a layout or mapping mistake moves them by O(1)).
  tol = float32_feature_tol(config, computations=2)
  for name, ours in (('tokens', tokens), ('cls', tokens[:, 0])):
    ref = out[f'{case}/{name}']
    assert ours.shape == ref.shape
    err = np.abs(ours - ref)
    rel = err.max() / np.abs(ref).max()
    print(f'{case} {name}: max abs {err.max():.3g}, max abs / max |ref| {rel:.3g} '
          f'(bound {tol:.3g})')
    assert rel <= tol, (case, name, err.max(), rel)


def test_resampling_is_torch_bilinear():
  """Half-pixel bilinear without antialias, checked on a grid where it is known exactly."""
  grid = np.arange(4 * 2, dtype=np.float32).reshape(1, 4, 2, 1)  # rows 0..3, cols 0..1
  posemb = np.concatenate([np.full((1, 1, 1), 7.0, np.float32), grid.reshape(1, 8, 1)], axis=1)
  out = pretrained.resample_pos_embed(posemb, (4, 2), True, (8, 2))
  assert out[0, 0, 0] == 7.0  # CLS kept
  rows = out[0, 1:, 0].reshape(8, 2)[:, 0] / 2  # the first column holds 2 * row
  # Upsampling x2 with half-pixel centres: source row = (i + 0.5) / 2 - 0.5, clamped at 0 / 3.
  np.testing.assert_allclose(rows, np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Loading into the OGFR tree


def test_load_backbone_fills_the_occluder_classifier_blocks_it_has():
  config = make_config({**PARITY, 'input.height': 128, 'model.stride': 12,
                        'student_erase.enabled': True, 'student_erase.detector': 'separate',
                        'student_erase.layer': 1}, extend=ERASE)
  before = random_params(config)
  after, report = pretrained.load_backbone(before, WEIGHTS, config)
  assert report.backbones == ('teacher_vit', 'student_vit', 'occluder_vit')
  fa, src = flat(after), timm_tensors()
  assert not any(k.startswith('occluder_vit/blocks_1') for k in fa)
  np.testing.assert_array_equal(fa['occluder_vit/blocks_0/fc2/kernel'],
                                src['blocks.0.mlp.fc2.weight'].T)
  np.testing.assert_array_equal(fa['occluder_vit/pos_embed'], fa['student_vit/pos_embed'])
  np.testing.assert_array_equal(fa['occluder_head/kernel'], flat(before)['occluder_head/kernel'])


def test_load_backbone_fills_both_backbones_and_nothing_else():
  config = make_config({**PARITY, 'input.height': 128, 'model.stride': 12, 'model.jpm': True})
  before = random_params(config)
  after, report = pretrained.load_backbone(before, WEIGHTS, config)
  assert report.backbones == ('teacher_vit', 'student_vit')
  fb, fa = flat(before), flat(after)
  assert fa.keys() == fb.keys()
  for key, value in fa.items():
    assert value.dtype == fb[key].dtype and value.shape == fb[key].shape, key
    in_backbone = key.startswith(('teacher_vit/', 'student_vit/'))
    if not in_backbone or key.endswith('sie_embed'):
      assert np.array_equal(value, fb[key]), f'{key} was changed'
  src = timm_tensors()
  for branch in ('teacher_vit', 'student_vit'):
    np.testing.assert_array_equal(fa[f'{branch}/blocks_1/fc2/kernel'],
                                  src['blocks.1.mlp.fc2.weight'].T)
    np.testing.assert_array_equal(fa[f'{branch}/patch_embed/kernel'],
                                  src['patch_embed.proj.weight'].transpose(2, 3, 1, 0))
    # The JPM branch starts as a copy of the last block and the final norm (TransReID).
    np.testing.assert_array_equal(fa[f'{branch}/jpm_block/attn/qkv/kernel'],
                                  src['blocks.1.attn.qkv.weight'].T)
    np.testing.assert_array_equal(fa[f'{branch}/jpm_norm/scale'], src['norm.weight'])
  assert rows_by_key(report)['pos_embed'].note == 'grid 4x4 -> 10x5 (bilinear)'
  assert report.count('copied') == 14  # 12 block tensors + 2 norm tensors


def test_load_into_an_abstract_tree():
  config = make_config(PARITY)
  abstract = jax.tree.map(lambda z: jax.ShapeDtypeStruct(z.shape, z.dtype), zero_params(config))
  loaded, _ = pretrained.load_backbone(abstract, WEIGHTS, config)
  assert isinstance(loaded['student_vit']['cls_token'], np.ndarray)
  assert isinstance(loaded['student_vit']['sie_embed'], jax.ShapeDtypeStruct)
  assert isinstance(loaded['student_head']['classifier']['kernel'], jax.ShapeDtypeStruct)


def test_load_vit_on_a_plain_backbone_tree():
  config = make_config(NARROW)
  tree = zero_params(config)
  via_ogfr, _ = pretrained.load_backbone(tree, WEIGHTS, config)
  vit, report = pretrained.load_vit(tree['student_vit'], WEIGHTS, grid=(5, 3), num_heads=2)
  assert report.backbones == ('vit',) and report.count('resampled') == 1
  for key, value in flat(via_ogfr['student_vit']).items():
    np.testing.assert_array_equal(flat(vit)[key], value, err_msg=key)


def test_load_from_config_is_a_no_op_without_init_from():
  config = make_config(PARITY)
  params = zero_params(config)
  assert pretrained.load_from_config(params, config) == (params, None)
  config.init_from, config.init_format = WEIGHTS, 'safetensors'
  loaded, report = pretrained.load_from_config(params, config)
  assert report.fmt == 'safetensors' and np.abs(loaded['student_vit']['cls_token']).sum() > 0


# ---------------------------------------------------------------------------------------------
# Format detection


def _write_fake_torch_zip(path, pickle_bytes):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', pickle_bytes)
    z.writestr('archive/version', '3\n')


def test_detect_format(tmp_path):
  assert pretrained.detect_format(WEIGHTS) == 'safetensors'
  assert pretrained.detect_format(os.path.join(FIXTURES, 'torch_state_zip.pth')) == 'torch'
  assert pretrained.detect_format(os.path.join(FIXTURES, 'torch_state_legacy.pth')) == 'torch'
  npz = str(tmp_path / 'w.weights')  # the name says nothing; the bytes do
  np.savez(npz, **{'embedding/kernel': np.zeros((2, 2, 3, 4), np.float32)})
  assert pretrained.detect_format(npz + '.npz') == 'npz'
  st = str(tmp_path / 'w.npz')
  save_file({'x': np.zeros(3, np.float32)}, st)
  assert pretrained.detect_format(st) == 'safetensors'
  other_zip = str(tmp_path / 'other.zip')
  with zipfile.ZipFile(other_zip, 'w') as z:
    z.writestr('readme.txt', 'hello')
  with pytest.raises(ValueError, match='other.zip.*neither'):
    pretrained.detect_format(other_zip)
  junk = str(tmp_path / 'junk.bin')
  open(junk, 'wb').write(b'GIF89a not weights')
  with pytest.raises(ValueError, match='junk.bin: unknown checkpoint format'):
    pretrained.detect_format(junk)
  with pytest.raises(ValueError, match='is a folder'):
    pretrained.detect_format(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    pretrained.read_checkpoint(str(tmp_path / 'nope.pth'))
  with pytest.raises(ValueError, match='init_format'):
    pretrained.read_checkpoint(WEIGHTS, 'onnx')


def _safetensors_with_header_length(path, low_byte, at_least=0):
  """A safetensors file whose header length has `low_byte` as its low byte (the first byte of
  the file), found by growing a metadata string; returns (header length, tensors)."""
  tensors = {'patch_embed.proj.weight': np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)}
  for pad in range(at_least + 512):
    data = save(tensors, metadata={'note': 'x' * pad})
    n = int.from_bytes(data[:8], 'little')
    if n % 256 == low_byte and n >= at_least:
      open(path, 'wb').write(data)
      return n, tensors
  raise AssertionError(f'no header length with low byte {low_byte:#x}')


@pytest.mark.parametrize('at_least', [0, 0x200, 0x1000])
def test_safetensors_whose_first_byte_is_the_pickle_opcode(tmp_path, at_least):
  path = str(tmp_path / 'vit.safetensors')
  n, tensors = _safetensors_with_header_length(path, 0x80, at_least)
  assert n % 256 == 0x80 and n >= at_least
  assert open(path, 'rb').read(1) == pickle.PROTO  # what a legacy torch file starts with
  assert pretrained.detect_format(path) == 'safetensors'
  checkpoint = pretrained.read_checkpoint(path)
  assert checkpoint.fmt == 'safetensors'
  np.testing.assert_array_equal(checkpoint.tensors['patch_embed.proj.weight'],
                                tensors['patch_embed.proj.weight'])


def test_pickles_that_look_like_safetensors_stay_torch(tmp_path):
  # A pickle whose 9th byte is '{' but whose "header" is no JSON object inside the file.
  for body in (b'{ not json', b'{}' + b' ' * 6, b'{"a": 1'):
    data = pickle.PROTO + b'\x02' + b'\x00' * 6 + body
    path = tmp_path / 'w.pth'
    path.write_bytes(data)
    assert pretrained.detect_format(str(path)) == 'torch', body
  # The legacy torch fixture starts with PROTO and is still read as torch.
  legacy = os.path.join(FIXTURES, 'torch_state_legacy.pth')
  assert open(legacy, 'rb').read(1) == pickle.PROTO
  assert pretrained.detect_format(legacy) == 'torch'


def test_header_names_the_weights_or_warns_about_random_init():
  config = make_config(PARITY)
  _, report = pretrained.load_from_config(zero_params(config), _with_init(config, WEIGHTS))
  [line] = pretrained.header_lines(report, config)
  loaded = report.count('loaded') + report.count('copied')
  assert line == (f'weights: {WEIGHTS} (safetensors, {report.naming}): {loaded} loaded, '
                  f'{report.count("resampled")} resampled, {report.count("unexpected")} '
                  f'skipped')
  assert loaded > 0 and report.count('unexpected') > 0  # the fixture has a timm head
  # A resumed run imports nothing: its weights come from the checkpoint.
  assert pretrained.header_lines(None, _with_init(config, WEIGHTS)) == [
      f'weights: restored from the checkpoint (the run started from {WEIGHTS})']
  config.init_from = ''
  assert pretrained.header_lines(None, config) == [
      'weights: random initialisation (config.init_from is empty)']
  for size in ('base', 'large'):
    config.model.size = size
    lines = pretrained.header_lines(None, config)
    assert len(lines) == 2 and lines[1].startswith(f'warning: a {size} ViT from random init')
    assert '--config.init_from=' in lines[1]


def _with_init(config, path):
  config = config.copy_and_resolve_references()
  config.init_from = path
  return config


# ---------------------------------------------------------------------------------------------
# The report and errors


def test_report_table_lists_missing_unexpected_and_resampled(tmp_path):
  tensors = timm_tensors()
  del tensors['blocks.1.mlp.fc2.weight']
  tensors['blocks.0.ls1.gamma'] = np.ones(64, np.float32)
  tensors['pre_logits.fc.weight'] = np.ones((64, 64), np.float32)
  path = str(tmp_path / 'edited.safetensors')
  save_file(tensors, path)
  config = make_config(NARROW)
  params, report = pretrained.load_backbone(zero_params(config), path, config)
  rows = rows_by_key(report)
  assert rows['blocks_1/fc2/kernel'].status == 'missing'
  assert (rows['blocks_1/fc2/kernel'].target_shape, rows['blocks_1/fc2/kernel'].source_shape) \
      == ((256, 64), None)
  assert rows['blocks.0.ls1.gamma'].status == 'unexpected'
  assert rows['blocks.0.ls1.gamma'].note == 'not used by our ViT'
  assert rows['pre_logits.fc.weight'].note == 'classification head: skipped'
  assert rows['pos_embed'].status == 'resampled'
  assert rows['pos_embed'].source_shape == (1, 17, 64)
  assert rows['pos_embed'].target_shape == (1, 16, 64)
  assert rows['sie_embed'].status == 'kept'
  # The missing tensor keeps its initial value.
  assert not params['student_vit']['blocks_1']['fc2']['kernel'].any()
  table = report.table()
  lines = table.splitlines()
  assert [c.strip() for c in lines[1].split(' | ')] == [
      'key', 'status', 'source shape', 'target shape', 'note']
  assert any(l.startswith('blocks_1/fc2/kernel') and '| missing' in l and '256x64' in l
             for l in lines)
  assert 'blocks.0.ls1.gamma' in table and 'loaded' not in table.split('\n', 1)[1]
  assert '1 missing' in lines[0] and '1 resampled' in lines[0]
  assert 'blocks.0.attn.qkv.weight' in report.table(include_loaded=True)


def test_unmappable_shape_names_the_key(tmp_path):
  config = make_config(PARITY)
  for key, value, match in (
      ('blocks.0.mlp.fc1.weight', np.zeros((128, 64), np.float32),
       r'blocks\.0\.mlp\.fc1\.weight: shape \(128, 64\)'),
      ('patch_embed.proj.weight', np.zeros((64, 3, 8, 8), np.float32),
       r'patch_embed\.proj\.weight: shape \(64, 3, 8, 8\)'),
      ('blocks.1.attn.qkv.weight', np.zeros((192,), np.float32),
       r'blocks\.1\.attn\.qkv\.weight: expected a 2-D linear weight')):
    path = str(tmp_path / f'{key}.safetensors')
    save_file(dict(timm_tensors(), **{key: value}), path)
    with pytest.raises(ValueError, match=match):
      pretrained.load_backbone(zero_params(config), path, config)


def test_pos_embed_grid_that_cannot_be_inferred(tmp_path):
  tensors = dict(timm_tensors(), pos_embed=np.zeros((1, 1 + 6, 64), np.float32))
  path = str(tmp_path / 'odd_grid.safetensors')
  save_file(tensors, path)
  config = make_config(PARITY)
  with pytest.raises(ValueError, match='pos_embed: cannot tell the token grid.*source_grid'):
    pretrained.load_backbone(zero_params(config), path, config)
  _, report = pretrained.load_backbone(zero_params(config), path, config, source_grid=(3, 2))
  assert rows_by_key(report)['pos_embed'].note == 'grid 3x2 -> 4x4 (bilinear)'


def test_file_without_vit_weights(tmp_path):
  path = str(tmp_path / 'resnet.safetensors')
  save_file({'conv1.weight': np.zeros((4, 3, 7, 7), np.float32)}, path)
  config = make_config(PARITY)
  with pytest.raises(ValueError, match='resnet.safetensors holds no ViT weights'):
    pretrained.load_backbone(zero_params(config), path, config)


# ---------------------------------------------------------------------------------------------
# JAX .npz naming (vision_transformer AugReg, big_vision)


def to_jax_names(tensors, style):
  """The timm fixture rewritten the way the JAX code bases store it."""
  d, heads = MANIFEST['width'], MANIFEST['heads']
  prefix = {'augreg': '', 'opt_target': 'opt/target/', 'big_vision': 'params/img/',
            'big_vision_scan': 'params/'}[style]
  vt = style in ('augreg', 'opt_target')
  out = {f'{prefix}embedding/kernel': tensors['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
         f'{prefix}embedding/bias': tensors['patch_embed.proj.bias'],
         f'{prefix}cls': tensors['cls_token'],
         f'{prefix}Transformer/encoder_norm/scale': tensors['norm.weight'],
         f'{prefix}Transformer/encoder_norm/bias': tensors['norm.bias'],
         f'{prefix}head/kernel': tensors['head.weight'].T,
         f'{prefix}head/bias': tensors['head.bias']}
  if vt:
    out[f'{prefix}Transformer/posembed_input/pos_embedding'] = tensors['pos_embed']
    out[f'{prefix}pre_logits/kernel'] = np.eye(d, dtype=np.float32)
  else:  # big_vision: no position for the CLS token
    out[f'{prefix}pos_embedding'] = tensors['pos_embed'][:, 1:]
  mha, ln2, mlp = ('MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3') if vt else (
      'MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0')
  blocks = []
  for i in range(MANIFEST['depth']):
    t = lambda name: tensors[f'blocks.{i}.{name}']  # noqa: E731
    qw = t('attn.qkv.weight').reshape(3, heads, d // heads, d)
    qb = t('attn.qkv.bias').reshape(3, heads, d // heads)
    b = {'LayerNorm_0/scale': t('norm1.weight'), 'LayerNorm_0/bias': t('norm1.bias'),
         f'{ln2}/scale': t('norm2.weight'), f'{ln2}/bias': t('norm2.bias'),
         f'{mha}/out/kernel': t('attn.proj.weight').T.reshape(heads, d // heads, d),
         f'{mha}/out/bias': t('attn.proj.bias'),
         f'{mlp}/Dense_0/kernel': t('mlp.fc1.weight').T, f'{mlp}/Dense_0/bias': t('mlp.fc1.bias'),
         f'{mlp}/Dense_1/kernel': t('mlp.fc2.weight').T, f'{mlp}/Dense_1/bias': t('mlp.fc2.bias')}
    for j, n in enumerate(('query', 'key', 'value')):
      b[f'{mha}/{n}/kernel'] = qw[j].transpose(2, 0, 1)  # [D, heads, head_dim]
      b[f'{mha}/{n}/bias'] = qb[j]
    blocks.append(b)
  if style == 'big_vision_scan':
    for name in blocks[0]:
      out[f'{prefix}Transformer/encoderblock/{name}'] = np.stack([b[name] for b in blocks])
  else:
    for i, b in enumerate(blocks):
      out.update({f'{prefix}Transformer/encoderblock_{i}/{k}': v for k, v in b.items()})
  return out


@pytest.mark.parametrize('style', ['augreg', 'opt_target', 'big_vision', 'big_vision_scan'])
def test_npz_naming_gives_the_same_backbone(tmp_path, style):
  config = make_config(NARROW)
  reference, _ = pretrained.load_backbone(zero_params(config), WEIGHTS, config)
  path = str(tmp_path / f'{style}.npz')
  np.savez(path, **to_jax_names(timm_tensors(), style))
  params, report = pretrained.load_backbone(zero_params(config), path, config)
  assert report.fmt == 'npz' and 'JAX ViT names' in report.naming
  ours, ref = flat(params['student_vit']), flat(reference['student_vit'])
  for key in ref:
    if key == 'pos_embed' and style.startswith('big_vision'):
      # Without a CLS position in the file, the CLS entry is zero; the grid part is the same.
      np.testing.assert_array_equal(ours[key][:, 0], 0)
      np.testing.assert_allclose(ours[key][:, 1:], ref[key][:, 1:], atol=1e-7)
    else:
      np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
  rows = rows_by_key(report)
  heads = [r for r in report.rows if r.note == 'classification head: skipped']
  assert heads and all(r.status == 'unexpected' for r in heads)
  if style == 'big_vision_scan':
    assert rows['params/Transformer/encoderblock/LayerNorm_0/scale[0]'].status == 'loaded'
  assert report.count('missing') == 0


def test_npz_with_other_head_count_is_refused(tmp_path):
  tensors = to_jax_names(timm_tensors(), 'augreg')
  key = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'
  tensors[key] = tensors[key].reshape(64, 4, 16)
  path = str(tmp_path / 'heads.npz')
  np.savez(path, **tensors)
  config = make_config(PARITY)
  with pytest.raises(ValueError, match=f'{key}: the checkpoint has 4 attention heads'):
    pretrained.load_backbone(zero_params(config), path, config)


# ---------------------------------------------------------------------------------------------
# PyTorch files: TransReID layouts, the torch-free reader, and refusal of code


def test_transreid_checkpoint_with_jpm_branches(tmp_path):
  src = timm_tensors()
  tensors = {f'module.base.{k}': v for k, v in src.items() if not k.startswith('head.')}
  tensors['module.base.sie_embed'] = np.ones((6, 1, 64), np.float32)
  rng = np.random.default_rng(1)
  for branch in ('b1', 'b2'):
    for k, v in src.items():
      if k.startswith('blocks.1.'):
        tensors[f'module.{branch}.0.{k[len("blocks.1."):]}'] = rng.standard_normal(
            v.shape).astype(np.float32)
    tensors[f'module.{branch}.1.weight'] = rng.standard_normal(64).astype(np.float32)
    tensors[f'module.{branch}.1.bias'] = rng.standard_normal(64).astype(np.float32)
  tensors['module.classifier.weight'] = np.zeros((5, 64), np.float32)
  tensors['module.bottleneck.running_mean'] = np.zeros(64, np.float32)
  path = str(tmp_path / 'transreid.safetensors')
  save_file(tensors, path)
  config = make_config({**PARITY, 'model.jpm': True})
  params, report = pretrained.load_backbone(zero_params(config), path, config)
  vit = params['student_vit']
  np.testing.assert_array_equal(vit['blocks_1']['attn']['qkv']['kernel'],
                                tensors['module.b1.0.attn.qkv.weight'].T)
  np.testing.assert_array_equal(vit['blocks_0']['attn']['qkv']['kernel'],
                                src['blocks.0.attn.qkv.weight'].T)
  np.testing.assert_array_equal(vit['norm']['scale'], tensors['module.b1.1.weight'])
  np.testing.assert_array_equal(vit['jpm_block']['fc1']['kernel'],
                                tensors['module.b2.0.mlp.fc1.weight'].T)
  np.testing.assert_array_equal(vit['jpm_norm']['bias'], tensors['module.b2.1.bias'])
  assert np.array_equal(vit['sie_embed'], np.zeros_like(vit['sie_embed']))
  rows = rows_by_key(report)
  assert rows['module.base.blocks.1.attn.qkv.weight'].note.startswith('superseded by module.b1')
  assert rows['module.base.sie_embed'].note.startswith('camera embedding')
  assert rows['module.classifier.weight'].note == 'ReID head (TransReID): skipped'
  assert report.count('missing') == 0 and report.count('copied') == 0


def test_unwrap_state_dict():
  w = np.zeros(2, np.float32)
  assert pretrained.unwrap_state_dict({'model': {'a': w}, 'epoch': 3}, 'f.pth') == (
      {'a': w}, "state dict under 'model'")
  assert pretrained.unwrap_state_dict({'a': w, 'b': {'c': w}}, 'f.pth')[0].keys() == {'a', 'b.c'}
  with pytest.raises(ValueError, match='f.pth holds no tensors'):
    pretrained.unwrap_state_dict({'epoch': 3}, 'f.pth')


@pytest.mark.parametrize('name', ['torch_state_zip.pth', 'torch_state_legacy.pth'])
def test_torch_free_reader_on_real_torch_files(name):
  ckpt = pretrained.read_torch(os.path.join(FIXTURES, name), use_torch=False)
  expected = np.load(os.path.join(FIXTURES, 'torch_state_expected.npz'))
  assert ckpt.note == "state dict under 'state_dict'"
  assert set(ckpt.tensors) == set(expected.files)
  for key in expected.files:
    got = ckpt.tensors[key]
    if key == 'bf':
      assert got.dtype == ml_dtypes.bfloat16
      got = got.astype(np.float32)
    assert got.dtype == expected[key].dtype, key
    np.testing.assert_array_equal(got, expected[key], err_msg=key)
  # Views that share a storage come back as independent arrays.
  np.testing.assert_array_equal(ckpt.tensors['at'], ckpt.tensors['a'].T)


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / 'MARKER'
  payload = pickle.dumps({'state_dict': {'w': _RunsCode(marker)}}, protocol=2)
  plain = tmp_path / 'evil.pth'
  plain.write_bytes(payload)
  zipped = tmp_path / 'evil_zip.pth'
  _write_fake_torch_zip(zipped, payload)
  config = make_config(PARITY)
  for path in (plain, zipped):
    assert pretrained.detect_format(str(path)) == 'torch'
    for call in (lambda p: pretrained.read_torch(p, use_torch=False),  # the torch-free reader
                 pretrained.read_checkpoint,  # whichever reader this environment has
                 lambda p: pretrained.load_backbone(zero_params(config), p, config)):
      with pytest.raises(pretrained.UnsafeCheckpointError,
                         match='contains arbitrary Python objects.*not loaded.*safetensors'):
        call(str(path))
      assert not marker.exists()
  # The payload is live: unpickled the naive way, it runs the command.
  pickle.loads(payload)
  assert marker.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path):
  path = str(tmp_path / 'objects.npz')
  np.savez(path, w=np.array([{'a': 1}], dtype=object))
  with pytest.raises(pretrained.UnsafeCheckpointError, match='objects.npz holds pickled'):
    pretrained.read_checkpoint(path)


def _hand_made_torch_pickle(numel: int, size: int) -> bytes:
  """{'w': _rebuild_tensor_v2(<FloatStorage numel>, 0, (size,), (1,), False, {})}, written
  opcode by opcode (protocol 2) so that no fake torch module is needed to pickle it."""
  def text(s):
    return b'X' + len(s).to_bytes(4, 'little') + s.encode()

  pid = (b'(' + text('storage') + b'ctorch\nFloatStorage\n' + text('0') + text('cpu')
         + b'K' + bytes([numel]) + b't')
  args = (b'(' + pid + b'Q' + b'K\x00' + b'M' + size.to_bytes(2, 'little') + b'\x85'
          + b'K\x01\x85' + b'\x89' + b'}' + b't')
  return (b'\x80\x02}' + text('w') + b'ctorch._utils\n_rebuild_tensor_v2\n' + args + b'R'
          + b's.')


def test_torch_reader_bounds_checks_tensor_records(tmp_path):
  """A tensor record reaching past its storage is refused instead of reading other memory."""
  for size, ok in ((4, True), (1000, False)):
    path = tmp_path / f'size{size}.pth'
    with zipfile.ZipFile(path, 'w') as z:
      z.writestr('archive/data.pkl', _hand_made_torch_pickle(4, size))
      z.writestr('archive/data/0', np.arange(4, dtype=np.float32).tobytes())
    if ok:
      np.testing.assert_array_equal(
          pretrained.read_torch(str(path), use_torch=False).tensors['w'], np.arange(4))
    else:
      with pytest.raises(ValueError, match='past the end of its storage'):
        pretrained.read_torch(str(path), use_torch=False)
