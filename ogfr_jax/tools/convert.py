r"""Converts ViT weights into our layout, or exports a trained student for timm.

Import (ImageNet / ReID weights -> an orbax checkpoint of our ViT backbone tree):

  python -m ogfr_jax.tools.convert --input jx_vit_base_p16_224-80ecf9dd.pth \
      --output /ckpt/vit_b16_oduke --config configs/occluded_duke.py

  The output folder holds params/ (orbax, our parameter names and layouts, the position
  embedding already at the config's token grid), metadata.json (grid, source) and
  import_report.txt (the mapping table, also printed). Only tensors that came from the file are
  written, so a later import still reports what was missing. Train from it with
  --config.init_from=/ckpt/vit_b16_oduke (the format is detected; the grid is recorded, so a
  config with another input size or stride resamples again).

Export (a trained student -> timm-compatible safetensors):

  python -m ogfr_jax.tools.convert --export-student runs/oduke --output student.safetensors

  Reads the latest checkpoint in WORKDIR/checkpoints and the config in WORKDIR/config.json
  (or --config). See `pretrained.export_timm_safetensors` for the layout: the position
  embedding is at our grid, so img_size and the patch stride must match. Besides timm's
  tensors the file holds what the ReID model adds to every token, under 'reid.' names:
  `reid.sie_embed` [num_cameras, D], the camera embedding table (model.sie), with its weight
  in the metadata as `reid.sie_weight`; and `reid.pattern_embed_0` [D] when the student's
  test-time pattern embedding is not folded into pos_embed (--nofold_pattern_embed). In timm:

    import timm, torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    meta = safe_open(path, 'pt').metadata()
    state = load_file(path)
    extra = {k: state.pop(k) for k in list(state) if k.startswith('reid.')}
    (gh, gw), p, s = map(int, meta['ogfr.grid'].split('x')), int(meta['ogfr.patch_size']), \
        int(meta['ogfr.stride'])
    m = timm.create_model('vit_base_patch16_224', num_classes=0, img_size=(gh * p, gw * p))
    m.patch_embed.proj.stride, m.patch_embed.strict_img_size = (s, s), False
    m.load_state_dict(state)
    def add_extras(module, inputs, tokens):   # after pos_embed, before the blocks
      if 'reid.sie_embed' in extra:           # camid: int64 [B], 0-based training cameras
        tokens = tokens + float(meta['reid.sie_weight']) * extra['reid.sie_embed'][camid][:, None]
      return tokens + extra.get('reid.pattern_embed_0', 0)
    m.norm_pre.register_forward_hook(add_extras)
    feat = m.forward_features(x)[:, 0]        # x: [B, 3, H, W], (x / 255 - mean) / std
    feat = torch.nn.functional.normalize(feat, dim=-1)   # if meta['ogfr.eval_normalize']

  gives the features of `python -m ogfr_jax.tools.extract` (camera: --camera; an unknown
  camera as there: row 0, or the table's mean); with meta['ogfr.eval_flip'] == 'true' average
  them with those of the mirrored image, as the run does. Runs whose features depend on parts
  a timm ViT has no place for (student_erase, model.jpm's part features,
  eval.feature='post_bn') are refused: --allow_lossy writes
  the backbone anyway, warns on stderr and lists the parts in the metadata ('ogfr.lossy').

Flags may be written with '-' or '_' (--export-student, --export_student). A user-facing
error (a missing workdir or checkpoint, a refused file, an output that exists, a bad flag) is
one line 'error: ...' on stderr and exit status 2; --verbosity=1 adds its traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Optional

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from ogfr_jax import console
from ogfr_jax.tools import cli
from ogfr_jax.tools import common

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/NAME.py[:ARGS]); for --export_student the default is '
    'WORKDIR/config.json.', lock_config=False)
_INPUT = flags.DEFINE_string('input', None, 'Checkpoint to import (.npz, .pth/.bin, '
                             '.safetensors).')
_OUTPUT = flags.DEFINE_string('output', None, 'Import: output folder. Export: .safetensors '
                              'file.')
_FORMAT = flags.DEFINE_enum('format', 'auto', ['auto', 'npz', 'torch', 'safetensors', 'orbax'],
                            'Format of --input (auto: from the file).')
_SOURCE_GRID = flags.DEFINE_string('source_grid', '', 'Token grid HxW of the input\'s position '
                                   'embedding when it cannot be inferred (not square).')
_EXPORT = flags.DEFINE_string('export_student', None, 'Workdir of a training run whose student '
                              'backbone is exported to --output.')
_BRANCH = flags.DEFINE_enum('branch', 'student', ['student', 'teacher'],
                            'Which backbone --export_student writes.')
_FOLD = flags.DEFINE_bool('fold_pattern_embed', True, 'Fold the test-time pattern embedding '
                          'E[0] into the exported pos_embed.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --output.')
_ALLOW_LOSSY = flags.DEFINE_bool('allow_lossy', False, 'Export even when the run\'s features '
                                 'depend on parts a timm ViT cannot represent (listed in the '
                                 'metadata as ogfr.lossy).')

_HELP_FLAGS = ('--help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')
_OWN_FLAGS = ('input', 'output', 'format', 'source_grid', 'export_student', 'branch',
              'fold_pattern_embed', 'overwrite', 'allow_lossy')


def normalise_argv(argv: list[str]) -> list[str]:
  """'--export-student' -> '--export_student', '--no-overwrite' -> '--nooverwrite' (absl's
  spelling), for this tool's own flags; --config.* overrides are left alone."""
  out = []
  for arg in argv:
    name, sep, value = arg.partition('=')
    flag = name[2:].replace('-', '_') if name.startswith('--') else ''
    if flag.startswith('no_') and flag[3:] in _OWN_FLAGS:
      flag = 'no' + flag[3:]
    if flag in _OWN_FLAGS or (flag.startswith('no') and flag[2:] in _OWN_FLAGS):
      arg = f'--{flag}{sep}{value}'
    out.append(arg)
  return out


