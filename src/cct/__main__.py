import os
import sys

from .cli import main
from .distributed import LOCAL_WORKER_ENV

code = main()
if os.environ.get(LOCAL_WORKER_ENV) == "1":
    # a process `--procs` started (cct.distributed.local_workers): its work is done and its output
    # flushed; skip the interpreter's teardown, in which gloo's threads can abort the process
    # ("terminate called without an active exception") after a perfectly good run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
