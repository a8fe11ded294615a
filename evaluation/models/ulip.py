"""ULIP with a Point-BERT point encoder and a SLIP ViT-B/16 image tower (``ULIP_PointBERT``).

Key for key and shape for shape the module layout of salesforce/ULIP's ``ULIP_PointBERT`` (the
ULIP-2 ``ULIP-2-PointBERT-8k-xyz-pc-slip_vit_b-objaverse-pretrained.pt`` checkpoint loads into it
strictly once the DDP ``module.`` prefix is removed):

* ``visual``: timm ``vit_base_patch16_224`` with ``num_classes=0`` (the CLS token after the final
  norm); ``image_projection`` 768 -> 512;
* ``point_encoder``: Point-BERT (512 groups x 32 points, mini-PointNet to 256, ``reduce_dim`` to
  384, 12 pre-norm blocks of 6 heads without qkv bias, positions added before *every* block,
  final LayerNorm, output = [CLS, max over groups] = 768); ``pc_projection`` 768 -> 512;
* the CLIP text tower (``token_embedding``, ``positional_embedding``, ``transformer``,
  ``ln_final``, ``text_projection``) and ``logit_scale`` — held so the checkpoint loads strictly;
  image–shape scoring does not run it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from know3d.evaluation.models.pointtok import Group, PointNetTokens, position_mlp


@dataclass(frozen=True)
class UlipConfig:
    vision_model: str = "vit_base_patch16_224"
    vision_overrides: dict = field(default_factory=dict)  # timm kwargs (debug sizes)
    vision_width: int = 768
    embed_dim: int = 512
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    group_size: int = 32
    num_group: int = 512
    encoder_dims: int = 256

    @classmethod
    def tiny(cls) -> UlipConfig:
        return cls(
            vision_overrides=dict(embed_dim=32, depth=1, num_heads=2),
            vision_width=32,
            embed_dim=16,
            context_length=8,
            vocab_size=64,
            transformer_width=16,
            transformer_heads=2,
            transformer_layers=1,
            trans_dim=32,
            depth=2,
            num_heads=2,
            group_size=8,
            num_group=16,
            encoder_dims=32,
        )


class PointBert(nn.Module):
    def __init__(self, cfg: UlipConfig) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.group_divider = Group(cfg.num_group, cfg.group_size)
        self.encoder = PointNetTokens(cfg.encoder_dims, in_channels=3)
        self.reduce_dim = nn.Linear(cfg.encoder_dims, cfg.trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, cfg.trans_dim))
        self.pos_embed = position_mlp(cfg.trans_dim)
        self.blocks = nn.Module()
        self.blocks.blocks = nn.ModuleList(
            [
                Block(cfg.trans_dim, cfg.num_heads, mlp_ratio=4.0, qkv_bias=False, norm_layer=nn.LayerNorm)
                for _ in range(cfg.depth)
            ]
        )
        self.norm = nn.LayerNorm(cfg.trans_dim)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        groups, centres = self.group_divider(xyz)
        tokens = self.reduce_dim(self.encoder(groups))
        batch = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centres)], dim=1)
        for block in self.blocks.blocks:
            x = block(x + pos)
        x = self.norm(x)
        return torch.cat([x[:, 0], x[:, 1:].max(dim=1).values], dim=-1)


class UlipPointBert(nn.Module):
    def __init__(self, cfg: UlipConfig = UlipConfig()) -> None:
        super().__init__()
        import timm
        from open_clip.transformer import Transformer

        self.cfg = cfg
        self.visual = timm.create_model(cfg.vision_model, pretrained=False, num_classes=0, **cfg.vision_overrides)
        self.image_projection = nn.Parameter(torch.empty(cfg.vision_width, cfg.embed_dim))
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers, cfg.transformer_heads)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = nn.LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.point_encoder = PointBert(cfg)
        self.pc_projection = nn.Parameter(torch.empty(2 * cfg.trans_dim, cfg.embed_dim))
        if not self.image_projection.is_meta:
            for p in (self.image_projection, self.text_projection, self.pc_projection):
                nn.init.normal_(p, std=p.shape[0] ** -0.5)
            nn.init.normal_(self.positional_embedding, std=0.01)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image) @ self.image_projection

    def encode_pc(self, xyz: torch.Tensor) -> torch.Tensor:
        return self.point_encoder(xyz) @ self.pc_projection

    def image_transform(self):
        """The benchmark's preprocessing: timm's eval transform for the image tower."""
        import timm.data

        data_cfg = timm.data.resolve_model_data_config(self.visual)
        return timm.data.create_transform(**data_cfg, is_training=False)
