"""A mock OpenAI-compatible server with a fixed service time and ONE worker (requests queue).

    python tests/integration/bench_mock_server.py PORT SERVICE_MS [--not-openai]

Stdlib asyncio only, so it measures nothing but the queue: every request holds a
single lock for SERVICE_MS, then answers. ``/v1/embeddings`` answers one JSON
body; ``/v1/completions`` and ``/v1/chat/completions`` stream 4 tokens after the
service time (then 2 ms apart). ``--not-openai`` answers every route with an
HTML page (a server that is not OpenAI-compatible).
"""

from __future__ import annotations

import asyncio
import json
import sys

PORT = int(sys.argv[1])
SERVICE_S = float(sys.argv[2]) / 1000
NOT_OPENAI = "--not-openai" in sys.argv[3:]
LOCK = asyncio.Lock()


def _head(status: str, ctype: str, length: int | None) -> bytes:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\n{framing}\r\n\r\n".encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _stream(writer: asyncio.StreamWriter, chat: bool) -> None:
    writer.write(_head("200 OK", "text/event-stream", None))
    for i in range(4):
        choice = (
            {"index": 0, "delta": {"content": f"t{i}"}} if chat else {"index": 0, "text": f"t{i}"}
        )
        writer.write(_chunk(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"))
        await writer.drain()
        await asyncio.sleep(0.002)
    usage = {"choices": [], "usage": {"completion_tokens": 4}}
    writer.write(_chunk(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n"))
    writer.write(b"0\r\n\r\n")


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *headers = head.decode().split("\r\n")
            path = line.split(" ")[1]
            length = next((int(h.split(":")[1]) for h in headers
                           if h.lower().startswith("content-length")), 0)  # fmt: skip
            if length:
                await reader.readexactly(length)
            if NOT_OPENAI:
                body = b"<html>hello</html>"
                writer.write(_head("200 OK", "text/html", len(body)) + body)
            elif path in ("/ready", "/health", "/v1/models"):
                body = json.dumps({"object": "list", "data": [{"id": "mock"}]}).encode()
                writer.write(_head("200 OK", "application/json", len(body)) + body)
            else:
                async with LOCK:  # one worker: the others queue here
                    await asyncio.sleep(SERVICE_S)
                    if path.endswith("/embeddings"):
                        body = json.dumps({"data": [{"embedding": [0.0]}]}).encode()
                        writer.write(_head("200 OK", "application/json", len(body)) + body)
                    else:
                        await _stream(writer, chat="chat" in path)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", PORT)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
