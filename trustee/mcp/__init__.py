"""Talking to MCP servers: processes that cannot outlive the run, connections, pooling.

`transport.py` starts a stdio server's process (own process group, stdin a pipe, killed with
trustee, stderr tail kept) as a transport of the `mcp` SDK (2.x); `servers.py` holds the
connections (handshake and call timeouts, faults that fail one episode, the shared-server
pool, tool discovery). The environment over them is `trustee/envs/mcp_env.py`.
"""
