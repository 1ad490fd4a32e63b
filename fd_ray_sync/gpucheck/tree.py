"""The process tree: each child's main loop, and the parent's side of the trainer and ranks."""

from __future__ import annotations

import faulthandler
import math
import os
import queue
import signal
import threading
import time
import traceback

import torch

from .plan import NAMES
from .proc import Aborted, Ctl
from .rank import Rank
from .trainer import Trainer


def _watch_parent() -> None:
    ppid = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(3)  # the parent is gone: nobody will ever send "exit"

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def _raise_fd_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


def child_main(name, cfg, ctl_tensor, cmd_q, res_q, inbox, outboxes) -> None:
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks on a hang
    faulthandler.dump_traceback_later(cfg["timeout_s"] + 60, exit=True)
    _watch_parent()
    _raise_fd_limit()
    ctl = Ctl(ctl_tensor)
    proc, init_error = None, None
    try:
        if name == "trainer":
            proc = Trainer(name, cfg, ctl, inbox, outboxes)
        else:
            proc = Rank(name, cfg, ctl, inbox, outboxes, rank=int(name[-1]))
        proc.log("started, pid %d", os.getpid())
    except BaseException:  # noqa: BLE001 - reported on the first command
        init_error = traceback.format_exc()
    while True:
        cmd, seq, deadline = cmd_q.get()
        if cmd == "exit":
            break
        if init_error:
            res_q.put(("error", name, seq, init_error))
            continue
        proc.deadline = deadline
        try:
            res_q.put(("ok", name, seq, proc.handle(cmd)))
        except Aborted as e:
            res_q.put(("error", name, seq, f"aborted: {e}"))
        except BaseException:  # noqa: BLE001 - the parent shows the traceback
            ctl.set(Ctl.ABORT, 1)
            res_q.put(("error", name, seq, traceback.format_exc()))
    if proc is not None:
        proc.close()


class StepFailed(RuntimeError):
    def __init__(self, step: str, errors: dict, timed_out: bool = False):
        self.step, self.errors, self.timed_out = step, errors, timed_out
        super().__init__(f"{step} failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))

    def summary(self) -> str:
        """Each process's last line (a traceback's exception), for the table."""
        last = {k: (v.strip().splitlines() or ["?"])[-1] for k, v in self.errors.items()}
        return "; ".join(f"{k}: {v}" for k, v in last.items())


class Tree:
    """The trainer and the two ranks, and the parent's side of their queues."""

    def __init__(self, cfg: dict, ctx, log):
        self.log = log
        self.ctl = Ctl(torch.zeros(Ctl.SLOTS, dtype=torch.int64).share_memory_())
        self.res_q = ctx.Queue()
        self.cmd_q = {n: ctx.Queue() for n in NAMES}
        # Held for the tree's life: a queue the parent drops is unlinked before a spawned
        # child has unpickled it.
        self.inbox = inbox = {n: ctx.Queue() for n in NAMES}
        self.procs = {}
        for n in NAMES:
            outboxes = [inbox["rank0"], inbox["rank1"]] if n == "trainer" else [inbox["trainer"]]
            args = (n, cfg, self.ctl.tensor, self.cmd_q[n], self.res_q, inbox[n], outboxes)
            p = ctx.Process(target=child_main, name=f"gpucheck-{n}", args=args, daemon=True)
            p.start()
            self.procs[n] = p
        self.seq = 0

    def command(self, cmd: str, names: tuple[str, ...], deadline: float) -> dict:
        self.seq += 1
        seq = self.seq
        self.ctl.a[:] = 0  # every child is idle between commands
        for n in names:
            self.cmd_q[n].put((cmd, seq, deadline))
        out, errors = {}, {}
        grace = math.inf
        while len(out) + len(errors) < len(names):
            try:
                kind, name, got_seq, payload = self.res_q.get(timeout=0.25)
            except queue.Empty:
                now = time.monotonic()
                for n, p in self.procs.items():
                    if not p.is_alive() and n not in errors:
                        errors[n] = f"died with exit code {p.exitcode}"
                        self.ctl.set(Ctl.ABORT, 1)
                        grace = min(grace, now + 5)  # let the others report what they saw
                if now > grace:
                    for n in names:
                        if n not in out:
                            errors.setdefault(n, f"no answer to {cmd!r} after a failure")
                    break
                if now > deadline:
                    self.dump_stacks()
                    for n in names:
                        if n not in out:
                            errors.setdefault(n, f"no answer to {cmd!r} before the deadline")
                    raise StepFailed(cmd, errors, timed_out=True) from None
                continue
            if got_seq != seq:
                continue
            if kind == "ok":
                out[name] = payload
            else:
                errors[name] = payload
                self.ctl.set(Ctl.ABORT, 1)
                grace = min(grace, time.monotonic() + 10)
        if errors:
            raise StepFailed(cmd, errors)
        return out

    def dump_stacks(self) -> None:
        # One process at a time: dumps written at once interleave on the shared stderr.
        for n, p in self.procs.items():
            if p.is_alive():
                self.log("asking %s (pid %d) for its stack", n, p.pid)
                try:
                    os.kill(p.pid, signal.SIGUSR1)
                except OSError:
                    continue
                time.sleep(0.5)

    def kill(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(10)

    def close(self) -> None:
        # Ranks first: the trainer must outlive every handle opened on its memory.
        for group in (("rank0", "rank1"), ("trainer",)):
            for n in group:
                self.cmd_q[n].put(("exit", 0, 0.0))
            for n in group:
                self.procs[n].join(30)
        self.kill()
