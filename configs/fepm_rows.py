"""The purification controls: the README recipe (configs/synthetic.py) with the teacher's FEPM
off, replacing random tokens, driven by the agent, or replacing exactly the planted
contamination (the oracle upper bound).

Command (one run per row and seed; the table over seeds with benchmarks/ablation_table.py):
  python -m ogfr_jax.main --config configs/fepm_rows.py:row=agent --workdir runs/fepm/agent
  python benchmarks/ablation_table.py --config configs/fepm_rows.py --arg row \
      --steps none random agent oracle --seeds 0 1 2 --root runs/fepm

Machine and wall time: the project's 2-core CPU VM, about 2 min per row alone (40 epochs);
about 4 min on one core with the other busy.

Expected (one XLA:CPU thread per run): rows agent and oracle are the same configs as the ablation ladder's full and
fepm_oracle steps: student mAP 0.479 +- 0.013 and 0.493 +- 0.011 (seeds 0-2); with
`protocol=holdout` 0.350 +- 0.006 and 0.359 +- 0.011. Rows none and random: not measured at
this recipe (the ladder's kd and fepm_random, without pattern embeddings, score 0.485 +- 0.009
and 0.486 +- 0.015). docs/results.md ("The ladder at the README recipe").

Args: `row=none|random|agent|oracle`; `protocol=holdout` starts from
configs/synthetic_holdout.py (query occluder types never synthesised in training) instead;
`runlocal` for smoke tests.
"""

ROWS = ('none', 'random', 'agent', 'oracle')


def apply_row(c, row):
  if row not in ROWS:
    raise ValueError(f'unknown FEPM row {row!r}; one of {ROWS}')
  c.fepm.enabled = row != 'none'
  if row != 'none':
    c.fepm.selection = row
  return c


def _base(protocol, runlocal):
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  name = {'standard': 'synthetic.py', 'holdout': 'synthetic_holdout.py'}.get(protocol)
  if name is None:
    raise ValueError(f"protocol={protocol!r}: use 'standard' or 'holdout'")
  return config_defaults.sibling_config(__file__, name, 'runlocal' if runlocal else None)


def get_config(arg=None):
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  arg = config_defaults.parse_arg(arg, row='agent', protocol='standard', runlocal=False)
  return apply_row(_base(arg.protocol, arg.runlocal), arg.row)
