"""A notes server: the small, stateful MCP server of trustee's MCP example.

Written with the `mcp` SDK's server API (`MCPServer`), served over stdio. The notes live in
`notes.json` in the directory given by `--dir` (the example's config passes `{workdir}`, the
episode's fresh working directory, which trustee fills from `examples/mcp/workdir/`), so
every episode starts from the same notes and what it changes stays its own.

    python examples/mcp/notes_server.py --dir /tmp/notes      # speaks MCP on stdin/stdout
    python examples/mcp/notes_server.py --dir /tmp/notes --http 8000   # Streamable HTTP, /mcp
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError


def build_server(directory: Path) -> MCPServer:
    """The server, keeping its notes in `directory`/notes.json."""
    server = MCPServer("notes", instructions="A personal notebook: notes by title.")
    path = directory / "notes.json"

    def load() -> dict[str, str]:
        return json.loads(path.read_text()) if path.exists() else {}

    def save(notes: dict[str, str]) -> None:
        path.write_text(json.dumps(notes, indent=1, sort_keys=True) + "\n")

    @server.tool()
    def list_notes() -> dict:
        """The titles of every note, in alphabetical order."""
        return {"titles": sorted(load())}

    @server.tool()
    def read_note(title: str) -> dict:
        """The text of the note with this title."""
        notes = load()
        if title not in notes:
            raise ToolError(f"no note titled {title!r}; titles: {sorted(notes)}")
        return {"title": title, "text": notes[title]}

    @server.tool()
    def add_note(title: str, text: str) -> dict:
        """Save a note under a title (replacing a note of that title)."""
        notes = load()
        notes[title] = text
        save(notes)
        return {"saved": title, "count": len(notes)}

    @server.tool()
    def delete_note(title: str) -> dict:
        """Delete the note with this title."""
        notes = load()
        if title not in notes:
            raise ToolError(f"no note titled {title!r}; titles: {sorted(notes)}")
        del notes[title]
        save(notes)
        return {"deleted": title, "count": len(notes)}

    @server.tool()
    def search_notes(query: str) -> dict:
        """Titles of the notes whose title or text contains the query (case-insensitive)."""
        q = query.lower()
        return {"titles": sorted(t for t, x in load().items() if q in t.lower() or q in x.lower())}

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("."), help="where notes.json lives")
    parser.add_argument(
        "--http", type=int, default=0, help="serve Streamable HTTP on 127.0.0.1:PORT/mcp instead"
    )
    args = parser.parse_args()
    server = build_server(args.dir)
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run("stdio")


if __name__ == "__main__":
    main()
