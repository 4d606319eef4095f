"""``sa-deploy cache list|clear``: what the graph cache holds, and freeing it (registered in ``cli``)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from selfadapt_deploy.cli_options import console, fail

ACTIONS = ("list", "clear")


def cache(
    action: Annotated[str, typer.Argument(help="list: the cached graphs; clear: remove them all.")] = "list",
):
    """The graph cache: models exported once to ONNX by --runtime auto on the CPU (in
    $SA_DEPLOY_CACHE, else ~/.cache/sa-deploy/graphs). A cleared entry is exported again when
    next needed."""
    from selfadapt_deploy.caches import cache_dir
    from selfadapt_deploy.export.graph_cache import clear, list_entries

    root = cache_dir("graphs")
    if action not in ACTIONS:
        raise fail(f"sa-deploy cache takes {' or '.join(ACTIONS)}, got '{action}'")
    if action == "clear":
        n, size = clear(root)
        console.print(f"removed {n} cached graphs ({size / 2**20:.0f} MiB) from {root}", highlight=False)
        return
    entries = list_entries(root)
    if not entries:
        console.print(f"the graph cache ({root}) is empty", highlight=False)
        return
    table = Table("entry", "family", "graph", "precision", "weights sha256", "sa-deploy", "onnxruntime",
                  "MiB", title=str(root))
    for e in entries:
        k = e.key
        table.add_row(e.name, k.get("family", "?"), k.get("graph", "?"), k.get("precision", "?"),
                      k.get("weights_sha256", "?")[:12], str(k.get("sa_deploy", "?")),
                      str(k.get("onnxruntime", "?")), f"{e.bytes / 2**20:.0f}")
    console.print(table)
