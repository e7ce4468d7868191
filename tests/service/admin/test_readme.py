"""The README's Budgets and Admin API sections work as written: their YAML parses to what they say, and
the admin curl commands run against a gateway configured with that YAML."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import orjson
import yaml

from gateway.config import parse
from tests.harness import ROOT, GatewayProcess

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"### {title}\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_budgets_example_parses() -> None:
    (example,) = blocks(section("Budgets"), "yaml")
    config = parse(yaml.safe_load(example), {"SEARCH_BOT_KEY": "sk-gw-search-bot-0123"})
    (key,) = config.auth.keys
    assert key.budget is not None and (key.budget.micro_usd, key.budget.period) == (100_000_000, "month")
    team = config.auth.teams["search"].budget
    assert team is not None and (team.micro_usd, team.period) == (1_000_000_000, "month")
    assert config.budgets.when_state_down == "allow"


def test_the_admin_api_commands_run_as_written(tmp_path: Path) -> None:
    text = section("Admin API")
    (example,) = blocks(text, "yaml")
    (script,) = blocks(text, "sh")
    master = re.search(r"export LLM_GATEWAY_MASTER_KEY=(\S+)", script)
    assert master is not None
    settings = {**yaml.safe_load(example), "usage": {"database": f"sqlite:///{tmp_path}/usage.db"}}
    gateway = GatewayProcess(settings, tmp_path, env={"LLM_GATEWAY_MASTER_KEY": master.group(1)}).start()
    try:
        commands = script.replace("\\\n", "").replace("localhost:8080", f"127.0.0.1:{gateway.port}")
        outputs = []
        env = ""
        for line in commands.splitlines():
            if line.startswith("export "):
                env = line + "; "
            elif line.startswith("curl "):
                done = subprocess.run(["bash", "-c", env + line], capture_output=True, text=True, timeout=30)
                assert done.returncode == 0, done.stderr
                outputs.append(orjson.loads(done.stdout))
        created, listed, usage, budgets, revoked = outputs
        assert created["secret"].startswith("sk-gw-") and created["key"]["name"] == "search-bot"
        assert [k["name"] for k in listed["keys"]] == ["search-bot"]
        assert usage["start"] == "2026-12-01T00:00:00Z" and usage.get("rows", []) == []  # no calls yet
        assert [(b["scope"], b["name"], b["limit_usd"]) for b in budgets["budgets"]] == [
            ("key", "search-bot", "100.000000")
        ]
        assert revoked["revoked_at"]
        assert master.group(1) not in gateway.log_text() and created["secret"] not in gateway.log_text()
    finally:
        gateway.stop()
