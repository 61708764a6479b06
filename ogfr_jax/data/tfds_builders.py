r"""TensorFlow Datasets builders for the supported ReID datasets, written as ArrayRecord.

The datasets cannot be downloaded by a program (their licences ask for a manual request), so
each builder reads the user's extracted archive from `manual_dir` with the project's own
readers (`ogfr_jax.data.datasets`, so every layout rule -- junk and distractor ids, 0-based
cameras, train relabelling -- is the same as for the folder reader) and writes one ArrayRecord
file set per split: train (when the dataset has one), query, gallery.

  python -m ogfr_jax.data.tfds_builders --dataset occluded_duke \
      --manual_dir /data/Occluded_Duke --data_dir /data/tfds [--merge_train_val]

or from Python: `build('occluded_duke', '/data/Occluded_Duke', '/data/tfds')`, after which
`tfds.builder('reid_occluded_duke', data_dir='/data/tfds')` finds the prepared data (importing
this module registers the builders). Read the result with `ogfr_jax.data.arrayrecord_source`
(a grain data source and a `records.Split` per split).

Features of one example (no TensorFlow needed to write or read them):
  image   bytes   the image file's bytes, unchanged (JPEG, TIFF, ...)
  path    text    path relative to the dataset folder, e.g. query/0001_c2_f0046182.jpg
  pid     int32   train: relabelled 0..N-1; query/gallery: the original identity
  camid   int32   0-based camera
Examples keep the folder reader's order (shuffling is disabled), so features extracted from
the records line up with the folder reader's splits.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds

from ogfr_jax.data import datasets
from ogfr_jax.data import records

FILE_FORMAT = 'array_record'
SPLITS = ('train', 'query', 'gallery')
_VERSION = '1.0.0'

_LAYOUTS = {
    'market1501': ('Market-1501-v15.09.15.zip', 'bounding_box_train/, query/, bounding_box_test/'),
    'dukemtmc': ('DukeMTMC-reID.zip', 'bounding_box_train/, query/, bounding_box_test/'),
    'occluded_duke': ('Occluded_Duke.zip', 'bounding_box_train/, query/, bounding_box_test/'),
    'occluded_reid': ('OccludedREID.zip', 'occluded_body_images/, whole_body_images/'),
    'partial_reid': ('PartialREID.zip', 'partial_body_images/, whole_body_images/'),
    'partial_ilids': ('PartialiLIDS.zip', 'partial_body_images/, whole_body_images/'),
    'msmt17': ('MSMT17_V1.tar.gz or MSMT17_V2.zip',
               'list_train.txt, list_val.txt, list_query.txt, list_gallery.txt and the image '
               'folders'),
    'synthetic': ('(generated: python -m ogfr_jax.data.synthetic or any training run)',
                  'bounding_box_train/, query/, bounding_box_test/'),
}


def _instructions(dataset: str) -> str:
  archive, folders = _LAYOUTS[dataset]
  return (f'Request and download {archive} from the dataset\'s authors, extract it, and pass '
          f'the extracted dataset folder (the one holding {folders}) as manual_dir. '
          f'`python -m ogfr_jax.data.inspect --dataset {dataset} --root DIR` checks the folder '
          'first.')


class ReidBuilderMixin:
  """Common part of the builders (a mixin, so that only the concrete datasets register with
  TFDS): `DATASET` names the reader in ogfr_jax.data.datasets."""
  DATASET = ''
  VERSION = tfds.core.Version(_VERSION)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS locates a builder's source through importlib_resources (an optional dependency it
    # does not install) to find a checksums file beside it; these builders download nothing,
    # so there is no such file to find.
    return None

  RELEASE_NOTES = {_VERSION: 'Encoded image bytes with path, pid and camid as read by '
                             'ogfr_jax.data.datasets.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f'{self.DATASET} person re-identification images as read by '
                     'ogfr_jax.data.datasets (train ids relabelled, cameras 0-based).'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(), dtype=np.object_,
                                          doc='encoded image file bytes'),
            'path': tfds.features.Text(doc='path relative to the dataset folder'),
            'pid': tfds.features.Scalar(dtype=np.int32, doc='person id'),
            'camid': tfds.features.Scalar(dtype=np.int32, doc='0-based camera id'),
        }),
        disable_shuffling=True,
    )

  def reader_options(self) -> dict:
    return {}

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    data = datasets.get_dataset(self.DATASET, manual_dir, **self.reader_options())
    return {name: self._generate_examples(data.root, getattr(data, name))
            for name in SPLITS if len(getattr(data, name))}

  def _generate_examples(self, root: str, split: records.Split
                         ) -> Iterator[tuple[int, dict]]:
    for i, path in enumerate(split.paths):
      with open(path, 'rb') as f:
        data = f.read()
      yield i, {'image': data, 'path': os.path.relpath(path, root),
                'pid': int(split.pids[i]), 'camid': int(split.camids[i])}


class ReidMarket1501(ReidBuilderMixin, tfds.core.GeneratorBasedBuilder):
  name = 'reid_market1501'
  DATASET = 'market1501'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions('market1501')


class ReidDukemtmc(ReidBuilderMixin, tfds.core.GeneratorBasedBuilder):
  name = 'reid_dukemtmc'
  DATASET = 'dukemtmc'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions('dukemtmc')


class ReidOccludedDuke(ReidBuilderMixin, tfds.core.GeneratorBasedBuilder):
  name = 'reid_occluded_duke'
  DATASET = 'occluded_duke'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions('occluded_duke')


class ReidOccludedReid(ReidBuilderMixin, tfds.core.GeneratorBasedBuilder):
  name = 'reid_occluded_reid'
  DATASET = 'occluded_reid'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions('occluded_reid')


class ReidPartialReid(ReidBuilderMixin, tfds.core.GeneratorBasedBuilder):
  name = 'reid_partial_reid'
  DATASET = 'partial_reid'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions('partial_reid')


class ReidPartialIlids(ReidBuilderMixin, tfds.core.GeneratorBasedBuilder):
  name = 'reid_partial_ilids'
  DATASET = 'partial_ilids'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions('partial_ilids')


class ReidSynthetic(ReidBuilderMixin, tfds.core.GeneratorBasedBuilder):
  name = 'reid_synthetic'
  DATASET = 'synthetic'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions('synthetic')


class ReidMsmt17(ReidBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """Config 'train_val' merges list_val.txt into training (the reader's merge_train_val)."""
  name = 'reid_msmt17'
  DATASET = 'msmt17'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions('msmt17')
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='train', description='train = list_train.txt'),
      tfds.core.BuilderConfig(name='train_val',
                              description='train = list_train.txt + list_val.txt'),
  ]

  def reader_options(self) -> dict:
    return {'merge_train_val': self.builder_config.name == 'train_val'}


