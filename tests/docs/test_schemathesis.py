"""schemathesis against a live gateway on the dummy model, driven by openapi.yaml.

Every operation of the spec gets its examples, the coverage phase (boundary and invalid values) and ~50 fuzzed
requests each, valid and invalid. The run must find no 5xx and no response that breaks the spec (status, content
type, headers, body, each SSE event), and the gateway must still be up afterwards.

Checks left out, by design of the gateway:
  - positive_data_acceptance: `model` is free text in the schema, and a valid request for a model the gateway
    does not route is a 404 (model_not_found), not a 2xx;
  - negative_data_rejection: the gateway checks types, not OpenAI's value ranges; a provider does that (the
    dummy model accepts a temperature of 7);
  - ignored_auth: `authorization` is not checked by the gateway yet;
  - the stateful checks (use_after_free, ensure_resource_availability, object_level_authorization): the API
    creates no resources.
The seed is fixed so a run is reproducible; change it to explore further.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.docs.schemas import SPEC_PATH
from tests.harness import GatewayProcess
from tests.rest_facade.rest import call

SEED = 20260101
MAX_EXAMPLES = 50
EXCLUDED_CHECKS = (
    "positive_data_acceptance",
    "negative_data_rejection",
    "ignored_auth",
    "use_after_free",
    "ensure_resource_availability",
    "object_level_authorization",
)


def test_schemathesis_finds_nothing(gateway: GatewayProcess, tmp_path: Path) -> None:
    har = tmp_path / "schemathesis.har"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        str(SPEC_PATH),
        "--url",
        gateway.base_url,
        "--checks",
        "all",
        "--exclude-checks",
        ",".join(EXCLUDED_CHECKS),
        "--mode",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--request-timeout",
        "10",
        "--max-response-time",
        "5",
        "--report",
        "har",
        "--report-har-path",
        str(har),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert gateway.process is not None and gateway.process.poll() is None, (
        f"the gateway died during the run:\n{output[-6000:]}\n{gateway.log_text()[-3000:]}"
    )
    assert result.returncode == 0, output[-12000:]
    assert call(gateway.base_url, "GET", "/healthz").status == 200

    # The run reached the success paths, not only the errors: unary and streamed completions, and the models.
    seen: Counter[tuple[str, str, int, str]] = Counter()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        request, response = entry["request"], entry["response"]
        path = "/" + request["url"].split("/", 3)[3].split("?")[0]
        content_type = next((h["value"] for h in response["headers"] if h["name"].lower() == "content-type"), "")
        seen[request["method"], path, response["status"], content_type.split(";")[0]] += 1
    assert all(status < 500 for (_, _, status, _) in seen), seen
    for expected in (
        ("POST", "/v1/chat/completions", 200, "application/json"),
        ("POST", "/v1/chat/completions", 200, "text/event-stream"),
        ("POST", "/v1/chat/completions", 400, "application/json"),
        ("POST", "/v1/chat/completions", 404, "application/json"),
        ("GET", "/v1/models", 200, "application/json"),
        ("POST", "/v1/embeddings", 200, "application/json"),
        ("POST", "/v1/embeddings", 400, "application/json"),
    ):
        assert seen[expected] > 0, f"schemathesis never got {expected}: {seen}"
