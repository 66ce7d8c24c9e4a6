"""`cliniko-sandbox` / `python -m cliniko_provider.sandbox`: a local Cliniko with a strict S3."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cliniko_provider.sandbox.config import (
    DEFAULT_API_KEY,
    SandboxSettings,
    parse_rate_limit,
    parse_same_user_key,
    shard_of,
    strip_shard,
)

# What the [sandbox] extra installs: without them the server would start and then answer 500s.
EXTRA_MODULES = ("boto3", "starlette", "uvicorn")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliniko-sandbox",
        description="A local Cliniko API (attachments, patients) with a strict S3 POST endpoint.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8765, help="port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help=f"an accepted API key, one account each; repeatable; the suffix after the last '-' names the"
        f" shard (default: {DEFAULT_API_KEY})",
    )
    parser.add_argument(
        "--same-user-key",
        action="append",
        type=parse_same_user_key,
        dest="same_user_keys",
        default=[],
        metavar="NEW_KEY=KEY",
        help="accept NEW_KEY as a second API key of the user of KEY (an --api-key): one account, one "
        "rate limit; repeatable",
    )
    parser.add_argument("--data-dir", type=Path, help="where state and files live (default: a temporary dir)")
    parser.add_argument(
        "--processing-delay",
        type=_non_negative,
        default=2.0,
        metavar="SECONDS",
        help="how long 'processing' takes after an attachment is created (default: %(default)s)",
    )
    parser.add_argument(
        "--processing-delay-per-mb",
        type=_non_negative,
        default=0.01,
        metavar="SECONDS",
        help="extra processing time per MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--rate-limit",
        type=parse_rate_limit,
        default=(200, 60.0),
        metavar="N/SECONDS",
        help="per user: every key of one user counts in one window (default: 200/60)",
    )
    parser.add_argument("--storage-limit", type=int, metavar="BYTES", help="per account (default: unlimited)")
    parser.add_argument(
        "--presign-ttl", type=int, default=900, metavar="SECONDS", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--fail-rate", type=_fraction, default=0.0, help="fraction answered with a random 5xx"
    )
    parser.add_argument("--throttle-rate", type=_fraction, default=0.0, help="fraction answered 429")
    parser.add_argument("--seed", type=int, help="seed for reproducible fault injection")
    parser.add_argument(
        "--header-timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="close a connection whose request headers are not complete by then (default: %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive,
        default=30.0,
        metavar="SECONDS",
        help="close a connection whose request body stops arriving for this long (default: %(default)s)",
    )
    parser.add_argument(
        "--seed-example-patients",
        action="store_true",
        help="create the example DAGs' patients (WH-1001 to WH-1004) in every account, unless there",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the server's log level (default: %(default)s)",
    )
    return parser


def missing_extra_modules() -> list[str]:
    """Return the modules of the ``[sandbox]`` extra that are not installed."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox until SIGINT or SIGTERM; return the exit code.

    :param argv: the command-line arguments (default ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    missing = missing_extra_modules()
    if missing:
        build_parser().exit(
            2,
            f"cliniko-sandbox: {', '.join(missing)} not installed. "
            "Fix: pip install 'airflow-provider-cliniko[sandbox]'\n",
        )
    if args.fail_rate + args.throttle_rate > 1:
        build_parser().error("--fail-rate plus --throttle-rate must not exceed 1")
    api_keys = list(dict.fromkeys(args.api_keys or [DEFAULT_API_KEY]))
    if len({strip_shard(key) for key in api_keys}) < len(api_keys):
        build_parser().error(
            "two --api-key values differ only in their shard suffix: Cliniko treats them as one key"
        )
    same_user_keys = dict(args.same_user_keys)
    for new_key, key in same_user_keys.items():
        if strip_shard(key) not in {strip_shard(accepted) for accepted in api_keys}:
            build_parser().error(f"--same-user-key: {key!r} is not an --api-key")
        if strip_shard(new_key) in {strip_shard(accepted) for accepted in api_keys}:
            build_parser().error(f"--same-user-key: {new_key!r} is already an --api-key of its own user")
    # Everything the sandbox writes is private: its database holds the S3 signing secret.
    os.umask(0o077)
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="cliniko-sandbox-")) if temporary else args.data_dir
    limit, window = args.rate_limit
    settings = SandboxSettings(
        data_dir=data_dir,
        host=args.host,
        api_keys=api_keys,
        same_user_keys=same_user_keys,
        processing_delay=args.processing_delay,
        processing_delay_per_mb=args.processing_delay_per_mb,
        rate_limit=limit,
        rate_window=window,
        storage_limit=args.storage_limit,
        presign_ttl=args.presign_ttl,
        fail_rate=args.fail_rate,
        throttle_rate=args.throttle_rate,
        seed=args.seed,
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        seed_example_patients=args.seed_example_patients,
    )
    from cliniko_provider.sandbox.server import serve  # the heavy imports, after argument errors

    accepted = ", ".join(f"{key} (shard {shard_of(key)})" for key in api_keys)
    # On stderr: stdout carries the one ready line that scripts wait for.
    print(
        f"Cliniko sandbox accepts the API key{'s' if len(api_keys) > 1 else ''}: {accepted}", file=sys.stderr
    )

    try:
        asyncio.run(serve(settings, args.host, args.port, args.log_level))
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0
