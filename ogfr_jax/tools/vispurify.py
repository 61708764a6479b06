r"""What the purification agent picks, what the student sees, and (synthetic) what was planted.

  python -m ogfr_jax.tools.vispurify --workdir runs/synthetic [--num-images 8] [--step 0] \
      [--num-batches 4] [--out runs/synthetic/vispurify] [--augment]

For one training batch, as the train pipeline builds it (`pipeline.make_train_iterator`: the
holistic view x = `image`, the synthesised occluded view occ(x) = `occluded` and its
`pattern`), each image gets one row of panels:
  x | x with the agent's sampled selection | x with its greedy selection | occ(x) and the
  pattern type | x with the planted clutter (synthetic benchmark only)
The agent runs on x as in the teacher (`OGFR.teacher_selection`: tokens after block L, the
greedy action, and the agent's logits). The sampled selection is one draw of the training
policy from those logits (Bernoulli per token, or Gumbel top-k), seeded by --seed. A selected
token is shaded over its whole receptive window (patch x patch pixels at its stride, so
windows overlap) and its own stride x stride cell at the window centre is outlined.

Augmentation (flip, pad-crop, random erasing) is off unless --augment: the planted clutter
masks are stored for the unaugmented image, so only then do they line up with the pixels the
agent sees. Occlusion synthesis stays on.

On the synthetic benchmark the tool prints the agent's precision and recall on clutter tokens
over --num-batches batches. What counts as a hit: a selected token whose window is at least
half covered by the planted clutter (the contamination of clutter.npz: another identity's
clothes, a bag, ...; `synthetic.clutter_token_mask`). precision = selected clutter tokens /
selected tokens, recall = selected clutter tokens / clutter tokens; chance precision is the
clutter fraction of all tokens (the precision of a random pick), as in the run's FEPM
report. A selected token on the image's own occluder (masks.npz: foliage, a car, ...; same
half-window rule) is no hit for precision, but no plain mistake either: it is counted apart
as 'occluder', and `occluder_share` is the share of the selected tokens it takes. The figures and the
numbers go to OUT/vispurify_000.png and OUT/purification.json.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from ogfr_jax import paths as fspaths
from ogfr_jax.tools import cli
from ogfr_jax.tools import common
from ogfr_jax.tools import drawing

_SELECTED = (230, 30, 30)
_CLUTTER = (255, 200, 0)


def teacher_selection_fn(trained: common.TrainedModel):
  """jit(pixels, camid) -> {'mask', 'scores'} of the teacher's agent (evaluation mode); the
  pixels are the train pipeline's uint8 images, normalised on the device."""
  import jax  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import ogfr as ogfr_lib  # pylint: disable=g-import-not-at-top
  if not build.has_fepm(trained.config):
    raise ValueError(f'{trained.workdir} was trained without a purification agent '
                     '(model.teacher or fepm.enabled is off): nothing to show')
  variables = jax.device_put(trained.variables)
  from ogfr_jax.data import augment  # pylint: disable=g-import-not-at-top
  mean, std = tuple(trained.config.input.mean), tuple(trained.config.input.std)
  fn = jax.jit(lambda v, image, camid: trained.model.apply(
      v, augment.normalize_on_device(image, mean, std), camid,
      method=ogfr_lib.OGFR.teacher_selection))
  return lambda image, camid: jax.device_get(fn(variables, image, camid))


def sample_selection(scores: np.ndarray, config: Any, rng: np.random.Generator,
                     greedy: np.ndarray) -> np.ndarray:
  """One draw of the training policy from the agent's logits [B, N] (see models/fepm.py)."""
  f = config.fepm
  if f.selection == 'random':
    return greedy  # random selection is already a draw
  lo, hi = (float(v) for v in f.prob_bounds)
  p = lo + (hi - lo) / (1.0 + np.exp(-scores.astype(np.float64)))
  return rng.random(scores.shape) < p


def token_windows(grid: tuple[int, int], patch: int, stride: int) -> np.ndarray:
  """int [gh * gw, 4] (y0, x0, y1, x1) pixel window of every token, row-major."""
  gh, gw = grid
  ys, xs = np.meshgrid(np.arange(gh) * stride, np.arange(gw) * stride, indexing='ij')
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  return np.stack([ys, xs, ys + patch, xs + patch], axis=-1)


