"""The byte relay behind a handed-over gRPC address, on real sockets: bytes pass both
ways, bytes sent before the loopback side is up are kept, and the connection cap holds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time

from deployer.serving.grpc_relay import GrpcRelay, RelayLimits


async def _scenario() -> tuple[bytes, bytes, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    target = upstream.sockets[0].getsockname()[:2]
    limits = RelayLimits(max_connections=1)
    loop = asyncio.get_running_loop()
    relay = await loop.create_server(lambda: GrpcRelay(target, limits), "127.0.0.1", 0)
    port = relay.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"first bytes, sent at once")  # before the relay has its loopback side
    await writer.drain()
    first = await asyncio.wait_for(reader.readexactly(25), 5)
    writer.write(b"x" * 200_000)
    await writer.drain()
    big = await asyncio.wait_for(reader.readexactly(200_000), 5)
    # A second client over the cap of 1 is refused (closed at once).
    other_reader, other_writer = await asyncio.open_connection("127.0.0.1", port)
    refused = await asyncio.wait_for(other_reader.read(1), 5)
    open_now = limits.open
    other_writer.close()
    writer.close()
    relay.close()
    upstream.close()
    assert refused == b""
    return first, big[:3], open_now


def test_relay_passes_bytes_keeps_early_ones_and_caps_connections() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first, big, open_now = pool.submit(asyncio.run, _scenario()).result(timeout=30)
    assert first == b"FIRST BYTES, SENT AT ONCE"
    assert big == b"XXX"
    assert open_now == 1


def _slow_echo_server(name: bytes) -> tuple[object, int]:
    import grpc

    async def call(request: bytes, context: object) -> bytes:
        await asyncio.sleep(0.001)  # calls are in flight when the drain starts
        return name + request

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(call)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"M": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    return server, port


async def _handover_scenario(calls: list[str], stop: threading.Event) -> tuple[int, int]:
    """Instance 0 serves the public socket through its relay; each next one takes the
    socket over (a copy of it), the one before has its relays drained, and only then is
    its grpcio server stopped. Five handovers under calling clients."""
    loop = asyncio.get_running_loop()
    public = socket.create_server(("127.0.0.1", 0))
    public.setblocking(False)

    async def instance(name: bytes) -> tuple[object, RelayLimits, asyncio.base_events.Server]:
        server, port = _slow_echo_server(name)
        await server.start()
        limits = RelayLimits(64)
        relay = await loop.create_server(
            lambda: GrpcRelay(("127.0.0.1", port), limits), sock=public.dup()
        )
        return server, limits, relay

    current = await instance(b"0")
    calls.append(f"port {public.getsockname()[1]}")
    drained = forced = 0
    for number in range(1, 6):
        count = len(calls)
        while len(calls) < count + 100:  # the clients are calling through this instance
            await asyncio.sleep(0.01)
        following = await instance(str(number).encode())
        server, limits, relay = current
        relay.close()  # it stops accepting: new connections go to the next one
        drained += len(limits.relays)
        forced += await limits.drain(10)
        await server.stop(5)  # type: ignore[attr-defined]  # nobody is left calling it
        current = following
    count = len(calls)
    while len(calls) < count + 100:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.sleep(0.2)
    server, _, relay = current
    relay.close()
    await server.stop(1)  # type: ignore[attr-defined]
    public.close()
    return drained, forced


def test_a_drained_relay_moves_grpc_clients_off_without_a_failed_call() -> None:
    """Stopping grpcio under a calling client cancels calls (CANCELLED); draining the
    relay first (GOAWAY between frames, close when the passed-on calls ended) drops none."""
    import grpc

    calls: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        scenario = pool.submit(asyncio.run, _handover_scenario(calls, stop))
        while not calls:
            time.sleep(0.01)
        target = calls[0].split()[1]

        def client() -> None:
            channel = grpc.insecure_channel(f"127.0.0.1:{target}")
            method = channel.unary_unary("/t.S/M")
            while not stop.is_set():
                try:
                    calls.append(method(b"x", timeout=10).decode())
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")
            channel.close()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        draining, forced = scenario.result(timeout=120)
        for thread in threads:
            thread.join(timeout=20)
    assert failures == []
    assert draining >= 5  # each instance had clients when it drained
    assert forced == 0  # each connection left by itself once its calls were answered
    answers = calls[1:]
    firsts = [answers.index(f"{number}x") for number in range(6)]  # every one served
    assert firsts == sorted(firsts)
