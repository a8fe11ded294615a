"""Annotation with Qwen2.5-VL through `transformers`, batched, bf16 on GPUs.

The model and processor load from a hub id or a local folder (safetensors only). Requests are
answered in batches of ``batch_size``; answers that fail validation are asked again, with the
validation error appended to the conversation, up to ``max_retries`` times — the same contract
as the OpenAI backend. In a build this runs inside Ray actors that hold one model replica each
(with GPUs when the cluster has them); the class itself needs no Ray.

Keep it out of processes that render: Mesa's llvmpipe and triton's LLVM (imported by
transformers/torch) crash when loaded into one process — the build runs it in its own actors.
"""

from __future__ import annotations

import io
import time
from typing import Any

from PIL import Image

from know3d.annotation.base import PairRequest, Replicas
from know3d.annotation.config import AnnotateConfig
from know3d.annotation.openai_backend import build_prompt
from know3d.annotation.schema import AnnotationError, ask_again, check_answer, failure_record, success_record


def _rgb(png: bytes) -> Image.Image:
    """RGBA renders on white, as the model expects photos, not alpha."""
    with Image.open(io.BytesIO(png)) as img:
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, mask=img.split()[3])
        return canvas


class TransformersAnnotator:
    """Qwen2.5-VL in this process (batched ``generate``); the build replicates it over Ray actors."""

    @staticmethod
    def replicas(cfg: AnnotateConfig) -> Replicas | None:
        return Replicas(cfg.transformers.num_actors, cfg.transformers.batch_size, cfg.transformers.num_gpus_per_actor)

    @staticmethod
    def wants_parts(cfg: AnnotateConfig) -> bool:
        return cfg.parts_hint

    @staticmethod
    def model_name(cfg: AnnotateConfig) -> str:
        return cfg.transformers.model

    @staticmethod
    def cache_salt(cfg: AnnotateConfig) -> str:
        return ""

    def __init__(self, cfg: AnnotateConfig, model: Any = None, processor: Any = None) -> None:
        import torch

        self.cfg = cfg
        self.tcfg = cfg.transformers
        if model is None or processor is None:
            from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

            cuda = torch.cuda.is_available()
            dtype = {
                "auto": torch.bfloat16 if cuda else torch.float32,
                "bfloat16": torch.bfloat16,
                "float16": torch.float16,
                "float32": torch.float32,
            }[self.tcfg.dtype]
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                self.tcfg.model, revision=self.tcfg.revision, dtype=dtype, use_safetensors=True
            ).to("cuda" if cuda else "cpu")
            processor = AutoProcessor.from_pretrained(
                self.tcfg.model,
                revision=self.tcfg.revision,
                size={"shortest_edge": self.tcfg.min_pixels, "longest_edge": self.tcfg.max_pixels},
            )
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # decoder-only batched generation

    def _generate(self, conversations: list[list[dict]], images: list[list[Image.Image]]) -> tuple[list[str], int]:
        import torch

        texts = [
            self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
        ]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.tcfg.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        pad = self.processor.tokenizer.pad_token_id
        num_tokens = int((new != pad).sum()) if pad is not None else int(new.numel())
        return self.processor.tokenizer.batch_decode(new, skip_special_tokens=True), num_tokens

    def annotate(self, requests: list[PairRequest]) -> list[dict[str, Any]]:
        """One result per request, in order; never raises for a request's sake."""
        start = time.perf_counter()
        images = [[_rgb(r.front_png), _rgb(r.back_png)] for r in requests]
        conversations: list[list[dict]] = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "image"},
                        {"type": "text", "text": build_prompt(self.cfg, r.hint)},
                    ],
                }
            ]
            for r in requests
        ]
        results: list[dict[str, Any] | None] = [None] * len(requests)
        raws = [""] * len(requests)
        errors = [""] * len(requests)
        tokens = [0] * len(requests)
        active = list(range(len(requests)))
        for attempt in range(self.cfg.max_retries + 1):
            retry: list[int] = []
            for b in range(0, len(active), self.tcfg.batch_size):
                batch = active[b : b + self.tcfg.batch_size]
                answers, used = self._generate([conversations[i] for i in batch], [images[i] for i in batch])
                for i, raw in zip(batch, answers):
                    raws[i] = raw
                    tokens[i] += used // len(batch)
                    try:
                        parsed = check_answer(raw, self.cfg.max_items, self.cfg.max_words)
                    except AnnotationError as exc:
                        errors[i] = str(exc)
                        conversations[i] = conversations[i] + ask_again(raw, exc)
                        retry.append(i)
                        continue
                    results[i] = success_record(parsed, attempt, raw, tokens[i])
            active = retry
            if not active:
                break
        elapsed = time.perf_counter() - start
        out: list[dict[str, Any]] = []
        for i, result in enumerate(results):
            if result is None:
                result = failure_record(errors[i], raws[i], self.cfg.max_retries + 1, tokens[i])
            result["latency_s"] = elapsed / max(1, len(requests))  # batched: amortized per pair
            out.append(result)
        return out
