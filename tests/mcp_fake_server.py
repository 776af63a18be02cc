"""A test double: a minimal stdio MCP server written without the SDK, for the fault tests.

Named as a double: it speaks just enough MCP (the initialize handshake, tools/list,
tools/call; `server/discover` is answered "method not found", so clients fall back to the
handshake) to be a real server to trustee, and starts in milliseconds (no SDK import), so a
test can run dozens at once on two cores. Behaviour by `--mode`:

- `ok`: tools `echo(text)`, `add(n)` (adds to a counter kept in this process: state),
  `info()` (its arguments and `$FAKE_TAG`), `crash()` (writes to stderr, exits with status 3),
  `hang()` (never answers);
- `silent`: reads its stdin and never answers anything (an `initialize` that never returns);
- `die`: writes a line to stderr and exits 1 before reading anything.

`--after-first PATH`: the mode applies from the second start on (the first start, which
is the environment's tool discovery, creates PATH and behaves as `ok`).
`--ignore-eof`: does not exit when its stdin closes (it must be killed).
`--child` also starts a grandchild (`sleep 300`) in the server's process group;
`--pidfile PATH` appends the server's pid (and the grandchild's) to PATH.
"""

import json
import os
import subprocess
import sys
import time

TOOLS = [
    {
        "name": "echo",
        "description": "Echo the text back.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
    {
        "name": "add",
        "description": "Add n to this server's counter and return the total.",
        "inputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    },
    {"name": "crash", "description": "Exit at once.", "inputSchema": {"type": "object", "properties": {}}},
    {
        "name": "info",
        "description": "Arguments and FAKE_TAG.",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {"name": "hang", "description": "Never answer.", "inputSchema": {"type": "object", "properties": {}}},
]


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def main():
    args = sys.argv[1:]
    mode = args[args.index("--mode") + 1] if "--mode" in args else "ok"
    if "--after-first" in args:
        marker = args[args.index("--after-first") + 1]
        if not os.path.exists(marker):
            open(marker, "w").close()
            mode = "ok"
    pids = [os.getpid()]
    if "--child" in args:
        pids.append(subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL).pid)
    if "--pidfile" in args:
        with open(args[args.index("--pidfile") + 1], "a") as f:
            f.write("".join(f"{p}\n" for p in pids))
    if mode == "die":
        sys.stderr.write("fake server: refusing to start\n")
        sys.exit(1)
    counter = 0
    for line in sys.stdin:
        if mode == "silent" or not line.strip():
            continue
        msg = json.loads(line)
        if "id" not in msg:
            continue  # a notification
        method, rid, params = msg.get("method"), msg["id"], msg.get("params") or {}
        if method == "initialize":
            send(
                {
                    "jsonrpc": "2.0",
                    "id": rid,
                    "result": {
                        "protocolVersion": params.get("protocolVersion"),
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": "fake", "version": "0"},
                    },
                }
            )
        elif method == "tools/list":
            send({"jsonrpc": "2.0", "id": rid, "result": {"tools": TOOLS}})
        elif method == "tools/call":
            name, a = params.get("name"), params.get("arguments") or {}
            if name == "echo":
                text = json.dumps({"echo": a.get("text")})
            elif name == "add":
                counter += int(a.get("n", 0))
                text = json.dumps({"total": counter})
            elif name == "info":
                text = json.dumps({"argv": sys.argv[1:], "tag": os.environ.get("FAKE_TAG")})
            elif name == "crash":
                sys.stderr.write("fake server: crashing on purpose\n")
                sys.stderr.flush()
                os._exit(3)
            elif name == "hang":
                time.sleep(3600)
                continue
            else:
                send(
                    {
                        "jsonrpc": "2.0",
                        "id": rid,
                        "error": {"code": -32602, "message": f"Unknown tool: {name}"},
                    }
                )
                continue
            send(
                {
                    "jsonrpc": "2.0",
                    "id": rid,
                    "result": {"content": [{"type": "text", "text": text}], "isError": False},
                }
            )
        else:
            send(
                {
                    "jsonrpc": "2.0",
                    "id": rid,
                    "error": {"code": -32601, "message": f"Method not found: {method}"},
                }
            )
    if "--ignore-eof" in args:  # a server that does not exit when its stdin closes
        time.sleep(3600)


if __name__ == "__main__":
    main()