def token_coverage(mask: np.ndarray, grid: tuple[int, int], patch: int, stride: int,
                   size: tuple[int, int]) -> np.ndarray:
  """int [H, W]: how many of the selected tokens' windows cover each pixel."""
  out = np.zeros(size, np.int32)
  for y0, x0, y1, x1 in token_windows(grid, patch, stride)[np.asarray(mask, bool)]:
    out[y0:y1, x0:x1] += 1
  return out


def clutter_stats(selected: np.ndarray, clutter: np.ndarray,
                  occluder: Optional[np.ndarray] = None) -> dict[str, Optional[float]]:
  """Precision / recall of a token selection [B, N] against clutter tokens [B, N]; with
  `occluder` (tokens on the image's own occluder), the selected occluder tokens that are not
  clutter, apart."""
  selected, clutter = np.asarray(selected, bool), np.asarray(clutter, bool)
  hit = int(np.sum(selected & clutter))
  n_sel, n_clutter = int(selected.sum()), int(clutter.sum())
  extra = {}
  if occluder is not None:
    on_occluder = int(np.sum(selected & np.asarray(occluder, bool) & ~clutter))
    extra = {'selected_occluder_tokens': on_occluder,
             'occluder_share': on_occluder / n_sel if n_sel else None}
  return {
      'selected_tokens': n_sel, 'clutter_tokens': n_clutter, 'selected_clutter_tokens': hit,
      'tokens': int(clutter.size),
      'select_rate': n_sel / clutter.size if clutter.size else None,
      'precision': hit / n_sel if n_sel else None,
      'recall': hit / n_clutter if n_clutter else None,
      'chance_precision': n_clutter / clutter.size if clutter.size else None,
      **extra,
  }


# --------------------------------------------------------------------------------------------
# Data


def train_batches(config, split, *, start_step: int, num_batches: int, augment: bool):
  """The train pipeline's batches for global steps start_step, start_step + 1, ... (in the
  main process; augmentation off unless `augment`)."""
  from ogfr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = copy.deepcopy(config)
  cfg.input.num_workers, cfg.input.prefetch = 0, 0
  if not augment:
    cfg.input.flip_prob, cfg.input.pad, cfg.input.erase_prob = 0.0, 0, 0.0
  it = pipeline.make_train_iterator(split, cfg)
  it.set_state({'step': int(start_step)})
  try:
    return [_with_donors(next(it)) for _ in range(num_batches)]
  finally:
    it.close()


def _with_donors(batch: dict) -> dict:
  """The batch with its occluded view complete, as the train step sees it: one process
  holds the whole global batch, so the donor boxes are pasted here."""
  from ogfr_jax.data import donor_exchange  # pylint: disable=g-import-not-at-top
  if 'donor_row' not in batch:
    return batch
  out = {k: v for k, v in batch.items() if k not in donor_exchange.KEYS}
  out['occluded'] = donor_exchange.paste_on_host(batch)
  return out


def clutter_tokens(paths: Sequence[str], indices: np.ndarray, side: dict[str, dict],
                   config, key: str = 'clutter_mask') -> tuple[np.ndarray, np.ndarray]:
  """(token mask [B, N] bool, pixel mask [B, H, W] bool at the input size) of planted clutter
  (`key`='occluder_mask': of the images' own occluders)."""
  from ogfr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  h, w = int(config.input.height), int(config.input.width)
  gh, gw = build.token_grid(config)
  tokens = np.zeros((len(indices), gh * gw), bool)
  pixels = np.zeros((len(indices), h, w), bool)
  for row, index in enumerate(indices):
    entry = side.get(os.path.basename(paths[int(index)]))
    if entry is None or entry[key] is None:
      continue
    mask = entry[key]
    tokens[row] = synthetic.clutter_token_mask(
        mask, gh, gw, int(config.model.patch_size), int(config.model.stride),
        input_size=(h, w)).reshape(-1)
    pixels[row] = synthetic.clutter_token_mask(mask, h, w, 1, 1, input_size=(h, w))
  return tokens, pixels


