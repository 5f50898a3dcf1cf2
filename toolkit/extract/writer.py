"""A background thread that writes finished prompts while the next batch is computed."""

from __future__ import annotations

import errno
import queue
import threading

from ..errors import UserError


class BackgroundWriter:
    """Runs ``write(*item)`` for each item on one thread, at most ``depth`` items behind the producer.

    The bound keeps memory to a few prompts' activations. An error on the thread is raised in the producer at
    its next ``put`` or at ``close``; a full disk becomes a :class:`UserError` that says how to continue.
    """

    def __init__(self, write, store_path: str, depth: int = 2):
        self._write, self._store = write, store_path
        self._queue = queue.Queue(maxsize=depth)
        self._error = None
        self._thread = threading.Thread(target=self._run, name="repgeo-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            try:
                self._write(*item)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    e = UserError(f"the disk is full while writing prompt {item[0]} to {self._store}; free space, "
                                  f"then rerun with --resume (finished prompts are kept)")
                    e.keep_store = True
                self._error = e
            except Exception as e:  # re-raised in the producer
                self._error = e

    def _raise(self):
        if self._error is not None:
            raise self._error

    def put(self, *item):
        self._raise()
        self._queue.put(item)

    def abandon(self):
        """Stop writing: drop what is queued and wait for the item being written (before removing the store)."""
        self._error = self._error or RuntimeError("abandoned")
        self.close_quietly()

    def close_quietly(self):
        self._queue.put(None)
        self._thread.join()

    def close(self):
        """Wait until everything queued is written; raise the first write error, if any."""
        self.close_quietly()
        self._raise()
