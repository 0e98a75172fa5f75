"""A 2-block timm ViT registered as "mmray_vit_tiny", for tests and CPU runs of M2PT.

Like open_clip's "mmray-tiny" (`mmray.encoders.pretrained.register_tiny_clip`): real runs name a
timm ViT such as `vit_base_patch16_224`. Registered on demand by `register_tiny_vit`, so that
`timm.create_model("mmray_vit_tiny", **kwargs)` builds it anywhere (e.g. to load a merged
M2PT state dict into a fresh model).
"""

from __future__ import annotations

from torch import nn

__all__ = ["TINY_VIT", "mmray_vit_tiny", "register_tiny_vit"]

# Default shape; any timm VisionTransformer kwarg passed to create_model overrides it.
TINY_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def mmray_vit_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    """The timm entrypoint: VisionTransformer(**TINY_VIT | kwargs); no hub weights exist."""
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        raise ValueError("mmray_vit_tiny has no pretrained weights; load a local file instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # create_model's
        kwargs.pop(key, None)
    return VisionTransformer(**{**TINY_VIT, **kwargs})


def register_tiny_vit() -> None:
    import timm
    from timm.models import register_model

    if not timm.is_model("mmray_vit_tiny"):
        register_model(mmray_vit_tiny)
