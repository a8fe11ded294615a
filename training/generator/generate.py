"""``know3d generate shape``: front view (+ optional description of the back) -> back view -> H ->
sparse structure (stage 1) -> shape structured latent (stage 2) -> mesh, with trained generators.

1. The frozen back-view model (base + ``--backview-lora``) generates the back view from the front
   view and the prompt (the instruction, plus "The back shows <description>." when one is given),
   capturing H on the way at the generator's capture settings (layers, fraction, pooling — read
   from the generator's metadata, so H is what it was trained on). The whole sampler runs here:
   the user gets the back view too.
2. The front's DINOv3 tokens and the condition (H, or the ablation variant the generator was
   trained with) drive the Euler CFG sampler (TRELLIS.2's defaults, EMA weights).
3. The SS decoder turns the latent into occupancy (logits > 0).
4. With a stage-2 generator (``--shape-generator``): the occupancy, max-pooled to the shape latent
   grid as upstream does (64 -> 32 for the 512 model; 32 -> 16 at debug size), is the structure on
   which the SLat flow samples the shape latent (same front tokens and H); the shape SC-VAE decodes
   it to a flexible dual grid and :func:`~know3d.training.generator.dual_grid.dual_grid_to_mesh`
   extracts the mesh. Without one, marching cubes on the occupancy gives a coarse mesh.
5. Front-partial guidance (Consistent3DGen, ``front_guidance``): the input view's point map
   (rendered depth + its camera, or VGGT) -> front sheet -> thin band -> the shape SC-VAE and SS-VAE
   latents of its front half; stage 1 starts from the front latent and both stages are pulled
   towards it on the visible region (:mod:`~know3d.training.generator.front_guidance`); stage 2
   samples on stage 1's structure united with the front's coordinates. Needs the stage-2 generator
   (its SC-VAE encodes the front). ``front.npz`` holds the point map's valid points.
6. The multi-view baseline (paper §4.2, ``multiview="stochastic"|"multidiffusion"``): instead of H,
   the generated back view's DINOv3 tokens become a second image condition beside the front's
   (TRELLIS's multi-image mode, :class:`~know3d.training.generator.flow.MultiImage`), for
   generators trained without the branch (``model.condition: none``).

Outputs in ``--output``: ``back.png``, ``occupancy.npz`` (``grid`` bool [R, R, R], ``coords``,
Z-up TRELLIS convention), ``mesh.glb`` (glTF Y-up, in the unit cube) and ``shape.json`` (settings,
counts and per-stage seconds). An empty structure gives no mesh (``mesh: null`` and the reason),
never a crash. :class:`ShapeGenerator` loads everything once for many images (batch generation).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from know3d.core.io import atomic_write
from know3d.training.generator.config import HiddenStatesConfig, SamplerConfig
from know3d.training.generator.front_guidance import (
    FrontGuidanceConfig,
    FrontGuidanceError,
    FrontView,
    GuidedEulerSampler,
    union_coords,
)
from know3d.training.generator.model import load_decoder, load_generator
from know3d.training.generator.occupancy import occupancy_mesh
from know3d.training.prompting import build_prompt


def backview_settings(meta: dict, backview_lora: Path | None, multiview: bool = False) -> HiddenStatesConfig:
    """The capture settings the generator was trained with, asking for what inference needs: its
    condition's variant plus ``vae_latent`` (the finished back view, decoded for the user), plus
    ``dino_back`` for the multi-view baseline."""
    from know3d.training.generate import read_lora_meta

    fields = dict(meta["hidden"])
    wanted = {"hidden": ["hidden"], "vae_latent": [], "dino_back": ["dino_back"], "none": []}[meta["condition"]]
    if multiview and "dino_back" not in wanted:
        wanted = [*wanted, "dino_back"]
    fields.update(variants=[*wanted, "vae_latent"])
    if backview_lora is not None:
        read_lora_meta(backview_lora)  # a folder without the LoRA file: a short error, before loading
        fields["lora"] = str(backview_lora)
    return HiddenStatesConfig.model_validate(fields)


def backview_and_condition(
    pipe, hcfg: HiddenStatesConfig, front: Path, prompt: str | None, condition: str, dino, seed: int
) -> tuple[np.ndarray, torch.Tensor | None, str, torch.Tensor | None]:
    """(generated back view [3, H, W] in [-1, 1], the condition [1, T, C] or None, the prompt,
    the back view's DINOv3 tokens [1, N, D] when the settings ask for them, else None)."""
    from know3d.training.generate import load_front
    from know3d.training.generator.hidden_states import capture, decode_packed

    text = build_prompt(prompt, hcfg.instruction)
    out = capture(pipe, load_front(front, hcfg.image_size), text, hcfg, seed=seed, dino=dino)
    back = decode_packed(pipe, out["vae_latent"][None], out["grid"])
    tensor = None if condition == "none" else out[condition][None]
    back_tokens = out["dino_back"][None] if "dino_back" in out else None
    return back, tensor, text, back_tokens


MIN_MASK_PIXELS = 16


def check_front(path: Path) -> None:
    """A front view must be an image with an alpha channel whose mask is not empty (the object on
    transparency, as rendered); otherwise a ``ValueError`` naming the file."""
    from know3d.training.generate import read_image

    def alpha(img):
        if not (img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info):
            return None
        return np.asarray(img.convert("RGBA"))[..., 3]

    path = Path(path)
    mask = read_image(path, alpha)
    if mask is None:
        raise ValueError(f"{path}: no alpha channel (give the object on a transparent background)")
    if int((mask > 127).sum()) < MIN_MASK_PIXELS:
        raise ValueError(f"{path}: the alpha mask is empty (no object pixels)")


def pooled_structure(grid: np.ndarray, resolution: int) -> np.ndarray:
    """Stage 1's occupancy ``[R]³`` -> the coordinates ``[M, 3]`` of the shape latent grid
    ``resolution``³ (max-pool by ``R // resolution``, TRELLIS.2's ``sample_sparse_structure``)."""
    size = grid.shape[0]
    if size % resolution:
        raise ValueError(f"stage-1 grid {size}³ is not a multiple of the shape latent grid {resolution}³")
    f = size // resolution
    pooled = np.asarray(grid, bool).reshape(resolution, f, resolution, f, resolution, f).any(axis=(1, 3, 5))
    return np.argwhere(pooled)


def dual_grid_glb(grid, resolution: int) -> bytes:
    """GLB of the mesh extracted from a decoded dual grid (Z-up unit cube -> glTF Y-up)."""
    import trimesh

    from know3d.training.generator.dual_grid import dual_grid_to_mesh
    from know3d.training.generator.occupancy import GLTF_TO_ZUP

    vertices, faces = dual_grid_to_mesh(grid, resolution)
    if not len(faces):
        raise ValueError("the decoded dual grid holds no surface")
    mesh = trimesh.Trimesh(vertices=np.asarray(vertices) @ GLTF_TO_ZUP, faces=faces, process=True)
    return mesh.export(file_type="glb")


class ShapeGenerator:
    """The loaded chain (back-view model, stage-1 generator and decoder, optional stage-2 generator
    and shape SC-VAE, DINOv3): :meth:`run` one front view at a time, many times."""

    def __init__(
        self,
        generator: Path,
        shape_generator: Path | None = None,
        backview_lora: Path | None = None,
        sampler: dict[str, Any] | None = None,
        shape_sampler: dict[str, Any] | None = None,
        device: str | None = None,
        multiview: str | None = None,
        front_guidance: FrontGuidanceConfig | dict[str, Any] | None = None,
    ) -> None:
        from know3d.training.generator.dino import front_features
        from know3d.training.generator.model import GeneratorLoadError, load_shape_codec

        started = time.perf_counter()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backview_lora = backview_lora
        self.model, self.meta = load_generator(generator, self.device)
        if self.meta["model"].get("stage", "ss") != "ss":
            raise GeneratorLoadError(f"{generator}: a stage-2 generator; pass it as the shape generator")
        self.decoder = load_decoder(self.meta["model"]["ss_decoder"], self.device)
        self.dino = front_features(
            self.meta["model"]["dino"], self.meta["model"]["dino_resolution"], device=self.device
        )
        self.settings = SamplerConfig.model_validate({**self.meta["sampler"], **(sampler or {})})
        self.shape_model = self.shape_meta = self.codec = None
        if shape_generator is not None:
            self.shape_model, self.shape_meta = load_generator(shape_generator, self.device)
            m = self.shape_meta["model"]
            if m.get("stage") != "shape":
                raise GeneratorLoadError(f"{shape_generator}: not a stage-2 (shape) generator")
            for field in ("dino", "dino_resolution"):
                if m[field] != self.meta["model"][field]:
                    raise GeneratorLoadError(
                        f"{shape_generator}: trained with {field}={m[field]!r}, stage 1 with {self.meta['model'][field]!r}"
                    )
            if self.shape_meta["condition"] != "none" and (
                self.shape_meta["condition"] != self.meta["condition"]
                or self.shape_meta["hidden"] != self.meta["hidden"]
            ):
                raise GeneratorLoadError(
                    f"{shape_generator}: its condition ({self.shape_meta['condition']}) was captured with other "
                    f"settings than stage 1's ({self.meta['condition']}); train both on the same hidden-state cache"
                )
            self.codec = load_shape_codec(m["shape_vae"], self.device)
            self.shape_settings = SamplerConfig.model_validate({**self.shape_meta["sampler"], **(shape_sampler or {})})
        from know3d.training.generator.hidden_states import load_backview_pipeline

        self.multiview = multiview
        if multiview is not None:
            from know3d.training.generator.flow import MultiImage

            MultiImage(self.model, multiview)  # checks the mode
            for folder, meta in ((generator, self.meta), (shape_generator, self.shape_meta)):
                if meta is not None and meta["condition"] != "none":
                    raise GeneratorLoadError(
                        f"{folder}: the multi-view baseline conditions on images only; this generator reads "
                        f"'{meta['condition']}' (use one trained with model.condition=none)"
                    )
        self.front_guidance = None
        if front_guidance is not None:
            self._load_front_guidance(front_guidance)
        self.hcfg = backview_settings(self.meta, backview_lora, multiview is not None)
        self.pipe = load_backview_pipeline(self.hcfg, self.device)
        self.load_seconds = time.perf_counter() - started

    def _load_front_guidance(self, cfg: FrontGuidanceConfig | dict[str, Any]) -> None:
        """The encoders that turn the front into latents (the stage-2 generator's shape SC-VAE, stage
        1's SS-VAE) and, for the ``vggt`` source, VGGT."""
        from know3d.training.generator.model import GeneratorLoadError
        from know3d.training.generator.shape_vae import ShapeVAELoadError, load_shape_vae

        cfg = cfg if isinstance(cfg, FrontGuidanceConfig) else FrontGuidanceConfig.model_validate(cfg)
        if self.shape_model is None:
            raise GeneratorLoadError(
                "front guidance needs the stage-2 generator (--shape-generator): its shape SC-VAE encodes the front"
            )
        try:
            self.shape_encoder = load_shape_vae(self.shape_meta["model"]["shape_vae"], ("encoder",), self.device)
        except ShapeVAELoadError as exc:
            raise GeneratorLoadError(str(exc)) from None
        self.ss_encoder = load_decoder(self.meta["model"]["ss_decoder"], self.device, part="encoder")
        for what, have, want in (
            ("shape SC-VAE latent grid", self.shape_encoder.latent_resolution, self.shape_model.cfg.resolution),
            ("SS-VAE latent grid", self.ss_encoder.cfg.latent_resolution, self.model.cfg.resolution),
            ("SS-VAE latent channels", self.ss_encoder.cfg.latent_channels, self.model.cfg.in_channels),
        ):
            if int(have) != int(want):
                raise GeneratorLoadError(f"front guidance: the {what} is {have}, the generator's {want}")
        self.vggt = None
        if cfg.source == "vggt":
            from know3d.training.generator.vggt import load_vggt

            self.vggt = load_vggt(cfg.vggt_model, self.device)
        self.front_guidance = cfg

    def front_targets(
        self, image: Path, front: FrontView | dict[str, Any] | None = None, cfg: FrontGuidanceConfig | None = None
    ):
        """``(FrontTargets, valid points [N, 3], view_dir [3])`` of the front view ``image``; ``front``:
        its :class:`FrontView`, or the files (``depth``, ``camera``, ``view``) of
        :func:`~.front_guidance.read_front_view` (default: a rendered view's own files); ``cfg``:
        default the chain's settings."""
        from know3d.training.generator.front_guidance import (
            camera_view_dir,
            front_pointmap,
            front_targets,
            read_front_view,
            valid_pixels,
        )

        cfg = cfg or self.front_guidance
        view = front if isinstance(front, FrontView) else read_front_view(image, cfg.source, **(front or {}))
        try:
            points, conf = front_pointmap(cfg, view.camera, depth=view.depth, image=image, vggt_model=self.vggt)
            direction = camera_view_dir(view.camera)
            targets = front_targets(points, conf, direction, self.shape_encoder, self.ss_encoder, cfg)
        except FrontGuidanceError as exc:
            raise FrontGuidanceError(f"{view.depth_file or image}: {exc}") from None
        targets.info.update(camera_file=view.camera_file, depth_file=view.depth_file)
        return targets, points[valid_pixels(points, conf, cfg.conf_threshold)], direction

    @torch.no_grad()
    def run(
        self,
        image: Path,
        output: Path,
        prompt: str | None = None,
        seed: int = 0,
        front: FrontView | dict[str, Any] | None = None,
        guidance: FrontGuidanceConfig | bool = True,
    ) -> dict[str, Any]:
        """One front view -> files in ``output``; returns the summary written to ``shape.json``.
        ``front``: the front view's depth / camera for front guidance (see :meth:`front_targets`);
        ``guidance``: True = the chain's front-guidance settings, False = unguided, or other settings
        of the same source (a lambda sweep on one loaded chain)."""
        from know3d.training.edit_model import to_pil
        from know3d.training.generator.flow import EulerCfgSampler, SparseSample

        image, output = Path(image), Path(output)
        check_front(image)
        seconds: dict[str, float] = {}
        fg = self.front_guidance if guidance is True else (guidance or None)
        if fg is not None and (self.front_guidance is None or fg.source != self.front_guidance.source):
            raise ValueError("front guidance: load the chain with front guidance of this source first")
        targets, guidance = None, None
        if fg is not None:
            clock = time.perf_counter()
            guidance = {**fg.model_dump(mode="json"), "unguided_reason": None}
            try:
                targets, front_points, view_dir = self.front_targets(image, front, fg)
            except FrontGuidanceError as exc:
                if fg.on_bad_front == "error":
                    raise
                warnings.warn(f"front guidance off: {exc}", stacklevel=2)
                guidance["unguided_reason"] = str(exc)
            else:
                guidance["targets"] = targets.info
            seconds["front_targets"] = time.perf_counter() - clock
        clock = time.perf_counter()
        back, condition, text, back_tokens = backview_and_condition(
            self.pipe, self.hcfg, image, prompt, self.meta["condition"], self.dino, seed
        )
        seconds["backview_and_condition"] = time.perf_counter() - clock
        clock = time.perf_counter()
        cond = self.dino.encode([image]).to(self.device)

        def conditioned(model):
            """The model as the sampler calls it: front + back views as two image conditions in
            the multi-view baseline (cond [2, T, D]), else as it is."""
            if self.multiview is None:
                return model
            from know3d.training.generator.flow import MultiImage

            return MultiImage(model, self.multiview)

        if self.multiview is not None:
            cond = torch.cat([cond, back_tokens.to(self.device, cond.dtype)])
        gen = torch.Generator(device=self.device).manual_seed(seed)
        cfg = self.model.cfg
        noise = torch.randn((1, cfg.in_channels, *(cfg.resolution,) * 3), generator=gen, device=self.device)
        hidden = None if condition is None else condition.to(self.device)
        if targets is None:
            sampler = EulerCfgSampler(self.settings, sigma_min=self.meta["sigma_min"])
        else:
            sampler = GuidedEulerSampler.for_stage(
                "ss", self.settings, fg, *targets.ss_guidance(), sigma_min=self.meta["sigma_min"]
            )
        result = sampler.sample(conditioned(self.model), noise, cond, hidden)
        latent = result.samples
        if targets is not None:
            guidance["residual_ss"] = [round(r, 5) for r in result.residual]
        grid = (self.decoder(latent.float())[0, 0] > 0).cpu().numpy()
        seconds["stage1"] = time.perf_counter() - clock

        output.mkdir(parents=True, exist_ok=True)
        to_pil(back).save(output / "back.png")
        if targets is not None:
            atomic_write(output / "front.npz", _npz(points=front_points.astype(np.float32), view_dir=view_dir))
            guidance["points"] = str(output / "front.npz")
        buffer = _npz(grid=grid, coords=np.argwhere(grid).astype(np.int16), resolution=np.int64(grid.shape[0]))
        atomic_write(output / "occupancy.npz", buffer)
        summary: dict[str, Any] = {
            "image": str(image),
            "prompt": text,
            "seed": seed,
            "condition": self.meta["condition"],
            "multiview": self.multiview,
            "sampler": self.settings.model_dump(mode="json"),
            "occupied_voxels": int(grid.sum()),
            "back": str(output / "back.png"),
            "occupancy": str(output / "occupancy.npz"),
            "mesh": None,
            "mesh_from": None,
            "stage2": self.shape_model is not None,
            "front_guidance": guidance,
        }
        mesh_bytes, reason = None, None
        clock = time.perf_counter()
        front_only = targets is not None and fg.union_coords  # stage 2 also samples on the front's voxels
        if not grid.any() and not front_only:
            reason = "stage 1 produced an empty sparse structure"
        elif self.shape_model is None:
            mesh_bytes = occupancy_mesh(grid).export(file_type="glb")
            summary["mesh_from"] = "occupancy"
        else:
            structure = pooled_structure(grid, self.shape_model.cfg.resolution)
            if targets is not None and fg.union_coords:
                structure = union_coords(structure, targets.shape_coords)
            coords = torch.from_numpy(structure)
            hidden2 = None if self.shape_meta["condition"] == "none" else hidden
            noise = torch.randn((1, len(coords), self.shape_model.cfg.in_channels), generator=gen, device=self.device)
            sigma_min = self.shape_meta["sigma_min"]
            if targets is None:
                sampler2 = EulerCfgSampler(self.shape_settings, sigma_min=sigma_min)
            else:
                pair = targets.shape_guidance(coords)
                sampler2 = GuidedEulerSampler.for_stage("shape", self.shape_settings, fg, *pair, sigma_min=sigma_min)
            wrapped = conditioned(SparseSample(self.shape_model, coords.to(self.device)))
            result2 = sampler2.sample(wrapped, noise, cond, hidden2)
            feats = result2.samples[0].float()
            if targets is not None:
                guidance["residual_shape"] = [round(r, 5) for r in result2.residual]
            seconds["stage2"] = time.perf_counter() - clock
            clock = time.perf_counter()
            fine = self.codec.decode(coords, feats)
            summary.update(
                latent_voxels=len(coords), dual_grid_voxels=len(fine), shape_sampler=self.shape_settings.model_dump()
            )
            try:
                mesh_bytes = dual_grid_glb(fine, self.codec.resolution)
                summary["mesh_from"] = "dual_grid"
            except ValueError as exc:
                reason = str(exc)
        if mesh_bytes is not None:
            atomic_write(output / "mesh.glb", mesh_bytes)
            summary["mesh"] = str(output / "mesh.glb")
        summary["no_mesh_reason"] = reason
        seconds["mesh"] = time.perf_counter() - clock
        summary["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        atomic_write(output / "shape.json", json.dumps(summary, indent=1))
        return summary


def generate_shape(
    image: Path,
    generator: Path,
    output: Path,
    prompt: str | None = None,
    backview_lora: Path | None = None,
    seed: int = 0,
    sampler: dict[str, Any] | None = None,
    device: str | None = None,
    shape_generator: Path | None = None,
    shape_sampler: dict[str, Any] | None = None,
    multiview: str | None = None,
    front_guidance: FrontGuidanceConfig | dict[str, Any] | None = None,
    front: FrontView | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the chain for one front view; returns where the files are and a summary."""
    chain = ShapeGenerator(
        generator, shape_generator, backview_lora, sampler, shape_sampler, device, multiview, front_guidance
    )
    return chain.run(Path(image), Path(output), prompt, seed, front)


def _npz(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()
