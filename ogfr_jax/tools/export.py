r"""Exports the trained student's inference function as serialised StableHLO (`jax.export`).

  python -m ogfr_jax.tools.export --workdir runs/oduke --out student.jaxexport \
      [--batch-size 32 | (default) polymorphic batch] [--params baked|argument] \
      [--platforms cpu,cuda] [--safetensors student.safetensors] [--overwrite]
  python -m ogfr_jax.tools.export --workdir runs/oduke --safetensors student.safetensors

The exported function is the evaluation's (`evaluate.student_features` with the run's
config.eval): normalised images float32 [B, H, W, 3] and camera ids int32 [B] in, features
float32 [B, D] out (L2-normalised by default). Serving needs jax, not this package:

  from jax import export
  exp = export.deserialize(open('student.jaxexport', 'rb').read())
  feats = exp.call(images, camids)                       # --params baked (default)
  params = dict(np.load('student.jaxexport.params.npz'))
  feats = exp.call(params, images, camids)               # --params argument

Parameters: 'baked' (default) folds the student's weights into the program as constants: one
self-contained file, nothing to keep in sync. 'argument' leaves them out and takes them as the
first argument, a flat dict {'params/student_vit/...': array} written next to the program
(OUT.params.npz): the program stays small (what very large models need) and the weights can be
swapped for another checkpoint of the same config. Only the student's variables are kept
(teacher, agent and replacement token are training-only).

Preprocessing is not part of the program. OUT.json records what a server must do before
calling it, under `preprocessing`: decode to RGB with Pillow, resize with Pillow's bilinear
filter (`Image.resize((W, H), Image.Resampling.BILINEAR)`, antialiased when shrinking; other
libraries' "bilinear" resizes, jax.image.resize or OpenCV's, are other filters and give other
features), then x * (1 / (255 * std)) + (-mean / std) in float32, i.e. (x / 255 - mean) / std.
Its `python` entry is a reference function (numpy and Pillow only) that reproduces the
project's evaluation input, also shown in docs/serving.md. Camera ids are in
[0, num_cameras) (unknown camera: see the extract tool's docs; 0 is a valid choice). The batch
is symbolic ('b') unless --batch-size fixes it. The program runs on the --platforms it was
lowered for (default: this machine's); `requires` names the packages a client installs.

--safetensors writes the student backbone in timm's layout (`pretrained.export_timm_safetensors`:
with the camera embedding table as `reid.sie_embed`; no heads; how to use it in timm: the
docstring of tools/convert.py), with or without --out. A run whose features need parts timm
cannot represent (the student's occluder-token erasure, JPM, a 'soft' pattern policy,
post-BN features) is refused before any work unless --allow-lossy, which warns on stderr and
lists them in the file's metadata.

A user-facing error (missing workdir or checkpoint, existing output, bad argument) is one line
'error: ...' on stderr and exit status 2; OGFR_TRACEBACK=1 adds the traceback (tools/cli.py).

Writing and reading the program needs the 'flatbuffers' package (jax's serialiser uses it but
does not install it); the tool says so before doing any work when it is missing.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from ogfr_jax.tools import cli
from ogfr_jax.tools import common

# What a client runs before the program: the evaluation's decoding (data/image_io.py) and
# resize, and augment.normalize's arithmetic, with numpy and Pillow only. Written verbatim into
# OUT.json (`preprocessing.python`) and docs/serving.md.
REFERENCE_PREPROCESSING = """\
import numpy as np
from PIL import Image

def preprocess(path, meta):
  \"\"\"float32 [H, W, 3]: one image file as the exported program takes it.\"\"\"
  h, w = meta['input_size']
  with Image.open(path) as img:
    if img.format == 'JPEG' and img.mode in ('RGB', 'L'):
      img.draft(img.mode, (w, h))  # large JPEGs: decoded at a reduced scale first
    img = img.convert('RGB')
    if img.size != (w, h):
      img = img.resize((w, h), Image.Resampling.BILINEAR)  # Pillow's filter, no other
  std = np.float32(meta['std'])
  scale, offset = np.float32(1.0) / (np.float32(255.0) * std), -np.float32(meta['mean']) / std
  return np.asarray(img, np.float32) * scale + offset
