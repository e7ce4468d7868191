"""`python -m bench`: the full benchmark, or `--smoke` for a few seconds of it (see bench/README.md)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from . import report
from .run import PATHS, PEERS, Bench, Options
from .upstream import MissingTool, require

HERE = Path(__file__).resolve().parent
NOTES = HERE / "profile-notes.md"  # hand-written profile findings, appended to RESULTS.md when present


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: floor, REST in-process and gRPC, 1 worker")
    parser.add_argument("--out", type=Path, help="output directory (default: bench/, or a temp dir with --smoke)")
    parser.add_argument("--seconds", type=float, help="measured seconds per scenario (default 8, smoke 1)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per scenario (default 2, smoke 0)")
    parser.add_argument("--workers", type=_ints, help="worker counts, e.g. 1,2")
    parser.add_argument("--concurrency", type=_ints, help="concurrency levels, e.g. 1,32")
    parser.add_argument("--paths", help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument(
        "--peers",
        help=f"comma-separated peers to measure too, of {','.join(PEERS)} (default: $BENCH_PEERS; "
        "$BENCH_LITELLM=1 means litellm)",
    )
    args = parser.parse_args(argv)
    smoke = args.smoke
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-smoke-")) if smoke else HERE)
    paths = (
        tuple(args.paths.split(",")) if args.paths else (("floor", "rest-inproc", "grpc-direct") if smoke else PATHS)
    )
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    peer_text = args.peers if args.peers is not None else os.environ.get("BENCH_PEERS", "")
    peers = tuple(p for p in peer_text.split(",") if p)
    if os.environ.get("BENCH_LITELLM") == "1" and "litellm" not in peers:
        peers = ("litellm", *peers)
    if set(peers) - set(PEERS):
        parser.error(f"unknown peers: {', '.join(sorted(set(peers) - set(PEERS)))} (known: {', '.join(PEERS)})")
    return Options(
        out=out,
        seconds=args.seconds or (1.0 if smoke else 8.0),
        warmup=args.warmup if args.warmup is not None else (0.0 if smoke else 2.0),
        workers=args.workers or ((1,) if smoke else (1, 2)),
        concurrency=args.concurrency or ((1, 4) if smoke else (1, 32)),
        paths=paths,
        peers=peers,
        info_level=not smoke,
        rss_pass=not smoke,
        smoke=smoke,
    )


def main(argv: list[str] | None = None) -> int:
    opts = options(argv)
    try:
        require("wrk", "wrk")
        require("nginx", "nginx")
    except MissingTool as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 3
    results = Bench(opts).run()
    extra = NOTES.read_text() if NOTES.exists() and not opts.smoke else ""
    json_path, md_path = report.write(results, opts, extra)
    print(f"bench: wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
