import os
import sys

from .cli import main

code = main()
if os.environ.get("CCT_LOCAL_WORKER") == "1":
    # a process `--procs` started (cct.distributed.local_workers): its work is done and its output
    # flushed; skip the interpreter's teardown, in which gloo's threads can abort the process
    # ("terminate called without an active exception") after a perfectly good run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