def backbone_module(config: Any):
  """The ViT of one OGFR backbone for `config`, without SIE (camera tables are per dataset)."""
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import vit as vit_lib  # pylint: disable=g-import-not-at-top
  dim, depth, heads = build.vit_size(config)
  m = config.model
  return vit_lib.ViT(dim=dim, depth=depth, num_heads=heads, grid=build.token_grid(config),
                     patch_size=m.patch_size, stride=m.stride, mlp_ratio=m.mlp_ratio,
                     jpm=bool(m.jpm))


def backbone_shapes(config: Any) -> dict[str, Any]:
  """Flat {'blocks_0/attn/qkv/kernel': ShapeDtypeStruct} of one backbone (no compute)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  module = backbone_module(config)
  image = jnp.zeros((1, config.input.height, config.input.width, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), image))['params']
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(shapes)).items()}


def _prepare_output(path: str, overwrite: bool) -> None:
  if os.path.exists(path):
    if not overwrite:
      raise FileExistsError(f'--output {path} exists; pass --overwrite to replace it')
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def convert(input_path: str, output_dir: str, config: Any, *, fmt: str = 'auto',
            source_grid: Optional[tuple[int, int]] = None, overwrite: bool = False):
  """Imports `input_path` for `config` and writes an orbax checkpoint of the backbone tree.

  Returns the ImportReport.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from ogfr_jax import pretrained  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  checkpoint = pretrained.read_checkpoint(input_path, fmt)
  grid = build.token_grid(config)
  values, rows, naming = pretrained.map_vit(
      checkpoint, backbone_shapes(config), grid=grid, num_heads=build.vit_size(config)[2],
      source_grid=source_grid)
  report = pretrained.ImportReport(checkpoint.path, checkpoint.fmt, naming, ('vit',), rows,
                                   checkpoint.note)
  _prepare_output(output_dir, overwrite)
  os.makedirs(output_dir)
  tree = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in values.items()})
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(os.path.abspath(output_dir), pretrained.CONVERTED_PARAMS_DIR), tree)
  ckpt.wait_until_finished()
  metadata = {
      pretrained.GRID_KEY: f'{grid[0]}x{grid[1]}', 'source': os.path.abspath(input_path),
      'source_format': checkpoint.fmt, 'naming': naming, 'model.size': config.model.size,
      'model.patch_size': config.model.patch_size, 'model.stride': config.model.stride,
      'input': f'{config.input.height}x{config.input.width}',
  }
  with open(os.path.join(output_dir, pretrained.CONVERTED_METADATA), 'w') as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
  with open(os.path.join(output_dir, 'import_report.txt'), 'w') as f:
    f.write(report.table(include_loaded=True) + '\n')
  return report


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
  return common.workdir_config(workdir)


