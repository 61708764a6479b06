"""The purification controls: the README recipe (configs/synthetic.py) with the teacher's FEPM
off, replacing random tokens, driven by the agent, or replacing exactly the planted
contamination (the oracle upper bound).

Command (one run per row and seed; the table over seeds with benchmarks/ablation_table.py):
  python -m ogfr_jax.main --config configs/fepm_rows.py:row=agent --workdir runs/fepm/agent
  python benchmarks/ablation_table.py --config configs/fepm_rows.py --arg row \
      --steps none random agent oracle --seeds 0 1 2 --root runs/fepm

Machine and wall time: the project's 2-core CPU VM, about 2 min per row alone (40 epochs).

Expected: not measured at the current recipe (both ViTs from the source-pretrained start).
At the from-scratch recipe of commit 53213de, student mAP over seeds 0-2: at 40 epochs none
0.391 +- 0.016, agent 0.378 +- 0.013; at 20 epochs (`--config.train.epochs=20`) none 0.275 +-
0.014, random 0.271 +- 0.017, agent 0.271 +- 0.015, oracle 0.280 +- 0.017. docs/results.md
("Purification") has the teacher's and the selection's figures.

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