"""

# Top-level parameters that only training uses (models/ogfr.py): never needed for inference.
TRAINING_ONLY = ('teacher_vit', 'teacher_head', 'teacher_part_head', 'agent', 'fepm')
PARAMS_MODES = ('baked', 'argument')


def inference_variables(variables: dict[str, Any], config) -> dict[str, Any]:
  """The variables the student's inference reads (the teacher's are dropped unless the
  backbone is shared)."""
  keep = lambda tree: {k: v for k, v in tree.items() if k not in TRAINING_ONLY}  # noqa: E731
  return {'params': keep(variables['params']),
          'batch_stats': keep(variables.get('batch_stats', {}))}


def flatten(variables: dict[str, Any]) -> dict[str, np.ndarray]:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep='/').items()}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def inference_function(model, config, variables: Optional[dict[str, Any]]):
  """fn(images, camids) with `variables` closed over, or fn(flat_variables, images, camids)
  when `variables` is None."""
  from ogfr_jax import evaluate  # pylint: disable=g-import-not-at-top
  eval_cfg = config.eval
  if variables is not None:
    return lambda images, camids: evaluate.student_features(model, variables, images, camids,
                                                            eval_cfg=eval_cfg)
  return lambda flat, images, camids: evaluate.student_features(
      model, unflatten(flat), images, camids, eval_cfg=eval_cfg)


def export_student(trained: common.TrainedModel, *, batch_size: Optional[int] = None,
                   params: str = 'baked', platforms: Optional[Sequence[str]] = None):
  """(jax.export.Exported, flat variables or None) of the student's inference function."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if params not in PARAMS_MODES:
    raise ValueError(f'--params={params!r}: use one of {PARAMS_MODES}')
  if batch_size is not None and batch_size < 1:
    raise ValueError(f'--batch-size must be >= 1, got {batch_size}')
  config = trained.config
  variables = inference_variables(trained.variables, config)
  h, w = int(config.input.height), int(config.input.width)
  batch = jax.export.symbolic_shape('b')[0] if batch_size is None else int(batch_size)
  images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
  camids = jax.ShapeDtypeStruct((batch,), jnp.int32)
  platforms = tuple(platforms) if platforms else (jax.default_backend(),)
  if params == 'baked':
    fn = inference_function(trained.model, config, jax.tree.map(jnp.asarray, variables))
    return jax.export.export(jax.jit(fn), platforms=platforms)(images, camids), None
  flat = flatten(variables)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
  fn = inference_function(trained.model, config, None)
  return jax.export.export(jax.jit(fn), platforms=platforms)(spec, images, camids), flat


def serving_metadata(trained: common.TrainedModel, exported, *, params: str,
                     batch_size: Optional[int]) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  c = trained.config
  out_shape = exported.out_avals[0].shape
  return {
      'format': 'jax.export (serialised StableHLO); load with jax.export.deserialize',
      'requires': ('pip install jax flatbuffers numpy pillow: jax.export.deserialize needs '
                   'flatbuffers, which jax does not install; numpy and Pillow run the '
                   'preprocessing'),
      'written_with': {'jax': jax.__version__},
      'workdir': trained.workdir, 'checkpoint_step': trained.step,
      'platforms': list(exported.platforms), 'params': params,
      'call': ('exp.call(images, camids)' if params == 'baked'
               else 'exp.call(dict(np.load(PARAMS_NPZ)), images, camids)'),
      'batch': 'symbolic' if batch_size is None else int(batch_size),
      'input_size': [int(c.input.height), int(c.input.width)],
      'images': 'float32 [B, H, W, 3] RGB, (x / 255 - mean) / std',
      'mean': [float(v) for v in c.input.mean], 'std': [float(v) for v in c.input.std],
      'preprocessing': {
          'decode': "PIL.Image.open(path); JPEG: img.draft(img.mode, (W, H)) when the mode is "
                    "RGB or L; img.convert('RGB')",
          'resize': 'PIL: img.resize((W, H), PIL.Image.Resampling.BILINEAR) to input_size '
                    "(Pillow's bilinear, antialiased when shrinking; jax.image.resize and "
                    "OpenCV's bilinear are other filters)",
          'normalize': 'float32: x * (1 / (255 * std)) + (-mean / std)',
          'python': REFERENCE_PREPROCESSING,
      },
      'camids': f'int32 [B] in [0, {trained.num_cameras})',
      'num_cameras': trained.num_cameras,
      'camera_embedding': bool(c.model.sie),
      'feature_dim': int(out_shape[-1]),
      'feature': c.eval.feature, 'normalized': bool(c.eval.normalize),
      'flip': bool(c.eval.flip),
      'distance': 'euclidean',
  }


