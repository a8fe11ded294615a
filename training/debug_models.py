"""Tiny, random, offline stand-ins for the real checkpoints, built in code.

They have the real classes and file layout (``save_pretrained``), so everything downstream —
``from_pretrained``, LoRA injection, DeepSpeed, export, ``load_lora_weights`` — runs the same code
as with ``Qwen/Qwen-Image-Edit-2511``. Their outputs are noise: they test plumbing, never quality.

- :func:`build_tiny_qwen_vl`: a Qwen2.5-VL with a byte-level tokenizer and a Qwen2-VL processor.
- :func:`build_tiny_qwen_image_edit`: a complete ``QwenImageEditPlusPipeline`` folder (that
  text encoder, a 2-block ``QwenImageTransformer2DModel`` with ``zero_cond_t`` like 2511, a
  4-channel ``AutoencoderKLQwenImage`` and the flow-match scheduler).

Model ids of the form ``debug:tiny-qwen-image-edit`` resolve to a cached build of the latter
(see :func:`resolve_debug_model`). Builds are deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEBUG_PREFIX = "debug:"
DEBUG_EDIT_MODEL = "debug:tiny-qwen-image-edit"
_BUILD_VERSION = "v2"  # bump when the tiny architecture changes, so caches rebuild


def _tiny_vl_parts(seed: int, min_pixels: int, max_pixels: int, processor_cls: str = "qwen2_5_vl"):
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLProcessor,
                              Qwen2Tokenizer, Qwen2VLImageProcessor)
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2_vl import Qwen2VLVideoProcessor

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    ids = dict(zip(SPECIALS, tokenizer.convert_tokens_to_ids(SPECIALS)))
    cls = Qwen2_5_VLProcessor if processor_cls == "qwen2_5_vl" else Qwen2VLProcessor  # 2511 ships Qwen2VLProcessor
    processor = cls(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, processor, tokenizer


def build_tiny_qwen_vl(folder: Path, seed: int = 0) -> Path:
    """A tiny random Qwen2.5-VL + processor saved as a model folder (safetensors)."""
    model, processor, _ = _tiny_vl_parts(seed, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return Path(folder)


def build_tiny_qwen_image_edit(folder: Path, seed: int = 0) -> Path:
    """A complete tiny ``QwenImageEditPlusPipeline`` saved with ``save_pretrained``."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)

    text_encoder, processor, tokenizer = _tiny_vl_parts(seed, min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28,
                                                       processor_cls="qwen2_vl")
    z_dim = 4
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_encoder.config.text_config.hidden_size,
        axes_dims_rope=(4, 6, 6), zero_cond_t=True,
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=16, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=16,
        max_image_seq_len=1024, shift_terminal=0.02, time_shift_type="exponential",
    )
    pipe = QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                     processor=processor, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def debug_cache_dir() -> Path:
    root = os.environ.get("KNOW3D_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "know3d")
    return Path(root) / "debug-models"


def resolve_debug_model(name: str, seed: int = 0) -> Path:
    """``debug:<name>`` -> a folder with that tiny model, built once and cached (atomically)."""
    builders = {DEBUG_EDIT_MODEL: build_tiny_qwen_image_edit}
    if name not in builders:
        raise ValueError(f"unknown debug model '{name}'; known: {', '.join(builders)}")
    tag = hashlib.sha256(f"{name}:{seed}:{_BUILD_VERSION}".encode()).hexdigest()[:12]
    folder = debug_cache_dir() / f"{name.removeprefix(DEBUG_PREFIX)}-{tag}"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    builders[name](tmp, seed=seed)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
