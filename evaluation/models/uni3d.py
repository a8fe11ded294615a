"""Uni3D-g point encoder and its OpenCLIP EVA02-E-14-plus image tower.

Module layout of baaivision/Uni3D's ``create_uni3d`` for the giant model (what
``checkpoint['module']`` of ``modelzoo/uni3d-g/model.pt`` holds, loaded strictly):

* ``point_encoder``: 512 groups x 64 points of xyz + rgb (6 channels) -> mini-PointNet to 512
  (``pc_encoder_dim``) -> ``encoder2trans`` 512 -> 1408; CLS token and a position MLP, positions
  added **once**; the 40 blocks of timm's ``eva_giant_patch14_560`` (registered whole as
  ``visual``: its patch embedding, position table and 1000-way head are stored but unused);
  ``visual.norm`` then ``visual.fc_norm`` on the CLS token; ``trans2embed`` 1408 -> 1024.
* ``logit_scale``.

The image tower is open_clip's ``TimmModel`` for ``EVA02-E-14-plus`` (timm
``eva02_enormous_patch14_clip_224``, token pool, no extra projection: ``trunk.head`` maps
1792 -> 1024), loaded from the ``visual.*`` entries of open_clip's weight file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from know3d.evaluation.models.pointtok import Group, PointNetTokens, position_mlp

UNI3D_COLOR = 100.0 / 255.0  # the constant RGB HY3D-Bench gives every point


@dataclass(frozen=True)
class Uni3dModelConfig:
    pc_model: str = "eva_giant_patch14_560"
    pc_model_overrides: dict = field(default_factory=dict)  # timm kwargs (debug sizes)
    pc_feat_dim: int = 1408
    embed_dim: int = 1024
    group_size: int = 64
    num_group: int = 512
    pc_encoder_dim: int = 512
    clip_model: str = "eva02_enormous_patch14_clip_224"
    clip_image_size: int = 224

    @classmethod
    def tiny(cls) -> Uni3dModelConfig:
        return cls(
            pc_model_overrides=dict(embed_dim=32, depth=2, num_heads=2, img_size=28),
            pc_feat_dim=32,
            embed_dim=16,
            group_size=8,
            num_group=16,
            pc_encoder_dim=32,
            clip_model="vit_tiny_patch16_224",  # no computed (RoPE) buffers, like the full tower
        )


class PointcloudEncoder(nn.Module):
    def __init__(self, cfg: Uni3dModelConfig) -> None:
        super().__init__()
        import timm

        self.group_divider = Group(cfg.num_group, cfg.group_size)
        self.encoder = PointNetTokens(cfg.pc_encoder_dim, in_channels=6)
        self.encoder2trans = nn.Linear(cfg.pc_encoder_dim, cfg.pc_feat_dim)
        self.trans2embed = nn.Linear(cfg.pc_feat_dim, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.pc_feat_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, cfg.pc_feat_dim))
        self.pos_embed = position_mlp(cfg.pc_feat_dim)
        self.visual = timm.create_model(cfg.pc_model, pretrained=False, drop_path_rate=0.0, **cfg.pc_model_overrides)

    def forward(self, xyz: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        groups, centres = self.group_divider(xyz, colors)
        tokens = self.encoder2trans(self.encoder(groups))
        batch = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centres)], dim=1)
        x = self.visual.pos_drop(x + pos)
        for block in self.visual.blocks:
            x = block(x)
        x = self.visual.fc_norm(self.visual.norm(x[:, 0, :]))
        return self.trans2embed(x)


class Uni3d(nn.Module):
    def __init__(self, cfg: Uni3dModelConfig = Uni3dModelConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.point_encoder = PointcloudEncoder(cfg)

    def encode_pc(self, pc: torch.Tensor) -> torch.Tensor:
        """pc [B, N, 6] (xyz, rgb)."""
        return self.point_encoder(pc[..., :3].contiguous(), pc[..., 3:].contiguous())


def clip_image_tower(cfg: Uni3dModelConfig) -> nn.Module:
    """open_clip's timm image tower of EVA02-E-14-plus (keys ``trunk.*``)."""
    from open_clip.timm_model import TimmModel

    return TimmModel(
        cfg.clip_model,
        embed_dim=cfg.embed_dim,
        image_size=cfg.clip_image_size,
        pool="token",
        proj=None,
        pretrained=False,
    )


def clip_image_transform(cfg: Uni3dModelConfig):
    """open_clip's eval preprocessing for the tower (resize shortest side, centre crop, OpenAI stats)."""
    import open_clip

    return open_clip.image_transform(
        cfg.clip_image_size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