def serialize(exported) -> bytes:
  """`exported.serialize()`, with a clear message when jax's serialiser cannot run: jax
  writes the program with the 'flatbuffers' package, which jax itself does not install."""
  require_serializer()
  return exported.serialize()


def require_serializer() -> None:
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('flatbuffers') is None:
    raise ValueError("jax.export needs the 'flatbuffers' package to write (and to read) a "
                     'serialised program: pip install flatbuffers')


def _check_output(path: str, overwrite: bool) -> None:
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass --overwrite to replace it')


def parse_args(argv: Sequence[str]):
  p = common.ArgumentParser(prog='python -m ogfr_jax.tools.export',
                            description=__doc__.split('\n\n')[0])
  p.add('workdir', required=True, help='training workdir (config.json + checkpoints/)')
  p.add('out', default='', help='serialised program (.jaxexport); OUT.json and, with '
        '--params argument, OUT.params.npz are written beside it')
  p.add('batch-size', type=int, default=None, help='fixed batch (default: symbolic)')
  p.add('params', default='baked', choices=PARAMS_MODES,
        help='weights baked into the program, or passed as the first argument')
  p.add('platforms', default='', help='comma-separated jax platforms to lower for '
        '(cpu, cuda, rocm, tpu); default: this machine\'s')
  p.add('safetensors', default='', help='also write the timm-compatible student backbone here')
  p.add('step', type=int, default=None, help='checkpoint step (default: latest)')
  p.add('overwrite', action='store_true', help='replace existing outputs')
  p.add('allow-lossy', action='store_true', help='write --safetensors even when the run\'s '
        'features depend on parts timm cannot represent (listed in its metadata)')
  args = p.parse_args(list(argv))
  if not args.out and not args.safetensors:
    raise common.UsageError('give --out (the program), --safetensors (timm weights) or both')
  return args


def main(argv: Sequence[str]) -> dict[str, Any]:
  args = parse_args(argv)
  outputs = [args.safetensors] if args.safetensors else []
  if args.out:
    outputs += [args.out, args.out + '.json'] + (
        [args.out + '.params.npz'] if args.params == 'argument' else [])
    require_serializer()
  for path in outputs:
    _check_output(path, args.overwrite)
  if args.safetensors:  # refuse a lossy export before any work
    from ogfr_jax import pretrained  # pylint: disable=g-import-not-at-top
    pretrained.check_lossless(common.workdir_config(args.workdir), 'student', args.allow_lossy)
  trained = common.load_trained(args.workdir, args.step)
  meta: dict[str, Any] = {}
  if args.out:
    platforms = [p.strip() for p in args.platforms.split(',') if p.strip()] or None
    exported, flat = export_student(trained, batch_size=args.batch_size, params=args.params,
                                    platforms=platforms)
    meta = serving_metadata(trained, exported, params=args.params, batch_size=args.batch_size)
    program = serialize(exported)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'wb') as f:
      f.write(program)
    if flat is not None:
      with open(args.out + '.params.npz', 'wb') as f:
        np.savez(f, **flat)
    with open(args.out + '.json', 'w') as f:
      json.dump(meta, f, indent=2)
    print(f'wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, params '
          f'{args.params}, batch {meta["batch"]}, platforms {",".join(meta["platforms"])}; '
          f'features [{meta["batch"]}, {meta["feature_dim"]}]) and {args.out}.json')
  if args.safetensors:
    from ogfr_jax import pretrained  # pylint: disable=g-import-not-at-top
    st = pretrained.export_timm_safetensors(trained.params, trained.config, args.safetensors,
                                            'student', allow_lossy=args.allow_lossy)
    meta['safetensors'] = {'path': args.safetensors, **st}
    print(f'wrote {args.safetensors} (timm layout, grid {st[pretrained.GRID_KEY]}, stride '
          f'{st["ogfr.stride"]}, step {trained.step})')
  return meta


if __name__ == '__main__':
  cli.run_cli(main)
