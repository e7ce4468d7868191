"""results.json and RESULTS.md from one run, with the issue's targets marked met or missed."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .run import Options, Results, Row

# The targets of issue 17 (and the per-feature budgets of issues 13 and 14), on this machine, as ratios
# from one run.
CPU_FULL_UNARY_MS = 0.25  # one key, rpm+tpm in memory, prices, the SQLite ledger
ADDED_P50_FULL_MS = 0.35
CPU_FULL_REDIS_UNARY_MS = 0.32  # the same with the limits in Redis (gateway CPU only)
CPU_FULL_STREAM_MS = 0.7
ANTHROPIC_STREAM_RATIO = 1.25  # Anthropic stream CPU / OpenAI-compatible stream CPU
KEYS_EXTRA_MS = 0.03  # keys + limits in memory, above no keys
REDIS_EXTRA_MS = 0.12  # keys + limits in Redis, above no keys
LEDGER_EXTRA_MS = 0.03  # prices + SQLite ledger, above keys + limits alone
LITELLM_RATIO = 60.0
PORTKEY_CPU_RATIO = 4.0
GRPC_UNARY_MS = 0.30
GRPC_STREAM_MS = 0.9
GRPC_FLOOR_RATIO = 1.3
RSS_MB = 80.0
RSS_GROWTH_MB = 2.0  # more than this between two identical passes counts as growth


def machine() -> dict[str, Any]:
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "?",
    )
    tools = {}
    for name, cmd in {"nginx": ["nginx", "-v"], "wrk": ["wrk", "-v"]}.items():
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            tools[name] = (done.stderr + done.stdout).strip().splitlines()[0]
        except (OSError, IndexError):
            tools[name] = "missing"
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "gateway", "service", "rest_facade", "proto", "gen").splitlines()
    return {
        "code": f"{git('rev-parse', '--short', 'HEAD') or '?'}"
        + (f" + {len(dirty)} uncommitted files" if dirty else ""),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        **tools,
    }


@dataclass
class Check:
    target: str
    measured: str
    limit: str
    met: bool | None  # None: not measured in this run
    informational: bool = False  # a number to watch, not a target

    @property
    def verdict(self) -> str:
        if self.informational:
            return "reported" if self.met is not None else "not measured"
        return "not measured" if self.met is None else ("met" if self.met else "**missed**")


def _find(rows: list[Row], path: str, workers: int, kind: str, c: int, run: int = 1) -> Row | None:
    return next(
        (
            r
            for r in rows
            if r.path == path and r.workers == workers and r.kind == kind and r.concurrency == c and r.run == run
        ),
        None,
    )


def added_p50(rows: list[Row], row: Row) -> float | None:
    """p50 at concurrency 1 minus the floor's, same body kind."""
    floor = _find(rows, "floor", 0, row.kind, 1)
    if row.concurrency != 1 or floor is None or row.path == "floor":
        return None
    return round(row.load.p50_ms - floor.load.p50_ms, 3)


def _gateway_cpu(row: Row | None) -> float | None:
    """The gateway's own CPU per request: without Redis's share, which is reported apart."""
    if row is None or row.cpu_ms is None:
        return None
    return row.cpu_split_ms.get("gateway", row.cpu_ms)


# The per-feature budgets and the base each is measured against, in the paired pass.
PAIRED_BUDGETS = (("rest-keys", "rest-inproc"), ("rest-keys-redis", "rest-inproc"), ("rest-full", "rest-keys"))


def paired_differences(results: Results, path: str, base: str) -> list[float]:
    """Per round of the paired pass: `path`'s gateway CPU per request minus `base`'s in the same round."""
    ours, theirs = results.paired_rounds.get(path), results.paired_rounds.get(base)
    if not ours or not theirs or len(ours) != len(theirs):
        return []
    return [round(a - b, 4) for a, b in zip(ours, theirs, strict=True)]


def paired_spread(results: Results) -> list[str]:
    """One line per budgeted feature: the median difference, its quartiles and every round's."""
    lines = []
    for path, base in PAIRED_BUDGETS:
        differences = paired_differences(results, path, base)
        if len(differences) < 2:
            continue
        low, _, high = statistics.quantiles(differences, n=4, method="inclusive")
        every = ", ".join(f"{d:+.3f}" for d in differences)
        lines.append(
            f"- {path} above {base}: median {statistics.median(differences):+.4f} ms, quartiles {low:+.4f} to "
            f"{high:+.4f} ({len(differences)} rounds: {every})"
        )
    return lines


