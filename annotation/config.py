"""Config of the annotation stage: which annotator, its prompt and its backend settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from know3d.core.config import StrictModel, url_credentials

DEFAULT_PROMPT = (
    "The first image shows an object from the front, the second shows the same object from the back. "
    "List the salient components of the object that are visible in the back view, especially those "
    "hidden or less visible from the front. Answer with a JSON list of at most {max_items} short noun "
    'phrases of at most {max_words} words each, e.g. ["two padded shoulder straps", "a zipper pocket"]. '
    "Describe the object's parts only, never the picture or the camera.{hint}"
)


class OpenAIBackendConfig(StrictModel):
    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="OpenAI-compatible server.")
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Environment variable with the key.")
    concurrency: int = Field(default=16, ge=1, le=1024)
    timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, description="HTTP attempts per request (429/5xx/timeouts).")
    backoff_s: float = Field(default=1.0, ge=0)
    max_tokens: int = Field(default=256, ge=8)
    temperature: float = Field(default=0.2, ge=0)

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        # the config is logged (MLflow params, config.yaml): the key goes in the api_key_env variable
        if where := url_credentials(url):
            raise ValueError(f"must not contain credentials ({where}); put the key in the api_key_env variable")
        return url


class TransformersBackendConfig(StrictModel):
    model: str = Field(default="Qwen/Qwen2.5-VL-7B-Instruct", description="Hub id or local folder.")
    revision: str | None = None
    batch_size: int = Field(default=8, ge=1)
    max_new_tokens: int = Field(default=128, ge=8)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto = bfloat16 on GPUs, float32 on CPU."
    )
    num_actors: int = Field(default=1, ge=1, description="Ray actors (model replicas).")
    num_gpus_per_actor: float = Field(default=1.0, ge=0, description="Used only when the cluster has GPUs.")
    min_pixels: int = Field(default=256 * 28 * 28, ge=4 * 28 * 28)
    max_pixels: int = Field(default=512 * 28 * 28, ge=4 * 28 * 28)


class AnnotateConfig(StrictModel):
    backend: Literal["none", "parts", "transformers", "openai"] = "parts"
    prompt_version: str = "v1"
    prompt: str = DEFAULT_PROMPT
    max_items: int = Field(default=6, ge=1, description="K: at most this many descriptions per pair.")
    max_words: int = Field(default=6, ge=1, description="N: at most this many words per description.")
    max_retries: int = Field(default=2, ge=0, description="Re-asks with the validation error.")
    parts_hint: bool = Field(default=False, description="Give the VLM the part list of the parts backend.")
    parts_min_fraction: float = Field(default=0.002, ge=0, le=1, description="Min. share of the image a part covers.")
    parts_back_ratio: float = Field(default=1.5, ge=1, description="A part must show this much more from the back.")
    parts_skip_body: bool = Field(default=True, description="Leave out the part seen most over all views (the body).")
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig)
    transformers: TransformersBackendConfig = Field(default_factory=TransformersBackendConfig)
