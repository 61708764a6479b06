r"""Ranked-list figures: each query beside its top-k gallery images, as the evaluation ranks them.

  python -m ogfr_jax.tools.visrank --workdir runs/synthetic [--num-queries 8] [--topk 10] \
      [--out runs/synthetic/visrank] [--select spread|random|failures] [--per-page 8]

Features, distances and re-ranking are those of the evaluation (`evaluate.extract_split` with
the run's config.eval, `metrics.pairwise_distance`, `metrics.re_ranking` when eval.rerank is
on), and the figures' header repeats the evaluation figures computed from the same distances
by `metrics.evaluate_rank`. Each row shows:
- the query (blue frame), tagged when it is occluded: on the synthetic benchmark from its side
  files (occluder type), otherwise by dataset (every Occluded-Duke and Occluded-REID query is
  occluded; Partial-REID and Partial-iLIDS queries are partial);
- its top-k gallery images in rank order, green frame for the same identity, red otherwise,
  with rank, distance, pid and camera underneath;
- after a gap, the nearest gallery images that the protocol drops for this query (same pid AND
  same camera, dashed grey frame, "dropped"): they are not part of the ranking, shown only so
  that a near-duplicate at distance ~0 is not mistaken for a missing match.
Queries without any true match in the gallery are skipped by the protocol; they are never
chosen here.

Each page is titled with the run, the evaluation figures and what --select chose, above a key
of the frame colours. Writes OUT/visrank_<select>_000.png, ... (default OUT: WORKDIR/visrank)
and prints their paths.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from ogfr_jax import paths as fspaths
from ogfr_jax.tools import cli
from ogfr_jax.tools import common
from ogfr_jax.tools import drawing

# Datasets whose queries are all occluded (or partial) by construction of the benchmark.
QUERY_CONDITION = {
    'occluded_duke': 'occluded',
    'occluded_reid': 'occluded',
    'partial_reid': 'partial',
    'partial_ilids': 'partial',
}
SELECTIONS = ('spread', 'random', 'failures')
# What each --select shows, in the page title.
SELECTION_TITLES = {
    'spread': 'queries spread evenly over the query set',
    'random': 'random queries (seed {seed})',
    'failures': 'failures: queries whose rank-1 gallery image is another identity',
}
# The frame colours of a page, in its key.
KEY = ((drawing.BLUE, 'query'), (drawing.GREEN, 'same identity as the query'),
       (drawing.RED, 'another identity'),
       (drawing.GREY, 'same pid and camera: dropped by the protocol, not ranked'))


@dataclasses.dataclass(frozen=True)
class RankedList:
  """One query's ranking under the protocol."""
  query: int  # index into the query split
  ranked: np.ndarray  # gallery indices, nearest first, protocol-dropped items excluded
  distances: np.ndarray  # distances of `ranked`
  matches: np.ndarray  # bool: same identity as the query, for `ranked`
  dropped: np.ndarray  # gallery indices the protocol drops for this query, nearest first

  @property
  def first_match(self) -> Optional[int]:
    """1-based rank of the first true match (None if the gallery holds none)."""
    hits = np.flatnonzero(self.matches)
    return int(hits[0]) + 1 if hits.size else None


def protocol_dropped(q_pid: int, q_camid: int, g_pids: np.ndarray,
                     g_camids: np.ndarray) -> np.ndarray:
  """The gallery items `metrics.evaluate_rank` leaves out for this query: same pid AND same
  camera (the same view of the person, not a retrieval)."""
  return (g_pids == q_pid) & (g_camids == q_camid)


def rank_query(dist_row: np.ndarray, query: int, q_pid: int, q_camid: int,
               g_pids: np.ndarray, g_camids: np.ndarray) -> RankedList:
  """The full ranking of one query with the tie rule of `metrics` (equal distances: lower
  gallery index first, i.e. a stable sort)."""
  order = np.argsort(dist_row, kind='stable')
  drop = protocol_dropped(q_pid, q_camid, g_pids, g_camids)[order]
  ranked = order[~drop]
  return RankedList(query=query, ranked=ranked, distances=dist_row[ranked],
                    matches=g_pids[ranked] == q_pid, dropped=order[drop])