def checks(results: Results, options: Options) -> list[Check]:
    rows, top = results.rows, max(options.concurrency)
    out: list[Check] = []

    def at_most(target: str, value: float | None, limit: float, unit: str = "ms", informational: bool = False) -> None:
        measured = "-" if value is None else (f"{value:.3f} ms" if unit == "ms" else f"{value:.2f}x")
        bound = f"≤ {limit} ms" if unit == "ms" else f"≤ {limit}x"
        out.append(Check(target, measured, bound, None if value is None else value <= limit, informational))

    def cpu(path: str, kind: str, workers: int = 1) -> float | None:
        return _gateway_cpu(_find(rows, path, workers, kind, top))

    def extra(path: str, base: str) -> float | None:
        """A feature's CPU above its base: the median of the paired pass's per-round differences when it
        ran, else its summed rows (run 3), else the two scenarios' first runs."""
        differences = paired_differences(results, path, base)
        if differences:
            return round(statistics.median(differences), 4)
        paired = [_find(rows, p, 1, "unary", top, run=3) for p in (path, base)]
        if all(paired):
            return diff(_gateway_cpu(paired[0]), _gateway_cpu(paired[1]))
        return diff(cpu(path, "unary"), cpu(base, "unary"))

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a - b, 4)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    at_most(
        f"REST unary, key + limits in memory + prices + SQLite ledger, CPU/req (c={top})",
        cpu("rest-full", "unary"),
        CPU_FULL_UNARY_MS,
    )
    row = _find(rows, "rest-full", 1, "unary", 1)
    at_most("REST unary, all of the above, added p50 at c=1", added_p50(rows, row) if row else None, ADDED_P50_FULL_MS)
    at_most(
        f"REST unary, the same with limits in Redis, gateway CPU/req (c={top})",
        cpu("rest-full-redis", "unary"),
        CPU_FULL_REDIS_UNARY_MS,
    )
    at_most(
        f"REST stream (20 chunks + usage), all of the above, CPU/stream (c={top})",
        cpu("rest-full", "stream"),
        CPU_FULL_STREAM_MS,
    )
    at_most(
        "Anthropic stream CPU / OpenAI-compatible stream CPU",
        ratio(cpu("rest-anthropic", "stream"), cpu("rest-inproc", "stream")),
        ANTHROPIC_STREAM_RATIO,
        "x",
    )
    at_most(
        "keys + rpm/tpm in memory: extra CPU/req above no keys (unary; paired pass)",
        extra("rest-keys", "rest-inproc"),
        KEYS_EXTRA_MS,
    )
    at_most(
        "keys + rpm/tpm in Redis: extra gateway CPU/req above no keys (unary; paired pass)",
        extra("rest-keys-redis", "rest-inproc"),
        REDIS_EXTRA_MS,
    )
    redis_row = _find(rows, "rest-keys-redis", 1, "unary", top)
    at_most(
        "Redis's own CPU/req (keys + limits, unary)",
        redis_row.cpu_split_ms.get("redis") if redis_row else None,
        1.0,
        informational=True,
    )
    at_most(
        "prices + SQLite ledger: extra CPU/req above keys + limits alone (unary; paired pass)",
        extra("rest-full", "rest-keys"),
        LEDGER_EXTRA_MS,
    )
    for kind in options.kinds:
        for workers in options.workers:
            ours = _find(rows, "rest-inproc", workers, kind, top)
            theirs = _find(rows, "litellm", workers, kind, top)
            name = f"req/s per worker ≥ {LITELLM_RATIO:.0f}x LiteLLM ({kind}, {workers} worker(s), c={top})"
            if ours is None or theirs is None or theirs.load.rps <= 0:
                out.append(Check(name, "-", f"≥ {LITELLM_RATIO:.0f}x", None))
                continue
            times = ours.load.rps / theirs.load.rps
            out.append(
                Check(
                    name,
                    f"{times:.1f}x ({ours.load.rps / workers:.0f} vs {theirs.load.rps / workers:.1f})",
                    f"≥ {LITELLM_RATIO:.0f}x",
                    times >= LITELLM_RATIO,
                )
            )
        theirs_cpu = cpu("portkey", kind)
        ours_cpu = cpu("rest-inproc", kind)
        less = None if theirs_cpu is None or not ours_cpu else theirs_cpu / ours_cpu
        out.append(
            Check(
                f"CPU/req ≥ {PORTKEY_CPU_RATIO:.0f}x less than Portkey's gateway ({kind}, c={top})",
                "-" if less is None else f"{less:.1f}x ({ours_cpu:.3f} vs {theirs_cpu:.3f} ms)",
                f"≥ {PORTKEY_CPU_RATIO:.0f}x",
                None if less is None else less >= PORTKEY_CPU_RATIO,
            )
        )
    for kind, limit in (("unary", GRPC_UNARY_MS), ("stream", GRPC_STREAM_MS)):
        value, floor = cpu("grpc-direct", kind), cpu("grpc-floor", kind)
        bound = max(limit, GRPC_FLOOR_RATIO * floor) if floor is not None else limit
        floor_text = f" (bare grpc.aio floor {floor:.3f} ms)" if floor is not None else ""
        out.append(
            Check(
                f"gRPC direct {kind}, CPU/{'req' if kind == 'unary' else 'stream'} (c={top}){floor_text}",
                "-" if value is None else f"{value:.3f} ms",
                f"≤ {limit} ms, or ≤ {GRPC_FLOOR_RATIO}x the floor",
                None if value is None else value <= bound,
            )
        )
    gateway_rss = [r for r in results.rss if r["instance"] not in ("litellm", "portkey")]
    worst = max((p["rss_mb"] for r in gateway_rss for p in r["pass1"] + (r["pass2"] or [])), default=None)
    out.append(
        Check(
            "RSS per gateway process after the run (every feature on included)",
            "-" if worst is None else f"max {worst:.1f} MB",
            f"< {RSS_MB:.0f} MB",
            None if worst is None else worst < RSS_MB,
        )
    )
    growths = [g for r in gateway_rss for g in rss_growth(r)]
    grow = max(growths, default=None)
    out.append(
        Check(
            "RSS growth between two back-to-back passes",
            "-" if grow is None else f"max {grow:+.1f} MB",
            f"≤ {RSS_GROWTH_MB} MB",
            None if grow is None else grow <= RSS_GROWTH_MB,
        )
    )
    return out


