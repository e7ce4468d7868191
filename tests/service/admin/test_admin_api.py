"""The admin API through real gateway processes, over REST (httpx, curl's equal) and gRPC (the generated
stubs): create a key, use it, list, revoke; the revoked key is refused by every replica within the
stated delay (a 2 s poll of the database, or at once through Redis pub/sub); the master key is required;
no secret reaches a log line at DEBUG."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import orjson
import pytest
import yaml

from llm_gateway.v1 import admin_pb2, admin_pb2_grpc
from tests.fakes.upstream import FakeUpstream
from tests.harness import GatewayProcess, replicas
from tests.service.tenancy.conftest import RedisServer

MASTER = "mk-admin-0123456789abcdef"
CONFIG_KEY = "sk-gw-config-1234567890"
PROPAGATION = 2.0  # seconds: the poll interval (service/admin/sync.py), the stated delay without Redis


def config(upstream: FakeUpstream, database: str, redis_url: str = "", master: str | None = MASTER) -> dict[str, Any]:
    auth: dict[str, Any] = {"keys": [{"name": "from-config", "key": CONFIG_KEY}]}
    if master is not None:
        auth["master_key"] = master
    return {
        "logging": {"level": "DEBUG"},
        "routing": {"retries": 0},
        "providers": {"openai": {"type": "openai", "api_url": f"{upstream.url}/v1", "api_key": "sk-provider-0000"}},
        "models": {"gpt-4o": {"provider": "openai", "price": {"input": 2.5, "output": 10}}, "other": "openai"},
        "auth": auth,
        "state": {"redis_url": redis_url, "timeout": 2.0},
        "usage": {"database": database, "flush_interval": 0.05},
    }


def admin(gateway: GatewayProcess, master: str = MASTER) -> httpx.Client:
    return httpx.Client(base_url=f"{gateway.base_url}/admin", headers={"authorization": f"Bearer {master}"})


@contextlib.contextmanager
def admin_stub(gateway: GatewayProcess) -> Iterator[Any]:
    with gateway.channel() as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]


MASTER_METADATA = (("authorization", f"Bearer {MASTER}"),)


def chat(gateway: GatewayProcess, key: str, model: str = "gpt-4o") -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hello"}]},
        headers={"authorization": f"Bearer {key}"},
    )


def eventually(check: Callable[[], bool], timeout: float = PROPAGATION * 10) -> None:
    """Polls: the delay is stated (PROPAGATION), the bound is generous for a loaded machine."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def assert_no_secret_logged(gateways: list[GatewayProcess], *secrets: str) -> None:
    for gateway in gateways:
        text = gateway.log_text()
        assert "admin call" in text
        for secret in secrets:
            assert secret not in text


def create_over_rest(gateway: GatewayProcess, **body: Any) -> dict[str, Any]:
    with admin(gateway) as client:
        reply = client.post("/keys", json=body)
    assert reply.status_code == 200, reply.text
    created: dict[str, Any] = reply.json()
    return created


