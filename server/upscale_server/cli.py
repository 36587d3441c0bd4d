"""The ``upscale-server`` command: ``upscale`` files and folders offline, list ``models``.

Exit codes: 0 when every input was upscaled, 1 when any input failed (the others are still
processed), 2 for a usage error. Every failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from upscale_server import __version__
from upscale_server.config import Convolution, Settings, UnusableSettingError
from upscale_server.errors import UpscaleError
from upscale_server.vocabulary import DEFAULT_UPSCALE_FACTOR, OUTPUT_QUALITY, UPSCALE_FACTORS, ImageFormat, atomic_write

if TYPE_CHECKING:
    from upscale_server.imaging import Picture

PROG = "upscale-server"
#: ``--format`` values: the formats' file extensions.
FORMAT_CHOICES = tuple(fmt.extension for fmt in ImageFormat)

stderr = Console(stderr=True, highlight=False)


class CliError(Exception):
    """A problem with the command line itself: reported in one line, exit code 2."""


@dataclass(frozen=True)
class Job:
    source: Path
    target_dir: Path | None  # None: write exactly to ``target_file``
    target_file: Path | None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        code: int = args.handler(args, settings)
        return code
    except CliError as exc:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except UnusableSettingError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except UpscaleError as exc:
        sys.stderr.write(f"{PROG}: error: {exc.message}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Self-hosted Real-ESRGAN upscaling.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("upscale", help="upscale image files and folders", description=UPSCALE_HELP)
    up.add_argument("inputs", nargs="+", metavar="IN", type=Path, help="image files or folders of images")
    up.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder (or file)")
    up.add_argument(
        "--scale",
        type=int,
        choices=UPSCALE_FACTORS,
        default=DEFAULT_UPSCALE_FACTOR,
        help=f"upscale factor (default {DEFAULT_UPSCALE_FACTOR})",
    )
    up.add_argument("--format", choices=FORMAT_CHOICES, help="output format (default: the input's)")
    up.add_argument(
        "--quality",
        type=quality_arg,
        default=OUTPUT_QUALITY.default,
        help=f"JPG/WEBP quality {OUTPUT_QUALITY.min}-{OUTPUT_QUALITY.max} (default {OUTPUT_QUALITY.default})",
    )
    up.add_argument("--model", metavar="ID", help="model id from `upscale-server models`")
    add_compute_args(up)
    up.set_defaults(handler=run_upscale)

    serve = sub.add_parser("serve", help="run the Runware-compatible API server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--data-dir", type=Path, help="folder for stored images and the database (default ./data)")
    serve.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="accept this key (repeat). A command line is visible to other users of this machine (ps): prefer "
        "UPSCALE_API_KEYS or UPSCALE_API_KEYS_FILE",
    )
    serve.add_argument("--log-format", choices=["plain", "json"], help="log line format (default plain)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"], help="default info")
    serve.add_argument(
        "--role",
        choices=("all", "api"),
        default="all",
        help="all: API and inference in this process (default); api: a cluster API node that loads no model and "
        "leaves the jobs to `upscale-server worker` processes (needs UPSCALE_REDIS_URL and UPSCALE_S3_BUCKET)",
    )
    add_compute_args(serve)
    serve.set_defaults(handler=run_serve)

    worker = sub.add_parser(
        "worker",
        help="run one cluster inference worker (one per GPU: --device cuda:N)",
        description="Take upscale jobs from the cluster's queue (UPSCALE_REDIS_URL, UPSCALE_S3_BUCKET) and run them "
        "on one device. Serves only /health, /ready and /metrics, on --port (default 8001). docs/scaling.md",
    )
    worker.add_argument("--host", help="address of the probe endpoints (default 127.0.0.1)")
    worker.add_argument("--port", type=int, default=8001, help="port of the probe endpoints (default 8001)")
    worker.add_argument("--log-format", choices=["plain", "json"], help="log line format (default plain)")
    worker.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"], help="default info")
    add_compute_args(worker)
    worker.set_defaults(handler=run_worker, role="worker")

    models = sub.add_parser("models", help="list models, where their weights come from and if they are ready")
    models.add_argument("--prepare", action="store_true", help="provision every model's weights now")
    models.add_argument("--models-dir", type=Path, help="folder of weight files (default: the repo's models/)")
    models.add_argument("--download", action="store_true", help="allow downloading official weights (with --prepare)")
    models.set_defaults(handler=run_models)

    doctor = sub.add_parser(
        "doctor",
        help="show this machine's hardware and the compute methods chosen on it, and why",
        description="The CPU, GPU and kernel this machine offers, the compute settings as resolved, and the CPU "
        "method measured for each model and window size (cached per CPU model and torch version).",
    )
    doctor.add_argument("--measure", action="store_true", help="load a model and measure its CPU methods now")
    doctor.add_argument("--model", metavar="ID", help="the model --measure loads (default: the default model)")
    add_compute_args(doctor)
    doctor.set_defaults(handler=run_doctor)
    return parser


UPSCALE_HELP = (
    "Upscale images with Real-ESRGAN. Outputs are named NAME_xSCALE.EXT inside OUT; a single input "
    "may name an output file instead. Inputs are never overwritten."
)


def add_compute_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compute (defaults come from UPSCALE_* settings)")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    group.add_argument(
        "--precision", choices=("auto", "fp32", "fp16", "bf16"), help="fp32 = exact; bf16 = CPU fast mode"
    )
    group.add_argument(
        "--convolution",
        dest="cpu_convolution",
        choices=get_args(Convolution),
        help="CPU fp32 convolutions (auto = the faster on this machine, measured)",
    )
    group.add_argument("--tile-size", type=int, metavar="PX", help="tile edge in input pixels (0 = auto)")
    group.add_argument("--threads", type=int, metavar="N", help="CPU threads (0 = all cores)")
    group.add_argument("--models-dir", type=Path, help="folder of weight files (default: the repo's models/)")
    group.add_argument("--allow-download", action="store_true", help="allow fetching official weights")
    group.add_argument(
        "--engine",
        choices=("realesrgan", "resize"),
        help="resize = test-target mode: fast deterministic resize, no weights (docs/test-target.md)",
    )


def quality_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value not in OUTPUT_QUALITY:
        raise argparse.ArgumentTypeError(f"must be between {OUTPUT_QUALITY.min} and {OUTPUT_QUALITY.max}, got {value}")
    return value


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags the user gave."""
    overrides = {
        name: getattr(args, name)
        for name in (
            "device",
            "precision",
            "cpu_convolution",
            "tile_size",
            "threads",
            "models_dir",
            "host",
            "port",
            "data_dir",
            "api_keys",
            "log_format",
            "log_level",
            "engine",
        )
        if getattr(args, name, None) is not None
    }
    if getattr(args, "allow_download", False) or getattr(args, "download", False):
        overrides["allow_download"] = True
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        # One line, without the usage: most settings come from UPSCALE_* variables, not from the command line.
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        variable = f"UPSCALE_{str(first['loc'][0]).upper()}"
        raise UnusableSettingError(f"invalid setting {where} ({variable}): {message}") from None
    except SettingsError as exc:  # an UPSCALE_* list or mapping that is not JSON (an empty string included)
        raise UnusableSettingError(f"invalid setting: {exc} (lists are JSON, e.g. '[\"key-1\"]')") from None
    if settings.model_aliases:
        from upscale_server.inference import check_model_aliases

        check_model_aliases(settings.model_aliases)
    return settings


