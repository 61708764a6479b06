r"""Student features for a folder of your own images.

  python -m ogfr_jax.tools.extract --workdir runs/oduke --images /data/crops --out feats.npz \
      [--batch-size 64] [--camera 0|mean] [--skip-bad] [--no-progress]

Every image file under --images (recursively; .jpg .jpeg .png .tif .tiff .bmp in any letter
case, hidden files skipped) is decoded as in evaluation (`image_io.load_image` resized to the
model input, uint8 pixels normalised on the device) and passed through the student exactly as
the evaluation does (`evaluate.student_features` with the run's config.eval: pre/post-BN, flip
averaging, L2 normalisation, test-time pattern policy). The output .npz holds:
  features  float32 [N, D]   L2-normalised when config.eval.normalize (the default)
  names     str [N]          paths relative to --images, in sorted order
  camids    int32 [N]        the camera each image was embedded with (0-based), -1: the
                             model has no camera embedding or --camera=mean
  skipped   str [M]          unreadable files left out (--skip-bad), relative paths
  meta      str              JSON: workdir, checkpoint step, feature kind, camera embedding
Compare features with Euclidean distance (`ogfr_jax.metrics.pairwise_distance`), as the
evaluation does.

Cameras. A model trained with SIE adds a learned camera embedding to every token, so it needs
a camera id. File names in the Market-1501 form (`0161_c2s1_012345_01.jpg`) or the
DukeMTMC / Occluded-Duke form (`0005_c2_f0046985.jpg`) carry their camera (c2: camera id 1,
0-based as in training), and each such image gets its own camera's embedding. Other names,
and cameras the model was not trained with, are unknown: they get camera 0's embedding. The
option --camera overrides the names for every image: an id gives that camera's embedding,
'mean' the average of all camera embeddings, which favours no training camera. Features of
one shared embedding stay comparable with each other, but ranking them against a gallery
extracted with true camera ids is not the evaluation. Without SIE cameras change nothing.

An unreadable image stops the run with an error naming the file, unless --skip-bad, which
leaves such files out, lists them in `skipped` and reports their number.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ogfr_jax.tools import cli
from ogfr_jax.tools import common

# Images decoded in parallel with the model's work on the previous batches.
_LOOKAHEAD_BATCHES = 2
# Runs of fewer batches finish too quickly for a progress bar to help.
_PROGRESS_MIN_BATCHES = 4


# Market-1501 ('0161_c2s1_012345_01') and DukeMTMC ('0005_c2_f0046985') file names, as the
# readers in data/datasets.py parse them: the camera is the number after 'c', 1-based.
_CAMERA_IN_NAME = re.compile(r'^(?:-1|\d+)_c(\d+)(?:s\d+_\d+_\d+|_f\d+)')


def cameras_from_names(names: Sequence[str]) -> np.ndarray:
  """int32 [N]: the 0-based camera in each file name (Market / Duke form), -1 where the
  name carries none."""
  out = np.full(len(names), -1, np.int32)
  for i, name in enumerate(names):
    m = _CAMERA_IN_NAME.match(os.path.splitext(os.path.basename(name))[0])
    if m and int(m.group(1)) >= 1:
      out[i] = int(m.group(1)) - 1
  return out


@dataclasses.dataclass
class Features:
  features: np.ndarray  # float32 [N, D]
  names: list[str]  # relative paths of the images in `features`
  skipped: list[str]  # unreadable files left out
  camids: Optional[np.ndarray] = None  # int32 [N]: the camera id fed for each image


def list_images(folder: str) -> list[str]:
  """Image files under `folder`, as sorted paths relative to it."""
  from ogfr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'--images {folder} is not a folder')
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    for name in filenames:
      if not name.startswith('.') and os.path.splitext(name)[1].lower() in (
          datasets.IMAGE_EXTENSIONS):
        found.append(os.path.relpath(os.path.join(dirpath, name), folder))
  if not found:
    raise ValueError(f'no image files ({", ".join(datasets.IMAGE_EXTENSIONS)}) under '
                     f'{folder}')
  return sorted(found)


def _has_camera_table(variables: dict[str, Any]) -> bool:
  params = variables['params']
  return 'sie_embed' in params[common.student_backbone_name(params)]


def camera_variables(variables: dict[str, Any], camera: str, num_cameras: int
                     ) -> tuple[dict[str, Any], int, str]:
  """(variables, camid to feed, description) for --camera: an id, or 'mean' (every row of
  the student's SIE table replaced by the table's mean, so any id gives the mean)."""
  params = variables['params']
  name = common.student_backbone_name(params)
  has_sie = _has_camera_table(variables)
  if camera == 'mean':
    if not has_sie:
      return variables, 0, 'none (the model has no camera embedding)'
    table = np.asarray(params[name]['sie_embed'])
    mean = np.broadcast_to(table.mean(axis=0, keepdims=True), table.shape).copy()
    backbone = {**params[name], 'sie_embed': mean}
    return ({**variables, 'params': {**params, name: backbone}}, 0,
            f'mean of the {table.shape[0]} training cameras\' embeddings')
  try:
    camid = int(camera)
  except ValueError:
    raise ValueError(f"--camera={camera!r}: give a camera id or 'mean'") from None
  if not has_sie:
    return variables, 0, 'none (the model has no camera embedding)'
  if not 0 <= camid < num_cameras:
    raise ValueError(f'--camera={camid} is outside the model\'s {num_cameras} cameras '
                     f'(0..{num_cameras - 1})')
  return variables, camid, f'camera {camid} of {num_cameras} (0-based)'


def _decoder(folder: str, size: tuple[int, int], skip_bad: bool
             ) -> Callable[[str], Optional[np.ndarray]]:
  from ogfr_jax.data import image_io  # pylint: disable=g-import-not-at-top

  def decode(name: str) -> Optional[np.ndarray]:
    path = os.path.join(folder, name)
    try:
      return image_io.load_image(path, size=size)
    except (image_io.CorruptImageError, OSError) as e:
      if skip_bad:
        return None
      detail = e if isinstance(e, image_io.CorruptImageError) else f'{path}: {e}'
      raise ValueError(f'cannot read image {detail} (pass --skip-bad to leave unreadable '
                       'files out)') from e
  return decode


class Extractor:
  """The evaluation's jitted student features over this process's devices, compiled once for
  a fixed batch: call it with uint8 images [batch, H, W, 3] and camera ids [batch]."""

  def __init__(self, model, variables: dict[str, Any], config, batch_size: int):
    from ogfr_jax import evaluate  # pylint: disable=g-import-not-at-top
    self.mesh = common.local_mesh()
    self.batch_size = common.round_batch(batch_size, self.mesh.size)
    self.size = (int(config.input.height), int(config.input.width))
    self.mean, self.std = tuple(config.input.mean), tuple(config.input.std)
    # --camera, not the run's test set, says which camera embedding the images get.
    self._fn = evaluate.make_extract_fn(model, config, self.mesh, unseen_cameras=False)
    self._variables = common.replicate(variables, self.mesh)

  def __call__(self, images: np.ndarray, camids: np.ndarray):
    """Features [batch, D] as a device array (not waited for, so the caller can prepare the
    next batch meanwhile)."""
    from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
    arrays = parallel.global_batch({'image': np.asarray(images, np.uint8),
                                    'camid': np.asarray(camids, np.int32)}, self.mesh)
    return self._fn(self._variables, arrays['image'], arrays['camid'])


def extract_folder(extractor: Extractor, folder: str, *, camid: int = 0,
                   camids: Optional[Sequence[int]] = None,
                   skip_bad: bool = False, progress: bool = True,
                   names: Optional[Sequence[str]] = None, decode_threads: int = 0) -> Features:
  """Features of the images under `folder` (or of `names`, relative to it).

  Each image gets camera `camid`, or its entry of `camids` (one per name). Batches are padded
  to the extractor's batch so the model runs one compiled program; decoding runs in
  `decode_threads` threads (0: one per CPU core) ahead of the model.
  """
  from ogfr_jax import console  # pylint: disable=g-import-not-at-top
  names = list_images(folder) if names is None else list(names)
  if camids is None:
    camids = [camid] * len(names)
  if len(camids) != len(names):
    raise ValueError(f'{len(camids)} camera ids for {len(names)} images')
  camera_of = dict(zip(names, (int(c) for c in camids)))
  batch_size = extractor.batch_size
  h, w = extractor.size
  decode = _decoder(folder, (h, w), skip_bad)
  batches = [names[i:i + batch_size] for i in range(0, len(names), batch_size)]
  kept: list[str] = []
  skipped: list[str] = []
  outputs = []
  threads = decode_threads or os.cpu_count() or 1
  bar = console.CountProgress(len(names) if progress and len(batches) >= _PROGRESS_MIN_BATCHES
                              else 0, 'extract', out=sys.stderr)
  with bar, concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending = collections.deque()
    for b in batches[:_LOOKAHEAD_BATCHES]:
      pending.append([pool.submit(decode, n) for n in b])
    for i, batch_names in enumerate(batches):
      futures = pending.popleft()
      if i + _LOOKAHEAD_BATCHES < len(batches):
        pending.append([pool.submit(decode, n) for n in batches[i + _LOOKAHEAD_BATCHES]])
      images = np.zeros((batch_size, h, w, 3), np.uint8)
      batch_camids = np.zeros((batch_size,), np.int32)
      rows = []
      for name, future in zip(batch_names, futures):
        image = future.result()
        if image is None:
          skipped.append(name)
          continue
        images[len(rows)] = image
        batch_camids[len(rows)] = camera_of[name]
        rows.append(name)
      if rows:
        outputs.append((extractor(images, batch_camids), len(rows)))
        kept.extend(rows)
      bar.update(len(batch_names))
  if not kept:
    raise ValueError(f'none of the {len(names)} image files under {folder} could be read')
  features = np.concatenate([np.asarray(out)[:n] for out, n in outputs], axis=0)
  return Features(features.astype(np.float32), kept, skipped,
                  np.array([camera_of[n] for n in kept], np.int32))


def save_features(path: str, result: Features, meta: dict[str, Any]) -> None:
  """Writes the .npz described in the module docstring (loads without allow_pickle)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:  # a file object keeps np.savez from appending '.npz'
    np.savez(f, features=result.features, names=np.array(result.names, dtype=str),
             camids=(np.full(len(result.names), -1, np.int32) if result.camids is None
                     else np.asarray(result.camids, np.int32)),
             skipped=np.array(result.skipped, dtype=str), meta=np.array(json.dumps(meta)))