def test_create_use_list_revoke_over_rest_and_grpc_on_two_replicas_polling_sqlite(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    with replicas(config(upstream, f"sqlite:///{tmp_path}/usage.db"), tmp_path, count=2) as (one, two):
        created = create_over_rest(
            one,
            name="search-bot",
            models=["gpt-4o"],
            limits={"rpm": 100},
            budget={"usd": 5, "period": "month"},
            metadata={"team": "search"},
        )
        secret = created["secret"]
        assert secret.startswith("sk-gw-") and len(secret) > 40
        assert created["key"] == {
            "name": "search-bot",
            "models": ["gpt-4o"],
            "limits": {"rpm": 100},
            "budget": {"usd": 5.0, "period": "month"},
            "metadata": {"team": "search"},
            "source": "admin",
            "read_only": False,
            "created_at": created["key"]["created_at"],
        }
        # In force at once where it was created, and on the other replica within the poll.
        assert chat(one, secret).status_code == 200
        eventually(lambda: chat(two, secret).status_code == 200)
        reply = openai.OpenAI(base_url=f"{two.base_url}/v1", api_key=secret).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hello"}]
        )
        assert reply.choices[0].message.content == "Hello!"
        assert chat(two, secret, model="other").status_code == 404  # its models only
        # Listed over gRPC, without secrets; the config's key is there and read-only.
        with admin_stub(two) as stub:
            listed = stub.ListKeys(admin_pb2.ListKeysRequest(), metadata=MASTER_METADATA)
        assert [(k.name, k.source, k.read_only) for k in listed.keys] == [
            ("from-config", "config", True),
            ("search-bot", "admin", False),
        ]
        assert secret not in str(listed) and "sha256" not in str(listed)
        handled = 'llm_gateway_grpc_server_handled_total{grpc_code="OK",grpc_method="ListKeys"} 1.0'
        assert handled in httpx.get(f"{two.base_url}/metrics").text.splitlines()
        # Revoked over gRPC on one replica: 401 on both.
        with admin_stub(two) as stub:
            revoked = stub.RevokeKey(admin_pb2.RevokeKeyRequest(name="search-bot"), metadata=MASTER_METADATA)
        assert revoked.revoked_at
        assert chat(two, secret).status_code == 401
        eventually(lambda: chat(one, secret).status_code == 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{one.base_url}/v1", api_key=secret, max_retries=0).models.list()
        # Still listed, as revoked, when asked for.
        with admin(one) as client:
            keys = client.get("/keys", params={"include_revoked": "true"}).json()["keys"]
            assert [(k["name"], "revoked_at" in k) for k in keys] == [("from-config", False), ("search-bot", True)]
            assert [k["name"] for k in client.get("/keys").json()["keys"]] == ["from-config"]
        assert_no_secret_logged([one, two], secret, MASTER, CONFIG_KEY)


def test_keys_propagate_through_redis_pub_sub_with_postgresql(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer, postgres_url: str
) -> None:
    # Two workers each: every worker of every replica hears of the change.
    settings = config(upstream, postgres_url, redis_server.url)
    with replicas(settings, tmp_path, count=2, args=("--workers", "2")) as (one, two):
        with admin_stub(one) as stub:
            created = stub.CreateKey(
                admin_pb2.CreateKeyRequest(name="ops", metadata=orjson.dumps({"team": "ops"}).decode()),
                metadata=MASTER_METADATA,
            )
        assert created.key.source == "admin" and created.secret
        served = []  # the calls made with the key that were answered (the ledger records them under it)

        def status(gateway: GatewayProcess) -> int:
            code = chat(gateway, created.secret).status_code
            if code == 200:
                served.append(code)
            return code

        eventually(lambda: status(two) == 200)
        with admin(two) as client:
            assert client.delete("/keys/ops").status_code == 200
        eventually(lambda: status(one) == 401)
        for _ in range(8):  # new connections each time: the kernel hands them to either worker
            assert status(one) == 401 and status(two) == 401
        # Usage from the PostgreSQL ledger: the calls made with it, by key, team and model.
        with admin(one) as client:

            def usage() -> list[dict[str, Any]]:
                reply = client.get("/usage", params=[("group_by", "key"), ("group_by", "team"), ("group_by", "model")])
                rows: list[dict[str, Any]] = reply.json()["rows"]
                return [row for row in rows if row["key"] == "ops"]

            calls = len(served)
            eventually(lambda: len(usage()) == 1 and usage()[0]["requests"] == calls)
            (row,) = usage()
            assert (row["team"], row["model"], row["requests"]) == ("ops", "gpt-4o", calls)
            # 11 prompt and 7 completion tokens at USD 2.5 and 10 per 1M: 27.5 + 70 micro-dollars, rounded
            # once (half to even), per call.
            assert (row["prompt_tokens"], row["completion_tokens"]) == (11 * calls, 7 * calls)
            assert row["cost_micro_usd"] == 98 * calls
            assert row["cost_usd"] == f"0.{98 * calls:06d}"
        assert_no_secret_logged([one, two], created.secret, MASTER)


def test_the_master_key_is_required_over_rest_and_grpc(tmp_path: Path, upstream: FakeUpstream) -> None:
    with replicas(config(upstream, f"sqlite:///{tmp_path}/usage.db"), tmp_path, count=1) as (gateway,):
        for headers in ({}, {"authorization": "Bearer mk-wrong-0123456789abcdef"}, {"authorization": CONFIG_KEY}):
            for method, path in (("POST", "/admin/keys"), ("GET", "/admin/keys"), ("DELETE", "/admin/keys/x"),
                                 ("GET", "/admin/usage"), ("GET", "/admin/budgets")):  # fmt: skip
                reply = httpx.request(method, f"{gateway.base_url}{path}", headers=headers, json={"name": "x"})
                assert reply.status_code == 401, (method, path, headers)
                assert reply.json()["error"]["code"] == "invalid_api_key"
        # A gateway key is not the master key.
        reply = httpx.get(f"{gateway.base_url}/admin/keys", headers={"authorization": f"Bearer {CONFIG_KEY}"})
        assert reply.status_code == 401
        with admin_stub(gateway) as stub:
            for metadata in ((), (("authorization", "Bearer nope-nope-nope-nope"),)):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ListKeys(admin_pb2.ListKeysRequest(), metadata=metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        # Refusals: config keys are read-only, names are unique, models must be configured.
        with admin(gateway) as client:
            reply = client.delete("/keys/from-config")
            assert reply.status_code == 400 and "read-only" in reply.json()["error"]["message"]
            assert client.delete("/keys/nobody").status_code == 404
            assert client.post("/keys", json={"name": "from-config"}).status_code == 409
            assert client.post("/keys", json={"name": "dup"}).status_code == 200
            assert client.post("/keys", json={"name": "dup"}).status_code == 409
            # A name with the characters a key name may hold, percent-encoded in the path.
            assert client.post("/keys", json={"name": "team:bot@x"}).status_code == 200
            gone = client.delete("/keys/team%3Abot%40x")
            assert gone.status_code == 200 and gone.json()["name"] == "team:bot@x"
            bad = client.post("/keys", json={"name": "bad", "models": ["nope"]})
            assert bad.status_code == 400 and "'nope' is not a configured model" in bad.json()["error"]["message"]
            assert client.post("/keys", json={"name": "bad", "unknown": 1}).status_code == 400
            assert client.post("/keys", json={"name": "bad", "budget": {"usd": -1}}).status_code == 400
            assert client.get("/usage", params={"group_by": "nope"}).status_code == 400
            assert client.get("/usage", params={"start": "yesterday"}).status_code == 400
        with admin_stub(gateway) as stub:
            with pytest.raises(grpc.RpcError) as caught:
                stub.RevokeKey(admin_pb2.RevokeKeyRequest(name="from-config"), metadata=MASTER_METADATA)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        refused = [line for line in gateway.log_lines() if line.get("msg") == "admin call refused"]
        assert refused and all("authorization" not in line for line in refused)
        assert_no_secret_logged([gateway], MASTER, CONFIG_KEY, "mk-wrong-0123456789abcdef")


def test_without_a_master_key_the_admin_api_is_off(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = config(upstream, f"sqlite:///{tmp_path}/usage.db", master=None)
    with replicas(settings, tmp_path, count=1) as (gateway,):
        reply = httpx.get(f"{gateway.base_url}/admin/keys", headers={"authorization": f"Bearer {MASTER}"})
        assert reply.status_code == 403
        assert reply.json()["error"]["type"] == "permission_error"


def test_budgets_report_spend_against_their_limits(tmp_path: Path, upstream: FakeUpstream) -> None:
    with replicas(config(upstream, f"sqlite:///{tmp_path}/usage.db"), tmp_path, count=1) as (gateway,):
        created = create_over_rest(gateway, name="capped", budget={"usd": 1, "period": "day"})
        for _ in range(2):
            assert chat(gateway, created["secret"]).status_code == 200
        with admin(gateway) as client:

            def budgets() -> list[dict[str, Any]]:
                found: list[dict[str, Any]] = client.get("/budgets").json()["budgets"]
                return found

            eventually(lambda: budgets()[0].get("spent_usd") == "0.000196")
            (status,) = budgets()
        assert status == {
            "scope": "key",
            "name": "capped",
            "period": "day",
            "current": time.strftime("%Y-%m-%d", time.gmtime()),
            "limit_usd": "1.000000",
            "spent_usd": "0.000196",
            "counted_usd": "0.000196",
            "remaining_usd": "0.999804",
        }


def test_a_facade_in_front_of_a_remote_service_serves_the_admin_routes(
    tmp_path: Path, upstream: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    settings = config(upstream, f"sqlite:///{tmp_path}/usage.db")
    service = gateway_factory(settings, args=("--grpc-only",))
    facade = gateway_factory(settings, env={"GRPC_TARGET": service.grpc_address}, wait_grpc=False)
    created = create_over_rest(facade, name="remote-made")
    assert chat(facade, created["secret"]).status_code == 200
    with admin(facade) as client:
        reply = client.delete("/keys/from-config")  # the service's FAILED_PRECONDITION, over the channel
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "name"
        assert client.delete("/keys/remote-made").status_code == 200
    assert chat(facade, created["secret"]).status_code == 401
    unauthorized = httpx.get(f"{facade.base_url}/admin/keys")
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"


def test_created_keys_and_the_master_key_through_a_config_reload(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = config(upstream, f"sqlite:///{tmp_path}/usage.db")
    with replicas(settings, tmp_path) as (gateway,):
        created = create_over_rest(gateway, name="kept")
        assert gateway.config_path is not None
        new_master = "mk-rotated-0123456789abcdef"
        settings["auth"]["master_key"] = new_master
        scratch = gateway.config_path.with_name("next.yml")
        scratch.write_text(yaml.safe_dump(settings))
        os.replace(scratch, gateway.config_path)  # watched: the reload follows
        gateway.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        gateway.wait_log(lambda line: line.get("msg") == "config reloaded", timeout=20)
        # The created key is in force across the swap, and the rotated master key is the one accepted.
        old = {"authorization": f"Bearer {MASTER}"}
        eventually(lambda: httpx.get(f"{gateway.base_url}/admin/keys", headers=old).status_code == 401)
        assert chat(gateway, created["secret"]).status_code == 200
        with admin(gateway, new_master) as client:
            assert [k["name"] for k in client.get("/keys").json()["keys"]] == ["from-config", "kept"]
        assert_no_secret_logged([gateway], created["secret"], MASTER, new_master)