# --------------------------------------------------------------------------------------------- upscale


def plan_jobs(inputs: Sequence[Path], output: Path) -> tuple[list[Job], list[str]]:
    """Expand folders and pair every input with its destination; returns (jobs, one-line problems)."""
    problems: list[str] = []
    files: list[Path] = []
    for given in inputs:
        if given.is_dir():
            found = sorted(p for p in given.iterdir() if p.is_file() and not p.name.startswith("."))
            if not found:
                problems.append(f"{given}: folder has no files")
            files.extend(found)
        elif given.is_file():
            files.append(given)
        elif given.exists():
            problems.append(f"{given}: not a regular file")
        else:
            problems.append(f"{given}: no such file or folder")

    names_a_file = ImageFormat.from_extension(output.suffix) is not None if output.suffix else False
    single_file_target = len(inputs) == 1 and not inputs[0].is_dir() and names_a_file
    if single_file_target:
        return [Job(f, None, output) for f in files], problems
    if output.exists() and not output.is_dir():
        raise CliError(f"{output} exists and is not a folder")
    return [Job(f, output, None) for f in files], problems


def output_path(job: Job, fmt: ImageFormat, scale: int) -> Path:
    if job.target_file is not None:
        return job.target_file
    assert job.target_dir is not None
    return job.target_dir / f"{job.source.stem}_x{scale}.{fmt.extension}"


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except OSError:
        return False


def run_upscale(args: argparse.Namespace, settings: Settings) -> int:
    from upscale_server.imaging import encode_image, read_image_file
    from upscale_server.inference import ComputeConfig, InferenceService, tune_process

    jobs, problems = plan_jobs(args.inputs, args.output)
    for problem in problems:
        report(stderr, problem)
    compute = ComputeConfig.from_settings(settings)
    tune_process(settings, compute.device)
    inference = InferenceService(settings, compute)
    model = inference.check_model(args.model)  # unknown model: one line, before any work
    inference.check_factor(model, args.scale, schema=False)  # so is a factor the model does not serve
    sources = [job.source for job in jobs]
    failures = len(problems)
    written = 0
    with make_progress() as progress:
        files_task = progress.add_task("files", total=len(jobs))
        tiles_task = progress.add_task("", total=None, visible=False)
        for job in jobs:
            name = job.source.name
            try:
                picture = read_image_file(job.source)
                fmt = _output_format(args.format, picture)
                target = output_path(job, fmt, args.scale)
                if any(same_file(target, src) for src in sources):
                    raise UpscaleError(f"refusing to overwrite the input {target}")
                progress.update(tiles_task, description=f"  {name}", completed=0, total=None, visible=True)

                def on_tile(done: int, total: int) -> None:
                    progress.update(tiles_task, completed=done, total=total)

                result = inference.upscale(picture, args.scale, model, progress=on_tile)
                data = encode_image(result, fmt, quality=args.quality)
                atomic_write(target, data)
                written += 1
            except UpscaleError as exc:
                failures += 1
                report(progress.console, f"{name}: {exc.message}")
            except OSError as exc:
                failures += 1
                report(progress.console, f"{name}: {exc.strerror or exc}")
            finally:
                progress.update(tiles_task, visible=False)
                progress.advance(files_task)
    stderr.print(f"{written} written, {failures} failed", highlight=False)
    return 1 if failures else 0


