"""gen/ is committed; it must be exactly what `make proto` makes from proto/ today."""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gen_proto  # noqa: E402


def _files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_gen_matches_proto(tmp_path: Path) -> None:
    gen_proto.generate(tmp_path)
    fresh, committed = _files(tmp_path), _files(ROOT / "gen")
    assert sorted(fresh) == sorted(committed), "gen/ has other files than `make proto` makes: run `make proto`"
    stale = [name for name in fresh if not filecmp.cmp(fresh[name], committed[name], shallow=False)]
    assert not stale, f"gen/ is stale against proto/ ({', '.join(stale)}): run `make proto` and commit gen/"


def test_http_rules_are_in_the_contract() -> None:
    from google.api import annotations_pb2

    from llm_gateway.v1 import chat_pb2

    rules = {
        m.name: m.GetOptions().Extensions[annotations_pb2.http]
        for m in chat_pb2.DESCRIPTOR.services_by_name["ChatService"].methods
    }
    assert (rules["CreateChatCompletion"].post, rules["CreateChatCompletion"].body) == ("/v1/chat/completions", "*")
    assert (rules["StreamChatCompletion"].post, rules["StreamChatCompletion"].body) == ("/v1/chat/completions", "*")
    assert rules["ListModels"].get == "/v1/models"
