"""`python -m worker.jobs.prep_child`, except that a job whose first text is HANG never ends.

The pool tests kill it while it holds that job (a decoder that crashed or hung);
the fault lives here, not in production code.
"""

from __future__ import annotations

import sys
import time

from worker.jobs import prep_child

_handle = prep_child.handle


def handle(env, owner_pid, message):
    if '"text":"HANG"' in message["request"].replace(" ", ""):
        print(f"hanging on {message['job_id']}", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    return _handle(env, owner_pid, message)


if __name__ == "__main__":
    prep_child.handle = handle
    sys.exit(prep_child.main())