def rank_all(dist: np.ndarray, query_indices: Sequence[int], query, gallery) -> list[RankedList]:
  """`rank_query` for the rows of `dist` (row r belongs to query_indices[r])."""
  g_pids, g_camids = np.asarray(gallery.pids), np.asarray(gallery.camids)
  return [rank_query(dist[r], int(q), int(query.pids[q]), int(query.camids[q]), g_pids,
                     g_camids) for r, q in enumerate(query_indices)]


def occlusion_tags(data) -> tuple[list[Optional[str]], list[Optional[str]]]:
  """(query tags, gallery tags): 'occluded: <type>' / 'occluded' / 'partial' or None.

  The synthetic benchmark records the occluder of every occluded query and gallery image in
  its side files; the public occluded/partial sets are occluded or partial in every query.
  """
  if data.name == 'synthetic':
    from ogfr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    side = synthetic.load_side_info(data.root, splits=('query', 'gallery'))

    def tag(path: str, split: str) -> Optional[str]:
      entry = side.get(os.path.basename(path))
      if entry is None or entry['occluder_type'] is None or entry['split'] != split:
        return None
      return f'occluded: {entry["occluder_type"]}'

    return ([tag(p, 'query') for p in data.query.paths],
            [tag(p, 'gallery') for p in data.gallery.paths])
  condition = QUERY_CONDITION.get(data.name)
  return [condition] * len(data.query), [None] * len(data.gallery)


def choose_queries(lists: Sequence[RankedList], num: int, how: str,
                   seed: int = 0) -> list[RankedList]:
  """`num` queries that have a true match: evenly spread over the split, random, or failures
  (rank-1 wrong) evenly spread."""
  if how not in SELECTIONS:
    raise ValueError(f'--select={how!r}: use one of {SELECTIONS}')
  pool = [l for l in lists if l.first_match is not None]
  if how == 'failures':
    pool = [l for l in pool if l.first_match != 1]
  if not pool or num < 1:
    return []
  if how == 'random':
    picks = np.random.default_rng(seed).choice(len(pool), min(num, len(pool)), replace=False)
    return [pool[i] for i in sorted(picks)]
  picks = np.unique(np.linspace(0, len(pool) - 1, min(num, len(pool))).round().astype(int))
  return [pool[i] for i in picks]


# --------------------------------------------------------------------------------------------
# Drawing


def _load_tile(path: str, size: tuple[int, int], tile_height: int) -> np.ndarray:
  from ogfr_jax.data import image_io  # pylint: disable=g-import-not-at-top
  return drawing.fit_height(image_io.load_image(path, size=size), tile_height)


