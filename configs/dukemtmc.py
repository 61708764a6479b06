"""OGFR on DukeMTMC-reID (ViT-B/16, overlapping stride 12, SIE, 120 epochs).

Command:
  python -m ogfr_jax.main --config configs/dukemtmc.py \
      --config.dataset.root=/data/DukeMTMC-reID --workdir runs/dukemtmc

Reference: TransReID* (ViT-B, stride 12, SIE + JPM) as reported by TransReID: 90.7 Rank-1 / 82.0 mAP. OGFR's DukeMTMC-reID figure is not known to us.
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
  c.dataset.name = 'dukemtmc'
  if arg.runlocal:
    config_defaults.shrink_for_local_run(c)
  return c
