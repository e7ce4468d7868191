"""The benchmark run: every path and scenario in one go, so the ratios between them hold."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from . import features, load, systems
from .load import LoadResult
from .procs import CpuSample, free_port, pinned, rss_table
from .upstream import STREAM_CHUNKS, Nginx

Target = Callable[[int, float], LoadResult]  # (concurrency, seconds) -> result

PATHS = ("floor", "proxy-floor", "grpc-floor", "rest-inproc", "rest-separate", "grpc-direct", *features.FEATURES)
PEERS = ("litellm", "portkey")
# The feature scenarios whose budgets are differences to rest-inproc, measured again side by side (paired).
PAIRED = ("rest-keys", "rest-keys-redis", "rest-full", "rest-full-redis")
PAIRED_ROUNDS = 12
# RSS is read this long after a pass: the requests its load generator abandoned end, and their cycles go.
RSS_SETTLE_S = 2.0
PAIRED_SLICE_S = 1.5


@dataclass
class Options:
    out: Path
    seconds: float = 8.0
    warmup: float = 2.0
    workers: tuple[int, ...] = (1, 2)
    concurrency: tuple[int, ...] = (1, 32)
    kinds: tuple[str, ...] = ("unary", "stream")
    paths: tuple[str, ...] = PATHS
    peers: tuple[str, ...] = ()
    info_level: bool = True  # also measure the default INFO logging once
    rss_pass: bool = True  # repeat the highest-concurrency scenarios to check RSS growth
    smoke: bool = False


@dataclass
class Row:
    path: str
    workers: int
    kind: str
    concurrency: int
    load: LoadResult
    cpu_ms: float | None  # CPU of the system under test, all its processes, per request
    cpu_split_ms: dict[str, float] = field(default_factory=dict)
    run: int = 1
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "workers": self.workers,
            "kind": self.kind,
            "concurrency": self.concurrency,
            "run": self.run,
            **self.load.as_dict(),
            "rps_per_worker": round(self.load.rps / max(1, self.workers), 1),
            "cpu_ms_per_req": self.cpu_ms,
            "cpu_split_ms_per_req": self.cpu_split_ms,
            "note": self.note,
        }


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    rss: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    # 1-minute load average before and after: other work on the machine skews every number.
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])
    load_after: float = 0.0
    # The paired pass: each path's gateway CPU per request in each round, in round order (see paired()).
    paired_rounds: dict[str, list[float]] = field(default_factory=dict)


def _rest_target(
    url: str, kind: str, workdir: Path, authorization: str = "", headers: dict[str, str] | None = None
) -> Target:
    body = load.request_body(f"bench-{kind}", kind == "stream")
    return lambda c, s: load.wrk(url, body, c, s, workdir, LOADGEN_CPUS, authorization, headers)


def _body_target(url: str, body: bytes, workdir: Path) -> Target:
    return lambda c, s: load.wrk(url, body, c, s, workdir, LOADGEN_CPUS)


def _grpc_target(address: str, kind: str) -> Target:
    return lambda c, s: load.grpc(address, kind == "stream", c, s, LOADGEN_CPUS)


# The load generators and nginx share one core; the gateway gets the other (it is not pinned, so a
# second worker or gRPC's own threads may still use both). On a 1-core machine nothing is pinned.
LOADGEN_CPUS: set[int] | None = {max(os.sched_getaffinity(0))} if len(os.sched_getaffinity(0)) > 1 else None


def check_rest(url: str, kind: str, authorization: str = "", extra: dict[str, str] | None = None) -> None:
    """One request before measuring: the path answers correctly, so a fast error page is never timed."""
    body = load.request_body(f"bench-{kind}", kind == "stream")
    headers = {"content-type": "application/json", **({"authorization": authorization} if authorization else {})}
    headers.update(extra or {})
    request = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        data = response.read()
    if kind == "unary":
        reply = orjson.loads(data)
        if not reply.get("choices"):
            raise RuntimeError(f"{url}: unexpected unary reply {data[:200]!r}")
        return
    events = [e for e in data.split(b"\n\n") if e.startswith(b"data: ")]
    if events[-1] != b"data: [DONE]" or len(events) != STREAM_CHUNKS + 2:
        raise RuntimeError(f"{url}: expected {STREAM_CHUNKS} chunks, usage and [DONE], got {len(events)} events")


class Bench:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.results = Results()
        # Configs, logs and nginx's prefix: a temp dir, never the output directory.
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-work-"))

    def log(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def measure(
        self, path: str, workers: int, kind: str, target: Target, groups: dict[str, int], c: int, run: int = 1
    ) -> Row:
        # One request at a time is a chain of wake-ups (client, system, upstream, and back), and on this
        # VM a wake-up on the other core costs about 50 us of latency and CPU: the nginx proxy floor's
        # added p50 reads 0.18 ms across cores. At c=1 the system under test shares the load generator's
        # core, as the floor's nginx does, so the figures are the system's own and not the VM's.
        with pinned(list(groups.values()) if c == 1 else [], LOADGEN_CPUS):
            if self.o.warmup > 0:
                target(c, self.o.warmup)
            before = {name: CpuSample.take([pid]) for name, pid in groups.items()}
            result = target(c, self.o.seconds)
            after = {name: CpuSample.take([pid]) for name, pid in groups.items()}
        split = {name: round(after[name].since(before[name]) * 1000 / max(1, result.requests), 4) for name in groups}
        row = Row(path, workers, kind, c, result, round(sum(split.values()), 4) if groups else None, split, run)
        if result.errors:
            row.note = f"{result.errors} errors"
        self.results.rows.append(row)
        cpu = f"{row.cpu_ms:.3f} ms CPU/req" if row.cpu_ms is not None else ""
        self.log(
            f"{path:<16} w={workers} {kind:<6} c={c:<3} run {run}: {result.rps:>9.1f} req/s  "
            f"p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  {cpu} {row.note}"
        )
        return row

    def scenarios(
        self, path: str, workers: int, targets: dict[str, Target], groups: dict[str, int], run: int = 1
    ) -> None:
        top = max(self.o.concurrency)
        for kind in self.o.kinds:
            for c in self.o.concurrency if run == 1 else (top,):
                self.measure(path, workers, kind, targets[kind], groups, c, run)

    def instance(
        self, name: str, workers: int, paths: list[tuple[str, dict[str, Target], dict[str, int]]], roots: list[int]
    ) -> None:
        """Pass 1 (every scenario), RSS, pass 2 (the busiest scenarios again), RSS: growth between them."""
        for path, targets, groups in paths:
            self.scenarios(path, workers, targets, groups)
        time.sleep(RSS_SETTLE_S)
        first = rss_table(roots)
        if not self.o.rss_pass:
            self.results.rss.append({"instance": name, "workers": workers, "pass1": first, "pass2": None})
            return
        for path, targets, groups in paths:
            self.scenarios(path, workers, targets, groups, run=2)
        time.sleep(RSS_SETTLE_S)
        self.results.rss.append({"instance": name, "workers": workers, "pass1": first, "pass2": rss_table(roots)})

    # ------------------------------------------------------------------ the paths

    def floor(self, nginx: Nginx) -> None:
        targets = {}
        for kind in self.o.kinds:
            url = nginx.url(kind) + "/chat/completions"
            check_rest(url, kind)
            targets[kind] = _rest_target(url, kind, self.workdir)
        assert nginx.process is not None
        self.scenarios("floor", 0, targets, {"nginx": nginx.process.pid})

    def proxy_floor(self, nginx: Nginx) -> None:
        """nginx as a reverse proxy in front of the upstream: the C floor for a proxy. Like the gateway, it
        is not pinned (but at c=1: see measure)."""
        proxy = Nginx(self.workdir / "nginx-proxy", free_port(), None, proxy_to=nginx.port).start()
        try:
            targets = {}
            for kind in self.o.kinds:
                url = f"{proxy.url(kind)}/chat/completions"
                check_rest(url, kind)
                targets[kind] = _rest_target(url, kind, self.workdir)
            assert proxy.process is not None
            self.scenarios("proxy-floor", 1, targets, {"nginx-proxy": proxy.process.pid})
        finally:
            proxy.stop()

    def grpc_floor(self) -> None:
        """A bare grpc.aio service with fixed answers, called by the same gRPC load generator."""
        port = free_port()
        proc = systems.Proc(
            "grpc-floor",
            [sys.executable, "-m", "bench.grpc_floor", "--port", str(port)],
            systems.bench_env(),
            self.workdir,
        )
        try:
            proc.wait_listening(port, 1)
            address = f"127.0.0.1:{port}"
            targets = {kind: _grpc_target(address, kind) for kind in self.o.kinds}
            self.scenarios("grpc-floor", 1, targets, {"grpc-floor": proc.pid})
        finally:
            proc.stop()

    def feature(self, nginx: Nginx, feature: str, redis_url: str, redis_pid: int | None) -> None:
        """rest-inproc with one feature on (bench/features.py), one worker."""
        upstream = {kind: nginx.url(kind) for kind in ("unary", "stream")}
        base = systems.gateway_config(upstream, "WARNING")
        config = features.config(feature, base, nginx.base, self.workdir, redis_url)
        proc, rest, _ = systems.start_gateway(feature, self.workdir, config, 1)
        try:
            url = f"http://127.0.0.1:{rest}{features.path_of(feature)}"
            auth = features.authorization(feature)
            targets: dict[str, Target] = {}
            for kind in features.kinds_of(feature, self.o.kinds):
                if feature == "rest-embeddings":
                    body = features.embedding_body(kind)
                    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
                    with urllib.request.urlopen(request, timeout=30) as response:
                        features.check_embeddings(response.read(), kind)
                    targets[kind] = _body_target(url, body, self.workdir)
                else:
                    check_rest(url, kind, auth)
                    targets[kind] = _rest_target(url, kind, self.workdir, auth)
            groups = {"gateway": proc.pid, **({"redis": redis_pid} if redis_pid and feature.endswith("-redis") else {})}
            saved = self.o.kinds
            self.o.kinds = tuple(targets)
            try:
                self.instance(feature, 1, [(feature, targets, groups)], [proc.pid])
            finally:
                self.o.kinds = saved
        finally:
            proc.stop()

    def inproc(
        self, upstream: dict[str, str], workers: int, level: str = "WARNING", label: str = "rest-inproc"
    ) -> None:
        config = systems.gateway_config(upstream, level)
        proc, rest, _ = systems.start_gateway(f"{label}-w{workers}", self.workdir, config, workers)
        try:
            url = f"http://127.0.0.1:{rest}/v1/chat/completions"
            for kind in self.o.kinds:
                check_rest(url, kind)
            targets = {kind: _rest_target(url, kind, self.workdir) for kind in self.o.kinds}
            if level == "WARNING":
                self.instance(label, workers, [(label, targets, {"gateway": proc.pid})], [proc.pid])
            else:  # the logging cost: the busiest scenarios only
                top = max(self.o.concurrency)
                for kind in self.o.kinds:
                    self.measure(label, workers, kind, targets[kind], {"gateway": proc.pid}, top)
        finally:
            proc.stop()

    def separate(self, upstream: dict[str, str], workers: int) -> None:
        config = systems.gateway_config(upstream, "WARNING")
        service, _, grpc_port = systems.start_gateway(
            f"service-w{workers}", self.workdir, config, workers, grpc_only=True
        )
        procs = [service]
        try:
            paths: list[tuple[str, dict[str, Target], dict[str, int]]] = []
            if "rest-separate" in self.o.paths:
                facade, rest, _ = systems.start_gateway(
                    f"facade-w{workers}", self.workdir, config, workers, grpc_target=f"127.0.0.1:{grpc_port}"
                )
                procs.append(facade)
                url = f"http://127.0.0.1:{rest}/v1/chat/completions"
                for kind in self.o.kinds:
                    check_rest(url, kind)
                targets = {kind: _rest_target(url, kind, self.workdir) for kind in self.o.kinds}
                paths.append(("rest-separate", targets, {"facade": facade.pid, "service": service.pid}))
            if "grpc-direct" in self.o.paths:
                address = f"127.0.0.1:{grpc_port}"
                paths.append(
                    ("grpc-direct", {k: _grpc_target(address, k) for k in self.o.kinds}, {"service": service.pid})
                )
            self.instance("separate", workers, paths, [p.pid for p in procs])
        finally:
            for proc in reversed(procs):
                proc.stop()

    def litellm(self, upstream: dict[str, str], workers: int) -> None:
        proc, port, auth = systems.start_litellm(self.workdir, upstream, workers)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            for kind in self.o.kinds:
                check_rest(url, kind, auth)
            targets = {kind: _rest_target(url, kind, self.workdir, auth) for kind in self.o.kinds}
            self.instance("litellm", workers, [("litellm", targets, {"litellm": proc.pid})], [proc.pid])
        finally:
            proc.stop()

    # ------------------------------------------------------------------ the run

    def run(self) -> Results:
        nginx = Nginx(self.workdir / "nginx", free_port(), LOADGEN_CPUS).start()
        try:
            upstream = {kind: nginx.url(kind) for kind in ("unary", "stream")}
            if "floor" in self.o.paths:
                self.floor(nginx)
            if "proxy-floor" in self.o.paths:
                self.proxy_floor(nginx)
            if "grpc-floor" in self.o.paths:
                self.grpc_floor()
            for workers in self.o.workers:
                if "rest-inproc" in self.o.paths:
                    self.inproc(upstream, workers)
                if {"rest-separate", "grpc-direct"} & set(self.o.paths):
                    self.separate(upstream, workers)
            wanted = [f for f in features.FEATURES if f in self.o.paths]
            if wanted:
                self.run_features(nginx, wanted)
            if self.o.info_level and "rest-inproc" in self.o.paths:
                self.inproc(upstream, 1, level="INFO", label="rest-inproc INFO log")
            if "litellm" in self.o.peers:
                self.run_litellm(upstream)
            if "portkey" in self.o.peers:
                self.run_portkey(upstream)
        finally:
            nginx.stop()
        self.results.load_after = os.getloadavg()[0]
        shutil.rmtree(self.workdir, ignore_errors=True)  # kept when the run failed, for its logs
        return self.results

    def run_features(self, nginx: Nginx, wanted: list[str]) -> None:
        redis = None
        if set(wanted) & set(features.REDIS_FEATURES):
            try:
                redis = features.Redis(self.workdir, LOADGEN_CPUS).start()
            except Exception as exc:
                self.results.failures["redis"] = f"{type(exc).__name__}: {exc}"
                wanted = [f for f in wanted if f not in features.REDIS_FEATURES]
        try:
            for feature in wanted:
                try:
                    pid = redis.process.pid if redis is not None and redis.process is not None else None
                    self.feature(nginx, feature, redis.url if redis is not None else "", pid)
                except Exception as exc:  # reported in the results; the rest of the bench still runs
                    self.results.failures[feature] = f"{type(exc).__name__}: {str(exc)[-500:]}"
                    self.log(f"{feature} failed: {exc}")
            budgeted = [f for f in PAIRED if f in wanted]
            if budgeted and "rest-inproc" in self.o.paths and "unary" in self.o.kinds and not self.o.smoke:
                try:
                    self.paired(nginx, budgeted, redis)
                except Exception as exc:
                    self.results.failures["paired"] = f"{type(exc).__name__}: {str(exc)[-500:]}"
                    self.log(f"paired pass failed: {exc}")
        finally:
            if redis is not None:
                redis.stop()

    def paired(self, nginx: Nginx, wanted: list[str], redis: features.Redis | None) -> None:
        """The per-feature budgets (a few hundredths of a millisecond) are differences of two CPU figures,
        and on a shared 2-core machine one scenario run a minute after another can read 30% apart. Here
        rest-inproc and each feature's gateway run side by side, idle but for the one under load, and take
        turns: PAIRED_ROUNDS rounds of one slice each, in a rotated order, CPU and requests summed per
        path (rows: run 3, unary, top concurrency). Each round's CPU per request is kept too: a budget is
        the median over rounds of the feature's figure minus its base's in the same round, so a slice
        that another tenant of the host slowed down moves one difference, not the verdict."""
        upstream = {kind: nginx.url(kind) for kind in ("unary", "stream")}
        base = systems.gateway_config(upstream, "WARNING")
        redis_url = redis.url if redis is not None else ""
        redis_pid = redis.process.pid if redis is not None and redis.process is not None else None
        started: list[systems.Proc] = []
        try:
            turns: list[tuple[str, Target, dict[str, int]]] = []
            for path in ("rest-inproc", *wanted):
                if path in features.REDIS_FEATURES and not redis_url:
                    continue
                config = base
                if path != "rest-inproc":
                    config = features.config(path, base, nginx.base, self.workdir, redis_url)
                proc, rest, _ = systems.start_gateway(f"paired-{path}", self.workdir, config, 1)
                started.append(proc)
                url = f"http://127.0.0.1:{rest}/v1/chat/completions"
                auth = features.authorization(path)
                check_rest(url, "unary", auth)
                groups = {"gateway": proc.pid}
                if redis_pid and path.endswith("-redis"):
                    groups["redis"] = redis_pid
                turns.append((path, _rest_target(url, "unary", self.workdir, auth), groups))
            top = max(self.o.concurrency)
            for _, target, _ in turns:
                target(top, max(self.o.warmup, 0.5))
            cpu = {path: dict.fromkeys(groups, 0.0) for path, _, groups in turns}
            done: dict[str, list[LoadResult]] = {path: [] for path, _, _ in turns}
            rounds: dict[str, list[float]] = {path: [] for path, _, _ in turns}
            for round_ in range(PAIRED_ROUNDS):
                shift = round_ % len(turns)
                for path, target, groups in turns[shift:] + turns[:shift]:
                    before = {name: CpuSample.take([pid]) for name, pid in groups.items()}
                    result = target(top, PAIRED_SLICE_S)
                    done[path].append(result)
                    for name, pid in groups.items():
                        spent = CpuSample.take([pid]).since(before[name])
                        cpu[path][name] += spent
                        if name == "gateway":
                            rounds[path].append(round(spent * 1000 / max(1, result.requests), 4))
            self.results.paired_rounds = rounds
            for path, _, _ in turns:
                results = done[path]
                requests = sum(r.requests for r in results)
                seconds = sum(r.seconds for r in results)
                load = LoadResult(
                    requests,
                    sum(r.errors for r in results),
                    seconds,
                    requests / seconds if seconds else 0.0,
                    statistics.median(r.p50_ms for r in results),
                    statistics.median(r.p90_ms for r in results),
                    statistics.median(r.p99_ms for r in results),
                    sum(r.client_cpu_s for r in results),
                )
                split = {name: round(spent * 1000 / max(1, requests), 4) for name, spent in cpu[path].items()}
                row = Row(path, 1, "unary", top, load, round(sum(split.values()), 4), split, run=3, note="paired")
                self.results.rows.append(row)
                self.log(f"{path:<16} paired unary c={top}: {load.rps:>9.1f} req/s  {row.cpu_ms:.3f} ms CPU/req")
        finally:
            for proc in started:
                proc.stop()

    def run_litellm(self, upstream: dict[str, str]) -> None:
        problem = systems.litellm_status()
        if problem is not None:
            self.log(f"installing LiteLLM {systems.LITELLM_VERSION} into {systems.LITELLM_VENV}")
            problem = systems.install_litellm()
        if problem is not None:
            self.results.failures["litellm"] = f"install failed: {problem}"
            self.log(f"LiteLLM skipped: {problem}")
            return
        for workers in self.o.workers:
            try:
                self.litellm(upstream, workers)
            except Exception as exc:  # reported in the results, never fatal to the rest of the bench
                self.results.failures[f"litellm w={workers}"] = f"{type(exc).__name__}: {str(exc)[-500:]}"
                self.log(f"LiteLLM w={workers} failed: {exc}")

    def run_portkey(self, upstream: dict[str, str]) -> None:
        problem = systems.portkey_status()
        if problem is not None:
            self.log(f"installing Portkey's gateway {systems.PORTKEY_VERSION} into {systems.PORTKEY_DIR}")
            problem = systems.install_portkey()
        if problem is not None:
            self.results.failures["portkey"] = f"install failed: {problem}"
            self.log(f"Portkey skipped: {problem}")
            return
        proc, port = systems.start_portkey(self.workdir)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            targets: dict[str, Target] = {}
            for kind in self.o.kinds:
                headers = systems.portkey_headers(upstream[kind])
                try:
                    check_rest(url, kind, extra=headers)
                except Exception as exc:  # a peer's failure is reported, never hidden, never fatal
                    cause = systems.peer_error(proc.log)
                    self.results.failures[f"portkey {kind}"] = f"{type(exc).__name__}: {str(exc)[-300:]}" + (
                        f" (its log: {cause})" if cause else ""
                    )
                    self.log(f"Portkey {kind} failed its check: {exc}")
                    continue
                targets[kind] = _rest_target(url, kind, self.workdir, headers=headers)
            # One Node.js process: Portkey's server has no worker option.
            for kind, target in targets.items():
                for c in self.o.concurrency:
                    self.measure("portkey", 1, kind, target, {"portkey": proc.pid}, c)
        finally:
            proc.stop()