def _output_format(requested: str | None, picture: Picture) -> ImageFormat:
    """``--format``, else the input's own format (PNG for anything but JPEG and WEBP)."""
    if requested is not None:
        return ImageFormat.from_extension(requested) or ImageFormat.PNG
    return ImageFormat.from_pillow(picture.source_format) or ImageFormat.PNG


def report(console: Console, problem: str) -> None:
    """One line per problem, never wrapped, so scripts can grep it."""
    console.print(f"{PROG}: error: {problem}", markup=False, highlight=False, soft_wrap=True)


def make_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=False,
    )


# --------------------------------------------------------------------------------------------- serve


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from upscale_server.app import create_app
    from upscale_server.connections import uvicorn_options
    from upscale_server.inference import ComputeConfig, tune_process
    from upscale_server.observability.logs import configure_logging

    role = args.role
    if role != "api":
        tune_process(settings, ComputeConfig.from_settings(settings).device)
    # Settings this machine cannot honour (a device, a key file, a cluster role without Redis): one line
    # here, not a failed start-up.
    app = create_app(settings, role)
    if settings.redis_url:
        from upscale_server.backends import check_cluster

        check_cluster(settings)  # Redis or S3 unusable: one line and exit code 2, before anything starts
    configure_logging(settings.log_format, settings.log_level)  # after the checks: their line stays alone
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        **uvicorn_options(settings),  # connection, header and frame bounds (upscale_server.connections)
        log_config=None,  # keep configure_logging's handler: uvicorn's own config would replace it
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )
    return 0


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    """A cluster worker is the serve command's process with the ``worker`` role: the same start-up checks,
    the same graceful stop (SIGTERM: take no new job, finish or hand back the running ones)."""
    return run_serve(args, settings)


# --------------------------------------------------------------------------------------------- doctor


def run_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from upscale_server.inference import doctor_report

    for line in doctor_report(settings, measure_model=args.model, measure=args.measure):
        print(line)  # noqa: T201 - the command's output
    return 0


# --------------------------------------------------------------------------------------------- models


def run_models(args: argparse.Namespace, settings: Settings) -> int:
    from upscale_server.inference.weights.local import LocalModels, describe
    from upscale_server.inference.weights.manifest import load_manifest
    from upscale_server.inference.weights.provision import WeightStore

    manifest = load_manifest()
    store = WeightStore(settings.resolved_models_dir(), allow_download=settings.allow_download)
    local = LocalModels(settings.resolved_models_dir(), manifest)
    # The table says why a file is not used; the scanner's warning for the server log would repeat it.
    logging.getLogger(LocalModels.__module__).setLevel(logging.ERROR)
    failures = 0
    if args.prepare:
        for spec in manifest.models:
            try:
                store.ensure(spec)
            except UpscaleError as exc:
                failures += 1 if spec.ncnn is not None else 0  # optional models may stay absent
                stderr.print(f"{spec.id}: {exc.message}", markup=False)
    table = Table(title=f"models in {settings.resolved_models_dir()}")
    for column in ("id", "name", "arch", "scale", "ready"):
        table.add_column(column, no_wrap=True)
    table.add_column("source", overflow="fold")
    for spec in manifest.models:
        status = store.status(spec)
        table.add_row(spec.id, spec.name, spec.arch, f"x{spec.scale}", "yes" if status.ready else "no", status.detail)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    console.print(table)
    files = local.scan()
    if files:
        own = Table(title="your models: other .pth / .safetensors files in that folder (detected from their weights)")
        for column in ("file", "id"):
            own.add_column(column, no_wrap=True)
        own.add_column("architecture, scale, hyper-parameters", overflow="fold")
        for found in files:
            if found.spec is None:
                own.add_row(found.path.name, "-", f"not used: {found.reason}")
            else:
                role = " (restoration: does not upscale)" if found.spec.scale == 1 else ""
                own.add_row(found.path.name, found.spec.id, describe(found.spec.arch_info) + role)
        console.print(own)
    if settings.model_aliases:
        aliases = Table(title="aliases (UPSCALE_MODEL_ALIASES): requests for these ids run the local model")
        aliases.add_column("requested id", no_wrap=True)
        aliases.add_column("runs", no_wrap=True)
        for alias, target in settings.model_aliases.items():
            aliases.add_row(alias, target)
        console.print(aliases)
    return 1 if failures else 0
