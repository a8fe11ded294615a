"""ULIP and Uni3D image–shape scores (HY3D-Bench protocol).

score = cos(normalize(encode_pc(points)), normalize(encode_image(image))) per uid, where
``points`` are the 8,192 FPS points of the normalized mesh (:mod:`know3d.evaluation.meshes`) and the
image is the condition image converted to RGB (no alpha compositing, as in the benchmark).
ULIP sees xyz; Uni3D sees xyz plus the constant colour 100/255.

Checkpoints are files given by path, read with ``torch.load(weights_only=True, mmap=True)`` or
safetensors, and loaded **strictly** into architectures built on the ``meta`` device: no random
initialization of billions of parameters, and the model takes over the loaded tensors instead of
copying them (entries the model does not use, e.g. the CLIP text tower, are dropped first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from know3d.evaluation.checkpoints import CheckpointError, read_checkpoint
from know3d.evaluation.models.ulip import UlipConfig as UlipArch
from know3d.evaluation.models.ulip import UlipPointBert
from know3d.evaluation.models.uni3d import UNI3D_COLOR, Uni3d, Uni3dModelConfig, clip_image_tower, clip_image_transform

WHERE = {
    "ulip": "https://huggingface.co/datasets/SFXX/ulip/resolve/main/ULIP-2/pretrained_models/"
    "ULIP-2-PointBERT-8k-xyz-pc-slip_vit_b-objaverse-pretrained.pt",
    "uni3d": "https://huggingface.co/BAAI/Uni3D/resolve/main/modelzoo/uni3d-g/model.pt",
    "clip": "https://huggingface.co/timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k/"
    "resolve/main/open_clip_pytorch_model.bin",
}
#: the eval config key (as ``--set`` takes it) and CLI flag of each checkpoint, named in hints
CHECKPOINT_KEYS = {
    "ulip": "semantic.ulip.checkpoint",
    "uni3d": "semantic.uni3d.checkpoint",
    "clip": "semantic.uni3d.clip_checkpoint",
}
CHECKPOINT_FLAGS = {"ulip": "--ulip-ckpt", "uni3d": "--uni3d-ckpt", "clip": "--clip-ckpt"}
# non-persistent buffers that are zeros by construction (timm EVA attention's fixed k bias)
_ZERO_BUFFERS = {"k_bias"}


def _check_path(path: str | Path | None, what: str) -> Path:
    if not path:
        raise CheckpointError(
            f"no {what} checkpoint given ({CHECKPOINT_FLAGS[what]} PATH or --set {CHECKPOINT_KEYS[what]}=PATH); "
            f"download it from {WHERE[what]} or pass --no-semantic to skip the ULIP/Uni3D scores"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint not found: {path} (download it from {WHERE[what]})")
    return path


def state_dict_of(ckpt: Any, entry: str | None, strip: str | None, path: Path) -> dict:
    if entry is not None and isinstance(ckpt, dict) and entry in ckpt:
        ckpt = ckpt[entry]
    elif entry is not None and not (isinstance(ckpt, dict) and all(hasattr(v, "shape") for v in ckpt.values())):
        raise CheckpointError(
            f"{path.name}: no '{entry}' entry (keys: {sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__})"
        )
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path.name}: not a state_dict")
    import torch

    odd = [k for k, v in ckpt.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(
            f"{path.name}: state_dict entries that are not tensors (e.g. {', '.join(map(str, odd[:3]))})"
        )
    if strip:
        ckpt = {k.removeprefix(strip): v for k, v in ckpt.items()}
    return ckpt


def load_strict(model: Any, state: dict, path: Path, device: str) -> Any:
    """Strict load into a meta-built model (assigning the loaded tensors), then move to ``device``."""
    import torch

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:2])})")
        raise CheckpointError(f"{path.name}: does not match the architecture: " + ", ".join(parts))
    state = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name not in _ZERO_BUFFERS:
                    raise CheckpointError(f"buffer '{name}' of {type(module).__name__} has no value after loading")
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
    return model.to(device).eval()


def resolve_device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def load_ulip(checkpoint: str | Path | None, arch: UlipArch | None = None, device: str = "cpu") -> UlipPointBert:
    import torch

    arch = arch or UlipArch()

    path = _check_path(checkpoint, "ulip")
    state = state_dict_of(read_checkpoint(path), "state_dict", "module.", path)
    with torch.device("meta"):
        model = UlipPointBert(arch)
    return load_strict(model, state, path, device)


def load_uni3d(
    checkpoint: str | Path | None,
    clip_checkpoint: str | Path | None,
    arch: Uni3dModelConfig | None = None,
    device: str = "cpu",
) -> tuple[Uni3d, Any]:
    import torch

    arch = arch or Uni3dModelConfig()
    path = _check_path(checkpoint, "uni3d")
    clip_path = _check_path(clip_checkpoint, "clip")
    state = state_dict_of(read_checkpoint(path), "module", "module.", path)
    clip_ckpt = read_checkpoint(clip_path)
    if isinstance(clip_ckpt, dict) and "state_dict" not in clip_ckpt:  # keep only the image tower
        clip_ckpt = {k: v for k, v in clip_ckpt.items() if str(k).startswith("visual.")} or clip_ckpt
    clip_state = state_dict_of(clip_ckpt, "state_dict", None, clip_path)
    visual = {k.removeprefix("visual."): v for k, v in clip_state.items() if k.startswith("visual.")}
    if not visual:
        raise CheckpointError(f"{clip_path.name}: no 'visual.*' weights (not an open_clip checkpoint)")
    with torch.device("meta"):
        model = Uni3d(arch)
        tower = clip_image_tower(arch)
    return load_strict(model, state, path, device), load_strict(tower, visual, clip_path, device)


def condition_image(path: Path, max_pixels: int) -> Image.Image:
    """The benchmark's ``Image.open(path).convert('RGB')``, with a decoding bound."""
    from know3d.evaluation.images import ImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{Path(path).name}: {w}x{h} pixels exceeds the decoding bound of {max_pixels}")
            return img.convert("RGB")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{Path(path).name}: file not found") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"{Path(path).name}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _cosine(a: Any, b: Any) -> float:
    import torch.nn.functional as F

    return float((F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1).item())


