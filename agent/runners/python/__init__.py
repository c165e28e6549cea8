"""The Python runner: the process one Sequence runs in, inside an Instance.

``runner.py`` is the entry point (``python3 runner.py``); it loads this package under a
private name (a sequence may have modules called ``main`` or ``context``) so that every
module comes from its .pyc. Standard library only, plus ``scramjet.streams`` when
importable; no trio. One module per job::

    lazy_imports    import stand-ins: loaded first, keeps rarely used modules unloaded
    base            bounds, exit codes, the monitoring and log records, stdio, environment
    input           fd 5 (input) and fd 0 (stdin) as async iterables with back-pressure
    scramjet_input  the original's DataStream API over the input (scramjet's, or a small
                    stand-in with read/map/filter/each when scramjet is not installed)
    output          what run returns, encoded and written to fd 6 with back-pressure;
                    OutputGone when the hub stops reading
    context         the AppContext a sequence gets
    control         fds 3/4: messages to the hub, handshake, control and heartbeat threads
    main            the runner's main loop: load, run on the asyncio loop, output, endings

Theory of operation
-------------------
The hub starts ``python3 runner.py`` with the channels of :mod:`spacehub.protocol.runner`
already open as fds 0-7 (0 stdin, 1 stdout, 2 stderr, 3 control, 4 monitoring, 5 input,
6 output, 7 log) and the sequence described by the environment: ``SPACEHUB_SEQUENCE_DIR``
(absolute), ``SPACEHUB_SEQUENCE_MAIN`` (package.json ``main``, relative to it),
``SPACEHUB_INSTANCE_ID`` and ``SPACEHUB_RUNNER_INFO`` (JSON: appConfig, args, inputTopic?,
outputTopic?). The runner loads the sequence module, sends PING, waits for PONG, then
calls ``run(context, input, *args)``, sends PANG and writes what ``run`` returns to fd 6.

Threads, and why there are several::

    main       the asyncio loop: run(), its input (fd 5), its output (fd 6), sys.stdin (fd 0)
    control    blocking reads of fd 3; delivers events and handles STOP/KILL even while the
               loop is blocked (a sequence flooding a stdout nobody reads blocks its own loop)
    heartbeat  MONITORING every second, also while the loop is blocked
    stop       one per STOP, so a slow stop handler never holds back a KILL

Writes to fd 4 (monitoring) and fd 7 (log) are blocking writes of whole records under
one lock per fd: the hub drains both constantly, and a record must never interleave.
Everything the sequence reads or writes on fds 0, 5 and 6 goes through the loop with
back-pressure, never read whole into memory.

Exit codes: 0 completed, stopped, killed or hub gone; 20 bad environment; 21 bad entry
point; 22 failed on start; 23 failed during execution.
"""