# --------------------------------------------------------------------------------------------
# Drawing


def _tint(image: np.ndarray, where: np.ndarray, colour, alpha: float) -> np.ndarray:
  out = image.astype(np.float32)
  out[where] = (1 - alpha) * out[where] + alpha * np.asarray(colour, np.float32)
  return np.clip(out, 0, 255).astype(np.uint8)


def _outline_cells(image: np.ndarray, mask: np.ndarray, grid, patch: int, stride: int,
                   colour) -> np.ndarray:
  """Outlines each selected token's own stride x stride cell at the centre of its window."""
  out = image.copy()
  inset = (patch - stride) // 2
  for y0, x0, _, _ in token_windows(grid, patch, stride)[np.asarray(mask, bool)]:
    y0, x0 = y0 + inset, x0 + inset
    y1, x1 = min(y0 + stride, out.shape[0]) - 1, min(x0 + stride, out.shape[1]) - 1
    out[y0, x0:x1 + 1] = colour
    out[y1, x0:x1 + 1] = colour
    out[y0:y1 + 1, x0] = colour
    out[y0:y1 + 1, x1] = colour
  return out


def selection_panel(image: np.ndarray, mask: np.ndarray, grid, patch: int,
                    stride: int) -> np.ndarray:
  covered = token_coverage(mask, grid, patch, stride, image.shape[:2]) > 0
  return _outline_cells(_tint(image, covered, _SELECTED, 0.45), mask, grid, patch, stride,
                        _SELECTED)


def draw_image_row(x: np.ndarray, occ: np.ndarray, pattern_name: str, sampled: np.ndarray,
                   greedy: np.ndarray, clutter_tok: Optional[np.ndarray],
                   clutter_px: Optional[np.ndarray], grid, patch: int, stride: int,
                   scale: int, caption: str,
                   occluder_tok: Optional[np.ndarray] = None) -> np.ndarray:
  def up(img):
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)

  def hit_line(mask):
    if clutter_tok is None:
      return f'{int(mask.sum())} tokens'
    hits = int(np.sum(mask & clutter_tok))
    line = f'{int(mask.sum())} tok: {hits} clutter'
    if occluder_tok is not None and occluder_tok.any():
      line += f', {int(np.sum(mask & occluder_tok & ~clutter_tok))} occluder'
    return line

  panels = [
      drawing.labelled(up(x), ['x (teacher)', caption]),
      drawing.labelled(up(selection_panel(x, sampled, grid, patch, stride)),
                      ['agent: sampled', hit_line(sampled)], [_SELECTED, drawing.BLACK]),
      drawing.labelled(up(selection_panel(x, greedy, grid, patch, stride)),
                      ['agent: greedy', hit_line(greedy)], [_SELECTED, drawing.BLACK]),
      drawing.labelled(up(occ), ['occ(x) (student)', pattern_name],
                      [drawing.BLACK, drawing.ORANGE]),
  ]
  if clutter_px is not None:
    img = _tint(x, clutter_px, _CLUTTER, 0.6)
    img = _outline_cells(img, clutter_tok, grid, patch, stride, (0, 90, 255))
    lines = [f'{int(clutter_tok.sum())} clutter tokens' if clutter_px.any() else 'none']
    if occluder_tok is not None and occluder_tok.any():
      lines.append(f'+ own occluder: {int(occluder_tok.sum())} tokens')
    panels.append(drawing.labelled(up(img), ['planted clutter'] + lines,
                                  [(160, 110, 0)] + [drawing.BLACK] * len(lines)))
  return drawing.hstack(panels, gap=3)


