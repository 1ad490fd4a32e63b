"""The command's progress bars and status table, drawn into a string console (no Ray)."""

import io
import threading

import pytest
from rich.console import Console

from fd_ray_sync.progress import (
    PROGRESS_ENV,
    UPDATE_PHASES,
    Bars,
    progress_wanted,
    scale_progress,
    update_progress,
)
from fd_ray_sync.status_table import print_status


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=120), out


@pytest.mark.parametrize(
    "env, tty, wanted",
    [(None, True, True), (None, False, False), ("1", False, True), ("0", True, False)],
)
def test_bars_show_on_a_terminal_unless_the_environment_says_otherwise(
    monkeypatch, env, tty, wanted
):
    if env is None:
        monkeypatch.delenv(PROGRESS_ENV, raising=False)
    else:
        monkeypatch.setenv(PROGRESS_ENV, env)
    assert progress_wanted(_Stream(tty)) is wanted


def test_a_task_is_an_on_progress_callback_drawn_as_a_bar():
    console, out = _console()
    with Bars(enabled=True, console=console) as bars:
        task = bars.task("bench", 10)
        task(3, 10, "object_store: round 2/5")
    text = out.getvalue()
    assert "object_store: round 2/5" in text and "3/10" in text
    with Bars(enabled=True, console=console) as bars:
        bars.task("update", None).finish("version 7 committed")
    assert "version 7 committed" in out.getvalue()


def test_bars_off_draw_nothing_and_poll_nothing():
    console, out = _console()
    polled = []
    with Bars(enabled=False, console=console) as bars:
        task = bars.task("update", 4)
        task(1, 4, "phase pause")
        with bars.follow(lambda: polled.append(1) or {}, task, update_progress, 0.01):
            threading.Event().wait(0.05)
        task.finish("done")
    assert out.getvalue() == "" and polled == []


def test_follow_moves_the_bar_to_what_the_status_answers():
    console, out = _console()
    answers = iter([{"phase": "prepare"}, {"phase": "load"}] + [{"phase": "commit"}] * 100)
    seen = threading.Event()

    def status():
        answer = next(answers)
        if answer["phase"] == "commit":
            seen.set()
        return answer

    with Bars(enabled=True, console=console) as bars:
        task = bars.task("update", None)
        with bars.follow(status, task, update_progress, interval_s=0.01):
            assert seen.wait(5)
    assert "phase commit" in out.getvalue()


def test_update_progress_reads_buckets_or_the_phase():
    assert update_progress({"phase": None, "update": None}) is None
    assert update_progress({"phase": "load", "update": None}) == (
        UPDATE_PHASES.index("load"),
        len(UPDATE_PHASES),
        "phase load",
    )
    feed = {"buckets_put": 6, "written": [4, 2, 5]}
    done, total, label = update_progress({"phase": "load", "update": feed})
    assert (done, total) == (2, 6) and label.startswith("load")


def test_scale_progress_counts_each_new_rank_placed_set_up_and_loaded():
    ranks = [
        {"rank": 0, "pid": 1, "set_up": True, "weights": "NORMAL"},
        {"rank": 1, "pid": 2, "set_up": True, "weights": "NORMAL"},
        {"rank": 2, "pid": 3, "set_up": True, "weights": "UPDATING"},
        {"rank": 3, "error": "GetTimeoutError"},  # still starting
    ]
    status = {"tp": 2, "ranks": ranks}
    assert scale_progress(status, old_dp=1, dp=2, loads=True) == (
        2,
        6,
        "ranks placed 1/2, set up 1/2, loaded 0/2",
    )
    assert scale_progress(status, old_dp=1, dp=2, loads=False)[:2] == (2, 4)


STATUS = {
    "name": "demo",
    "version": "3",
    "serving": True,
    "replicas_serving": [True, False],
    "replica_errors": {"1": "rank 2 is not the process set up (restarted or dead)"},
    "dp": 2,
    "tp": 2,
    "phase": "load",
    "update": {"buckets_put": 4, "written": [3, 3, 2, 4]},
    "ranks": [
        {
            "rank": r,
            "tp_rank": r % 2,
            "replica": r // 2,
            "set_up": True,
            "weights": "NORMAL",
            "kv_cache": "NORMAL",
            "version": "3",
            "fingerprint": f"fp{r}",
            "pid": 4240 + r,
            "node": "6f1c0e2a9b31" + "a" * 44,
        }
        for r in (0, 1, 3)
    ]
    + [{"rank": 2, "error": "RayActorError"}],
}


def test_the_status_table_has_a_row_per_rank_and_each_replica_state():
    out = io.StringIO()
    print_status(STATUS, Console(file=out, width=200))  # plain text, lines unwrapped
    lines = out.getvalue().splitlines()
    text = "\n".join(lines)
    assert "fleet demo" in lines[0] and "version 3" in lines[0] and "serving 1/2" in lines[0]
    assert "update running: phase load (buckets put 4, written per rank 3 3 2 4)" in text
    assert lines[2].split()[:3] == ["replica", "serving", "rank"]
    rows = lines[3:]  # ranks in order; a replica's state on its first rank's row
    assert len(rows) == 4
    assert rows[0].split()[:3] == ["0", "yes", "0"] and "4240" in rows[0] and "fp0" in rows[0]
    assert rows[1].split()[:2] == ["1", "1"] and "fp1" in rows[1]  # rank 1, tp rank 1
    assert rows[2].startswith("1") and "no: rank 2 is not the process set up" in rows[2]
    assert "no answer: RayActorError" in rows[2]
    assert "fp3" in rows[3] and "4243" in rows[3]
    assert "6f1c0e2a9b31" in text and "6f1c0e2a9b31a" not in text  # node ids shortened


def test_the_status_table_off_a_terminal_has_no_escape_codes(capsys):
    print_status({**STATUS, "phase": None, "update": None})
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "update running" not in out and "fp1" in out