def restore_params(workdir: str, step: Optional[int] = None) -> tuple[dict, int]:
  """The 'params' of the train state in WORKDIR/checkpoints (latest step), as numpy arrays,
  read onto the host without the dataset or the training run's devices (see
  `common.restore_state`)."""
  state, step = common.restore_state(workdir, step)
  return state['params'], step


def export_student(workdir: str, output: str, config: Optional[Any] = None, *,
                   branch: str = 'student', fold_pattern_embed: bool = True,
                   overwrite: bool = False, allow_lossy: bool = False) -> dict[str, str]:
  from ogfr_jax import pretrained  # pylint: disable=g-import-not-at-top
  config = workdir_config(workdir) if config is None else config
  params, step = restore_params(workdir)
  # Refusals first, so that a refused export leaves an existing --output alone; a file there
  # is then replaced atomically by the write.
  if os.path.exists(output) and not overwrite:
    raise FileExistsError(f'--output {output} exists; pass --overwrite to replace it')
  pretrained.check_lossless(config, branch, allow_lossy)
  if os.path.isdir(output):
    _prepare_output(output, overwrite)
  metadata = pretrained.export_timm_safetensors(params, config, output, branch,
                                                fold_pattern_embed=fold_pattern_embed,
                                                allow_lossy=allow_lossy)
  return {**metadata, 'ogfr.step': str(step)}


def main(argv: list[str]) -> None:
  """Every user-facing error ends as one 'error: ...' line and exit status 2 (tools.cli)."""
  # As ogfr_jax.main: library INFO logs (absl, orbax, jax's backend probing) only when
  # --verbosity asks for them.
  console.configure_logging(int(flags.FLAGS.verbosity) if flags.FLAGS['verbosity'].present
                            else None)
  try:
    _main(argv)
  except (app.UsageError,) + cli.USER_ERRORS as e:
    cli.fail(e, show_traceback=flags.FLAGS.verbosity >= 1 or cli.traceback_requested())


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from ogfr_jax import pretrained  # pylint: disable=g-import-not-at-top
  if not _OUTPUT.value:
    raise app.UsageError('--output is required')
  if bool(_INPUT.value) == bool(_EXPORT.value):
    raise app.UsageError('give exactly one of --input (import) or --export_student (export)')
  if _EXPORT.value:
    metadata = export_student(_EXPORT.value, _OUTPUT.value, _CONFIG.value, branch=_BRANCH.value,
                              fold_pattern_embed=_FOLD.value, overwrite=_OVERWRITE.value,
                              allow_lossy=_ALLOW_LOSSY.value)
    print(f'wrote {_OUTPUT.value} from {_EXPORT.value} (step {metadata["ogfr.step"]}); grid '
          f'{metadata[pretrained.GRID_KEY]}, patch {metadata["ogfr.patch_size"]}, stride '
          f'{metadata["ogfr.stride"]}: in timm use img_size={metadata["ogfr.timm_img_size"]} '
          f'and patch_embed.proj.stride={metadata["ogfr.stride"]} '
          f'(see ogfr_jax.pretrained.export_timm_safetensors)')
    return
  if _CONFIG.value is None:
    raise app.UsageError('--config is required with --input (it fixes size, grid and stride)')
  grid = pretrained.parse_grid(_SOURCE_GRID.value) if _SOURCE_GRID.value else None
  report = convert(_INPUT.value, _OUTPUT.value, _CONFIG.value, fmt=_FORMAT.value,
                   source_grid=grid, overwrite=_OVERWRITE.value)
  print(report.table())
  print(f'wrote {_OUTPUT.value}')


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(normalise_argv(argv))
  except SystemExit as e:
    # absl ends --help (--helpshort, --helpfull) with status 1; asking for help is no error.
    if e.code == 1 and any(a.split('=')[0] in _HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    print(f'error: {cli.one_line(e)} (--helpshort lists the flags)', file=sys.stderr)
    sys.exit(cli.EXIT_STATUS)


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