def summary(results: Results, options: Options) -> list[tuple[str, str]]:
    """The ratios at the top of RESULTS.md: the gateway against each peer and each floor."""
    rows, top = results.rows, max(options.concurrency)
    lines: list[tuple[str, str]] = []
    for kind in options.kinds:
        ours = _find(rows, "rest-inproc", 1, kind, top)
        if ours is None or ours.cpu_ms is None:
            continue
        for peer in ("litellm", "portkey"):
            theirs = _find(rows, peer, 1, kind, top)
            if theirs is not None and theirs.cpu_ms:
                lines.append(
                    (
                        f"{peer}, {kind}, 1 worker",
                        f"{theirs.load.rps and ours.load.rps / theirs.load.rps:.1f}x the req/s, "
                        f"{theirs.cpu_ms / ours.cpu_ms:.1f}x less CPU/req",
                    )
                )
            elif peer in options.peers:
                lines.append((f"{peer}, {kind}", results.failures.get(f"{peer} {kind}", "not measured")))
        floor = _find(rows, "proxy-floor", 1, kind, top)
        if floor is not None and floor.cpu_ms:
            lines.append(
                (f"nginx proxy (C floor), {kind}", f"gateway CPU/req = {ours.cpu_ms / floor.cpu_ms:.1f}x nginx's")
            )
        direct, bare = _find(rows, "grpc-direct", 1, kind, top), _find(rows, "grpc-floor", 1, kind, top)
        if direct is not None and bare is not None and direct.cpu_ms and bare.cpu_ms:
            lines.append(
                (
                    f"bare grpc.aio (gRPC floor), {kind}",
                    f"gRPC direct CPU/req = {direct.cpu_ms / bare.cpu_ms:.2f}x the floor's "
                    f"({direct.cpu_ms:.3f} vs {bare.cpu_ms:.3f} ms)",
                )
            )
    return lines


def rss_growth(entry: dict[str, Any]) -> list[float]:
    if not entry["pass2"]:
        return []
    first = {p["pid"]: p["rss_mb"] for p in entry["pass1"]}
    return [round(p["rss_mb"] - first[p["pid"]], 1) for p in entry["pass2"] if p["pid"] in first]