def _fmt(v: Optional[float]) -> str:
  return 'n/a' if v is None else f'{v:.3f}'


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]):
  p = common.ArgumentParser(prog='python -m ogfr_jax.tools.vispurify',
                            description=__doc__.split('\n\n')[0])
  p.add('workdir', required=True, help='training workdir (config.json + checkpoints/)')
  p.add('out', default='', help='output folder (default WORKDIR/vispurify)')
  p.add('num-images', type=int, default=8, help='images of the first batch to draw (spread '
        'over its identities)')
  p.add('step', type=int, default=0, help='global train step whose batch is drawn')
  p.add('num-batches', type=int, default=1,
        help='batches (from --step on) over which the clutter statistics are computed')
  p.add('augment', action='store_true',
        help='keep flip / pad-crop / erasing (clutter masks then no longer line up)')
  p.add('seed', type=int, default=0, help='seed of the sampled selection')
  p.add('scale', type=int, default=0, help='pixel enlargement of the panels (default: '
        'enough for 192-pixel-high panels)')
  p.add('per-row', type=int, default=2, help='images side by side in the figure')
  p.add('checkpoint-step', type=int, default=None, help='checkpoint (default: latest)')
  p.add('dataset-root', default='', help='training dataset folder, if it moved')
  p.add('colors', type=int, default=0, help='palette PNG of this many colours (0: full)')
  args = p.parse_args(list(argv))
  for name in ('num_images', 'num_batches', 'per_row'):
    if getattr(args, name) < 1:
      raise common.UsageError(f'--{name.replace("_", "-")} must be >= 1')
  if args.step < 0:
    raise common.UsageError('--step must be >= 0')
  return args


