"""TRELLIS' sparse-structure VAE (dense conv3d, "ss_vae_conv3d_16l8"), checkpoint-compatible.

The structure follows TRELLIS v1 (reused unchanged by TRELLIS.2): a 64³ occupancy grid
``[B, 1, 64, 64, 64]`` is encoded to a ``[B, 8, 16, 16, 16]`` latent by

* ``input_layer``: Conv3d 3³ to ``channels[0]``;
* ``blocks``: per level ``num_res_blocks`` residual blocks, then (except after the last level) a
  2³ stride-2 Conv3d to the next level's width;
* ``middle_block``: ``num_res_blocks_middle`` residual blocks;
* ``out_layer``: channel LayerNorm, SiLU, Conv3d 3³ to ``2 * latent_channels`` (mean, logvar).

The decoder mirrors it: ``input_layer`` from the latent, ``middle_block``, ``blocks`` whose
upsampling is a Conv3d 3³ to ``8 * C_next`` channels followed by a 3D pixel shuffle, and
``out_layer`` to occupancy logits. Residual blocks are norm1-SiLU-conv1-norm2-SiLU-conv2 plus the
input; norms are LayerNorms over the channel axis computed in float32. The module names are those
of the released checkpoints, so ``state_dict()`` matches them key for key and shape for shape.

Loading (:func:`load_ss_vae`) reads safetensors only (never a pickle) and checks the keys
strictly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PARTS = ("encoder", "decoder")
# file-name prefixes of the released TRELLIS checkpoints (ckpts/ss_enc_conv3d_16l8_fp16.*)
_UPSTREAM_PREFIX = {"encoder": "ss_enc_", "decoder": "ss_dec_"}


class SSVaeLoadError(Exception):
    """A sparse-structure VAE checkpoint cannot be loaded; the message names the file and why."""


@dataclass(kw_only=True)
class SSVaeConfig:
    """One side of the VAE. ``channels`` runs from the occupancy grid to the latent for the
    encoder (upstream's encoder list); the decoder uses it reversed (upstream's decoder list)."""

    in_channels: int = 1  # occupancy channels (encoder input, decoder output)
    latent_channels: int = 8
    num_res_blocks: int = 2
    num_res_blocks_middle: int = 2
    channels: tuple[int, ...] = (32, 128, 512)
    resolution: int = 64  # occupancy grid side; latent side = resolution / 2**(len(channels) - 1)

    @classmethod
    def full(cls) -> SSVaeConfig:
        """``ss_vae_conv3d_16l8``: 64³ -> 8 x 16³ (the released TRELLIS checkpoints)."""
        return cls()

    @classmethod
    def debug(cls) -> SSVaeConfig:
        """CPU size: 32³ -> 8 x 16³, two levels of 8 and 32 channels, one block each."""
        return cls(num_res_blocks=1, num_res_blocks_middle=1, channels=(8, 32), resolution=32)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // 2 ** (len(self.channels) - 1)

    def encoder_args(self) -> dict:
        """The upstream ``SparseStructureEncoder`` constructor arguments."""
        return {
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "num_res_blocks": self.num_res_blocks,
            "num_res_blocks_middle": self.num_res_blocks_middle,
            "channels": list(self.channels),
        }

    def decoder_args(self) -> dict:
        """The upstream ``SparseStructureDecoder`` constructor arguments."""
        return {
            "out_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "num_res_blocks": self.num_res_blocks,
            "num_res_blocks_middle": self.num_res_blocks_middle,
            "channels": list(reversed(self.channels)),
        }

    def to_json(self) -> dict:
        out = asdict(self)
        out["channels"] = list(self.channels)
        return out

    @classmethod
    def from_json(cls, data: dict) -> SSVaeConfig:
        """Our own ``to_json`` or an upstream checkpoint json (``{"name": ..., "args": {...}}``)."""
        if "args" in data:
            args = data["args"]
            channels = list(args["channels"])
            if data.get("name", "").endswith("Decoder") or "out_channels" in args:
                channels = channels[::-1]
            return cls(
                in_channels=int(args.get("in_channels", args.get("out_channels", 1))),
                latent_channels=int(args["latent_channels"]),
                num_res_blocks=int(args["num_res_blocks"]),
                num_res_blocks_middle=int(args["num_res_blocks_middle"]),
                channels=tuple(channels),
                resolution=int(data.get("resolution", 64)),
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SS-VAE config fields: {', '.join(unknown)}")
        data = dict(data)
        if "channels" in data:
            data["channels"] = tuple(data["channels"])
        return cls(**data)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of ``[B, C, D, H, W]``, computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.movedim(1, -1).float()
        h = F.layer_norm(h, self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return h.movedim(-1, 1).to(x.dtype)


class ResBlock3d(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels)
        self.norm2 = ChannelLayerNorm(channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        if self.conv2.weight.device.type != "meta":  # residual branch starts at zero (as upstream)
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class Downsample3d(nn.Module):
    """2³ stride-2 convolution: halves each side."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def pixel_shuffle_3d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """``[B, C * f³, D, H, W] -> [B, C, D*f, H*f, W*f]``; channel index = c*f³ + a*f² + b*f + e."""
    b, c, d, h, w = x.shape
    out = c // factor**3
    x = x.reshape(b, out, factor, factor, factor, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, out, d * factor, h * factor, w * factor)


class Upsample3d(nn.Module):
    """3³ convolution to ``8 * out_channels`` then a 3D pixel shuffle: doubles each side."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


def _out_layer(channels: int, out: int) -> nn.Sequential:
    return nn.Sequential(ChannelLayerNorm(channels), nn.SiLU(), nn.Conv3d(channels, out, 3, padding=1))


