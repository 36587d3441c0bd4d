"""Settings: the one place for every tunable, read from ``UPSCALE_*`` environment variables.

Entry points build a :class:`Settings` and pass it down; nothing reads the environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The repository's ``models/`` folder when running from a checkout (the normal way to run the server).
REPO_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

Device = str  # "auto", "cpu", "cuda" or "cuda:N"
Precision = Literal["auto", "fp32", "fp16", "bf16"]


class Settings(BaseSettings):
    """Every setting of the server and the CLI. Field docs are the configuration reference."""

    model_config = SettingsConfigDict(env_prefix="UPSCALE_", extra="forbid")

    models_dir: Path = Field(
        default=REPO_MODELS_DIR,
        description="Folder holding the model manifest's weight files (dropped in, converted or downloaded).",
    )
    allow_download: bool = Field(
        default=False,
        description="Allow fetching official weights from their release URLs when no offline source exists.",
    )
    default_model: str = Field(default="runware:504@1", description="Model used when a request names none.")
    device: Device = Field(
        default="auto", description="Inference device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
    )
    precision: Precision = Field(
        default="auto",
        description="Compute precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 (CUDA only) or bf16 "
        "(the CPU fast mode; costs a little accuracy).",
    )
    tile_size: int = Field(
        default=0,
        ge=0,
        description="Tile edge in input pixels; 0 picks it from the memory available on the device.",
    )
    tile_overlap: int = Field(
        default=16, ge=0, le=128, description="Context pixels added on each side of a tile, blended across seams."
    )
    threads: int = Field(default=0, ge=0, description="CPU threads for inference; 0 uses every core.")
    max_output_side: int = Field(
        default=4096,
        ge=64,
        description="Largest output width or height; bigger requests resize the input first (aspect kept).",
    )

    def resolved_models_dir(self) -> Path:
        return self.models_dir.expanduser().resolve()
