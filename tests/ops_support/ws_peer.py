#!/usr/bin/env python3
"""A Python `websockets` peer for tests/operations.rs (permessage-deflate through wsgate).

    ws_peer.py server
        Serves WebSocket echo on 127.0.0.1 (a port the OS picks), permessage-deflate on
        (websockets' default). Prints `listening PORT`, then one JSON line per session:
        {"event": "session", "path": ..., "offered": <client's Sec-WebSocket-Extensions>,
         "negotiated": <the server's answer>}. Runs until killed.

    ws_peer.py client URL COUNT SIZE
        Connects (permessage-deflate offered, websockets' default), sends COUNT text messages
        of SIZE highly compressible bytes, checks each echo, closes with 1000 and prints one
        JSON line: {"negotiated": <Sec-WebSocket-Extensions answered>, "echoed": N,
        "payload_bytes": total}. Exit 0 on success, 1 on any failure (reason on stderr).

Works with websockets >= 10 (the legacy API's attribute names are tried as a fallback).
"""

import asyncio
import json
import sys

import websockets


def _request_headers(ws):
    req = getattr(ws, "request", None)
    if req is not None and hasattr(req, "headers"):
        return req.headers
    return ws.request_headers  # websockets < 14


def _response_headers(ws):
    resp = getattr(ws, "response", None)
    if resp is not None and hasattr(resp, "headers"):
        return resp.headers
    return ws.response_headers  # websockets < 14


async def server():
    async def handler(ws, *_path):
        req = _request_headers(ws)
        resp = _response_headers(ws)
        req_obj = getattr(ws, "request", None)
        path = getattr(req_obj, "path", None) or getattr(ws, "path", "")
        print(
            json.dumps(
                {
                    "event": "session",
                    "path": path,
                    "offered": req.get("Sec-WebSocket-Extensions"),
                    "negotiated": resp.get("Sec-WebSocket-Extensions"),
                }
            ),
            flush=True,
        )
        try:
            async for message in ws:
                await ws.send(message)
        except websockets.ConnectionClosed:
            pass

    async with websockets.serve(handler, "127.0.0.1", 0, max_size=None) as srv:
        port = list(srv.sockets)[0].getsockname()[1]
        print(f"listening {port}", flush=True)
        await asyncio.Future()


def payload(i, size):
    unit = f"message {i}: the quick brown fox jumps over the lazy dog. "
    return (unit * (size // len(unit) + 1))[:size]


async def client(url, count, size):
    async with websockets.connect(url, max_size=None, open_timeout=10) as ws:
        negotiated = _response_headers(ws).get("Sec-WebSocket-Extensions")
        total = 0
        for i in range(count):
            p = payload(i, size)
            await ws.send(p)
            echo = await asyncio.wait_for(ws.recv(), 10)
            if echo != p:
                print(f"echo {i} differs: {len(echo)} bytes back", file=sys.stderr)
                return 1
            total += len(p.encode())
        await ws.close(1000)
    print(
        json.dumps({"negotiated": negotiated, "echoed": count, "payload_bytes": total}),
        flush=True,
    )
    return 0


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "server":
        asyncio.run(server())
        return 0
    if len(sys.argv) == 5 and sys.argv[1] == "client":
        return asyncio.run(client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
