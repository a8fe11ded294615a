"""Does back-view training learn? Overfit K pairs, export, generate through the CLI (issue 11).

1. picks K training pairs of a data build (distinct assets, each with an annotated description);
2. ``know3d generate backview`` with the *base* model (no LoRA) on their front views;
3. ``know3d train backview configs/backview_overfit.yaml`` on exactly those pairs (``data.keys``);
4. ``know3d generate backview --lora <run>/lora`` on the same fronts, without and with each
   pair's description (exported LoRA, ``load_lora_weights``, the pipeline's own scheduler);
5. prints, per pair and on average: latent MSE of the generated back vs the true back (the
   model's VAE, normalized latents) and its ratio to the base model's; PSNR/SSIM of the generated
   back, of the base model's and of the front view used as the prediction, all vs the true back
   at the training resolution; how much the description changes the generation.

The last line reads ``latent_mse_ratio=<x> psnr_gain_db=<y>`` (means over the pairs; the gain is
over the front-as-prediction baseline). Targets: ratio <= 0.25, gain >= 3 dB, <= 10 min on 2 cores.

    ./scripts/quickstart.sh      # builds runs/quickstart
    .venv/bin/python benchmarks/overfit_backview.py --shards runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from know3d.core.shards import resolve_shards
from know3d.evaluation.images import psnr, ssim
from know3d.training.data import decode_image, image_to_array
from know3d.training.edit_model import EditModel, load_pipeline

ROOT = Path(__file__).resolve().parents[1]

KNOW3D = str(Path(sys.executable).with_name("know3d"))


def pick_pairs(shards: str, k: int) -> list[dict]:
    """The first k training pairs (shard order) of distinct assets that have a description."""
    chosen, assets = [], set()
    for sample in wds.WebDataset(sorted(resolve_shards([shards], "train")[0]), shardshuffle=False):
        meta = json.loads(sample["json"])
        if meta["asset_id"] in assets or not meta.get("components"):
            continue
        assets.add(meta["asset_id"])
        chosen.append(
            {
                "key": sample["__key__"],
                "front": sample["front.png"],
                "back": sample["back.png"],
                "description": meta["components"][0],
            }
        )
        if len(chosen) == k:
            break
    if len(chosen) < k:
        raise SystemExit(f"{shards}: only {len(chosen)} annotated pairs of distinct assets, {k} wanted")
    return chosen


def cli(*args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([KNOW3D, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(
            f"know3d {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return time.perf_counter() - start


def generate(fronts: list[Path], out: Path, prompts: list[str] | None, common: list[str]) -> float:
    args = ["generate", "backview", "--output", str(out), *common]
    for front in fronts:
        args += ["--image", str(front)]
    for prompt in prompts or []:
        args += ["--prompt", prompt]
    return cli(*args)


def as_unit(path: Path, size: int) -> np.ndarray:
    """An image file -> [H, W, 3] in [0, 1] at ``size`` (the training resolution, as training sees it)."""
    from PIL import Image

    with Image.open(path) as img:
        return (image_to_array(img, size).transpose(1, 2, 0) + 1.0) / 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="runs/quickstart")
    parser.add_argument("--config", default="configs/backview_overfit.yaml")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("runs/overfit-backview"))
    parser.add_argument("--sample-steps", type=int, default=20, help="sampling steps of every generation")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="true CFG of every generation (1 = off)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="training config override")
    args = parser.parse_args()
    t0 = time.perf_counter()
    out = args.output.resolve()
    pairs = pick_pairs(args.shards, args.pairs)
    fronts = []
    for p in pairs:
        name = p["key"].replace("/", "_")
        for kind in ("front", "back"):
            (out / kind).mkdir(parents=True, exist_ok=True)
            (out / kind / f"{name}.png").write_bytes(p[kind])
        fronts.append(out / "front" / f"{name}.png")
    from know3d.pipeline.config import load_config
    from know3d.training.config import TrainBackviewConfig

    cfg = load_config(ROOT / args.config, args.overrides, model=TrainBackviewConfig)
    size, model_name = cfg.data.image_size, cfg.model.name
    common = ["--steps", str(args.sample_steps), "--cfg-scale", str(args.cfg_scale)]

    base_s = generate(fronts, out / "base", None, ["--model", model_name, "--size", str(size), *common])
    run = out / "train"
    train_s = cli(
        "train",
        "backview",
        str(ROOT / args.config),
        "--shards",
        str(Path(args.shards).resolve()),
        "--output",
        str(run),
        "--fresh",
        "--set",
        f"data.keys={json.dumps([p['key'] for p in pairs])}",
        "--set",
        f"data.max_pairs={len(pairs)}",
        *sum((["--set", o] for o in args.overrides), []),
    )
    lora = ["--lora", str(run / "lora"), *common]
    gen_s = generate(fronts, out / "trained", None, lora)
    gen_s += generate(fronts, out / "trained_described", [p["description"] for p in pairs], lora)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    # latent MSE with the model's own VAE (normalized latents, as the MMDiT sees them)
    pipe = load_pipeline(model_name, transformer=None, text_encoder=None)
    model = EditModel(pipe, torch.device("cpu"), torch.float32, size)

    def latents(paths: list[Path]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack([decode_image(p.read_bytes(), size) for p in paths]))
        return model.encode_images(batch)

    names = [f.name for f in fronts]
    true = latents([out / "back" / n for n in names])
    lat = {kind: latents([out / kind / n for n in names]) for kind in ("base", "trained", "trained_described")}
    lat["front"] = latents(fronts)

    def mse(a: torch.Tensor, b: torch.Tensor) -> list[float]:
        return ((a - b) ** 2).flatten(1).mean(1).tolist()

    rows = []
    print(
        f"{'pair':<24} {'lat MSE':>8} {'base':>8} {'ratio':>6} | {'PSNR':>6} {'front':>6} {'base':>6} | "
        f"{'SSIM':>5} {'front':>5} {'base':>5} | {'desc Δ':>7}  description"
    )
    for i, (p, name) in enumerate(zip(pairs, names)):
        gt = as_unit(out / "back" / name, size)
        img = {kind: as_unit(out / kind / name, size) for kind in ("trained", "base", "trained_described")}
        img["front"] = as_unit(fronts[i], size)
        row = {
            "key": p["key"],
            "description": p["description"],
            "latent_mse": mse(lat["trained"][i : i + 1], true[i : i + 1])[0],
            "latent_mse_base": mse(lat["base"][i : i + 1], true[i : i + 1])[0],
            "latent_mse_front": mse(lat["front"][i : i + 1], true[i : i + 1])[0],
            "latent_mse_described": mse(lat["trained_described"][i : i + 1], true[i : i + 1])[0],
            "description_change": mse(lat["trained_described"][i : i + 1], lat["trained"][i : i + 1])[0],
            "description_pixel_change": float(np.abs(img["trained_described"] - img["trained"]).mean()),
            **{f"psnr_{k}": psnr(v, gt) for k, v in img.items()},
            **{f"ssim_{k}": ssim(v, gt) for k, v in img.items()},
        }
        row["latent_mse_ratio"] = row["latent_mse"] / row["latent_mse_base"]
        rows.append(row)
        print(
            f"{p['key']:<24} {row['latent_mse']:8.4f} {row['latent_mse_base']:8.4f} {row['latent_mse_ratio']:6.3f} | "
            f"{row['psnr_trained']:6.2f} {row['psnr_front']:6.2f} {row['psnr_base']:6.2f} | "
            f"{row['ssim_trained']:5.3f} {row['ssim_front']:5.3f} {row['ssim_base']:5.3f} | "
            f"{row['description_change']:7.4f}  {p['description']}"
        )

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    ratio = mean("latent_mse_ratio")
    gain = mean("psnr_trained") - mean("psnr_front")
    total = time.perf_counter() - t0
    print(
        f"training: {len(losses)} steps, loss {np.mean(losses[:10]):.4f} (first 10) -> {np.mean(losses[-10:]):.4f} "
        f"(last 10), {train_s:.0f} s incl. Ray start; generation {base_s + gen_s:.0f} s for {3 * len(pairs)} images"
    )
    print(
        f"mean latent MSE: trained {mean('latent_mse'):.4f}, base {mean('latent_mse_base'):.4f}, "
        f"front-as-prediction {mean('latent_mse_front'):.4f}, trained + description {mean('latent_mse_described'):.4f}"
    )
    print(
        f"mean PSNR: trained {mean('psnr_trained'):.2f} dB, trained + description {mean('psnr_trained_described'):.2f}"
        f" dB, front {mean('psnr_front'):.2f} dB, base {mean('psnr_base'):.2f} dB"
    )
    print(
        f"mean SSIM: trained {mean('ssim_trained'):.3f}, trained + description {mean('ssim_trained_described'):.3f}, "
        f"front {mean('ssim_front'):.3f}, base {mean('ssim_base'):.3f}"
    )
    print(
        f"text control: the description changes the generation by latent MSE {mean('description_change'):.4f} "
        f"(mean |Δpixel| {mean('description_pixel_change'):.4f}); pairs differ from each other by "
        f"{float(((true[:, None] - true[None]) ** 2).flatten(2).mean(2).sum() / (len(rows) * (len(rows) - 1))):.4f}"
    )
    (out / "results.json").write_text(
        json.dumps(
            {
                "pairs": rows,
                "latent_mse_ratio": ratio,
                "psnr_gain_db": gain,
                "seconds": total,
                "train_seconds": train_s,
            },
            indent=1,
        )
    )
    print(f"total {total:.0f} s; images in {out}/{{front,back,base,trained,trained_described}}")
    print(f"latent_mse_ratio={ratio:.4f} psnr_gain_db={gain:.2f}")


if __name__ == "__main__":
    main()