@dataclass
class ScorerSpec:
    """What to load: checkpoints plus the architecture size ('full' or 'tiny' for tests)."""

    ulip_checkpoint: str | None = None
    uni3d_checkpoint: str | None = None
    clip_checkpoint: str | None = None
    ulip: bool = True
    uni3d: bool = True
    arch: str = "full"
    uni3d_batchnorm: str = "batch"
    device: str = "auto"
    max_pixels: int = 4096 * 4096

    def check(self) -> None:
        """Fail fast (before any work) when an enabled model's checkpoint is missing."""
        if self.ulip:
            _check_path(self.ulip_checkpoint, "ulip")
        if self.uni3d:
            _check_path(self.uni3d_checkpoint, "uni3d")
            _check_path(self.clip_checkpoint, "clip")


class SemanticScorer:
    """Loads the enabled models (ULIP, Uni3D) once and scores (points, image) pairs.

    Raises :class:`CheckpointError` when a checkpoint is missing, unsafe or does not match."""

    def __init__(self, spec: ScorerSpec) -> None:
        import torch

        self.spec = spec
        self.device = resolve_device(spec.device)
        tiny = spec.arch == "tiny"
        self.ulip = self.uni3d = self.clip = None
        if spec.ulip:
            self.ulip = load_ulip(spec.ulip_checkpoint, UlipArch.tiny() if tiny else UlipArch(), self.device)
            self.ulip_transform = self.ulip.image_transform()
        if spec.uni3d:
            arch = Uni3dModelConfig.tiny() if tiny else Uni3dModelConfig()
            self.uni3d, self.clip = load_uni3d(spec.uni3d_checkpoint, spec.clip_checkpoint, arch, self.device)
            self.clip_transform = clip_image_transform(arch)
            if spec.uni3d_batchnorm == "batch":
                # HY3D-Bench never calls .eval() on Uni3D: its BatchNorms normalize with the
                # statistics of the cloud being scored. momentum=0 keeps the stored stats intact.
                for module in self.uni3d.modules():
                    if isinstance(module, torch.nn.BatchNorm1d):
                        module.train()
                        module.momentum = 0.0

    @property
    def metrics(self) -> list[str]:
        return [name for name, model in (("ulip", self.ulip), ("uni3d", self.uni3d)) if model is not None]

    def score(self, points: np.ndarray, image_path: Path) -> dict[str, float]:
        """Scores of one uid: ``points`` [N, 3] of the normalized mesh, the condition image path."""
        import torch

        image = condition_image(image_path, self.spec.max_pixels)
        xyz = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))[None].to(self.device)
        out: dict[str, float] = {}
        with torch.no_grad():
            if self.ulip is not None:
                img = self.ulip_transform(image)[None].to(self.device)
                out["ulip"] = _cosine(self.ulip.encode_pc(xyz), self.ulip.encode_image(img))
            if self.uni3d is not None:
                pc = torch.cat([xyz, torch.full_like(xyz, UNI3D_COLOR)], dim=-1)
                img = self.clip_transform(image)[None].to(self.device)
                out["uni3d"] = _cosine(self.uni3d.encode_pc(pc), self.clip(img))
        return out
