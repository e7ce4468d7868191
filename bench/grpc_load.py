"""A gRPC load generator: closed-loop grpc.aio clients calling ChatService through the generated stubs.

`concurrency` tasks each own a channel (a local subchannel pool, so one TCP connection each, which
the kernel spreads over SO_REUSEPORT workers, as wrk's connections are). A task calls again as soon
as its previous call (the whole stream, for streams) has finished. Prints one `BENCH_JSON {...}` line.
Run it pinned (taskset) so it takes one core and leaves the other to the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc

from llm_gateway.v1 import chat_pb2, chat_pb2_grpc

_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


def _request(stream: bool) -> chat_pb2.CreateChatCompletionRequest:
    request = chat_pb2.CreateChatCompletionRequest(
        model="bench-stream" if stream else "bench-unary",
        messages=[chat_pb2.ChatMessage(role="user", content_text="Say hello.")],
    )
    if stream:
        request.stream = True
        request.stream_options.include_usage = True
    return request


async def _worker(
    target: str, stream: bool, start_at: float, stop_at: float, latencies: list[float], errors: list[int]
) -> None:
    request = _request(stream)
    async with grpc.aio.insecure_channel(target, options=_OPTIONS) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)  # type: ignore[no-untyped-call]
        clock = time.perf_counter
        while (began := clock()) < stop_at:
            try:
                if stream:
                    async for _ in stub.StreamChatCompletion(request, timeout=30):
                        pass
                else:
                    await stub.CreateChatCompletion(request, timeout=30)
            except grpc.aio.AioRpcError:
                if began >= start_at:
                    errors[0] += 1
                continue
            if began >= start_at:  # calls started in the warm-up second are not counted
                latencies.append(clock() - began)


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def run(target: str, stream: bool, concurrency: int, seconds: float, warmup: float) -> dict[str, float | int]:
    latencies: list[float] = []
    errors = [0]
    now = time.perf_counter()
    start_at, stop_at = now + warmup, now + warmup + seconds
    await asyncio.gather(*(_worker(target, stream, start_at, stop_at, latencies, errors) for _ in range(concurrency)))
    # Calls still running at stop_at finish after it: count the window up to the last one to end.
    elapsed = max(seconds, time.perf_counter() - start_at)
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "errors": errors[0],
        "seconds": round(elapsed, 3),
        "rps": round(len(ordered) / elapsed, 1),
        "p50_ms": round(_percentile(ordered, 50) * 1000, 3),
        "p90_ms": round(_percentile(ordered, 90) * 1000, 3),
        "p99_ms": round(_percentile(ordered, 99) * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--warmup", type=float, default=0.0, help="uncounted seconds first (the bench warms up separately)"
    )
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    stats = asyncio.run(run(args.target, args.stream, args.concurrency, args.seconds, args.warmup))
    print("BENCH_JSON " + json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
