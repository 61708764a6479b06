"""OGFR on MSMT17 (ViT-B/16, overlapping stride 12, SIE, 120 epochs).

Command:
  python -m ogfr_jax.main --config configs/msmt17.py \
      --config.dataset.root=/data/MSMT17_V1 --workdir runs/msmt17

Reference: TransReID* (ViT-B, stride 12, SIE + JPM) as reported by TransReID: 85.3 Rank-1 / 67.4 mAP. OGFR's MSMT17 figure is not known to us.
Needs ImageNet-pretrained ViT-B/16 weights to approach these figures.

Machine and wall time: one GPU or TPU host; not run at full size yet. On CPU,
`benchmarks/rehearsal.py` measures every stage at this size and projects the run (README,
'What a run costs').

Expected: not measured: needs the dataset.

Args: `runlocal` shrinks the run to a few steps for a smoke test on one CPU.
"""

from ogfr_jax import config_defaults


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, runlocal=False)
  c = config_defaults.base_config()
  c.dataset.name = 'msmt17'
  if arg.runlocal:
    config_defaults.shrink_for_local_run(c)
  return c
