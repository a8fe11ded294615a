"""Back-view training learns, end to end: a LoRA of the learning-capable debug model
(``debug:small-qwen-image-edit``) overfits four pairs under the real training body (DeepSpeed, the
latent cache built by Ray actors; the config's ``ray.launcher=local`` trains in this process, whose
losses equal Ray Train's: tests/test_feedback.py), is exported, loaded by diffusers' ``load_lora_weights`` and sampled by the pipeline's
own scheduler through ``know3d generate backview`` — and its back views land near the true ones,
far nearer than the front view (the baseline a model that learned nothing about backs would match)
and than the base model's samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from know3d.core.shards import resolve_shards
from know3d.pipeline.build import run_build
from know3d.pipeline.config import load_config
from know3d.training.data import decode_image
from know3d.training.debug_models import DEBUG_SMALL_EDIT_MODEL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
STEPS = 1000


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, ray_local) -> tuple[Path, list[dict]]:
    """The quickstart's procedural set (256² -> 64² in training); pair 0 of the first 4 annotated assets
    (the benchmark's pairs: benchmarks/overfit_backview.py)."""
    out = tmp_path_factory.mktemp("data") / "build"
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            f"output={out}",
            "source.kind=procedural",
            "shard.val_fraction=0",
            "mlflow.enabled=false",
            "ray.render_concurrency=2",
        ],
    )
    assert run_build(cfg).num_failed == 0
    chosen, assets = [], set()
    for sample in wds.WebDataset(sorted(resolve_shards([str(out)], "train")[0]), shardshuffle=False):
        meta = json.loads(sample["json"])
        if meta["pair_index"] == 0 and meta["asset_id"] not in assets and meta.get("components"):
            assets.add(meta["asset_id"])
            chosen.append({"key": sample["__key__"], "front": sample["front.png"], "back": sample["back.png"]})
    assert len(chosen) >= 4
    return out, chosen[:4]


def test_an_overfit_lora_generates_the_trained_back_views(pairs, tmp_path: Path):
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app
    from know3d.training.edit_model import EditModel, load_pipeline

    shards, chosen = pairs
    run = tmp_path / "run"
    from know3d.pipeline.train import run_train_backview
    from know3d.training.config import TrainBackviewConfig

    cfg = load_config(
        ROOT / "configs" / "backview_overfit.yaml",
        [
            f"output={run}",
            f"data.shards=[{shards}]",
            f"data.keys={json.dumps([p['key'] for p in chosen])}",
            "data.max_pairs=4",
            f"schedule.max_steps={STEPS}",
            f"schedule.checkpoint_every={STEPS}",
            # rank 32 instead of the config's 64: the step is matmul-bound, and 4 pairs need no more
            # (the benchmark's 4 pairs at 1000 steps: latent MSE 0.036 vs the front's 0.197;
            # benchmarks/RESULTS.md)
            "lora.rank=32",
            "lora.alpha=32",
            "mlflow.enabled=false",
        ],
        model=TrainBackviewConfig,
    )
    run_train_backview(cfg, fresh=True)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and np.mean(losses[-50:]) < 0.4 * np.mean(losses[:20]), losses[::20]

    images = []
    for i, p in enumerate(chosen):
        (tmp_path / f"front{i}.png").write_bytes(p["front"])
        images += ["--image", str(tmp_path / f"front{i}.png")]
    runner = CliRunner()
    for name, source in (("trained", ["--lora", str(run / "lora")]), ("base", ["--model", DEBUG_SMALL_EDIT_MODEL])):
        result = runner.invoke(
            app,
            [
                "generate",
                "backview",
                *source,
                *images,
                "--size",
                str(SIZE),
                "--steps",
                "12",
                "--cfg-scale",
                "1",
                "--output",
                str(tmp_path / name),
            ],
        )
        assert result.exit_code == 0, result.output

    model = EditModel(
        load_pipeline(DEBUG_SMALL_EDIT_MODEL, transformer=None, text_encoder=None),
        torch.device("cpu"),
        torch.float32,
        SIZE,
    )

    def latents(pngs: list[bytes]) -> torch.Tensor:
        return model.encode_images(torch.from_numpy(np.stack([decode_image(b, SIZE) for b in pngs])))

    def mse(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        return ((a - b) ** 2).flatten(1).mean(1).numpy()

    true = latents([p["back"] for p in chosen])
    front = mse(latents([p["front"] for p in chosen]), true)
    generated = {
        name: mse(latents([(tmp_path / name / f"front{i}.png").read_bytes() for i in range(len(chosen))]), true)
        for name in ("trained", "base")
    }
    # much nearer the true back than the front view is (on average: which assets come first depends
    # on their bytes, and a near-symmetric one has a front as close to its back as any sample), and,
    # per pair, than the base model's sample
    assert generated["trained"].mean() < 0.5 * front.mean(), (generated, front)
    assert (generated["trained"] < 0.25 * generated["base"]).all(), generated