def run(args) -> dict[str, Any]:
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  trained = common.load_trained(args.workdir, args.checkpoint_step)
  config = trained.config
  data = common.read_split(config, 'train', args.dataset_root)
  select = teacher_selection_fn(trained)
  grid = build.token_grid(config)
  patch, stride = int(config.model.patch_size), int(config.model.stride)
  h = int(config.input.height)
  side = None
  if data.name == 'synthetic':
    from ogfr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    side = synthetic.load_side_info(data.root, splits=('train',))
  with_clutter = side is not None and not args.augment
  rng = np.random.default_rng(args.seed)
  batches = train_batches(config, data.train, start_step=args.step,
                          num_batches=args.num_batches, augment=args.augment)
  totals = {'sampled': [], 'greedy': [], 'clutter': [], 'occluder': []}
  rows = []
  patterns = tuple(config.occlusion.patterns)
  mean, std = tuple(config.input.mean), tuple(config.input.std)
  scale = args.scale or max(1, -(-192 // h))
  for b, batch in enumerate(batches):
    out = select(batch['image'], batch['camid'])
    greedy = np.asarray(out['mask'], bool)
    sampled = sample_selection(np.asarray(out['scores'], np.float32), config, rng, greedy)
    totals['greedy'].append(greedy)
    totals['sampled'].append(sampled)
    tok = px = occ_tok = None
    if with_clutter:
      tok, px = clutter_tokens(data.train.paths, batch['index'], side, config)
      occ_tok, _ = clutter_tokens(data.train.paths, batch['index'], side, config,
                                  key='occluder_mask')
      totals['clutter'].append(tok)
      totals['occluder'].append(occ_tok)
    if b:
      continue
    images, occluded = (common.to_uint8(batch[k], mean, std) for k in ('image', 'occluded'))
    # Rows spread over the batch: consecutive rows are the K images of one identity.
    shown = np.unique(np.linspace(0, len(images) - 1, min(args.num_images, len(images)))
                      .round().astype(int))
    for i in shown:
      k = int(batch['pattern'][i])
      name = 'not occluded' if k == 0 else f'pattern {k}: {patterns[k - 1]}'
      index = int(batch['index'][i])
      caption = f'pid {int(batch["pid"][i])} cam {int(batch["camid"][i])} #{index}'
      rows.append(draw_image_row(images[i], occluded[i], name, sampled[i], greedy[i],
                                 None if tok is None else tok[i],
                                 None if px is None else px[i], grid, patch, stride, scale,
                                 caption, None if occ_tok is None else occ_tok[i]))
  summary: dict[str, Any] = {
      'workdir': trained.workdir, 'checkpoint_step': trained.step, 'dataset': data.name,
      'train_steps': [args.step, args.step + args.num_batches - 1],
      'images': int(sum(len(m) for m in totals['greedy'])), 'augment': bool(args.augment),
      'token_grid': list(grid), 'selection': config.fepm.selection,
  }
  lines = [f'{trained.workdir} step {trained.step}: agent on {summary["images"]} training '
           f'images (train steps {args.step}..{args.step + args.num_batches - 1}, '
           f'{grid[0]}x{grid[1]} tokens)']
  for kind in ('sampled', 'greedy'):
    sel = np.concatenate(totals[kind])
    if with_clutter:
      stats = clutter_stats(sel, np.concatenate(totals['clutter']),
                            np.concatenate(totals['occluder']))
      lines.append(f'  {kind:7s}: select rate {_fmt(stats["select_rate"])}, clutter precision '
                   f'{_fmt(stats["precision"])} (a random pick: '
                   f'{_fmt(stats["chance_precision"])}), recall {_fmt(stats["recall"])}, '
                   f'occluder share {_fmt(stats["occluder_share"])}')
    else:
      stats = {'select_rate': float(sel.mean()), 'selected_tokens': int(sel.sum()),
               'tokens': int(sel.size)}
      lines.append(f'  {kind:7s}: select rate {_fmt(stats["select_rate"])}')
    summary[kind] = stats
  report = run_fepm_report(trained.workdir)
  if report is not None:
    summary['run_report'] = report
    lines.extend(describe_fepm_report(report))
  if with_clutter:
    lines.append('  hit: a selected token whose window is at least half planted clutter '
                 '(clutter.npz).')
    lines.append('  occluder: a selected token on the image\'s own occluder (masks.npz): no '
                 'hit for precision, counted apart')
  if side is not None and args.augment:
    lines.append('  (clutter statistics need unaugmented images: run without --augment)')
  elif side is None:
    lines.append(f'  ({data.name} has no planted clutter: no precision/recall)')
  title = lines[0].replace(trained.workdir, os.path.basename(trained.workdir.rstrip('/')))
  grouped = [drawing.hstack(rows[i:i + args.per_row], gap=16)
             for i in range(0, len(rows), args.per_row)]
  width = max(g.shape[1] for g in grouped)
  figure = drawing.vstack([drawing.banner(title, width, size=13)]
                         + [drawing.banner(l.strip(), width, size=12) for l in lines[1:]]
                         + grouped, gap=6)
  out = args.out or fspaths.join(fspaths.resolve(args.workdir, '--workdir'), 'vispurify')
  summary['figure'] = common.save_png(figure, fspaths.join(out, 'vispurify_000.png'),
                                      args.colors)
  common.write_json(fspaths.join(out, 'purification.json'), summary)
  print('\n'.join(lines))
  print(f'wrote {summary["figure"]} and {fspaths.join(out, "purification.json")}')
  return summary


def run_fepm_report(workdir: str) -> Optional[dict[str, Any]]:
  """The `fepm` object of the run's results.json (evaluator.fepm_report), None without one."""
  path = fspaths.join(fspaths.resolve(workdir, '--workdir'), 'results.json')
  if not fspaths.exists(path):
    return None
  try:
    results = json.loads(fspaths.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); rerun the evaluation '
                     '(python -m ogfr_jax.main --mode eval) to rewrite it') from e
  return results.get('fepm')


def describe_fepm_report(report: dict[str, Any]) -> list[str]:
  """What the run's end-of-training report says the greedy selection did, one line per part."""
  lines = [f"  run report ({report.get('selection')}, layer {report.get('layer')}), greedy "
           'selection over every image:']
  for part in ('train', 'gallery'):
    r = report.get(part)
    if r is None:
      lines.append(f'    {part:7s}: left out')
      continue
    lines.append(f"    {part:7s}: precision {_fmt(r['precision'])} (a random pick: "
                 f"{_fmt(r['chance'])}), "
                 f"recall {_fmt(r['recall'])}, select rate {_fmt(r['select_rate'])}, "
                 f"{r['contaminated_images']}/{r['images']} images contaminated")
  if 'teacher_purified' in report:
    lines.append(f"    teacher mAP {_fmt(report['teacher_purified']['mAP'])} purified vs "
                 f"{_fmt(report['teacher_clean']['mAP'])} clean")
  return lines


def main(argv: Sequence[str]) -> dict[str, Any]:
  return run(parse_args(argv))


if __name__ == '__main__':
  cli.run_cli(main)
