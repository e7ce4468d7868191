"""HTTP headers -> CallInfo: the metadata allow-list, request ids and client deadlines."""

from __future__ import annotations

import pytest
from sanic import HTTPResponse

from gateway.errors import InvalidRequestError
from rest_facade.app import Response
from rest_facade.headers import call_info, request_id


def test_metadata_is_an_allow_list() -> None:
    headers = {
        "authorization": "Bearer k",
        "traceparent": "00-abc-def-01",
        "tracestate": "a=b",
        "cookie": "secret",
        "x-api-key": "other",
        "grpc-timeout": "5S",
    }
    call = call_info(headers, "rid-1", 30.0)
    assert call.metadata == (
        ("x-request-id", "rid-1"),
        ("authorization", "Bearer k"),
        ("traceparent", "00-abc-def-01"),
        ("tracestate", "a=b"),
    )


def test_values_grpc_cannot_carry_are_dropped() -> None:
    call = call_info({"authorization": "Bearer \u00e9", "traceparent": "a\nb"}, "rid", 30.0)
    assert call.metadata == (("x-request-id", "rid"),)


def test_request_id() -> None:
    assert request_id({"x-request-id": "abc-123"}) == "abc-123"
    for bad in ("", "x" * 129, "new\nline", "caf\u00e9"):
        generated = request_id({"x-request-id": bad})
        assert generated != bad and len(generated) == 32
    assert request_id({}) != request_id({})


@pytest.mark.parametrize(
    ("headers", "timeout"),
    [
        ({}, 30.0),
        ({"x-request-timeout": "2.5"}, 2.5),
        ({"x-request-timeout": "999"}, 30.0),  # capped by the configured request timeout
        ({"grpc-timeout": "1500m"}, 1.5),
        ({"grpc-timeout": "2S"}, 2.0),
        ({"grpc-timeout": "1M"}, 30.0),
        ({"grpc-timeout": "250000u"}, 0.25),
        ({"grpc-timeout": "10000000n"}, 0.01),
        ({"x-request-timeout": "1", "grpc-timeout": "5S"}, 1.0),
    ],
)
def test_deadline(headers: dict[str, str], timeout: float) -> None:
    assert call_info(headers, "rid", 30.0).timeout == pytest.approx(timeout)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-request-timeout": "soon"},
        {"x-request-timeout": "0"},
        {"x-request-timeout": "-3"},
        {"x-request-timeout": "nan"},
        {"x-request-timeout": "inf"},
        {"grpc-timeout": "5"},
        {"grpc-timeout": "5s"},
        {"grpc-timeout": "123456789S"},
    ],
)
def test_bad_timeout_header(headers: dict[str, str]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        call_info(headers, "rid", 30.0)
    assert next(iter(headers)) in info.value.message


@pytest.mark.parametrize(
    ("value", "sent"),
    [("x-llm-gateway-model", "x-llm-gateway-model"), ("a\r\nb\x00c", "abc"), ("a\tb", "a\tb"), ("ünï", "ünï")],
)
def test_the_fast_header_check_sends_what_sanics_would(value: str, sent: str) -> None:
    assert Response._sanitize_header_value(value) == sent
    assert HTTPResponse._sanitize_header_value(value) == sent


@pytest.mark.parametrize("status", [200, 204, 304, 400])
def test_the_response_header_bytes_are_sanics(status: int) -> None:
    """The one-loop header rendering gives the bytes Sanic's own would, control characters included."""
    headers = {"x-request-id": "rid", "x-llm-gateway-model": "a\r\nb", "x-odd": "ünï", "content-length": 12}
    ours = Response(b"{}", status=status, headers=dict(headers), content_type="application/json")
    sanics = HTTPResponse(b"{}", status=status, headers=dict(headers), content_type="application/json")
    assert list(ours.processed_headers) == list(sanics.processed_headers)