def to_json(results: Results, options: Options, info: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(results.started)),
            "machine": info,
            "options": {
                "seconds": options.seconds,
                "warmup": options.warmup,
                "workers": options.workers,
                "concurrency": options.concurrency,
                "paths": options.paths,
                "peers": options.peers,
                "smoke": options.smoke,
            },
            "rows": [{**r.as_dict(), "added_p50_ms": added_p50(results.rows, r)} for r in results.rows],
            "rss": [{**r, "growth_mb": rss_growth(r)} for r in results.rss],
            "targets": [
                {
                    "target": c.target,
                    "measured": c.measured,
                    "limit": c.limit,
                    "met": c.met,
                    "informational": c.informational,
                }
                for c in checks(results, options)
            ],
            "summary": dict(summary(results, options)),
            "paired_rounds_cpu_ms_per_req": results.paired_rounds,
            "failures": results.failures,
            "loadavg_1min": {"before": results.load_before, "after": results.load_after},
        },
        option=orjson.OPT_INDENT_2,
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def to_markdown(results: Results, options: Options, info: dict[str, Any], extra: str = "") -> str:
    date = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(results.started))
    lines = [
        "# Benchmark results" + (" (smoke run)" if options.smoke else ""),
        "",
        f"Generated by `make bench` (`python -m bench`) on {date}.",
        "",
        f"Machine: {info['nproc']} CPUs, {info['cpu_model']}, {info['memory_gb']} GiB; Python {info['python']}; "
        f"kernel {info['kernel']}; {info['nginx']}; {info['wrk']}. Code: {info['code']}.",
        "",
        f"Each scenario: {options.warmup:g} s warm-up, then {options.seconds:g} s measured. Load generators (wrk, "
        "the gRPC client) and nginx are pinned to one core; the gateway is not pinned, except at c=1, where the "
        "system under test shares the load generator's core (cross-core wake-ups in this VM cost more than a "
        "proxy does). Column meanings and how CPU is measured: [README.md](README.md).",
        "",
        f"1-minute load average before the run {results.load_before:.2f}, after {results.load_after:.2f}"
        + (" (**other work was running on the machine: numbers are skewed**)." if results.load_before > 1 else "."),
        "",
        "## Summary",
        "",
        "| against | ratio |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in summary(results, options)),
        "",
        "## Targets (issues 13, 14 and 17)",
        "",
        "| target | measured | limit | verdict |",
        "|---|---|---|---|",
        *(f"| {c.target} | {c.measured} | {c.limit} | {c.verdict} |" for c in checks(results, options)),
        "",
    ]
    spread = paired_spread(results)
    if spread:
        lines += [
            "The paired pass's per-round differences of gateway CPU per request (each budget above is their median):",
            "",
            *spread,
            "",
        ]
    lines += [
        "## All paths",
        "",
        "| path | workers | scenario | run | req/s | req/s/worker | p50 ms | p99 ms | added p50 ms | CPU ms/req"
        " | CPU split ms/req | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.rows:
        split = ", ".join(f"{k} {v:.3f}" for k, v in r.cpu_split_ms.items()) if len(r.cpu_split_ms) > 1 else ""
        lines.append(
            f"| {r.path} | {r.workers or '-'} | {r.kind} c={r.concurrency} | {r.run} | {r.load.rps:,.0f} | "
            f"{r.load.rps / max(1, r.workers):,.0f} | {r.load.p50_ms:.3f} | {r.load.p99_ms:.3f} | "
            f"{_fmt(added_p50(results.rows, r))} | {_fmt(r.cpu_ms)} | {split} | {r.note} |"
        )
    lines += [
        "",
        "## RSS per process (MB)",
        "",
        "| system | workers | process | after pass 1 | after pass 2 | growth |",
        "|---|---|---|---|---|---|",
    ]
    for entry in results.rss:
        second = {p["pid"]: p["rss_mb"] for p in entry["pass2"] or []}
        for p in entry["pass1"]:
            after = second.get(p["pid"])
            growth = "-" if after is None else f"{after - p['rss_mb']:+.1f}"
            cmd = p["cmd"].replace("|", "/")
            lines.append(
                f"| {entry['instance']} | {entry['workers']} | `{cmd}` | {p['rss_mb']:.1f} | {_fmt(after, 1)}"
                f" | {growth} |"
            )
    if results.failures:
        lines += ["", "## Not measured", ""]
        lines += [f"- {name}: {why}" for name, why in results.failures.items()]
    if extra:
        lines += ["", extra.strip()]
    return "\n".join(lines) + "\n"


def write(results: Results, options: Options, extra: str = "") -> tuple[Path, Path]:
    info = machine()
    options.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = options.out / "results.json", options.out / "RESULTS.md"
    json_path.write_bytes(to_json(results, options, info))
    md_path.write_text(to_markdown(results, options, info, extra))
    return json_path, md_path
