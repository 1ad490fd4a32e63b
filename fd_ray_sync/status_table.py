"""`fd-ray-sync status` for a person: a coordinator's `status()` answer as a table.

    fleet demo  version 3  serving 1/2 replicas  dp=2 x tp=2
    update running: phase load (buckets put 4, written per rank 3 3 2 4)
    replica  serving           rank  tp  version  weights            kv cache  node          pid
    0        yes               0     0   3        NORMAL             NORMAL    6f1c0e2a9b31  4242
                               1     1   3        NORMAL             NORMAL    6f1c0e2a9b31  4243
    1        no: rank 2 is...  2     -   -        no answer: Ray...  -         -             -
                               3     1   3        NORMAL             NORMAL    6f1c0e2a9b31  4245

(then each rank's fingerprint; cells shortened here). One row per rank, its replica's
serving state (or the reason it does not serve) on the replica's first row. Scripts read
`status --json` instead: the answer as it is.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

NODE_CHARS = 12  # Ray node ids are 56 hex characters; the first 12 tell nodes apart


def _cell(value) -> str:
    return "-" if value is None else str(value)


def _update_line(status: dict) -> Text | None:
    phase, feed = status.get("phase"), status.get("update")
    if phase is None and not feed:
        return None
    line = f"update running: phase {phase or '-'}"
    if feed:
        written = " ".join(str(w) for w in feed.get("written", []))
        line += f" (buckets put {feed.get('buckets_put', 0)}, written per rank {written})"
    return Text(line, style="yellow")


def _serving_cell(status: dict, replica: int) -> Text:
    serving = status.get("replicas_serving", [])
    if replica < len(serving) and serving[replica]:
        return Text("yes", style="green")
    errors = status.get("replica_errors", {})
    reason = errors.get(replica, errors.get(str(replica)))  # JSON keys are strings
    if reason is None:
        reason = "cleared or not updated yet" if status.get("version") is None else "not serving"
    return Text(f"no: {reason}", style="red")


def status_table(status: dict) -> Group:
    """The whole answer as a renderable: a fleet line, the running update, a rank table."""
    serving = status.get("replicas_serving", [])
    head = Text.assemble(
        ("fleet ", "bold"),
        (str(status.get("name")), "bold cyan"),
        f"  version {_cell(status.get('version'))}",
        f"  serving {sum(map(bool, serving))}/{len(serving)} replicas",
        f"  dp={status.get('dp')} x tp={status.get('tp')}",
        (f"  paused ({status['paused']})", "yellow") if status.get("paused") else "",
        (f"  asleep {status['asleep']}", "yellow") if status.get("asleep") else "",
    )
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("replica", "serving", "rank", "tp", "version", "weights", "kv cache"):
        table.add_column(column)
    table.add_column("node", overflow="fold")
    table.add_column("pid")
    table.add_column("fingerprint", overflow="fold")
    tp = status.get("tp") or 1
    for r in sorted(status.get("ranks", []), key=lambda r: r.get("rank", 0)):
        rank = r.get("rank", 0)
        replica = r.get("replica", rank // tp)
        first = rank % tp == 0
        node = r.get("node")
        state = r.get("weights")
        if "error" in r:  # the rank did not answer
            state = Text(f"no answer: {r['error']}", style="red")
        table.add_row(
            str(replica) if first else "",
            _serving_cell(status, replica) if first else "",
            str(rank),
            _cell(r.get("tp_rank")),
            _cell(r.get("version")),
            state if isinstance(state, Text) else _cell(state),
            _cell(r.get("kv_cache")),
            node[:NODE_CHARS] if node else "-",
            _cell(r.get("pid")),
            _cell(r.get("fingerprint")),
            end_section=rank % tp == tp - 1,
        )
    parts = [head, _update_line(status), table]
    return Group(*(p for p in parts if p is not None))


def print_status(status: dict, console: Console | None = None) -> None:
    """Print the table on stdout (off a terminal: no colours, lines as wide as they need)."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200, no_color=True)
    console.print(status_table(status))