BUILDERS = {cls.DATASET: cls for cls in (
    ReidMarket1501, ReidDukemtmc, ReidOccludedDuke, ReidOccludedReid, ReidPartialReid,
    ReidPartialIlids, ReidSynthetic, ReidMsmt17)}


def builder(dataset: str, data_dir: str, *, merge_train_val: bool = False
            ) -> tfds.core.DatasetBuilder:
  """The builder of `dataset` (a name of ogfr_jax.data.datasets) writing ArrayRecord under
  data_dir."""
  if dataset not in BUILDERS:
    raise ValueError(f'no TFDS builder for dataset {dataset!r}; available: '
                     f'{", ".join(sorted(BUILDERS))}')
  kwargs = {'data_dir': data_dir, 'file_format': FILE_FORMAT}
  if dataset == 'msmt17':
    kwargs['config'] = 'train_val' if merge_train_val else 'train'
  elif merge_train_val:
    raise ValueError(f'merge_train_val is an msmt17 option; {dataset!r} does not take it')
  return BUILDERS[dataset](**kwargs)


def build(dataset: str, manual_dir: str, data_dir: str, *, merge_train_val: bool = False
          ) -> str:
  """Prepares `dataset` from its extracted folder; returns the builder's data folder (what
  `arrayrecord_source` reads)."""
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f'manual_dir {manual_dir} is not a folder: pass the extracted '
                            f'{dataset} folder')
  b = builder(dataset, data_dir, merge_train_val=merge_train_val)
  # The reader's checks first: they name the missing folder or file of the layout, where
  # TFDS would only say that manual_dir is empty.
  datasets.get_dataset(dataset, manual_dir, **b.reader_options())
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(manual_dir)))
  return os.fspath(b.data_dir)


def main(argv: Optional[list[str]] = None) -> str:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog='python -m ogfr_jax.data.tfds_builders',
                              description='Writes a ReID dataset as TFDS ArrayRecord.')
  p.add_argument('--dataset', required=True, choices=sorted(BUILDERS))
  p.add_argument('--manual_dir', '--manual-dir', required=True,
                 help='the extracted dataset folder')
  p.add_argument('--data_dir', '--data-dir', required=True, help='TFDS data folder to write')
  p.add_argument('--merge_train_val', '--merge-train-val', action='store_true',
                 help='msmt17: train on list_train + list_val')
  args = p.parse_args(argv)
  # TFDS speaks of downloading (there is none: the files are read from manual_dir) on stdout,
  # and draws progress bars with terminal escapes also into a pipe or a log file.
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()
  with contextlib.redirect_stdout(io.StringIO()):
    out = build(args.dataset, args.manual_dir, args.data_dir,
                merge_train_val=args.merge_train_val)
  splits = tfds.builder_from_directory(out).info.splits
  counts = ', '.join(f'{name} {splits[name].num_examples:,d}' for name in sorted(splits))
  print(f'wrote {out} ({counts} images)')
  return out


if __name__ == '__main__':
  from ogfr_jax.tools import cli  # pylint: disable=g-import-not-at-top
  cli.run_cli(main)