class SSEncoder(nn.Module):
    """Occupancy ``[B, 1, R, R, R]`` -> latent ``[B, latent_channels, R/4, R/4, R/4]`` (full size)."""

    def __init__(self, cfg: SSVaeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = list(cfg.channels)
        self.input_layer = nn.Conv3d(cfg.in_channels, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(cfg.num_res_blocks)]
            if i + 1 < len(ch):
                blocks.append(Downsample3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[-1]) for _ in range(cfg.num_res_blocks_middle)])
        self.out_layer = _out_layer(ch[-1], 2 * cfg.latent_channels)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = False, return_raw: bool = False, generator=None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The posterior mean (``sample_posterior=False``, what targets use) or a sample
        ``mean + exp(logvar / 2) * eps``; ``return_raw`` also returns ``(mean, logvar)``."""
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h)
        h = self.out_layer(self.middle_block(h))
        mean, logvar = h.chunk(2, dim=1)
        z = mean
        if sample_posterior:
            std = torch.exp(0.5 * logvar)
            z = mean + std * torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
        if return_raw:
            return z, mean, logvar
        return z


class SSDecoder(nn.Module):
    """Latent ``[B, latent_channels, r, r, r]`` -> occupancy logits ``[B, 1, 4r, 4r, 4r]`` (full size)."""

    def __init__(self, cfg: SSVaeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = list(reversed(cfg.channels))
        self.input_layer = nn.Conv3d(cfg.latent_channels, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[0]) for _ in range(cfg.num_res_blocks_middle)])
        blocks: list[nn.Module] = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(cfg.num_res_blocks)]
            if i + 1 < len(ch):
                blocks.append(Upsample3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = _out_layer(ch[-1], cfg.in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.middle_block(self.input_layer(z))
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h)


@dataclass
class SSVae:
    """Both halves, for round trips."""

    encoder: SSEncoder
    decoder: SSDecoder
    cfg: SSVaeConfig = field(default_factory=SSVaeConfig)

    @torch.no_grad()
    def reconstruct(self, occupancy: torch.Tensor) -> torch.Tensor:
        """Occupancy ``[B, 1, R, R, R]`` (0/1) -> logits through the posterior mean."""
        return self.decoder(self.encoder(occupancy.float()))


def build(part: str, cfg: SSVaeConfig) -> nn.Module:
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    return SSEncoder(cfg) if part == "encoder" else SSDecoder(cfg)


# --------------------------------------------------------------------------- files


def save_ss_vae(module: SSEncoder | SSDecoder, folder: Path, part: str) -> Path:
    """``<folder>/<part>.safetensors`` + ``<part>.json`` (the config); returns the weights path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    path = folder / f"{part}.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "part": part})
    (folder / f"{part}.json").write_text(json.dumps(module.cfg.to_json(), indent=2) + "\n")
    return path


def _find_files(folder: Path, part: str) -> tuple[Path, Path | None]:
    """(weights, config or None) of ``part`` in ``folder``: ``<part>.safetensors`` or the upstream
    ``ss_enc_*`` / ``ss_dec_*`` names, also under ``ckpts/``."""
    prefix = _UPSTREAM_PREFIX[part]
    candidates = [folder / f"{part}.safetensors"]
    for sub in (folder, folder / "ckpts"):
        if sub.is_dir():
            candidates += sorted(sub.glob(f"{prefix}*.safetensors"))
    weights = next((p for p in candidates if p.is_file()), None)
    if weights is None:
        raise SSVaeLoadError(
            f"{folder}: no {part} safetensors ({part}.safetensors or {prefix}*.safetensors); "
            "only safetensors checkpoints are loaded"
        )
    config = weights.with_suffix(".json")
    return weights, config if config.is_file() else None


def _resolve(source: str | Path, part: str) -> Path:
    """A local folder/file, or a Hugging Face hub id whose ``part`` files are downloaded."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise SSVaeLoadError(f"{source}: no such file or folder (and not a hub id 'owner/name')")
    from huggingface_hub import snapshot_download

    prefix = _UPSTREAM_PREFIX[part]
    patterns = [f"{part}.*", f"{prefix}*", f"ckpts/{prefix}*"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - network/hub errors become one clear line
        raise SSVaeLoadError(
            f"{source}: cannot download the {part} from the hub ({type(exc).__name__}: {exc})"
        ) from None


def load_ss_vae(
    source: str | Path, part: str = "encoder", cfg: SSVaeConfig | None = None, device: str | torch.device = "cpu"
) -> SSEncoder | SSDecoder:
    """The ``part`` ("encoder" or "decoder") from a folder, a ``.safetensors`` file or a hub id.

    The config comes from ``cfg``, else the json next to the weights (ours or upstream's
    ``{"name", "args"}``), else the full ``ss_vae_conv3d_16l8`` size. Keys are checked strictly;
    a mismatch raises :class:`SSVaeLoadError` naming the file and the missing/unexpected keys.
    The module is returned in eval mode, float32."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    path = _resolve(source, part)
    if path.is_dir():
        weights, config = _find_files(path, part)
    elif path.suffix == ".safetensors":
        weights, config = path, path.with_suffix(".json") if path.with_suffix(".json").is_file() else None
    else:
        raise SSVaeLoadError(f"{path}: not a .safetensors file (pickled checkpoints are never loaded)")
    if cfg is None:
        cfg = SSVaeConfig.from_json(json.loads(config.read_text())) if config else SSVaeConfig.full()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise SSVaeLoadError(f"{weights}: unreadable safetensors ({exc})") from None
    module = build(part, cfg)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{name} {len(keys)}: {', '.join(keys[:5])}{more}")
        raise SSVaeLoadError(f"{weights}: not an SS-VAE {part} of this config; " + "; ".join(parts))
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return module.to(device).eval()
