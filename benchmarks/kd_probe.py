"""What the teacher gives its student over a run: quality, loss terms and their gradients.

  python benchmarks/kd_probe.py --workdir runs/full [--batches 4] [--json out.json]

For every checkpoint saved in WORKDIR (train with --config.train.checkpoint_every=N and a
large --config.train.keep_checkpoints to keep several) it prints:
- the teacher's retrieval (clean, and purified when the run has FEPM) and the student's, on
  the run's evaluation split (the validation split with dataset.val_ids);
- on `--batches` fixed training batches, each loss term's value and the norm of its weighted
  gradient on the student's parameters (student_vit, student_head, part and pattern heads),
  the cosine of each distillation gradient with the student's ID + triplet gradient, the
  teacher's and the student's training accuracy, and the teacher's softmax at the KD
  temperature (entropy in nats, largest probability).
Then the loss curves of metrics.jsonl (every logged step) for the terms that reach the student.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STUDENT_PREFIXES = ('student', 'pattern')  # student_vit, student_head, student_part_head, ...
SUPERVISED = ('student_id', 'student_triplet')
CURVE_KEYS = tuple(f'train/{k}' for k in (
    'loss/student_id', 'loss/student_triplet', 'loss/kd_feature', 'loss/kd_logit',
    'loss/teacher_id', 'teacher/accuracy', 'student/accuracy'))


def _student_part(tree: dict) -> dict:
  return {k: v for k, v in tree.items() if k.startswith(STUDENT_PREFIXES)}


def _norm(tree) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                           for x in jax.tree_util.tree_leaves(tree))))


def _flat(tree) -> np.ndarray:
  import jax  # pylint: disable=g-import-not-at-top
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x in jax.tree_util.tree_leaves(tree)])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
  return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def training_batches(config, train_split, count: int) -> list[dict]:
  from ogfr_jax import train_step as step_lib  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_train_iterator(train_split, config)
  keys = step_lib.step_keys(config)
  out = []
  for _ in range(count):
    batch = next(it)
    out.append({k: batch[k] for k in keys})
  close = getattr(it, 'close', None)
  if close:
    close()
  return out


def make_term_gradients(model, config, steps_per_epoch: int):
  """jit(params, batch_stats, batch, step) -> (term values [T], weighted gradients on the
  student [T, ...], extra figures); the term order is `losses.active_terms(config)`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ogfr_jax import losses  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_step as step_lib  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import augment  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import donor_exchange  # pylint: disable=g-import-not-at-top

  terms = losses.active_terms(config)
  names = tuple(terms)
  weights = jnp.asarray([terms[n] for n in names], jnp.float32)

  def fn(params, batch_stats, batch, step):
    batch = donor_exchange.fill_donors(batch)
    batch = {**batch, **{k: augment.normalize_on_device(batch[k], config.input.mean,
                                                        config.input.std)
                         for k in step_lib.IMAGE_KEYS}}
    purify = step_lib.fepm_phase(step, config, steps_per_epoch)
    rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), step)
    drop_rng, agent_rng = jax.random.split(rng)

    def weighted(student):
      outputs, _ = model.apply({'params': {**params, **student}, 'batch_stats': batch_stats},
                               batch, train=True, purify=purify,
                               rngs={'dropout': drop_rng, 'agent': agent_rng},
                               mutable=['batch_stats'])
      ctx = losses.Context(loss=config.loss, fepm=config.fepm,
                           agent_on=purify.astype(jnp.float32))
      values = jnp.stack([losses.TERMS[n].fn(outputs, batch, ctx).value for n in names])
      extra = {}
      if 'teacher' in outputs:
        t = outputs['teacher']['logits'].astype(jnp.float32) / config.loss.kd_temperature
        p = jax.nn.softmax(t, axis=-1)
        extra['teacher_entropy'] = jnp.mean(-jnp.sum(p * jax.nn.log_softmax(t, -1), -1))
        extra['teacher_max_prob'] = jnp.mean(jnp.max(p, -1))
        pid = batch['pid']
        extra['teacher_accuracy'] = jnp.mean(jnp.argmax(t, -1) == pid)
        extra['student_accuracy'] = jnp.mean(
            jnp.argmax(outputs['student']['logits'], -1) == pid)
      return weights * values, (values, extra)

    return jax.jacrev(weighted, has_aux=True)(_student_part(params))

  jitted = jax.jit(fn)

  def run(variables, batch, step):
    params = jax.tree.map(jnp.asarray, variables['params'])
    batch_stats = jax.tree.map(jnp.asarray, variables['batch_stats'])
    jac, (values, extra) = jitted(params, batch_stats,
                                  {k: jnp.asarray(v) for k, v in batch.items()},
                                  jnp.asarray(step, jnp.int32))
    grads = {n: jax.tree.map(lambda g, i=i: np.asarray(g[i]), jac) for i, n in enumerate(names)}
    return ({n: float(values[i]) for i, n in enumerate(names)}, grads,
            {k: float(v) for k, v in extra.items()}, terms)

  return run


