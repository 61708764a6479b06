"""The full-scale rehearsal (benchmarks/rehearsal.py) at a tiny scale: the dataset it draws in
the Occluded-Duke layout, and one whole run of the tool (timm-named weights through
init_from, the real config through `python -m ogfr_jax.main`, a stop by SIGTERM and a resume,
the bounded evaluation, the checkpoint, FLOP and ranking stages, the report)."""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from benchmarks import rehearsal_data
from ogfr_jax.data import datasets
from ogfr_jax.data import sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUKE_NAME = re.compile(r'^(\d{4})_c(\d+)_f(\d{7})\.jpg$')
TINY = rehearsal_data.Counts(train_ids=16, train_images=70, query_ids=3, query_images=7,
                             gallery_ids=5, gallery_images=23, cameras=3)


def test_plan_has_the_counts_names_and_protocol():
  entries = rehearsal_data.plan_items(TINY, seed=0)
  by_split = collections.defaultdict(list)
  for split, name, item in entries:
    m = DUKE_NAME.match(name)
    assert m, name
    assert int(m.group(1)) == item.pid and int(m.group(2)) <= TINY.cameras
    by_split[split].append((item.pid, int(m.group(2)), name))
  assert len({n for _, _, n in entries}) == len(entries)
  assert [len(by_split[s]) for s in ('train', 'query', 'gallery')] == [70, 7, 23]
  assert len({p for p, _, _ in by_split['train']}) == 16
  assert len({p for p, _, _ in by_split['query']}) == 3
  assert len({p for p, _, _ in by_split['gallery']}) == 5
  assert not {p for p, _, _ in by_split['train']} & {p for p, _, _ in by_split['gallery']}
  # A query identity's camera never holds a gallery image of it.
  query_cams = {p: c for p, c, _ in by_split['query']}
  assert all(query_cams.get(p) != c for p, c, _ in by_split['gallery'])
  assert all(item.occluder for split, _, item in entries if split == 'query')


def test_more_query_than_gallery_identities_is_refused():
  with pytest.raises(ValueError, match='--query-ids'):
    rehearsal_data.plan_items(rehearsal_data.Counts(4, 8, 5, 5, 4, 8, 2), seed=0)


@pytest.mark.slow
def test_rehearsal_at_tiny_scale(tmp_path):
  out = tmp_path / 'report.json'
  # Tiny steps take a fraction of a second: the stop, sent once step 1 is logged, needs room to
  # land before the last step.
  steps = 20
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'rehearsal.py'),
         '--cache-dir', str(tmp_path / 'cache'), '--workdir', str(tmp_path / 'work'),
         '--height', '64', '--width', '32', '--model-size', 'tiny', '--steps', str(steps),
         '--kill-after', '1', '--batch', '2x2', '--eval-query', '4', '--eval-gallery', '12',
         '--input-batches', '1', '--flops-batch', '8', '--json', str(out)]
  for field in ('train_ids', 'train_images', 'query_ids', 'query_images', 'gallery_ids',
                'gallery_images', 'cameras'):
    cmd += ['--' + field.replace('_', '-'), str(getattr(TINY, field))]
  # One device, as a user's run has (the test session's fake 8 devices would split a batch
  # of 4).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'full recipe:' in proc.stdout
  r = json.loads(out.read_text())

  data = datasets.get_dataset('occluded_duke', r['data']['root'])
  assert (len(data.train), len(data.query), len(data.gallery)) == (70, 7, 23)
  assert data.num_train_ids == 16

  tensors = load_file(r['weights']['path'])
  assert tensors['pos_embed'].shape == (1, 1 + 14 * 14, 64)  # timm vit_*_patch16_224
  assert tensors['blocks.1.attn.qkv.weight'].shape == (3 * 64, 64)

  # Stopped by SIGTERM with a checkpoint before the end, then resumed to the last step.
  saved = r['train']['checkpoint_steps_after_kill']
  assert 1 <= saved[-1] < steps
  run = tmp_path / 'work' / 'run'
  logged = [json.loads(line)['step'] for line in open(run / 'metrics.jsonl')]
  assert sorted(set(logged)) == list(range(1, steps + 1))
  assert max(int(d) for d in os.listdir(run / 'checkpoints') if d.isdigit()) == steps
  results = json.loads((run / 'results.json').read_text())
  assert 0.0 <= results['occluded_duke']['mAP'] <= 1.0
  assert r['eval']['query'] == 4 and r['eval']['gallery'] == 12

  assert r['ranking']['num_query'] == 7 and r['ranking']['num_gallery'] == 23
  assert r['flops']['flops_per_train_image'] > 0 and r['flops']['flops_per_eval_image'] > 0
  assert r['train']['step_s'] > 0 and r['checkpoint']['restore_s'] > 0
  assert r['checkpoint']['step'] == steps
  assert r['peak_rss_bytes'] >= max(v for v in r['peak_rss_by_process'].values())
  # The projection is of the recipe (120 epochs of 16 x 4), not of the rehearsal's run.
  recipe_steps = sampler.steps_per_epoch(np.asarray(data.train.pids), 16, 4)
  assert r['projection']['train_images'] == 120 * recipe_steps * 64
  for target in r['projection']['targets'].values():
    assert target['total_s'] == pytest.approx(
        target['train_s'] + target['eval_s'] + target['fixed_s'])
