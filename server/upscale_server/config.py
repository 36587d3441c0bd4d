"""Settings: the one place for every tunable, read from ``UPSCALE_*`` environment variables.

Entry points build a :class:`Settings` and pass it down; nothing reads the environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from upscale_server.vocabulary import usable_cores, usable_memory

#: The checkout this package runs from, if any: ``<checkout>/server/upscale_server/config.py``.
_CHECKOUT = Path(__file__).resolve().parents[2]


def default_models_dir() -> Path:
    """Where weights are dropped, converted and downloaded when ``UPSCALE_MODELS_DIR`` is unset.

    A checkout keeps them in its own ``models/`` (git-ignored); an installed wheel has no such folder
    (``site-packages`` is no place for 67 MB files a user manages), so it uses the per-user data folder.
    """
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "models").is_dir():
        return _CHECKOUT / "models"
    return platformdirs.user_data_path("upscale-server", appauthor=False) / "models"


#: The memory budget where the machine's memory cannot be read.
DEFAULT_MEMORY_BUDGET = 4 * 2**30

Device = str  # "auto", "cpu", "cuda" or "cuda:N"
Precision = Literal["auto", "fp32", "fp16", "bf16"]
Convolution = Literal["auto", "winograd", "direct"]


class UnusableSettingError(ValueError):
    """A well-formed setting this machine cannot honour (a CUDA device without CUDA, say): start-up stops
    with its message, which names the setting and what to use instead."""


class Settings(BaseSettings):
    """Every setting of the server and the CLI. Field docs are the configuration reference."""

    model_config = SettingsConfigDict(env_prefix="UPSCALE_", extra="forbid")

    models_dir: Path = Field(
        default_factory=default_models_dir,
        description="Folder holding the model manifest's weight files (dropped in, converted or downloaded) and your "
        "own models: any other `.pth` or `.safetensors` file of a supported architecture is served as "
        "`local:<file name, lower case>@1`.",
    )
    max_loaded_models: int = Field(
        default=4,
        ge=1,
        description="Networks kept loaded at once; loading one more unloads the one used least recently.",
    )
    allow_download: bool = Field(
        default=False,
        description="Allow fetching official weights from their release URLs when no offline source exists.",
    )
    default_model: str = Field(default="runware:504@1", description="Model used when a request names none.")
    model_aliases: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Model ids this server answers with one of its own models, as comma-separated "
        "`requested=local` pairs, e.g. `runware:500@1=runware:504@1,runware:501@1=local:realesr-animevideov3@1`. "
        "Off by default: Runware's other upscalers get `invalidModel` listing the models this server has. An "
        "alias is the operator's choice of a stand-in (the output is the local model's, not Runware's); each "
        "target must be a model of this server (`upscale-server models` lists both).",
    )
    device: Device = Field(
        default="auto",
        description="Inference device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.",
    )
    precision: Precision = Field(
        default="auto",
        description="Compute precision: auto (fp16 on CUDA; on the CPU the fastest of the exact methods and, where "
        "the CPU has native bf16 arithmetic, bf16, measured once per machine), fp32 (exact), fp16 (CUDA only) or "
        "bf16 (the fast mode; costs a few tenths of a level on average).",
    )
    tile_size: int = Field(
        default=0,
        ge=0,
        description="Tile edge in input pixels; 0 picks it from the memory available on the device.",
    )
    tile_overlap: int | None = Field(
        default=None,
        ge=0,
        le=256,
        description="Context pixels around each tile, blended across seams; unset picks what keeps a tiled "
        "result within 1 level of the untiled one (64 for RRDBNet, 32 for SRVGGNetCompact).",
    )
    threads: int = Field(default=0, ge=0, description="CPU threads for inference; 0 uses every core.")
    cpu_convolution: Convolution = Field(
        default="auto",
        description="3x3 convolutions of the CPU exact (fp32) mode: winograd (F(4x4,3x3), within 0.01 levels of "
        "direct; its kernel is built when the package is installed with a C compiler present), direct (oneDNN), or "
        "auto (whichever measures faster on this machine for each window size).",
    )
    cpu_method_cache: Path | None = Field(
        default=None,
        description="JSON file keeping the CPU methods measured on this machine (per CPU model, torch version and "
        "model); unset uses the user's cache folder (~/.cache/upscale-server/cpu-methods.json on Linux).",
    )
    compile: bool = Field(
        default=False,
        description="Compile each network with torch.compile on first use: faster passes (mostly on a GPU) for a "
        "slow first request per model and input shape.",
    )
    batch_window_ms: float = Field(
        default=0,
        ge=0,
        le=1000,
        description="Milliseconds a tile waits for tiles of other requests to share one network pass (at most "
        "`UPSCALE_MAX_BATCH`); 0 turns cross-request batching off, right on a CPU, where one image already uses "
        "every core. 2-5 ms suits a GPU, together with `UPSCALE_WORKER_CONCURRENCY` > 1.",
    )
    max_batch: int = Field(
        default=8, ge=1, le=256, description="Most tiles in one batched network pass (with `UPSCALE_BATCH_WINDOW_MS`)."
    )
    batch_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        le=86400,
        description="With cross-request batching, the longest a tile waits for its network pass (queued and "
        "running); past it its task fails with an inference timeout. A hung pass itself cannot be interrupted: "
        "the tiles behind it time out too, until it returns.",
    )
    worker_concurrency: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Upscale jobs the inference worker runs at once. More than 1 only helps with cross-request "
        "batching (`UPSCALE_BATCH_WINDOW_MS`) on a GPU; on a CPU concurrent jobs just share the cores.",
    )
    encode_workers: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Threads that decode inputs and encode and store outputs, apart from the inference worker so "
        "the device never waits for a PNG; 0 uses one per CPU core.",
    )
    max_output_side: int = Field(
        default=4096,
        ge=64,
        description="Largest output width or height; bigger requests resize the input first (aspect kept).",
    )

    engine: Literal["realesrgan", "resize"] = Field(
        default="realesrgan",
        description="realesrgan runs the models; resize is test-target mode: a fast deterministic Lanczos resize "
        "behind the same API (same sizes, formats and errors), no weights needed (docs/test-target.md).",
    )
    resize_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        le=3600,
        description="Test-target mode only: each upscale takes at least this long, so a client's waiting, polling, "
        "timeouts and restarts can be exercised against work in progress; 0 answers at once.",
    )

    # ------------------------------------------------------------------ server
    host: str = Field(default="127.0.0.1", description="Address to bind; 0.0.0.0 exposes the server to the network.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    data_dir: Path = Field(default=Path("data"), description="Folder for stored images and the SQLite database.")
    public_url: str | None = Field(
        default=None,
        description="Base URL put in imageURL fields (e.g. https://upscale.example.com); default: the URL the "
        "client used to reach the server.",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted API keys (JSON list in the environment). None configured and no key file: open "
        "local mode, any key is accepted.",
    )
    api_keys_file: Path | None = Field(default=None, description="File with one accepted API key per line.")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Web page origins besides the server's own (and public_url's) whose POSTs and WebSocket "
        'upgrades are accepted (JSON list, e.g. ["https://app.example.com"]; "*": any). Requests without an Origin '
        "header (SDKs, curl) always pass.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the server answers to besides localhost, the bound host and public_url's host "
        '(JSON list; "*": any); IP addresses always pass. Bound to 0.0.0.0 or :: and unset: any name.',
    )
    api_docs: bool = Field(
        default=False,
        description="Serve Swagger UI at /docs. Its script and style load from a CDN, on the origin where the "
        "playground keeps its API key, so it is off by default; /openapi.json is always served.",
    )
    image_retention_days: float = Field(
        default=30, gt=0, description="Stored uploads and outputs unused for this long are deleted."
    )
    result_ttl_seconds: int = Field(
        default=3600, ge=1, description="How long finished task results stay pollable with getResponse."
    )
    sweep_interval_seconds: float = Field(
        default=600, gt=0, description="How often the background sweeper deletes expired images and results."
    )
    upload_max_side: int = Field(
        default=2048,
        ge=16,
        description="imageUpload stores images at most this many pixels on the long side.",
    )
    max_input_pixels: int = Field(
        default=64 * 2**20,
        ge=1,
        description="Largest decoded input image (width x height), checked from the header before decoding.",
    )
    memory_budget_bytes: int = Field(
        default=0,
        ge=0,
        description="Bytes of pixel work all tasks together may hold (decoded inputs, outputs and their working "
        "copies, estimated from each image's header before it is decoded; uploads and upscales, REST and "
        "WebSocket alike). A task that does not fit is refused with 429 before it is acknowledged, or, when its "
        "input URL is downloaded only after the acknowledgement, waits for room; one that could never fit gets "
        "413. 0 uses half the memory this process may use (the machine's, or its container's limit; 4 GiB "
        "where neither can be read). See docs/operations.md.",
    )
    keep_metadata: bool = Field(
        default=False,
        description="Keep EXIF (GPS position, camera, time), XMP, IPTC and text metadata in the upscale inputs "
        "the server stores; by default they are removed (the ICC profile and the orientation stay). imageUpload "
        "re-encodes what it stores and never keeps them.",
    )
    # ------------------------------------------------------------------ outbound requests
    outbound_allow: list[str] = Field(
        default_factory=list,
        description="Host names and networks that input URLs, webhooks and upload endpoints may reach although "
        'they are not public (JSON list, e.g. ["localhost", "10.0.0.0/8"]); everything else must resolve only to '
        "public addresses.",
    )
    outbound_max_redirects: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Redirects followed per outbound request; each hop is checked like the first.",
    )
    outbound_connect_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to connect to an input URL, webhook or upload endpoint."
    )
    outbound_timeout: float = Field(
        default=30.0, gt=0, description="Seconds for one whole outbound request (resolution, redirects, body)."
    )
    webhook_max_attempts: int = Field(
        default=8, ge=1, le=50, description="Attempts per webhook (retried on network errors, 408, 429 and 5xx)."
    )
    webhook_give_up_after: float = Field(
        default=300.0, gt=0, description="Seconds after a webhook's first attempt past which it is not retried."
    )

    preload_default_model: bool = Field(
        default=True, description="Load the default model in the background at start-up, so no request waits for it."
    )
    max_fetch_bytes: int = Field(default=50 * 2**20, ge=1024, description="Largest image downloaded from an input URL.")
    max_queue: int = Field(
        default=64, ge=1, description="Upscale tasks accepted and not yet finished; one more is refused with 429."
    )
    max_tasks: int = Field(default=64, ge=1, description="Tasks in one REST request or WebSocket frame (413 beyond).")
    max_body_bytes: int = Field(
        default=100 * 2**20, ge=1024, description="Largest REST request body (413 beyond): base64 adds a third."
    )
    max_unauthenticated_bytes: int = Field(
        default=64 * 2**10,
        ge=1024,
        description="Most bytes read of a REST body or taken in a WebSocket frame before its API key is accepted. A "
        "bigger REST body is judged by its `Authorization` header, or by a leading authentication task that fits "
        "in this prefix, before the rest is read; a bigger WebSocket frame before authentication closes the "
        "connection with code 1009.",
    )
    max_frame_bytes: int = Field(
        default=100 * 2**20,
        ge=1024,
        description="Largest WebSocket frame; a bigger one closes the connection with code 1009 (message too big).",
    )
    max_reply_bytes: int = Field(
        default=256 * 2**20,
        ge=1024,
        description="Most inline image data (base64Data, dataURI) in the reply to one REST request or WebSocket "
        "frame; a task whose output would pass it is answered with a payloadTooLarge error instead (its result "
        "stays pollable alone, or as a URL). Repeated getResponse items for one task in a request are answered "
        "once.",
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Open HTTP and WebSocket connections one process serves; past it a request is answered 503 "
        "and a WebSocket handshake refused with 503.",
    )
    max_header_bytes: int = Field(
        default=32 * 2**10, ge=1024, description="Largest request head (request line and headers); 400 beyond."
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="A request head must arrive whole within this long of its first byte (or of the connection), "
        "else the connection is closed; then a REST body's first `UPSCALE_MAX_UNAUTHENTICATED_BYTES` (all of a "
        "smaller one) within this long again, else 408 `requestTimeout`.",
    )
    ws_auth_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A WebSocket connection that has not authenticated this long after opening is closed (1008).",
    )
    ws_idle_timeout_seconds: float = Field(
        default=900.0,
        gt=0,
        description="An authenticated WebSocket connection with no frame from its client and no request of its own "
        "running for this long is closed (1001); its session stays resumable (`UPSCALE_SESSION_RESUME_SECONDS`).",
    )
    max_deliveries_in_flight: int = Field(
        default=32,
        ge=1,
        le=10000,
        description="Webhook and uploadEndpoint requests sent at once; the others wait their turn (none is "
        "dropped), so receivers that never answer hold at most this many sockets.",
    )
    shutdown_grace_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long a stopping process lets accepted work finish (and then its worker and webhooks): "
        "a cluster worker hands back the jobs still running after it, so another worker runs them at once. "
        "Keep it below the orchestrator's own grace period (Compose `stop_grace_period`, Kubernetes "
        "`terminationGracePeriodSeconds`).",
    )
    session_resume_seconds: float = Field(
        default=120,
        ge=0,
        description="How long a WebSocket session outlives its connection: a reconnect with its "
        "connectionSessionUUID receives the results that finished meanwhile.",
    )
    session_buffer_bytes: int = Field(
        default=64 * 2**20,
        ge=1024,
        description="Most frame text a detached WebSocket session keeps for its reconnect (a result can inline a "
        "whole image as base64; at most 256 frames in any case); beyond it the oldest frames are dropped, and "
        "their tasks stay pollable with getResponse. Single process only: cluster sessions keep references.",
    )
    session_buffers_total_bytes: int = Field(
        default=256 * 2**20,
        ge=1024,
        description="Most frame text all detached WebSocket sessions of the process keep together; beyond it a "
        "session's oldest frames are dropped as for UPSCALE_SESSION_BUFFER_BYTES (their tasks stay pollable). "
        "Single process only: cluster sessions keep references.",
    )
    log_format: Literal["plain", "json"] = Field(
        default="plain",
        description="Log lines as plain text or as one JSON object per line (time, level, logger, message, "
        "taskUUID, exc_info); both carry the taskUUID of the task being run.",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        default="info", description="Least severe log level written (uvicorn's access lines are info)."
    )
    cost_per_megapixel: float = Field(
        default=0.0, ge=0, description="Price reported in `cost` (includeCost) per output megapixel."
    )

    # ------------------------------------------------------------------ cluster (docs/scaling.md)
    redis_url: str | None = Field(
        default=None,
        description="Redis (or Valkey) for cluster mode, e.g. redis://redis:6379/0: the durable job queue, task "
        "records, sessions and image index shared by `serve --role api` nodes and `worker` processes. Unset: "
        "the single process (SQLite, local files, in-process worker).",
    )
    redis_prefix: str = Field(
        default="upscale:{u}:",
        min_length=1,
        max_length=64,
        description="Prefix of every Redis key; the braces are a hash tag, so a Redis Cluster keeps every key "
        "in one slot (the Lua scripts touch several). Two deployments sharing a Redis use different prefixes.",
    )
    s3_endpoint: str | None = Field(
        default=None,
        description="S3-compatible endpoint URL for cluster images (SeaweedFS, Garage, MinIO...); unset: AWS. "
        "Credentials come from the standard AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).",
    )
    s3_bucket: str | None = Field(default=None, description="Bucket for cluster images (required in cluster mode).")
    s3_region: str = Field(default="us-east-1", description="Region of the S3 bucket.")
    s3_prefix: str = Field(default="", max_length=256, description="Key prefix of every object in the bucket.")
    s3_presign_seconds: int = Field(
        default=0,
        ge=0,
        le=7 * 86400,
        description="`GET /image/...` redirects to a presigned S3 URL valid this long instead of streaming the "
        "object through the API node; 0 streams (the bucket then needs no public address).",
    )
    node_id: str | None = Field(
        default=None,
        max_length=128,
        description="Name of this API node or worker in logs, metrics and Redis; default: host name and PID.",
    )
    worker_dead_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A running task whose worker has not renewed its claim for this long is given to another "
        "worker (a live worker renews every third of it).",
    )
    worker_max_deliveries: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Times a task may be handed to a worker; a task whose workers died this often fails with "
        "taskCrashedWorkers and is kept aside in the dead-letter stream.",
    )
    cluster_check_seconds: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="How often an API node checks its waiting requests and sessions without a wake-up: Redis "
        "pub/sub is only a signal, and a lost one costs at most this long.",
    )
    resize_crash_width: int = Field(
        default=0,
        ge=0,
        description="Test-target mode only: the process running an upscale whose input is this many pixels wide "
        "dies at once (exit code 70), so recovery from crashing workers can be tested; 0 never.",
    )

    @field_validator("outbound_allow")
    @classmethod
    def _check_outbound_allow(cls, value: list[str]) -> list[str]:
        from upscale_server.outbound import OutboundPolicy

        OutboundPolicy.parse(value)  # ValueError naming the bad entry
        return value

    @field_validator("model_aliases", mode="before")
    @classmethod
    def _parse_model_aliases(cls, value: object) -> object:
        """``a=b,c=d`` (the environment variable's form) into a mapping; a mapping passes through."""
        return parse_model_aliases(value) if isinstance(value, str) else value

    @field_validator("model_aliases")
    @classmethod
    def _check_model_aliases(cls, value: dict[str, str]) -> dict[str, str]:
        """The form only; whether the ids exist is the manifest's to say (``check_model_aliases``)."""
        for alias, target in value.items():
            if not alias.strip() or not target.strip():
                raise ValueError(f"alias {alias!r}={target!r} needs a model id on both sides of '='")
        return value

    def resolved_models_dir(self) -> Path:
        return self.models_dir.expanduser().resolve()

    def resolved_memory_budget(self) -> int:
        """``memory_budget_bytes``, with 0 meaning half the memory this process may use."""
        if self.memory_budget_bytes:
            return self.memory_budget_bytes
        available = usable_memory()
        return available // 2 if available else DEFAULT_MEMORY_BUDGET

    def resolved_encode_workers(self) -> int:
        """``encode_workers``, with 0 meaning one per CPU core this process may use."""
        return self.encode_workers or usable_cores()


def parse_model_aliases(text: str) -> dict[str, str]:
    """``runware:500@1=runware:504@1,...`` as a mapping; ValueError naming a malformed or repeated entry."""
    aliases: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        alias, equals, target = (part.strip() for part in entry.partition("="))
        if not equals or not alias or not target or "=" in target:
            raise ValueError(f"malformed entry {entry!r}: write requested=local, e.g. runware:500@1=runware:504@1")
        if alias in aliases:
            raise ValueError(f"{alias} is aliased twice")
        aliases[alias] = target
    return aliases


def settings_reference() -> str:
    """The configuration reference (docs/configuration.md), generated from the fields above.

    ``python -m upscale_server.config > docs/configuration.md`` rewrites it; a test fails when it drifts.
    """
    lines = [
        "# Configuration",
        "",
        "Every setting is read from an environment variable with the `UPSCALE_` prefix; most also have a",
        "command-line flag (`upscale-server serve --help`, `upscale-server upscale --help`). Lists are JSON,",
        'e.g. `UPSCALE_API_KEYS=\'["key-1", "key-2"]\'`. This page is generated from',
        "`server/upscale_server/config.py`.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        if name == "models_dir":
            shown = "`models/` in a checkout, else the per-user data folder (`~/.local/share/upscale-server/models`)"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        elif default is None or default == {}:
            shown = "unset"
        else:
            shown = f"`{default}`"
        lines.append(f"| `UPSCALE_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(settings_reference())
