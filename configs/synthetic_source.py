"""Source-domain pretraining for the synthetic benchmark: the ImageNet stage of the real recipe.

What: on real data every OGFR row starts from an ImageNet-pretrained ViT. No such weights exist
for the tiny ViT of configs/synthetic.py, so this config trains one on a *different* synthetic
world (another generator seed: other identities, cameras and backgrounds; 400 identities),
student only, with no occlusion synthesis. Its student is then exported and loaded by the
rows that start from it:
  python -m ogfr_jax.main --config configs/synthetic_source.py --workdir runs/source
  python -m ogfr_jax.tools.convert --export_student runs/source --output runs/source.safetensors
  python -m ogfr_jax.main --config configs/synthetic.py --workdir runs/synthetic_pre \
      --config.init_from=runs/source.safetensors
`benchmarks/ablation_table.py --pretrain` runs these steps itself.

Command:
  python -m ogfr_jax.main --config configs/synthetic_source.py --workdir runs/source

Machine and wall time: the project's 2-core CPU VM; not measured at the current generator.

Expected: mAP 0.354 / rank-1 0.340 on its own test split (seed 0, 30 epochs, generator v2;
one seed only, docs/results.md "Figures").

Args: `runlocal` for smoke tests.
"""


def get_config(arg=None):
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  c = config_defaults.sibling_config(__file__, 'synthetic.py', arg)
  runlocal = 'runlocal' in str(arg or '')
  c.synthetic.seed = 1000  # another world: identities, cameras and backgrounds all differ
  if not runlocal:
    c.synthetic.num_train_ids = 400
    c.train.epochs = 30
    c.train.eval_every_epochs = 30
  # Student only, holistic images: what an ImageNet/ReID backbone would have seen.
  c.occlusion.enabled = False
  c.model.teacher = False
  c.fepm.enabled = False
  c.model.pattern_embed = False
  return c
