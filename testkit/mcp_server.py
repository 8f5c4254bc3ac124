"""A real MCP server for idemproxy's tests, built on the official Python SDK.

Streamable HTTP, stateful sessions, served by uvicorn on 127.0.0.1:

    python mcp_server.py PORT [IDLE_TIMEOUT_SECONDS] [--watch-stdin]

PORT 0 picks a free port. Once listening, the script prints one line
`LISTENING <port>` on stdout (the test waits for it). With `--watch-stdin`
it exits when its stdin closes, so it never outlives a test process that
died without stopping it.

- `POST/GET/DELETE /mcp`: the SDK's `StreamableHTTPSessionManager` with a
  short `session_idle_timeout`: a session with no HTTP request in flight for
  that long is closed by the SDK, and its id answers 404 from then on.
- Tool `record(call_id)`: a side effect. Every execution is appended to a
  list, so a call that ran twice is visible.
- `GET /stats` (plain HTTP, outside MCP): `{"runs": {call_id: count},
  "pings": N, "sessions": N, "idle_timeout": S}` so the test can count
  executions, pings that reached the server and sessions still open.
"""

import argparse
import json
import os
import socket
import sys
import threading

import anyio
import mcp_types as types
import uvicorn
from mcp.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

RUNS: list[str] = []
"""Every execution of the `record` tool, in order (its call_id)."""

PINGS = 0
"""MCP `ping` requests answered (idemproxy's heartbeats)."""


async def list_tools(ctx, params) -> types.ListToolsResult:
    return types.ListToolsResult(
        tools=[
            types.Tool(
                name="record",
                description="Records one execution of call_id (a side effect).",
                input_schema={
                    "type": "object",
                    "properties": {"call_id": {"type": "string"}},
                    "required": ["call_id"],
                },
            )
        ]
    )


async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
    if params.name != "record":
        return types.CallToolResult(content=[types.TextContent(text=f"unknown tool {params.name}")], is_error=True)
    call_id = str((params.arguments or {}).get("call_id", ""))
    RUNS.append(call_id)
    runs = RUNS.count(call_id)
    return types.CallToolResult(content=[types.TextContent(text=f"recorded {call_id} (run {runs})")])


async def ping(ctx, params) -> types.EmptyResult:
    global PINGS
    PINGS += 1
    return types.EmptyResult()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="port on 127.0.0.1 (0: pick one)")
    parser.add_argument("idle_timeout", type=float, nargs="?", default=2.5, help="session_idle_timeout, seconds")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    args = parser.parse_args()
    port, idle_timeout = args.port, args.idle_timeout
    if args.watch_stdin:

        def exit_on_eof() -> None:
            sys.stdin.read()
            os._exit(0)

        threading.Thread(target=exit_on_eof, daemon=True).start()

    server = Server("idemproxy-test-mcp", version="1", on_list_tools=list_tools, on_call_tool=call_tool, on_ping=ping)
    manager = StreamableHTTPSessionManager(
        app=server,
        session_idle_timeout=idle_timeout,
        # What the SDK's own streamable_http_app() sets up for a localhost server.
        security_settings=TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=["127.0.0.1:*", "localhost:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*"],
        ),
    )

    async def stats(request: Request) -> Response:
        counts: dict[str, int] = {}
        for call_id in RUNS:
            counts[call_id] = counts.get(call_id, 0) + 1
        doc = {
            "runs": counts,
            "pings": PINGS,
            # Private, but the only way to see which sessions the SDK still holds.
            "sessions": len(getattr(manager, "_server_instances", {})),
            "idle_timeout": idle_timeout,
        }
        return Response(json.dumps(doc), media_type="application/json")

    app = Starlette(
        routes=[
            Route("/mcp", endpoint=StreamableHTTPASGIApp(manager), methods=["GET", "POST", "DELETE"]),
            Route("/stats", endpoint=stats, methods=["GET"]),
        ],
        lifespan=lambda app: manager.run(),
    )

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    uvicorn_server = uvicorn.Server(config)

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(uvicorn_server.serve, [sock])
            with anyio.fail_after(10):
                while not uvicorn_server.started:
                    await anyio.sleep(0.01)
            print(f"LISTENING {sock.getsockname()[1]}", flush=True)

    anyio.run(serve)


if __name__ == "__main__":
    main()