def parse_args(argv: Sequence[str]):
  p = common.ArgumentParser(prog='python -m ogfr_jax.tools.extract',
                            description=__doc__.split('\n\n')[0])
  p.add('workdir', required=True, help='training workdir (config.json + checkpoints/)')
  p.add('images', required=True, help='folder of images (searched recursively)')
  p.add('out', required=True, help='output .npz file')
  p.add('batch-size', type=int, default=64, help='images per batch (rounded up to a '
        'multiple of the device count)')
  p.add('camera', default='', help="camera embedding of every image: an id of the training "
        "cameras (0-based), or 'mean'. Default: the camera in each Market / Duke style file "
        "name (0161_c2s1_..., 0005_c2_f...; c2 is id 1), camera 0 for other names")
  p.add('skip-bad', action='store_true', help='leave unreadable images out instead of failing')
  p.add('no-progress', action='store_true', help='no progress display')
  p.add('step', type=int, default=None, help='checkpoint step (default: latest)')
  p.add('decode-threads', type=int, default=0, help='image decoding threads (0: CPU count)')
  return p.parse_args(list(argv))


def image_cameras(names: Sequence[str], camera: str, variables: dict[str, Any],
                  num_cameras: int) -> tuple[dict[str, Any], np.ndarray, str]:
  """(variables, camera id per image, description) for --camera (see the module docstring):
  an explicit id or 'mean' for every image, else the cameras in the file names."""
  if camera:
    variables, camid, note = camera_variables(variables, camera, num_cameras)
    fed = np.full(len(names), camid, np.int32)
    if camera == 'mean' or note.startswith('none'):
      return variables, fed, note
    return variables, fed, f'{note}, every image (--camera)'
  if not _has_camera_table(variables):
    return variables, np.zeros(len(names), np.int32), 'none (the model has no camera embedding)'
  parsed = cameras_from_names(names)
  known = (parsed >= 0) & (parsed < num_cameras)
  fed = np.where(known, parsed, 0).astype(np.int32)
  if known.all():
    return variables, fed, f'the camera in each file name ({num_cameras} training cameras)'
  unknown = int((~known).sum())
  outside = int(((parsed >= num_cameras)).sum())
  why = (f'{outside} name(s) with a camera outside the model\'s {num_cameras}'
         if outside else 'no camera in the name')
  if known.any():
    return variables, fed, (f'the camera in the file name for {int(known.sum())} image(s); '
                            f'camera 0 for {unknown} ({why})')
  return variables, fed, f'camera 0 of {num_cameras} (0-based) for every image ({why})'


