"""OGFR models: the ReID ViT backbone (`vit`), the purification agent and token replacement
(`fepm`), and the teacher + student module (`ogfr`)."""

from ogfr_jax.models.ogfr import OGFR
from ogfr_jax.models.ogfr import backbone_names
from ogfr_jax.models.ogfr import fepm_layer
from ogfr_jax.models.ogfr import token_grid
from ogfr_jax.models.vit import resize_pos_embed

__all__ = ['OGFR', 'backbone_names', 'fepm_layer', 'resize_pos_embed', 'token_grid']
