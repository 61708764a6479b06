"""Pretrained ViT weights in and out: ImageNet / ReID checkpoints -> the OGFR backbones, and the
trained student -> a timm-compatible safetensors file.

  readers   format detection and the readers (npz, torch without pickle code, safetensors,
            orbax), the allowlisting unpickler                           -> `Checkpoint`
  mapping   source names -> our ViT layout, position-embedding resampling, the import into
            an OGFR parameter tree and its `ImportReport`
  export    our backbone -> a timm `vit_*` state dict in safetensors

Every public name of the three modules is importable from `ogfr_jax.pretrained`.
"""

from ogfr_jax.pretrained.export import (EXTRA_PREFIX, LOSSY_KEY, PATTERN_TENSOR, SIE_TENSOR,
                                        SIE_WEIGHT_KEY, LossyExportError, check_lossless,
                                        export_timm_safetensors, lossy_parts, vit_to_timm,
                                        write_bytes_honouring_umask)
from ogfr_jax.pretrained.mapping import (PRETRAINED_SIZES, STATUSES, ImportReport, Row,
                                         _note_for, _timm_entries, header_lines, load_backbone,
                                         load_from_config, load_vit, log_report, map_vit,
                                         parse_grid, resample_pos_embed, source_pos_grid,
                                         to_vit_layout)
from ogfr_jax.pretrained.readers import (CONVERTED_METADATA, CONVERTED_PARAMS_DIR, FORMATS,
                                         GRID_KEY, Checkpoint, UnsafeCheckpointError,
                                         detect_format, read_checkpoint, read_npz, read_orbax,
                                         read_safetensors, read_torch, read_torch_safe,
                                         torch_available, unwrap_state_dict)