def main(argv: Sequence[str]) -> Features:
  args = parse_args(argv)
  trained = common.load_trained(args.workdir, args.step)
  names = list_images(args.images)
  variables, camids, camera_note = image_cameras(names, args.camera, trained.variables,
                                                 trained.num_cameras)
  extractor = Extractor(trained.model, variables, trained.config, args.batch_size)
  result = extract_folder(extractor, args.images, camids=camids, names=names,
                          skip_bad=args.skip_bad, progress=not args.no_progress,
                          decode_threads=args.decode_threads)
  if args.camera == 'mean' or not _has_camera_table(trained.variables):
    result.camids = np.full(len(result.names), -1, np.int32)
  e = trained.config.eval
  meta = {'workdir': trained.workdir, 'checkpoint_step': trained.step,
          'images': os.path.abspath(args.images), 'feature': e.feature,
          'normalized': bool(e.normalize), 'flip': bool(e.flip),
          'camera_embedding': camera_note,
          'input_size': [int(trained.config.input.height), int(trained.config.input.width)]}
  save_features(args.out, result, meta)
  note = f'; skipped {len(result.skipped)} unreadable file(s)' if result.skipped else ''
  print(f'wrote {args.out}: {len(result.names)} x {result.features.shape[1]} features '
        f'(camera embedding: {camera_note}){note}')
  return result


if __name__ == '__main__':
  cli.run_cli(main)