def draw_row(ranked: RankedList, data, tags, topk: int, show_dropped: int,
             size: tuple[int, int], tile_height: int) -> np.ndarray:
  """One query's row: query | top-k | dropped-by-protocol strip."""
  q_tags, g_tags = tags
  q = ranked.query
  query = data.query
  caption = ['query', f'pid {int(query.pids[q])} cam {int(query.camids[q])}']
  colours = [drawing.BLUE, drawing.BLACK]
  if q_tags[q]:
    caption.append(q_tags[q])
    colours.append(drawing.ORANGE)
  width = max(tile_height // 2 + 16, 112)
  tiles = [drawing.labelled(drawing.bordered(_load_tile(query.paths[q], size, tile_height),
                                           drawing.BLUE), caption, colours, width=width,
                                 fit=True)]
  gallery = data.gallery
  tiles.append(np.full((tile_height, 10, 3), 255, np.uint8))
  for r, g in enumerate(ranked.ranked[:topk]):
    hit = bool(ranked.matches[r])
    colour = drawing.GREEN if hit else drawing.RED
    lines = [f'#{r + 1} d={ranked.distances[r]:.3f}',
             f'pid {int(gallery.pids[g])} cam {int(gallery.camids[g])}']
    line_colours = [colour, drawing.BLACK]
    if g_tags[g]:
      lines.append(g_tags[g])
      line_colours.append(drawing.ORANGE)
    tiles.append(drawing.labelled(drawing.bordered(_load_tile(gallery.paths[g], size,
                                                            tile_height), colour),
                                 lines, line_colours, width=width, fit=True))
  if show_dropped and ranked.dropped.size:
    tiles.append(np.full((tile_height, 16, 3), 255, np.uint8))
    for g in ranked.dropped[:show_dropped]:
      tiles.append(drawing.labelled(
          drawing.bordered(_load_tile(gallery.paths[g], size, tile_height), drawing.GREY,
                          dashed=True),
          ['dropped by protocol', f'same pid, cam {int(gallery.camids[g])}'],
          [drawing.GREY, drawing.GREY], width=width))
  row = drawing.hstack(tiles, gap=3)
  first = ranked.first_match
  note = (f'first true match at rank {first}' if first else 'no true match') + (
      f'; {ranked.dropped.size} gallery item(s) of the same pid and camera dropped by the '
      'protocol' if ranked.dropped.size else '')
  return drawing.vstack([drawing.banner(note, row.shape[1], size=11, colour=drawing.GREY), row],
                       gap=0)


def draw_pages(chosen: Sequence[RankedList], data, tags, *, topk: int, show_dropped: int,
               size: tuple[int, int], tile_height: int, per_page: int,
               title: str, subtitle: str = '') -> list[np.ndarray]:
  """Pages of `per_page` rows under the title, the subtitle (what the rows were chosen
  for) and the colour key."""
  pages = []
  for start in range(0, len(chosen), per_page):
    rows = [draw_row(r, data, tags, topk, show_dropped, size, tile_height)
            for r in chosen[start:start + per_page]]
    width = max(r.shape[1] for r in rows)
    key = drawing.colour_key(KEY[:4 if show_dropped else 3], width,
                             dashed=(False, False, False, True))
    head = [drawing.banner(title, width, size=13)]
    if subtitle:
      head.append(drawing.banner(subtitle, width, size=12))
    head.append(key)
    note = '#N: rank, d: the distance the evaluation ranks by'
    if any(t for t in tags[0]) or any(t for t in tags[1]):
      note += '; orange text: the occluder in the image'
    head.append(drawing.banner(note, width, size=11, colour=drawing.BLACK))
    pages.append(drawing.vstack([drawing.vstack(head, gap=2)] + rows, gap=8))
  return pages


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]):
  p = common.ArgumentParser(prog='python -m ogfr_jax.tools.visrank',
                            description=__doc__.split('\n\n')[0])
  p.add('workdir', required=True, help='training workdir (config.json + checkpoints/)')
  p.add('out', default='', help='output folder (default WORKDIR/visrank)')
  p.add('num-queries', type=int, default=8, help='queries to show')
  p.add('topk', type=int, default=10, help='gallery images per query')
  p.add('select', default='spread', choices=SELECTIONS,
        help='which queries: spread evenly, random, or failures (rank-1 wrong)')
  p.add('seed', type=int, default=0, help='seed of --select=random')
  p.add('per-page', type=int, default=8, help='queries per PNG')
  p.add('show-dropped', type=int, default=2,
        help='protocol-dropped gallery items shown per query (0: none)')
  p.add('tile-height', type=int, default=0, help='image height in pixels (default: the '
        'model input height, at least 96)')
  p.add('step', type=int, default=None, help='checkpoint step (default: latest)')
  p.add('colors', type=int, default=0, help='write palette PNGs of this many colours '
        '(smaller files; 0: full colour)')
  p.add('dataset-root', default='', help='folder of the test dataset, if it moved since '
        'training (default: the one in config.json)')
  p.add('batch-size', type=int, default=0, help='extraction batch (default: '
        'config.input.eval_batch_size)')
  p.add('num-workers', type=int, default=-1, help='grain workers for decoding (default: '
        'config.input.num_workers)')
  args = p.parse_args(list(argv))
  for name in ('num_queries', 'topk', 'per_page'):
    if getattr(args, name) < 1:
      raise common.UsageError(f'--{name.replace("_", "-")} must be >= 1')
  return args


