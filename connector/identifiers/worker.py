"""A normalization worker process (see `connector.identifiers.pool`).

Reads (specs, columns) tasks from stdin, writes `normalize_for` results to stdout,
one length-prefixed pickle each, until stdin closes (the parent exited or closed the pool). Ctrl-C
in a terminal reaches the whole process group: the worker ignores it and lets the parent decide
(a server finishes the batch in flight on SIGINT).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import IO, cast

from connector.identifiers.normalize import normalize_for
from connector.identifiers.pool import Task, read_message, write_message


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    while True:
        try:
            task = read_message(inp)
        except EOFError:
            return
        write_message(out, normalize_for(*cast(Task, task)))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)
    # nothing to clean up (every answer is written and flushed): exit at once rather than free
    # every cached value one by one, which held up the parent's close by most of a second
    sys.stdout.flush()
    os._exit(0)
