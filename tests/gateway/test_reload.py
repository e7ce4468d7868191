"""Hot config reload with 2 workers, in both process modes: SIGHUP and the watch of the config's
directory (a Kubernetes ConfigMap's `..data` symlink swap included), validation before anything
changes, every worker on the same new config, calls in flight finishing on the old one."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import parse
from gateway.reload import changes, effective
from tests.fakes.upstream import FakeUpstream, chunks, completion
from tests.harness import GatewayProcess
from tests.rest_facade.rest import call, open_request, post, sse_json
from tests.rest_facade.stacks import MODES, WorkerStack, start_workers

SECRET = "sk-reload-secret-0123456789"
NEW_SECRET = "sk-reload-secret-new-9876543210"
PIECES = tuple(f"p{i} " for i in range(8))


def base_config(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "server": {"request_timeout": 30},
        "logging": {"level": "DEBUG"},  # each worker says at DEBUG that it applied a reload
        "routing": {"retries": 0},
        "providers": {"openai": {"api_key": SECRET, "api_url": f"{fake.url}/v1", "is_openai_compatible": True}},
        "models": {"gpt-4o": "openai", "gpt-4o-mini": "openai"},
    }


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def reset(fake: FakeUpstream) -> None:
    fake.received.clear()
    fake.reply(200, completion())


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def stacks() -> Iterator[list[WorkerStack]]:
    started: list[WorkerStack] = []
    yield started
    for stack in started:
        stack.signal(signal.SIGTERM)
        assert stack.wait() == [0] * len(stack.processes)


def start(
    mode: str, config: dict[str, Any] | None, tmp_path: Path, stacks: list[WorkerStack], path: Path | None = None
) -> WorkerStack:
    """Both processes of the remote mode read the one file, as two containers mounting one ConfigMap."""
    if path is None:
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(config))
    stack = start_workers(mode, None, tmp_path, config_file=path)
    stack.service.config_path = path
    stacks.append(stack)
    return stack


def config_path(stack: WorkerStack) -> Path:
    assert stack.service.config_path is not None
    return stack.service.config_path


def rewrite(path: Path, config: dict[str, Any]) -> None:
    """Replace the file in one step, as editors and `kubectl` do: a watcher never reads half of it."""
    scratch = path.with_name(f".{path.name}.new")
    scratch.write_text(yaml.safe_dump(config))
    os.replace(scratch, path)


def models(stack: WorkerStack) -> set[str]:
    reply = call(stack.base_url, "GET", "/v1/models")
    assert reply.status == 200, reply.body
    return {model["id"] for model in reply.json["data"]}


def wait_applied(stack: WorkerStack, reloads: int) -> None:
    """Until every process has logged `reloads` reloads and each of its workers applied them."""
    stack.wait_logs("config reloaded", reloads * len(stack.processes))
    stack.wait_logs("config applied", reloads * stack.workers * len(stack.processes))


def metric(stack: WorkerStack, line_start: str) -> float:
    text = call(stack.base_url, "GET", "/metrics").body.decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    assert len(values) == 1, (line_start, text)
    return values[0]


def test_add_then_remove_a_model_every_worker_agrees(
    mode: str, fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack]
) -> None:
    config = base_config(fake)
    stack = start(mode, config, tmp_path, stacks)
    assert models(stack) == {"gpt-4o", "gpt-4o-mini", "dummy"}

    config["models"]["gpt-4o-added"] = {"provider": "openai", "model": "gpt-4o-2024-11-20"}
    rewrite(config_path(stack), config)
    wait_applied(stack, 1)
    # Each request on a new connection, which the kernel hands to either worker: all of them agree.
    for _ in range(10):
        assert models(stack) == {"gpt-4o", "gpt-4o-mini", "gpt-4o-added", "dummy"}
    assert (
        post(stack.base_url, {"model": "gpt-4o-added", "messages": [{"role": "user", "content": "hi"}]}).status == 200
    )
    assert fake.received[-1].json["model"] == "gpt-4o-2024-11-20"

    del config["models"]["gpt-4o-mini"]
    rewrite(config_path(stack), config)
    wait_applied(stack, 2)
    for _ in range(10):
        assert models(stack) == {"gpt-4o", "gpt-4o-added", "dummy"}
        gone = post(stack.base_url, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        assert gone.status == 404 and gone.error["code"] == "model_not_found"

    reports = [line for line in stack.service.log_lines() if line["msg"] == "config reloaded"]
    assert [r["trigger"] for r in reports] == ["watch", "watch"]
    assert reports[0]["models_added"] == ["gpt-4o-added"] and reports[1]["models_removed"] == ["gpt-4o-mini"]
    assert metric(stack, 'llm_gateway_config_reloads_total{result="applied"}') == 2


def test_stream_in_flight_across_a_reload_finishes_intact(
    mode: str, fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack]
) -> None:
    config = base_config(fake)
    stack = start(mode, config, tmp_path, stacks)
    fake.stream(chunks(PIECES), delay=0.3)
    with open_request(
        stack.base_url, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ) as conn:
        response = conn.getresponse()
        assert response.status == 200
        first = response.readline() + response.readline()
        # The stream's model and provider both go away, and a SIGHUP reloads at once.
        config["providers"] = {"other": {"api_url": f"{fake.url}/v2", "is_openai_compatible": True}}
        config["models"] = {"gpt-4o-mini": "other"}
        rewrite(config_path(stack), config)
        stack.signal(signal.SIGHUP)
        wait_applied(stack, 1)
        fake.reply(200, completion())
        assert post(stack.base_url, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).status == 404
        rest = response.read()
    events = sse_json(first + rest)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "".join(PIECES)
    assert not any("error" in e for e in events)
    assert post(stack.base_url, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).status == 200
    assert fake.received[-1].path == "/v2/chat/completions"


def test_a_bad_config_is_rejected_and_the_old_one_keeps_serving(
    mode: str, fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack]
) -> None:
    config = base_config(fake)
    stack = start(mode, config, tmp_path, stacks)
    config_path(stack).write_text("")  # caught halfway through a rewrite
    stack.wait_logs("config reload rejected; the old config keeps serving", len(stack.processes))
    bad = {**config, "models": {**config["models"], "typo": {"provider": "opneai"}}}
    rewrite(config_path(stack), bad)
    stack.wait_logs("config reload rejected; the old config keeps serving", 2 * len(stack.processes))
    rejected = [line for p in stack.processes for line in p.log_lines() if line["msg"].startswith("config reload rej")]
    assert all(line["error"].endswith(": empty") for line in rejected[::2])
    assert all("models.typo" in line["error"] and "opneai" in line["error"] for line in rejected[1::2])
    for _ in range(4):
        assert models(stack) == {"gpt-4o", "gpt-4o-mini", "dummy"}
        assert post(stack.base_url, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).status == 200
    assert metric(stack, 'llm_gateway_config_reloads_total{result="rejected"}') == 2
    assert metric(stack, 'llm_gateway_config_reloads_total{result="applied"}') == 0

    # Fixed, with a change that needs a restart too: the rest applies, that key keeps its value.
    fixed = {
        **config,
        "server": {**config["server"], "max_body_bytes": 1000},
        "providers": {"openai": {**config["providers"]["openai"], "api_key": NEW_SECRET}},
    }
    rewrite(config_path(stack), fixed)
    wait_applied(stack, 1)
    report = next(line for line in stack.service.log_lines() if line["msg"] == "config reloaded")
    assert report["level"] == "WARN"
    assert report["needs_a_restart"] == ["server.max_body_bytes"] and report["providers_changed"] == ["openai"]
    assert post(stack.base_url, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).status == 200
    assert fake.received[-1].headers["Authorization"] == f"Bearer {NEW_SECRET}"
    for process in stack.processes:
        assert SECRET not in process.log_text() and NEW_SECRET not in process.log_text()


def test_configmap_symlink_swap_is_picked_up(
    mode: str, fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack]
) -> None:
    """Kubernetes' layout: config.yml -> ..data/config.yml, ..data -> ..<timestamp>; an update writes a
    new timestamped directory and renames a new ..data over the old one."""
    mount = tmp_path / "mount"
    config = base_config(fake)
    (mount / "..2026_12_01_10_00_00.1").mkdir(parents=True)
    (mount / "..2026_12_01_10_00_00.1" / "config.yml").write_text(yaml.safe_dump(config))
    (mount / "..data").symlink_to("..2026_12_01_10_00_00.1")
    (mount / "config.yml").symlink_to("..data/config.yml")
    stack = start(mode, None, tmp_path, stacks, path=mount / "config.yml")

    config["models"]["from-configmap"] = "openai"
    (mount / "..2026_12_01_10_02_00.2").mkdir()
    (mount / "..2026_12_01_10_02_00.2" / "config.yml").write_text(yaml.safe_dump(config))
    (mount / "..data_tmp").symlink_to("..2026_12_01_10_02_00.2")
    os.replace(mount / "..data_tmp", mount / "..data")
    shutil.rmtree(mount / "..2026_12_01_10_00_00.1")
    wait_applied(stack, 1)
    for _ in range(6):
        assert "from-configmap" in models(stack)


def test_sighup_without_a_change_counts_unchanged(
    mode: str, fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack]
) -> None:
    stack = start(mode, base_config(fake), tmp_path, stacks)
    sha = hashlib.sha256(config_path(stack).read_bytes()).hexdigest()
    assert metric(stack, f'llm_gateway_config_info{{sha256="{sha}"}}') == 1
    stack.signal(signal.SIGHUP)
    stack.wait_logs("config unchanged", len(stack.processes))
    assert metric(stack, 'llm_gateway_config_reloads_total{result="unchanged"}') == 1
    assert metric(stack, 'llm_gateway_config_reloads_total{result="applied"}') == 0
    assert stack.count_logs("config applied") == 0
    assert models(stack) == {"gpt-4o", "gpt-4o-mini", "dummy"}


def test_watch_config_false_leaves_file_changes_to_sighup(fake: FakeUpstream, tmp_path: Path) -> None:
    config = base_config(fake)
    config["server"]["watch_config"] = False
    gateway = GatewayProcess(config, tmp_path).start()
    try:
        assert gateway.config_path is not None
        config["models"]["later"] = "openai"
        rewrite(gateway.config_path, config)
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGHUP)
        report = gateway.wait_log(lambda line: line["msg"] == "config reloaded")
        assert report["trigger"] == "SIGHUP" and report["models_added"] == ["later"]
        assert "later" in {m["id"] for m in call(gateway.base_url, "GET", "/v1/models").json["data"]}
        assert not any(line["msg"] == "watching the config directory" for line in gateway.log_lines())
    finally:
        assert gateway.stop() == 0


def test_other_files_in_the_config_directory_are_not_watched(fake: FakeUpstream, tmp_path: Path) -> None:
    """The harness logs into the config's own directory, as a user running from one folder would: neither
    that log nor any other file there may trigger a reload (each would log and so trigger the next)."""
    gateway = GatewayProcess(base_config(fake), tmp_path).start()
    try:
        assert gateway.config_path is not None and gateway.log_path.parent == gateway.config_path.parent
        gateway.wait_log(lambda line: line["msg"] == "watching the config directory")
        for i in range(3):
            (tmp_path / "notes.txt").write_text(f"edit {i}")
            call(gateway.base_url, "GET", "/v1/models")
        time.sleep(2.5)  # over twice the watch's 1 s debounce: what would have fired, has
        text = call(gateway.base_url, "GET", "/metrics").body.decode()
        assert 'llm_gateway_config_reloads_total{result="unchanged"} 0.0' in text, text
        assert not any(line["msg"].startswith("config") for line in gateway.log_lines())
        assert not any("change detected" in line["msg"] for line in gateway.log_lines())
    finally:
        assert gateway.stop() == 0


def test_log_level_follows_a_reload(fake: FakeUpstream, tmp_path: Path) -> None:
    config = base_config(fake)
    gateway = GatewayProcess(config, tmp_path).start()
    try:
        assert gateway.config_path is not None and gateway.process is not None

        def rejected_lines() -> int:
            assert post(gateway.base_url, b"{not json").status == 400  # logged at INFO
            return sum(line["msg"] == "request rejected" for line in gateway.log_lines())

        assert rejected_lines() == 1
        config["logging"] = {"level": "WARNING"}
        rewrite(gateway.config_path, config)
        gateway.process.send_signal(signal.SIGHUP)
        gateway.wait_log(lambda line: line["msg"] == "config reloaded")
        assert rejected_lines() == 1
    finally:
        assert gateway.stop() == 0


def test_unchanged_provider_keeps_its_pool_and_a_replaced_one_closes_after_its_last_request(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    config = base_config(fake)
    gateway = GatewayProcess(config, tmp_path).start()  # one worker: one pool to look at
    hello = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    try:
        assert gateway.config_path is not None and gateway.process is not None
        assert post(gateway.base_url, hello).status == 200
        first = fake.received[-1]

        config["models"]["another"] = "openai"  # the provider's settings stay as they are
        rewrite(gateway.config_path, config)
        gateway.process.send_signal(signal.SIGHUP)
        gateway.wait_log(lambda line: line["msg"] == "config reloaded")
        assert post(gateway.base_url, hello).status == 200
        assert fake.received[-1].peer_port == first.peer_port  # the same kept-alive connection

        fake.stream(chunks(PIECES), delay=0.3)
        with open_request(gateway.base_url, {**hello, "stream": True}) as conn:
            response = conn.getresponse()
            head = response.readline() + response.readline()  # the first event
            streaming = fake.received[-1]
            config["providers"]["openai"]["read_timeout"] = 120  # changed: a new provider, a new pool
            rewrite(gateway.config_path, config)
            gateway.process.send_signal(signal.SIGHUP)
            gateway.wait_log(lambda line: line["msg"] == "config reloaded" and "providers_changed" in line)
            fake.reply(200, completion())
            assert post(gateway.base_url, hello).status == 200
            assert fake.received[-1].peer_port not in (first.peer_port, streaming.peer_port)
            assert not streaming.connection_closed  # the old pool is still serving its stream
            events = sse_json(head + response.read())
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "".join(PIECES)
        deadline = time.monotonic() + 10
        while not (first.connection_closed and streaming.connection_closed) and time.monotonic() < deadline:
            time.sleep(0.05)  # the old core notices its last call ended, then closes its pool
        assert first.connection_closed and streaming.connection_closed
        assert not fake.received[-1].connection_closed  # the new pool's connection stays open
    finally:
        assert gateway.stop() == 0


def test_keys_added_and_removed_by_a_reload(
    mode: str, fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack]
) -> None:
    alpha, beta, gamma = "gk-alpha-0123456789", "gk-beta-0123456789", "gk-gamma-0123456789"
    config = base_config(fake)
    config["auth"] = {"keys": [{"name": "alpha", "key": alpha}, {"name": "beta", "key": beta}]}
    stack = start(mode, config, tmp_path, stacks)
    hello = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

    def status(key: str) -> int:
        return post(stack.base_url, hello, headers={"authorization": f"Bearer {key}"}).status

    assert (status(alpha), status(beta), status(gamma)) == (200, 200, 401)
    config["auth"] = {"keys": [{"name": "alpha", "key": alpha}, {"name": "gamma", "key": gamma}]}
    rewrite(config_path(stack), config)
    wait_applied(stack, 1)
    for _ in range(4):  # on either worker
        assert (status(alpha), status(beta), status(gamma)) == (200, 401, 200)
    report = next(line for line in stack.service.log_lines() if line["msg"] == "config reloaded")
    assert report["keys_added"] == ["gamma"] and report["keys_removed"] == ["beta"]
    for process in stack.processes:
        assert not any(key in process.log_text() for key in (alpha, beta, gamma))


def test_the_change_report_names_what_changed_and_never_a_value() -> None:
    def parsed(**sections: Any) -> Any:
        return parse({"providers": {"p": {"api_key": SECRET, "is_openai_compatible": True}}, **sections}, {})

    old = parsed(models={"a": "p", "b": "p"}, server={"port": 8080, "shutdown_grace": 30})
    new = parse(
        {
            "providers": {"p": {"api_key": NEW_SECRET, "is_openai_compatible": True}},
            "models": {"b": "p", "c": "p"},
            "server": {"port": 9090, "shutdown_grace": 5},
            "routing": {"retries": 1},
        },
        {},
    )
    report = changes(old, new)
    assert report == {
        "models_added": ["c"],
        "models_removed": ["a"],
        "providers_changed": ["p"],
        "sections_changed": ["routing"],
    }
    assert SECRET not in repr(report) and NEW_SECRET not in repr(report)
    applied, restart = effective(old, new)
    assert restart == ["server.port"]
    assert applied.server.port == 8080 and applied.server.shutdown_grace == 5
    assert changes(old, old) == {}


def test_a_deployment_in_cooldown_stays_benched_across_a_reload(tmp_path: Path) -> None:
    """A reload that leaves a failing deployment's provider as it was keeps it cooling down; one that
    changes the provider (a fixed key, say) gives it a fresh start."""
    failing, healthy = FakeUpstream().start(), FakeUpstream().start()
    failing.reply(500, {"error": {"message": "down", "type": "server_error"}})
    healthy.reply(200, completion())
    config = {
        "server": {"request_timeout": 30},
        "logging": {"level": "DEBUG"},
        "routing": {"retries": 1, "backoff_initial": 0.01, "backoff_max": 0.02, "cooldown_failures": 1},
        "providers": {
            name: {"api_key": SECRET, "api_url": f"{fake.url}/v1", "is_openai_compatible": True}
            for name, fake in (("a", failing), ("b", healthy))
        },
        # least_inflight picks the first of equals: deployment a, whenever it is not cooling down.
        "models": {
            "gpt-4o": {
                "load_balancing": "least_inflight",
                "deployments": [{"provider": "a", "name": "a"}, {"provider": "b", "name": "b"}],
            }
        },
    }
    gateway = GatewayProcess(config, tmp_path).start()
    hello = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

    def reload(count: int) -> None:
        assert gateway.config_path is not None and gateway.process is not None
        rewrite(gateway.config_path, config)
        gateway.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while sum(line["msg"] == "config reloaded" for line in gateway.log_lines()) < count:
            assert time.monotonic() < deadline, gateway.log_text()
            time.sleep(0.05)

    try:
        assert post(gateway.base_url, hello).status == 200  # a fails, the retry on b answers
        assert len(failing.received) == 1
        config["models"]["gpt-4o-mini"] = "b"  # a change elsewhere: a's provider stays as it was
        reload(1)
        for _ in range(4):
            assert post(gateway.base_url, hello).status == 200
        assert len(failing.received) == 1  # still benched: nothing went to a
        config["providers"]["a"]["read_timeout"] = 99  # a's provider changes: a starts healthy
        reload(2)
        assert post(gateway.base_url, hello).status == 200
        assert len(failing.received) == 2
    finally:
        assert gateway.stop() == 0
        failing.stop()
        healthy.stop()