def retrieval(model, variables, data, config, mesh, branch: str) -> dict:
  from ogfr_jax import evaluate  # pylint: disable=g-import-not-at-top
  fn = evaluate.make_extract_fn(model, config, mesh, branch=branch)
  qf = evaluate.extract_features(fn, variables, data.query, config, mesh)
  gf = evaluate.extract_features(fn, variables, data.gallery, config, mesh)
  r = evaluate.rank_features(qf, gf, data.query, data.gallery, config.eval, mesh)
  return {'mAP': float(r['mAP']), 'rank1': float(r['rank1'])}


def probe(workdir: str, num_batches: int) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from ogfr_jax import paths  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import loading  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  from ogfr_jax.tools import common  # pylint: disable=g-import-not-at-top

  config = common.workdir_config(workdir)
  train_data, eval_data = loading.load_data(config)
  steps_per_epoch, _ = loading.schedule_lengths(config, train_data.train)
  mesh = common.local_mesh()
  directory = paths.join(paths.resolve(workdir, '--workdir'), 'checkpoints')
  steps = sorted(int(s) for s in ocp.utils.checkpoint_steps(directory))
  batches = training_batches(config, train_data.train, num_batches)
  term_gradients = None
  rows = []
  for step in steps:
    trained = common.load_trained(workdir, step, config)
    model, variables = trained.model, trained.variables
    if term_gradients is None:
      term_gradients = make_term_gradients(model, config, steps_per_epoch)
    row = {'step': step, 'epoch': step / steps_per_epoch,
           'student': retrieval(model, variables, eval_data, config, mesh, 'student')}
    if build.has_teacher(config):
      row['teacher_clean'] = retrieval(model, variables, eval_data, config, mesh,
                                       'teacher_clean')
      if build.has_fepm(config):
        row['teacher_purified'] = retrieval(model, variables, eval_data, config, mesh,
                                            'teacher_purified')
    sums: dict[str, list] = {}
    for batch in batches:
      values, grads, extra, weights = term_gradients(variables, batch, step)
      sup = sum(_flat(grads[n]) for n in SUPERVISED)
      for n in values:
        sums.setdefault(f'value/{n}', []).append(values[n])
        sums.setdefault(f'grad/{n}', []).append(_norm(grads[n]))
        if n.startswith('kd_'):
          sums.setdefault(f'cos_sup/{n}', []).append(_cos(_flat(grads[n]), sup))
      sums.setdefault('grad/supervised', []).append(float(np.linalg.norm(sup)))
      for k, v in extra.items():
        sums.setdefault(k, []).append(v)
    row.update({k: float(np.mean(v)) for k, v in sums.items()})
    row['weights'] = weights
    rows.append(row)
    _print_row(row)
  return {'workdir': workdir, 'temperature': float(config.loss.kd_temperature),
          'kd_weight': float(config.loss.kd_weight),
          'kd_logit_weight': float(config.loss.kd_logit_weight), 'rows': rows,
          'curves': curves(workdir)}


def _print_row(row: dict) -> None:
  head = (f"step {row['step']:5d} (epoch {row['epoch']:4.1f})  student mAP "
          f"{row['student']['mAP']:.3f} r1 {row['student']['rank1']:.3f}")
  for b in ('teacher_clean', 'teacher_purified'):
    if b in row:
      head += f"  {b} mAP {row[b]['mAP']:.3f} r1 {row[b]['rank1']:.3f}"
  print(head)
  if 'teacher_accuracy' in row:
    print(f"    train-batch accuracy teacher {row['teacher_accuracy']:.3f} student "
          f"{row['student_accuracy']:.3f}; teacher softmax at T: entropy "
          f"{row['teacher_entropy']:.2f} nats, max prob {row['teacher_max_prob']:.3f}")
  names = [k[len('value/'):] for k in row if k.startswith('value/')]
  for n in names:
    if n.startswith(('student', 'kd_', 'pattern')):
      cos = row.get(f'cos_sup/{n}')
      print(f"    {n:16s} value {row[f'value/{n}']:7.3f}  weighted |grad| on student "
            f"{row[f'grad/{n}']:8.4f}" + (f"  cos with ID+triplet grad {cos:+.3f}"
                                           if cos is not None else ''))
  print(f"    {'ID + triplet':16s} {'':13s}  weighted |grad| on student "
        f"{row['grad/supervised']:8.4f}")


def curves(workdir: str) -> list[dict]:
  from ogfr_jax.tools import common  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  return [{k: r[k] for k in ('step',) + CURVE_KEYS if k in r}
          for r in common.read_jsonl(path) if 'train/loss/student_id' in r]


def _print_curves(rows: list[dict]) -> None:
  if not rows:
    return
  keys = [k for k in CURVE_KEYS if k in rows[0]]
  print('metrics.jsonl: ' + '  '.join(k.split('/', 2)[-1] if '/loss/' in k
                                      else k.split('/', 1)[-1] for k in keys))
  for r in rows:
    print(f"  step {r['step']:5d}  " + '  '.join(f'{r.get(k, float("nan")):.3f}'
                                                for k in keys))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--batches', type=int, default=4)
  p.add_argument('--json', default='')
  args = p.parse_args()
  out = probe(args.workdir, args.batches)
  print(f"temperature {out['temperature']}, kd_weight {out['kd_weight']}, kd_logit_weight "
        f"{out['kd_logit_weight']}")
  _print_curves(out['curves'])
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
