"""One aggregated progress line for all ranks, printed by rank 0."""

from __future__ import annotations

import sys
import time

TAG = 4711  # MPI tag of progress messages


class Progress:
    """Counts prompts and tokens done on every rank; rank 0 prints ``done/total, tokens/s, ETA``.

    Other ranks send their increments to rank 0 with non-blocking sends; rank 0 collects them whenever it
    reports, so no rank ever waits for another.
    """

    def __init__(self, ranks, total_prompts: int, total_tokens: int, already_done: int = 0, every: float = 5.0,
                 stream=sys.stderr):
        self.ranks = ranks
        self.total_prompts, self.total_tokens = total_prompts, total_tokens
        self.already_done = already_done  # prompts finished by earlier runs (resume)
        self.prompts = self.tokens = 0
        self.own = [0, 0]  # this rank's prompts and tokens
        self.every, self.stream = every, stream
        self.start = self.last = time.monotonic()
        self._printed = None  # the done count of the last line: each count is printed once
        self._sends = []

    def add(self, prompts: int, tokens: int):
        self.own[0] += prompts
        self.own[1] += tokens
        if self.ranks.is_root:
            self.prompts += prompts
            self.tokens += tokens
            self.report()
        else:
            self._sends.append(self.ranks.comm.isend((prompts, tokens), dest=0, tag=TAG))

    def _collect(self):
        from mpi4py import MPI

        comm = self.ranks.comm
        while comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG):
            prompts, tokens = comm.recv(source=MPI.ANY_SOURCE, tag=TAG)
            self.prompts += prompts
            self.tokens += tokens

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.tokens / elapsed
        left = max(self.total_tokens - self.tokens, 0)
        eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 and left > 0 else "0:00:00"
        done = self.already_done + self.prompts
        pct = 100.0 * done / max(self.total_prompts, 1)
        return (f"extract: {done}/{self.total_prompts} prompts ({pct:.0f}%), {self.tokens} tokens, "
                f"{rate:.0f} tokens/s, ETA {eta}")

    def report(self, force: bool = False):
        if not self.ranks.is_root:
            return
        self._collect()
        now = time.monotonic()
        done = self.already_done + self.prompts
        if done != self._printed and (force or now - self.last >= self.every):
            self.last, self._printed = now, done
            print(self.line(), file=self.stream, flush=True)

    def finish(self):
        """Exact totals from all ranks (a reduction, not the messages); rank 0 prints the final line."""
        for request in self._sends:
            request.wait()
        totals = self.ranks.comm.reduce(self.own, op=lambda a, b, _=None: [a[0] + b[0], a[1] + b[1]], root=0)
        self.ranks.comm.Barrier()
        if self.ranks.is_root:
            self._collect()  # drain messages still in flight
            self.prompts, self.tokens = totals
            self.report(force=True)