def run(args) -> dict:
  """Extracts, ranks and draws. Returns {'paths': PNGs written, 'summary': the evaluation
  figures of these distances, 'chosen': the RankedLists drawn}."""
  from ogfr_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ogfr_jax import metrics  # pylint: disable=g-import-not-at-top
  trained = common.load_trained(args.workdir, args.step)
  config = trained.config
  mesh = common.local_mesh()
  if args.batch_size:
    config.input.eval_batch_size = common.round_batch(args.batch_size, mesh.size)
  else:
    config.input.eval_batch_size = common.round_batch(config.input.eval_batch_size, mesh.size)
  if args.num_workers >= 0:
    config.input.num_workers = args.num_workers
  data = common.read_split(config, 'test', args.dataset_root)
  extract_fn = evaluate.make_extract_fn(trained.model, config, mesh)
  variables = common.replicate(trained.variables, mesh)
  qf = evaluate.extract_split(extract_fn, variables, data.query, config, mesh)
  gf = evaluate.extract_split(extract_fn, variables, data.gallery, config, mesh)
  e = config.eval
  dist = metrics.pairwise_distance(qf, gf)
  if e.rerank:
    dist = metrics.re_ranking(dist, metrics.pairwise_distance(qf, qf),
                              metrics.pairwise_distance(gf, gf), k1=e.rerank_k1,
                              k2=e.rerank_k2, lambda_value=e.rerank_lambda)
  summary = metrics.cmc_summary(metrics.evaluate_rank(
      dist, data.query.pids, data.gallery.pids, data.query.camids, data.gallery.camids,
      max_rank=max(e.max_rank, 10), query_chunk=e.query_chunk))
  lists = rank_all(dist, range(len(data.query)), data.query, data.gallery)
  chosen = choose_queries(lists, args.num_queries, args.select, args.seed)
  if not chosen:
    raise ValueError(f'no query to show for --select={args.select} (every query is ranked '
                     'correctly, or none has a true match)')
  size = (int(config.input.height), int(config.input.width))
  tile_height = args.tile_height or max(size[0], 96)
  title = (f'{os.path.basename(trained.workdir.rstrip("/"))} step {trained.step} on '
           f'{data.name}: rank-1 {summary["rank1"]:.3f}, mAP {summary["mAP"]:.3f} '
           f'({len(data.query)} queries, {len(data.gallery)} gallery; '
           f'{"re-ranked " if e.rerank else ""}{e.feature} features)')
  subtitle = SELECTION_TITLES[args.select].format(seed=args.seed)
  pages = draw_pages(chosen, data, occlusion_tags(data), topk=args.topk,
                     show_dropped=args.show_dropped, size=size, tile_height=tile_height,
                     per_page=args.per_page, title=title, subtitle=subtitle)
  out = args.out or fspaths.join(fspaths.resolve(args.workdir, '--workdir'), 'visrank')
  paths = [common.save_png(page, fspaths.join(out, f'visrank_{args.select}_{i:03d}.png'),
                           args.colors)
           for i, page in enumerate(pages)]
  print(f'{title}; {subtitle}')
  for path in paths:
    print(f'wrote {path}')
  return {'paths': paths, 'summary': summary, 'chosen': chosen}


def main(argv: Sequence[str]) -> dict:
  return run(parse_args(argv))


if __name__ == '__main__':
  cli.run_cli(main)
