"""OGFR trained on Market-1501, evaluated on Partial-REID (the standard cross-domain protocol:
Partial-REID has no training split).

Command:
  python -m ogfr_jax.main --config configs/partial_reid.py \
      --config.dataset.root=/data/Market-1501-v15.09.15 \
      --config.dataset.test_root=/data/Partial_REID --workdir runs/partial_reid

OGFR's published Partial-REID figure is not known to us; compare against the Market-1501-trained
baselines of the occluded-ReID literature. Needs ImageNet-pretrained ViT-B/16 weights.

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
  c.dataset.name = 'market1501'
  c.dataset.test_name = 'partial_reid'
  if arg.runlocal:
    config_defaults.shrink_for_local_run(c)
  return c
