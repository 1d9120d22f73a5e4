#!/usr/bin/env python3
"""Two Python clients chat through the wshub `sharedflow` example server.

Usage: python3 tests/interop/chat.py ws://127.0.0.1:PORT/ws

tests/interop.rs starts the server and runs this script; it checks the exit
status and the lines printed here. Needs the `websockets` package
(`pip install websockets`); works with its new asyncio client (13+) and with
the legacy one (10.x, Debian's python3-websockets).

Exit status: 0 when every step passed, 1 when a step failed (the reason is
printed on stderr), 3 when `websockets` is not installed.
"""

import asyncio
import inspect
import sys

try:
    import websockets
except ImportError:
    print("python websockets package missing: pip install websockets", file=sys.stderr)
    sys.exit(3)

GREETING = "You are connected to WebSocket!"
TIMEOUT = 10.0  # seconds, for every single step


def connect(url):
    """Opens a client connection, never through an HTTP proxy (loopback only)."""
    kwargs = {"open_timeout": TIMEOUT, "close_timeout": TIMEOUT}
    if "proxy" in inspect.signature(websockets.connect).parameters:
        kwargs["proxy"] = None  # websockets 15+ honours *_proxy variables by default
    return websockets.connect(url, **kwargs)


async def expect(ws, name, want):
    got = await asyncio.wait_for(ws.recv(), TIMEOUT)
    if type(got) is not type(want) or got != want:
        raise AssertionError(f"{name} expected {want!r}, got {got!r}")
    kind = "text" if isinstance(want, str) else "binary"
    print(f"{name} received {kind} {want!r}", flush=True)


async def main(url):
    async with connect(url) as a, connect(url) as b:
        await expect(a, "A", GREETING)
        await expect(b, "B", GREETING)

        await a.send("Hello from Python")
        await expect(a, "A", "Hello from Python")
        await expect(b, "B", "Hello from Python")

        blob = b"\x00\x01binary from Python\xff"
        await b.send(blob)
        await expect(a, "A", blob)
        await expect(b, "B", blob)

        await asyncio.wait_for(a.close(), TIMEOUT)
        print(f"A closed with code {a.close_code}", flush=True)
        if a.close_code != 1000:
            raise AssertionError(f"A close code {a.close_code}, expected 1000")

        # The hub carries on for the client that stayed.
        await b.send("still here")
        await expect(b, "B", "still here")

        await asyncio.wait_for(b.close(), TIMEOUT)
        print(f"B closed with code {b.close_code}", flush=True)
        if b.close_code != 1000:
            raise AssertionError(f"B close code {b.close_code}, expected 1000")
    print(f"websockets {websockets.__version__}: chat OK", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1]), 6 * TIMEOUT))
    except Exception as err:  # report every failure the same way
        print(f"FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
