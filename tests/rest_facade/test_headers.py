"""HTTP headers -> CallInfo: the metadata allow-list, request ids and client deadlines."""

from __future__ import annotations

import pytest
from sanic import HTTPResponse
from sanic.headers import format_http1_response

from gateway.errors import InvalidRequestError
from rest_facade.headers import call_info, request_id
from rest_facade.response import Response


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
@pytest.mark.parametrize(
    "odd",
    [
        {},
        {"x-llm-gateway-model": "a\r\nb"},
        {"x-llm-gateway-model": "a\x00b"},
        {"x-odd": "ünï"},
        {"x-tab": "a\tb\x7f"},
        {"x-lf": "a\nb", "x-cr": "c\rd"},
    ],
)
def test_the_response_header_bytes_are_sanics(status: int, odd: dict[str, str]) -> None:
    """The one-string header rendering gives the bytes Sanic's own would, control characters included."""
    headers = {"x-request-id": "rid", **odd, "content-length": 12, "connection": "keep-alive"}
    ours = Response(b"{}", status=status, headers=dict(headers), content_type="application/json")
    sanics = HTTPResponse(b"{}", status=status, headers=dict(headers), content_type="application/json")
    assert format_http1_response(status, ours.processed_headers) == format_http1_response(
        status, sanics.processed_headers
    )


def test_a_name_sanic_refuses_is_refused() -> None:
    ours = Response(b"{}", headers={"x-naïve": "v"}, content_type="application/json")
    with pytest.raises(UnicodeEncodeError):
        ours.processed_headers  # noqa: B018
    with pytest.raises(UnicodeEncodeError):
        list(HTTPResponse(b"{}", headers={"x-naïve": "v"}, content_type="application/json").processed_headers)


def test_no_headers() -> None:
    assert format_http1_response(204, Response(status=204).processed_headers) == format_http1_response(
        204, HTTPResponse(status=204).processed_headers
    )
