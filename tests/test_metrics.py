"""Ranking metrics against slow, obviously-correct references written out per query."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ogfr_jax import metrics


# ---------------------------------------------------------------------------------------------
# References: one query (or one pair) at a time, no vectorisation tricks.
# ---------------------------------------------------------------------------------------------


def reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
  cmcs, aps, inps = [], [], []
  for i in range(distmat.shape[0]):
    order = np.argsort(distmat[i], kind='stable')
    matches = []
    for j in order:
      if g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i]:
        continue  # same person seen by the same camera: junk
      matches.append(g_pids[j] == q_pids[i])
    if not any(matches):
      continue
    cmc = []
    hit = 0.0
    for r in range(max_rank):
      if r < len(matches) and matches[r]:
        hit = 1.0
      cmc.append(hit)
    cmcs.append(cmc)
    precisions = []
    found = 0
    last = 0
    for r, m in enumerate(matches):
      if m:
        found += 1
        precisions.append(found / (r + 1))
        last = r + 1
    aps.append(sum(precisions) / found)
    inps.append(found / last)
  return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(aps)


def reference_re_ranking(q_g, q_q, g_g, k1, k2, lam):
  nq, ng = q_g.shape
  full = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32)
  full = full * full
  row_max = full.max(axis=1)
  row_max[row_max == 0] = 1
  d = full / row_max[:, None]
  n = nq + ng
  rank = np.argsort(d, axis=1, kind='stable')

  def reciprocal(i, k):
    return [c for c in rank[i, :k + 1] if i in rank[c, :k + 1]]

  v = np.zeros((n, n))
  for i in range(n):
    r = reciprocal(i, k1)
    expanded = set(r)
    for c in r:
      rc = reciprocal(c, int(np.around(k1 / 2)))
      if len(set(rc) & set(r)) > 2 / 3 * len(rc):
        expanded |= set(rc)
    idx = np.array(sorted(expanded))
    w = np.exp(-d[i, idx].astype(np.float64))
    v[i, idx] = w / w.sum()
  if k2 != 1:
    v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
  out = np.zeros((nq, ng))
  for i in range(nq):
    for j in range(ng):
      lo = np.minimum(v[i], v[nq + j]).sum()
      hi = np.maximum(v[i], v[nq + j]).sum()
      out[i, j] = (1 - lo / hi) * (1 - lam) + d[i, nq + j] * lam
  return out


def random_problem(seed, num_q=37, num_g=120, num_ids=12, num_cams=4, integer=False):
  rng = np.random.default_rng(seed)
  q_pids = rng.integers(1, num_ids + 1, num_q)
  g_pids = rng.integers(0, num_ids + 1, num_g)  # pid 0: distractors, never a query identity
  q_cams = rng.integers(0, num_cams, num_q)
  g_cams = rng.integers(0, num_cams, num_g)
  if integer:
    dist = rng.integers(0, 6, (num_q, num_g)).astype(np.float32)  # many ties
  else:
    dist = rng.random((num_q, num_g), dtype=np.float32)
    dist -= 0.3 * (q_pids[:, None] == g_pids[None, :])  # some signal, some negative values
  return dist, q_pids, g_pids, q_cams, g_cams


def assert_matches_reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank, query_chunk):
  got = metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank, query_chunk)
  cmc, m_ap, m_inp, num_valid = reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank)
  assert got['cmc'].shape == (max_rank,)
  np.testing.assert_allclose(got['cmc'], cmc, rtol=0, atol=1e-12)
  assert got['mAP'] == pytest.approx(m_ap, abs=1e-12)
  assert got['mINP'] == pytest.approx(m_inp, abs=1e-12)
  assert got['num_valid_queries'] == num_valid
  assert got['num_skipped_queries'] == dist.shape[0] - num_valid
  return got


# ---------------------------------------------------------------------------------------------
# evaluate_rank
# ---------------------------------------------------------------------------------------------


def test_hand_computed_example():
  # Query: pid 1, camera 0. Gallery sorted by distance: wrong id, true match (other camera),
  # junk (same id, same camera), wrong id, true match.
  dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], np.float32)
  got = metrics.evaluate_rank(dist, [1], [2, 1, 1, 3, 1], [0], [1, 1, 0, 1, 2], max_rank=5)
  # Valid list: [miss, hit, miss, hit]; AP = (1/2 + 2/4) / 2; mINP = 2 / 4.
  np.testing.assert_allclose(got['cmc'], [0, 1, 1, 1, 1])
  assert got['mAP'] == pytest.approx(0.5)
  assert got['mINP'] == pytest.approx(0.5)
  assert got['num_valid_queries'] == 1


@pytest.mark.parametrize('query_chunk', [1, 5, 16, 1024])
def test_random_problem_matches_reference(query_chunk):
  problem = random_problem(0)
  got = assert_matches_reference(*problem, max_rank=50, query_chunk=query_chunk)
  assert 0 < got['mINP'] <= got['mAP'] < 1  # the last hit never ranks better than the average


@pytest.mark.parametrize('dtype', [np.float32, np.float64, np.int64, np.float16])
def test_ties_are_ranked_by_gallery_index(dtype):
  dist, q_pids, g_pids, q_cams, g_cams = random_problem(1, integer=True)
  assert_matches_reference(dist.astype(dtype), q_pids, g_pids, q_cams, g_cams, 20, 6)


def test_tie_rule_decides_the_result():
  # All distances equal: the order is the gallery order, so the true match at index 2 has rank 3.
  dist = np.zeros((1, 4), np.float32)
  got = metrics.evaluate_rank(dist, [7], [3, 4, 7, 5], [0], [1, 1, 1, 1], max_rank=4)
  np.testing.assert_allclose(got['cmc'], [0, 0, 1, 1])
  assert got['mAP'] == pytest.approx(1 / 3)


def test_float64_differences_below_float32_precision_are_kept():
  # These values collapse to one float32; ranked as float32 they would fall back to gallery
  # order and put the match (smallest value, last index) at rank 6.
  dist = (1.0 + np.array([5, 4, 3, 2, 1, 0]) * 1e-10)[None, :]
  assert len(set(dist.astype(np.float32)[0])) == 1
  problem = (dist, np.array([1]), np.array([3, 3, 3, 3, 3, 1]), np.array([0]), np.ones(6, int))
  got = assert_matches_reference(*problem, max_rank=6, query_chunk=1)
  assert got['cmc'][0] == 1.0


def test_junk_removal_and_skipped_queries():
  dist, q_pids, g_pids, q_cams, g_cams = random_problem(2, num_q=20, num_g=60)
  # Query 0: its identity appears in the gallery only under its own camera -> skipped.
  q_pids[0], q_cams[0] = 99, 1
  g_pids[:3], g_cams[:3] = 99, 1
  # Query 1: its identity is absent from the gallery -> skipped.
  q_pids[1] = 98
  got = assert_matches_reference(dist, q_pids, g_pids, q_cams, g_cams, 30, 7)
  assert got['num_skipped_queries'] >= 2


def test_junk_is_not_counted_as_a_hit():
  # The closest item is the same person in the same camera; it must not give a rank-1 hit.
  dist = np.array([[0.0, 0.5, 0.9]], np.float32)
  got = metrics.evaluate_rank(dist, [4], [4, 6, 4], [2], [2, 0, 0], max_rank=3)
  np.testing.assert_allclose(got['cmc'], [0, 1, 1])
  assert got['mAP'] == pytest.approx(0.5)


def test_distractors_count_as_negatives():
  dist = np.array([[0.1, 0.2, 0.3]], np.float32)
  got = metrics.evaluate_rank(dist, [1], [0, 0, 1], [0], [1, 1, 1], max_rank=3)
  np.testing.assert_allclose(got['cmc'], [0, 0, 1])
  assert got['mINP'] == pytest.approx(1 / 3)


def test_max_rank_larger_than_gallery_is_padded():
  dist, q_pids, g_pids, q_cams, g_cams = random_problem(3, num_q=9, num_g=8, num_ids=3)
  got = assert_matches_reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20, query_chunk=4)
  assert got['cmc'].shape == (20,)
  np.testing.assert_allclose(got['cmc'][8:], got['cmc'][7])
  assert got['cmc'][-1] == 1.0


def test_infinite_distances_are_ranked_last():
  dist = np.array([[np.inf, 0.3, np.inf, 0.2]], np.float32)
  assert_matches_reference(dist, np.array([1]), np.array([1, 2, 2, 3]), np.array([0]),
                           np.array([1, 1, 1, 1]), 4, 1)


def test_input_errors_name_the_argument():
  dist, q_pids, g_pids, q_cams, g_cams = random_problem(4, num_q=5, num_g=9)
  with pytest.raises(ValueError, match='g_pids'):
    metrics.evaluate_rank(dist, q_pids, g_pids[:-1], q_cams, g_cams)
  with pytest.raises(ValueError, match='q_camids'):
    metrics.evaluate_rank(dist, q_pids, g_pids, q_cams[:2], g_cams)
  with pytest.raises(ValueError, match='distmat must be 2-D'):
    metrics.evaluate_rank(dist[0], q_pids, g_pids, q_cams, g_cams)
  with pytest.raises(ValueError, match='max_rank'):
    metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=0)
  with pytest.raises(ValueError, match='query_chunk'):
    metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, query_chunk=0)
  bad = dist.copy()
  bad[3, 2] = np.nan
  with pytest.raises(ValueError, match='NaN.*row 3'):
    metrics.evaluate_rank(bad, q_pids, g_pids, q_cams, g_cams, query_chunk=2)
  with pytest.raises(ValueError, match='no query has a true match'):
    metrics.evaluate_rank(dist, q_pids + 1000, g_pids, q_cams, g_cams)


def test_input_is_not_modified():
  dist, q_pids, g_pids, q_cams, g_cams = random_problem(5)
  before = dist.copy()
  metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, query_chunk=8)
  np.testing.assert_array_equal(dist, before)


def test_cmc_summary():
  dist, q_pids, g_pids, q_cams, g_cams = random_problem(6)
  result = metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
  summary = metrics.cmc_summary(result)
  assert set(summary) == {'rank1', 'rank3', 'rank5', 'rank10', 'mAP', 'mINP'}
  assert all(type(v) is float for v in summary.values())
  assert summary['rank5'] == result['cmc'][4] and summary['mAP'] == result['mAP']
  assert summary['rank3'] == result['cmc'][2]
  assert summary['rank1'] <= summary['rank3'] <= summary['rank5']
  with pytest.raises(ValueError, match='at least 10'):
    metrics.cmc_summary({'cmc': np.ones(5), 'mAP': 1.0, 'mINP': 1.0})


# ---------------------------------------------------------------------------------------------
# pairwise_distance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('chunk', [3, 1000])
def test_pairwise_distance(chunk):
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(11, 6)), rng.normal(size=(13, 6))
  a[0] = b[4]  # identical rows: rounding must not produce NaN from a negative square
  a[1] = 0.0
  euclid = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  got = metrics.pairwise_distance(a, b, 'euclidean', chunk=chunk)
  assert got.dtype == np.float32 and got.shape == (11, 13)
  # Bound from float32 arithmetic (u = 2^-24), whatever order the BLAS sums in: each of
  # |a|^2, |b|^2 and 2 a.b (length k = 6) is within k u of exact relative to |a|^2 + |b|^2
  # (Cauchy-Schwarz bounds the sum of |terms|), the inputs' rounding to float32 and the two
  # additions add 4 u of it, so d^2 is within E = (3 k + 4) u (|a|^2 + |b|^2); then
  # |d - d_exact| <= sqrt(E) (|sqrt p - sqrt q| <= sqrt|p - q|, and clipping at 0 only
  # helps) plus the square root's own rounding, u d. Near d = 0 the bound is sqrt(E) ~ 3e-3.
  u, k = 2.0 ** -24, a.shape[1]
  sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :]
  bound = np.sqrt((3 * k + 4) * u * sq) + u * euclid
  assert np.all(np.abs(got - euclid) <= bound), np.max(np.abs(got - euclid) - bound)
  assert np.isfinite(got).all() and got[0, 4] <= bound[0, 4]
  na = np.linalg.norm(a, axis=1, keepdims=True)
  cos = 1 - (a / np.where(na > 0, na, 1)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
  # Cosine: both rows normalised (norms within (k / 2 + 1) u, each element one more u), then a
  # dot product of unit vectors (within k u) and 1 - cos (one u): (2 k + 5) u, doubled for
  # the float32 rounding of the inputs and the reference's own rounding.
  np.testing.assert_allclose(metrics.pairwise_distance(a, b, 'cosine', chunk=chunk), cos,
                             rtol=0, atol=2 * (2 * k + 5) * u)
  with pytest.raises(ValueError, match='metric'):
    metrics.pairwise_distance(a, b, 'manhattan')
  with pytest.raises(ValueError, match='feature size'):
    metrics.pairwise_distance(a, b[:, :5])


# ---------------------------------------------------------------------------------------------
# re_ranking
# ---------------------------------------------------------------------------------------------


def _split_distances(feats, nq):
  d = metrics.pairwise_distance(feats, feats)
  return d[:nq, nq:], d[:nq, :nq], d[nq:, nq:]


@pytest.mark.parametrize('k1,k2,lam,rounded', [
    (20, 6, 0.3, False),
    (7, 3, 0.5, False),  # odd k1: its half is rounded
    (5, 1, 0.0, False),  # no query expansion, Jaccard only
    (6, 4, 0.3, True),  # coarse distances: many ties in the neighbour lists
    (60, 6, 0.3, False),  # k1 + 1 beyond q + g: the lists hold everything
])
def test_re_ranking_matches_reference(k1, k2, lam, rounded):
  rng = np.random.default_rng(8)
  feats = rng.normal(size=(40, 5)).astype(np.float32)
  q_g, q_q, g_g = _split_distances(feats, 10)
  if rounded:
    q_g, q_q, g_g = (np.round(x, 0) for x in (q_g, q_q, g_g))
  got = metrics.re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
  want = reference_re_ranking(q_g, q_q, g_g, k1, k2, lam)
  assert got.dtype == np.float32 and got.shape == (10, 30)
  # Bound from float32 arithmetic (u = 2^-24) for any summation order. Both sides take the same
  # float32 d (squares and a division, correctly rounded), hence the same neighbour sets; the
  # reference then works in float64. A row of V is exp(-d) (within 4 u) over a sum of at most
  # n positive terms ((n - 1) u) and a division (u): each entry within (n + 4) u relative; the
  # query expansion's mean over k2 rows adds k2 u. sum V_i, sum V_j and sum min(V_i, V_j) are
  # sums of at most n non-negative entries, each of value <= 1 (+ rounding), so each is
  # within e = (n + k2 + 4) u + n u absolute; sum max = sum V_i + sum V_j - sum min >= 1 is
  # within 3 e + 2 u, the ratio within 4 e + 4 u, and 1 - ratio, the weighting by 1 - lam and
  # lam d and the final sum (all values <= 2) add 4 u more: (8 n + 4 k2 + 24) u in all.
  n, u = q_g.shape[0] + q_g.shape[1], 2.0 ** -24
  np.testing.assert_allclose(got, want, rtol=0, atol=(8 * n + 4 * k2 + 24) * u)


def test_re_ranking_refuses_problems_over_the_memory_limit():
  q_g, q_q, g_g = np.zeros((3, 5)), np.zeros((3, 3)), np.zeros((5, 5))
  with pytest.raises(ValueError, match=r'256 bytes.*Disable re-ranking'):
    metrics.re_ranking(q_g, q_q, g_g, max_bytes=255)
  metrics.re_ranking(q_g, q_q, g_g, max_bytes=256)  # exactly at the limit is allowed


def test_re_ranking_input_errors():
  q_g, q_q, g_g = np.ones((3, 5)), np.ones((3, 3)), np.ones((5, 5))
  with pytest.raises(ValueError, match='g_g_dist'):
    metrics.re_ranking(q_g, q_q, g_g[:4, :4])
  with pytest.raises(ValueError, match='q_q_dist'):
    metrics.re_ranking(q_g, q_q[:2], g_g)
  with pytest.raises(ValueError, match='negative'):
    metrics.re_ranking(-q_g, q_q, g_g)
  with pytest.raises(ValueError, match='lambda_value'):
    metrics.re_ranking(q_g, q_q, g_g, lambda_value=1.5)


def test_re_ranking_keeps_rank1_on_clustered_identities():
  rng = np.random.default_rng(9)
  num_ids, per_id_gallery, dim = 25, 6, 16
  centres = rng.normal(size=(num_ids, dim))
  q_pids = np.arange(num_ids)
  g_pids = np.repeat(np.arange(num_ids), per_id_gallery)
  q_feats = centres[q_pids] + 0.9 * rng.normal(size=(num_ids, dim))
  g_feats = centres[g_pids] + 0.9 * rng.normal(size=(g_pids.size, dim))
  feats = np.concatenate([q_feats, g_feats]).astype(np.float32)
  q_g, q_q, g_g = _split_distances(feats, num_ids)
  q_cams, g_cams = np.zeros(num_ids, int), np.ones(g_pids.size, int)
  base = metrics.evaluate_rank(q_g, q_pids, g_pids, q_cams, g_cams, max_rank=10)
  reranked = metrics.evaluate_rank(
      metrics.re_ranking(q_g, q_q, g_g), q_pids, g_pids, q_cams, g_cams, max_rank=10)
  assert 0.5 < base['cmc'][0] < 1  # the toy problem is neither trivial nor hopeless
  assert reranked['cmc'][0] >= base['cmc'][0] - 0.05  # at most one of 25 queries lost
  # Gallery images of one identity are each other's reciprocal neighbours, which is what the
  # Jaccard term rewards, so the whole ranking should get better (0.68 -> 0.80 here).
  assert reranked['mAP'] > base['mAP'] + 0.05


# ---------------------------------------------------------------------------------------------
# Chunked pieces: match lists, the device ranking kernel, the accumulator
# ---------------------------------------------------------------------------------------------


def test_match_lists_follow_the_protocol():
  q_pids, q_cams = np.array([1, 2, 3, 1]), np.array([0, 0, 1, 2])
  g_pids = np.array([1, 2, 1, 0, 1, 2, 5])
  g_cams = np.array([0, 1, 1, 0, 2, 0, 0])
  idx, counts = metrics.match_lists(q_pids, g_pids, q_cams, g_cams)
  # Query 0 (pid 1, cam 0): gallery 2 and 4 (gallery 0 is junk). Query 2 (pid 3): none.
  assert counts.tolist() == [2, 1, 0, 2] and idx.shape == (4, 2) and idx.dtype == np.int32
  assert idx.tolist() == [[2, 4], [1, 7], [7, 7], [0, 2]]
  with pytest.raises(ValueError, match='no query has a true match'):
    metrics.match_lists(np.array([9]), g_pids, np.array([0]), g_cams)
  with pytest.raises(ValueError, match='g_camids'):
    metrics.match_lists(q_pids, g_pids, q_cams, g_cams[:3])


_match_ranks = jax.jit(metrics.match_ranks_device)


def _device_result(dist, q_pids, g_pids, q_cams, g_cams, max_rank, chunk):
  idx, counts = metrics.match_lists(q_pids, g_pids, q_cams, g_cams)
  totals = metrics.RankAccumulator(max_rank)
  for start in range(0, dist.shape[0], chunk):
    stop = min(start + chunk, dist.shape[0])
    ranks, has_nan = _match_ranks(jnp.asarray(dist[start:stop], jnp.float32),
                                  jnp.asarray(idx[start:stop]), jnp.asarray(q_pids[start:stop]),
                                  jnp.asarray(g_pids))
    assert not np.asarray(has_nan).any()
    totals.add_match_ranks(np.asarray(ranks), counts[start:stop])
  return totals.result()


@pytest.mark.parametrize('search', ['linear', 'binary'])
@pytest.mark.parametrize('kind', ['random', 'ties', 'extremes'])
def test_device_ranks_equal_evaluate_rank_bitwise(monkeypatch, search, kind):
  """Same distances, same chunking: the same ranks and bitwise the same figures."""
  if search == 'binary':
    monkeypatch.setattr(metrics, '_LINEAR_COUNT_MAX', 0)
  dist, q_pids, g_pids, q_cams, g_cams = random_problem(11, integer=kind != 'random')
  if kind == 'extremes':  # infinities, signed zeros, negative values, all tied in places
    rng = np.random.default_rng(3)
    dist = dist - 2.0
    dist[rng.random(dist.shape) < 0.1] = np.inf
    dist[rng.random(dist.shape) < 0.1] = -np.inf
    dist[rng.random(dist.shape) < 0.1] = 0.0
    dist[rng.random(dist.shape) < 0.1] = -0.0
  chunk = 8
  want = metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 30, query_chunk=chunk)
  got = _device_result(dist, q_pids, g_pids, q_cams, g_cams, 30, chunk)
  assert got['mAP'] == want['mAP'] and got['mINP'] == want['mINP']
  np.testing.assert_array_equal(got['cmc'], want['cmc'])
  assert got['num_valid_queries'] == want['num_valid_queries']
  assert got['num_skipped_queries'] == want['num_skipped_queries']
  # And both equal the per-query reference.
  assert_matches_reference(dist, q_pids, g_pids, q_cams, g_cams, 30, chunk)


def test_device_kernel_reports_nan_rows():
  dist = np.ones((3, 4), np.float32)
  dist[1, 2] = np.nan
  _, has_nan = _match_ranks(jnp.asarray(dist), jnp.zeros((3, 1), jnp.int32),
                            jnp.zeros(3, jnp.int32), jnp.ones(4, jnp.int32))
  assert np.asarray(has_nan).tolist() == [False, True, False]


def test_accumulator_chunks_add_up_to_evaluate_rank():
  dist, q_pids, g_pids, q_cams, g_cams = random_problem(5)
  want = metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 20, query_chunk=37)
  totals = metrics.RankAccumulator(20)
  totals.add_distances(dist, q_pids, g_pids, q_cams, g_cams)
  got = totals.result()
  assert got['mAP'] == want['mAP'] and np.array_equal(got['cmc'], want['cmc'])
  with pytest.raises(ValueError, match='no query has a true match'):
    metrics.RankAccumulator(5).result()


# ---------------------------------------------------------------------------------------------
# Re-ranking from nearest-neighbour lists
# ---------------------------------------------------------------------------------------------


def _topn_re_ranking(q_g, q_q, g_g, top_n, k1, k2, lam):
  full = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32)
  nq = q_g.shape[0]
  idx, val, scale = metrics.nearest_neighbours(lambda s, e: full[s:e], full.shape[0], top_n,
                                               row_chunk=7)
  original = lambda s, e: metrics.normalize_rerank_rows(full[s:e])[0][:, nq:]
  out = np.full(q_g.shape, np.nan, np.float32)
  for start, stop, rows in metrics.re_ranking_from_neighbours(idx, val, original, nq, k1=k1,
                                                             k2=k2, lambda_value=lam):
    out[start:stop] = rows
  return out, scale


@pytest.mark.parametrize('k1,k2,lam,rounded', [
    (20, 6, 0.3, False),
    (7, 3, 0.5, False),
    (5, 1, 0.0, False),
    (6, 4, 0.3, True),  # many ties in the neighbour lists
])
def test_topn_re_ranking_with_all_neighbours_equals_exact(k1, k2, lam, rounded):
  rng = np.random.default_rng(8)
  feats = rng.normal(size=(40, 5)).astype(np.float32)
  q_g, q_q, g_g = _split_distances(feats, 10)
  if rounded:
    q_g, q_q, g_g = (np.round(x, 0) for x in (q_g, q_q, g_g))
  exact = metrics.re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
  for top_n in (40, 100):  # N >= q + g
    got, _ = _topn_re_ranking(q_g, q_q, g_g, top_n, k1, k2, lam)
    np.testing.assert_array_equal(got, exact)


def test_topn_re_ranking_with_short_lists_stays_close_and_checks_its_input():
  rng = np.random.default_rng(9)
  feats = rng.normal(size=(60, 6)).astype(np.float32)
  q_g, q_q, g_g = _split_distances(feats, 12)
  exact = metrics.re_ranking(q_g, q_q, g_g, k1=6, k2=3)
  short, _ = _topn_re_ranking(q_g, q_q, g_g, 7, 6, 3, 0.3)  # k1 + 1: the shortest allowed
  assert not np.isnan(short).any()
  assert 0 < np.abs(short - exact).max() < 0.2  # far expansions dropped: close, not equal
  idx, val, _ = metrics.nearest_neighbours(lambda s, e: np.zeros((e - s, 60), np.float32), 60, 5)
  with pytest.raises(ValueError, match='rerank_topn'):
    next(metrics.re_ranking_from_neighbours(idx, val, None, 12, k1=6, k2=3))
  with pytest.raises(ValueError, match='num_query'):
    next(metrics.re_ranking_from_neighbours(idx, val, None, 60, k1=2, k2=3))
