"""The Python runner (agent/runners/python/runner.py) as a real subprocess, without the hub.

Rules for these tests:
- each test spawns the runner with its own pipes mapped onto fds 0-7 exactly as the hub
  does (a two-line wrapper dup2's them into place, then execs the runner);
- the protocol is driven with spacehub.protocol.runner, as the hub drives it;
- every wait has a deadline (WAIT seconds) and a runner left running is SIGKILLed;
- the runner's interpreter is ``sys.executable``, or ``SPACEHUB_TEST_RUNNER_PYTHON``
  to check it on another CPython version; without scramjet it uses its own stream, and
  ``SPACEHUB_TEST_RUNNER_PYTHONPATH`` can add a directory holding scramjet for it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spacehub.protocol.runner import Code, Message, encode, encode_preamble
from tests.runner_harness import DUP_AND_EXEC, WAIT, Collector, messages, write_all

PROJECT = Path(__file__).resolve().parents[2]
RUNNER = PROJECT / "agent" / "runners" / "python" / "runner.py"
PYTHON = os.environ.get("SPACEHUB_TEST_RUNNER_PYTHON", sys.executable)
EXTRA_PATH = os.environ.get("SPACEHUB_TEST_RUNNER_PYTHONPATH", "")
needs_scramjet = pytest.mark.skipif(
    sys.executable != PYTHON and not EXTRA_PATH, reason="scramjet is installed for the test interpreter only"
)
INSTANCE_ID = "0f5ac4c8-8b0a-4d43-9a9a-6c1d2e3f4a5b"


class Instance:
    """One runner process with the hub's side of its eight channels."""

    def __init__(
        self,
        tmp_path: Path,
        source: str,
        *,
        main: str = "main.py",
        info: dict[str, Any] | None = None,
        env: dict[str, str | None] | None = None,
        drain_stdout: bool = True,
        collect_output: bool = True,
        files: dict[str, str] | None = None,
    ) -> None:
        package = tmp_path / "package"
        package.mkdir(parents=True)
        (package / "main.py").write_text(textwrap.dedent(source))
        for name, text in (files or {}).items():
            (package / name).parent.mkdir(parents=True, exist_ok=True)
            (package / name).write_text(textwrap.dedent(text))
        runner_info = {"appConfig": {}, "args": [], "instanceId": INSTANCE_ID, "sequence": {"id": "seq"}}
        runner_info.update(info or {})
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), EXTRA_PATH])),
            "PYTHONDONTWRITEBYTECODE": "1",  # as the hub sets it
            "SPACEHUB_SEQUENCE_DIR": str(package),
            "SPACEHUB_SEQUENCE_MAIN": main,
            "SPACEHUB_INSTANCE_ID": INSTANCE_ID,
            "SPACEHUB_RUNNER_INFO": json.dumps(runner_info),
        }
        for key, value in (env or {}).items():
            if value is None:
                child_env.pop(key, None)
            else:
                child_env[key] = value

        # (child fd, hub end, runner end) for each channel; True = the hub writes.
        directions = [True, False, False, True, False, True, False, False]
        hub_ends: list[int] = []
        runner_ends: list[int] = []
        for hub_writes in directions:
            read_end, write_end = os.pipe()
            hub_ends.append(write_end if hub_writes else read_end)
            runner_ends.append(read_end if hub_writes else write_end)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in runner_ends[3:]]
        mapping = ",".join(f"{source}:{target}" for target, source in enumerate(high, start=3))
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-c", DUP_AND_EXEC, mapping, PYTHON, str(RUNNER)],
            stdin=runner_ends[0],
            stdout=runner_ends[1],
            stderr=runner_ends[2],
            pass_fds=high,
            env=child_env,
        )
        for fd in runner_ends + high:
            os.close(fd)
        self._stdin, self._control, self._input = hub_ends[0], hub_ends[3], hub_ends[5]
        self._writers = {self._stdin, self._control, self._input}
        self._stdout_fd = hub_ends[1]
        self.stdout = Collector(hub_ends[1]) if drain_stdout else None
        self.stderr = Collector(hub_ends[2])
        self.monitoring = Collector(hub_ends[4])
        self._output_fd = hub_ends[6]
        # collect_output=False: nobody reads the output until close_output() (a hub gone)
        self.output = Collector(hub_ends[6]) if collect_output else None
        self.log = Collector(hub_ends[7])

    # ---- hub -> runner

    def send(self, code: Code, data: dict[str, Any] | None = None) -> None:
        os.write(self._control, encode(Message(code, data or {})))

    def pong(self, app_config: dict[str, Any] | None = None, args: list[Any] | None = None) -> None:
        self.wait_message(Code.PING)
        self.send(Code.PONG, {"appConfig": app_config or {}, "args": args or []})

    def write_input(self, data: bytes) -> None:
        write_all(self._input, data)

    def write_stdin(self, data: bytes) -> None:
        write_all(self._stdin, data)

    def close_writer(self, name: str) -> None:
        fd = {"stdin": self._stdin, "control": self._control, "input": self._input}[name]
        if fd in self._writers:
            self._writers.discard(fd)
            os.close(fd)

    # ---- runner -> hub

    def messages(self, code: Code | None = None) -> list[Message]:
        found = messages(self.monitoring.data)
        return [m for m in found if code is None or m.code is code]

    def wait_message(
        self, code: Code, predicate: Callable[[Message], bool] = lambda m: True, timeout: float = WAIT
    ) -> Message:
        def found(data: bytes) -> bool:
            return any(m.code is code and predicate(m) for m in messages(data))

        data = self.monitoring.wait_for(found, f"message {code.name}", timeout)
        return next(m for m in messages(data) if m.code is code and predicate(m))

    def wait_exit(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.data.splitlines() if line.strip()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        for fd in list(self._writers):
            self.close_writer({self._stdin: "stdin", self._control: "control", self._input: "input"}[fd])
        if self.stdout is None:
            os.close(self._stdout_fd)
        self.close_output()

    def close_output(self) -> None:
        """Close the hub's end of the output (only when it is not collected)."""
        if self.output is None and self._output_fd >= 0:
            os.close(self._output_fd)
            self._output_fd = -1


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Instance]]:
    instances: list[Instance] = []

    def start(source: str, **kwargs: Any) -> Instance:
        instance = Instance(tmp_path / str(len(instances)), source, **kwargs)
        instances.append(instance)
        return instance

    yield start
    for instance in instances:
        instance.close()


def _completed(instance: Instance) -> bytes:
    """Waits for the runner to end normally; returns its output."""
    output = instance.output.wait_eof()
    instance.wait_message(Code.SEQUENCE_COMPLETED)
    assert instance.wait_exit() == 0, instance.stderr.data
    instance.log.wait_eof()  # so that log_records() has everything
    return output


# --------------------------------------------------------------------------- handshake


def test_handshake_sends_ping_then_one_pang_after_pong(spawn: Callable[..., Instance]) -> None:
    instance = spawn("def run(context, input):\n    return None\n")
    ping = instance.wait_message(Code.PING)
    assert ping.data["id"] == INSTANCE_ID
    assert ping.data["pid"] == instance.proc.pid
    assert abs(ping.data["created"] - time.time() * 1000) < 60_000
    assert not instance.messages(Code.PANG)  # nothing runs before PONG
    instance.send(Code.PONG, {"appConfig": {}, "args": []})
    pang = instance.wait_message(Code.PANG)
    assert pang.data == {"provides": "", "requires": "", "contentType": ""}
    assert _completed(instance) == b""
    assert len(instance.messages(Code.PANG)) == 1


def test_declared_topics_with_different_types_give_two_pangs(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        provides = {"provides": "names", "contentType": "text/plain"}
        requires = {"requires": "cities", "contentType": "application/x-ndjson"}
        def run(context, input):
            return None
        """,
        info={"outputTopic": "override"},
    )
    instance.pong()
    instance.wait_message(Code.SEQUENCE_COMPLETED)
    assert [m.data for m in instance.messages(Code.PANG)] == [
        {"provides": "override", "contentType": "text/plain"},
        {"requires": "cities", "contentType": "application/x-ndjson"},
    ]


def test_runtime_attributes_declare_the_topic(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        class Out(list):
            pass
        def run(context, input):
            result = Out([{"a": 1}])
            result.provides = "topic-test"
            result.content_type = "application/x-ndjson"
            return result
        """
    )
    instance.pong()
    assert _completed(instance) == b'{"a": 1}\n'
    assert instance.messages(Code.PANG)[0].data == {
        "provides": "topic-test",
        "contentType": "application/x-ndjson",
    }


# --------------------------------------------------------------------------- input and output

TEXT_SEQUENCES = {
    "scramjet-map": "def run(context, input):\n    return input.map(lambda line: repr(line) + ';')\n",
    "async-for": (
        "async def run(context, input):\n    async for line in input:\n        yield repr(line) + ';'\n"
    ),
}


@pytest.mark.parametrize("name", sorted(TEXT_SEQUENCES))
def test_text_input_is_lines_with_their_newline(spawn: Callable[..., Instance], name: str) -> None:
    instance = spawn(TEXT_SEQUENCES[name])
    instance.pong()
    instance.write_input(encode_preamble("text/plain") + b"foo\nbar ")
    instance.write_input("baz\nżółw\nlast".encode())
    instance.close_writer("input")
    assert _completed(instance).decode() == "'foo\\n';'bar baz\\n';'żółw\\n';'last';"


def test_text_passthrough_adds_no_newlines(spawn: Callable[..., Instance]) -> None:
    instance = spawn("def run(context, input):\n    return input\n")
    instance.pong()
    lines = b"".join(b"%075d\n" % i for i in range(20000))
    instance.write_input(encode_preamble("text/plain") + lines)
    instance.close_writer("input")
    assert _completed(instance) == lines


def test_octet_stream_passes_bytes_chunks(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        provides = {"provides": "", "contentType": "application/octet-stream"}
        async def run(context, input):
            async for chunk in input:
                assert isinstance(chunk, bytes) and 0 < len(chunk) <= 65536, chunk
                yield chunk
        """
    )
    instance.pong()
    data = os.urandom(1024 * 1024)

    def feed() -> None:  # more than the pipes hold: written while the runner reads
        instance.write_input(encode_preamble("application/octet-stream") + data)
        instance.close_writer("input")

    writer = threading.Thread(target=feed)
    writer.start()
    assert _completed(instance) == data
    writer.join(WAIT)


def test_ndjson_input_and_output(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        provides = {"provides": "", "contentType": "application/x-ndjson"}
        def run(context, input):
            return input.map(lambda value: {"got": value})
        """
    )
    instance.pong()
    instance.write_input(encode_preamble("application/x-ndjson; charset=utf-8"))
    instance.write_input(b'{"a": 1}\n\n[1, 2]\n"s"\nnot json\nnull\n{"b":')
    instance.write_input(b" 2}")
    instance.close_writer("input")
    output = _completed(instance)
    assert [json.loads(line) for line in output.splitlines()] == [
        {"got": {"a": 1}},
        {"got": [1, 2]},
        {"got": "s"},
        {"got": {"b": 2}},
    ]
    assert any("Invalid NDJSON" in r["msg"] for r in instance.log_records())


@pytest.mark.parametrize("preamble", [b"", encode_preamble("application/x-ndjson")])
def test_declared_requires_type_needs_no_preamble(spawn: Callable[..., Instance], preamble: bytes) -> None:
    # ... but one sent anyway (as for input from a topic) is skipped
    instance = spawn(
        """
        requires = {"requires": "cities", "contentType": "text/x-ndjson"}
        async def run(context, input):
            async for value in input:
                yield f"{value['city']}\\n"
        """
    )
    instance.pong()
    instance.write_input(preamble + b'{"city": "New York"}\n{"city": "Gdynia"}\n')
    instance.close_writer("input")
    assert _completed(instance) == b"New York\nGdynia\n"


def test_input_closed_without_preamble_is_empty(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        "async def run(context, input):\n"
        "    items = await input.to_list()\n"
        "    return f'items={len(items)}'\n"
    )
    instance.pong()
    instance.close_writer("input")
    assert _completed(instance) == b"items=0"


def test_input_is_read_lazily(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        import asyncio
        async def run(context, input):
            first = await input.read()
            context.emit("first", len(first))
            await asyncio.sleep(3600)
        """,
    )
    instance.pong()
    done = threading.Event()
    written = [0]

    def flood() -> None:
        try:
            instance.write_input(encode_preamble("application/octet-stream"))
            while not done.is_set():
                written[0] += os.write(instance._input, b"x" * 65536)
        except OSError:
            pass

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    instance.wait_message(Code.EVENT, lambda m: m.data["eventName"] == "first")
    time.sleep(0.3)
    # Only pipe buffers and the runner's bounded read-ahead hold data: the writer is stuck.
    assert written[0] < 1024 * 1024
    done.set()
    instance.send(Code.KILL)
    assert instance.wait_exit() == 0


TRANSFORMS = {
    # sync transforms run straight from the input, with scramjet's semantics: DropChunk
    # drops an item, a None from map ends the stream
    "sync-chain": (
        """
        from scramjet.pyfca import DropChunk
        from scramjet.streams import Stream
        def up(line):
            if line == "stop\\n":
                return None
            return DropChunk if line == "drop\\n" else line.upper()
        def run(context, input):
            assert isinstance(input, Stream)
            return input.filter(lambda line: not line.startswith("#")).map(up).each(print)
        """,
        "A\nB\n",
    ),
    # an async transform is left to scramjet, fed from the sync ones before it
    "async-map": (
        """
        import asyncio
        async def up(line):
            await asyncio.sleep(0)
            return line.upper()
        def run(context, input):
            return input.filter(lambda line: line != "stop\\n").map(up)
        """,
        "A\n#C\nDROP\nB\nZ\n",
    ),
    "to-list": (
        """
        async def run(context, input):
            return "".join(await input.map(str.upper).to_list())
        """,
        "A\n#C\nDROP\nB\nSTOP\nZ\n",
    ),
}


@needs_scramjet
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_input_transforms(spawn: Callable[..., Instance], name: str) -> None:
    source, expected = TRANSFORMS[name]
    instance = spawn(source)
    instance.pong()
    instance.write_input(encode_preamble("text/plain") + b"a\n#c\ndrop\nb\nstop\nz\n")
    instance.close_writer("input")
    assert _completed(instance).decode() == expected
    if name == "sync-chain":
        assert instance.stdout is not None
        assert instance.stdout.wait_eof() == b"A\n\nB\n\n"


def test_results_of_every_shape(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        import asyncio
        async def gen():
            for i in range(3):
                await asyncio.sleep(0)
                yield f"{i}\\n"
        async def run(context, input):
            await asyncio.sleep(0)
            return gen()
        """
    )
    instance.pong()
    assert _completed(instance) == b"0\n1\n2\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("return ['a', b'b', 1]", b"ab1"),
        ("return 'once'", b"once"),
        ("yield from ('x', 'y')", b"xy"),
    ],
)
def test_sync_results(spawn: Callable[..., Instance], body: str, expected: bytes) -> None:
    instance = spawn(f"def run(context, input):\n    {body}\n")
    instance.pong()
    assert _completed(instance) == expected


def test_args_and_app_config_reach_run(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        import json, os
        import context, runner  # the sequence's own modules, not the runner's files
        def run(context_, input, *args):
            return json.dumps({"config": context_.config, "args": list(args), "id": context_.instance_id,
                               "id2": context_.instanceId, "cwd": os.getcwd(),
                               "modules": [context.NAME, runner.NAME]})
        """,
        info={"appConfig": {"x": 0}, "args": ["from-env"]},
        files={"context.py": "NAME = 'context'\n", "runner.py": "NAME = 'runner'\n"},
    )
    instance.pong(app_config={"x": 1}, args=["Hello", 123, {"abc": 456}])
    result = json.loads(_completed(instance))
    assert result["config"] == {"x": 1}
    assert result["args"] == ["Hello", 123, {"abc": 456}]
    assert result["id"] == result["id2"] == INSTANCE_ID
    assert result["cwd"].endswith("package")
    assert result["modules"] == ["context", "runner"]


def test_ssl_is_handed_to_asyncio_when_imported(spawn: Callable[..., Instance]) -> None:
    # The runner keeps asyncio from loading ssl (RSS); a sequence that imports it must
    # still get working TLS from asyncio.
    instance = spawn(
        """
        import asyncio, json, ssl
        import asyncio.base_events, asyncio.selector_events, asyncio.sslproto
        async def run(context, input):
            wired = [asyncio.base_events.ssl is ssl, asyncio.selector_events.ssl is ssl,
                     asyncio.sslproto.ssl is ssl,
                     asyncio.sslproto.SSLAgainErrors == (ssl.SSLWantReadError, ssl.SSLSyscallError)]
            async def not_tls(reader, writer):
                writer.write(b"HTTP/1.1 400 Not TLS\\r\\n\\r\\n" * 8)
                await writer.drain()
                writer.close()
            server = await asyncio.start_server(not_tls, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            tls = ssl.create_default_context()
            try:
                await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=tls), 5)
                outcome = "connected"
            except ssl.SSLError:
                outcome = "tls-error"
            except ConnectionError:
                outcome = "tls-error"  # the TLS layer saw the peer go away
            server.close()
            return json.dumps({"wired": wired, "outcome": outcome})
        """
    )
    instance.pong()
    assert json.loads(_completed(instance)) == {"wired": [True] * 4, "outcome": "tls-error"}


def test_stdin_is_async(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        import sys
        async def run(context, input):
            first = await sys.stdin.readline()
            rest = [line async for line in sys.stdin]
            return repr((first, rest))
        """
    )
    instance.pong()
    instance.write_stdin("hello\nżółw\n".encode())
    instance.write_stdin(b"end")
    instance.close_writer("stdin")
    assert _completed(instance).decode() == repr(("hello\n", ["żółw\n", "end"]))


def test_stdin_read_all(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        "import sys\nasync def run(context, input):\n    print('Got on stdin:', await sys.stdin.read())\n"
    )
    instance.pong()
    instance.write_stdin(b"python runner")
    instance.close_writer("stdin")
    _completed(instance)
    assert instance.stdout is not None
    assert instance.stdout.wait_eof() == b"Got on stdin: python runner\n"


#: Endless producers: one that never yields to the loop (an async generator that never
#: awaits), a sync generator, and one that yields to the loop on every item.
ENDLESS = {
    "async-never-awaits": "async def run(context, input):\n    while True:\n        yield 'x' * 99 + '\\n'\n",
    "sync": "def run(context, input):\n    while True:\n        yield 'x' * 99 + '\\n'\n",
    "async-sleeps": (
        "import asyncio\n"
        "async def run(context, input):\n"
        "    while True:\n"
        "        await asyncio.sleep(0)\n"
        "        yield 'x' * 99 + '\\n'\n"
    ),
}


@pytest.mark.parametrize("source", ENDLESS.values(), ids=ENDLESS.keys())
def test_an_output_nobody_reads_any_more_ends_the_writing(
    spawn: Callable[..., Instance], source: str
) -> None:
    """The hub closed its end of the output (EPIPE): the runner stops writing and completes,
    rather than looping on a dead pipe (and logging asyncio's "pipe closed" per item)."""
    instance = spawn(source, collect_output=False)
    instance.close_output()
    instance.pong()
    instance.wait_message(Code.SEQUENCE_COMPLETED)
    assert instance.wait_exit() == 0, instance.stderr.data
    instance.log.wait_eof()
    assert any("closed the output" in record["msg"] for record in instance.log_records())
    assert b"pipe closed by peer" not in instance.stderr.wait_eof()


# --------------------------------------------------------------------------- events, stop, kill


def test_event_round_trip(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        import asyncio
        def run(context, input):
            context.on("test-event", lambda message: context.emit("test-response", f"reply to {message}"))
            @context.on("async-event")
            async def answer(message):
                await asyncio.sleep(0)
                context.emit("async-response", message)
            context.on("boom", lambda message: 1 / 0)
        """
    )
    instance.pong()
    instance.wait_message(Code.PANG)
    instance.send(Code.EVENT, {"eventName": "boom", "message": None})
    # Codes this runner does not know (MONITORING_REPLY, MONITORING_RATE) are skipped, even
    # when they share a read with a message that follows them.
    os.write(
        instance._control,
        b'[4004,{}]\n[4003,{"monitoringRate":2}]\n[4004,{}]\n'
        + encode(Message(Code.EVENT, {"eventName": "test-event", "message": "foo", "source": "api"})),
    )
    reply = instance.wait_message(Code.EVENT, lambda m: m.data["eventName"] == "test-response")
    assert reply.data == {"eventName": "test-response", "message": "reply to foo"}
    instance.send(Code.EVENT, {"eventName": "async-event", "message": {"n": 1}})
    reply = instance.wait_message(Code.EVENT, lambda m: m.data["eventName"] == "async-response")
    assert reply.data["message"] == {"n": 1}
    assert instance.proc.poll() is None  # handlers keep a sequence without output alive
    instance.log.wait_for(lambda data: b"'boom' failed" in data, "the handler's failure logged")
    records = instance.log_records()
    failures = [r["msg"] for r in records if r["level"] == "ERROR"]
    assert failures == ["Event handler for 'boom' failed: ZeroDivisionError: division by zero"]
    ignored = [r["msg"] for r in records if r["msg"].startswith("Control message ignored")]
    assert ignored == [
        "Control message ignored: unknown message code 4004",
        "Control message ignored: unknown message code 4003",
    ]
    instance.send(Code.KILL)
    assert instance.wait_exit() == 0


FLOODS = {
    "async": "async def run(context, input):\n",
    "sync": "def run(context, input):\n",
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_events_answer_while_stdout_is_flooded(spawn: Callable[..., Instance], kind: str) -> None:
    instance = spawn(
        FLOODS[kind]
        + "    context.on('ping', lambda message: context.emit('pong', message))\n"
        + "    while True:\n        print('x' * 1000)\n",
        drain_stdout=False,
    )
    instance.pong()
    instance.wait_message(Code.PANG)  # a blocking sync run gets its PANG sent for it
    time.sleep(0.3)  # long enough to fill the stdout pipe nobody reads
    healthy_before = len(instance.messages(Code.MONITORING))
    instance.send(Code.EVENT, {"eventName": "ping", "message": 7})
    assert instance.wait_message(Code.EVENT, lambda m: m.data["eventName"] == "pong").data["message"] == 7
    instance.wait_message(Code.MONITORING, lambda m: len(instance.messages(Code.MONITORING)) > healthy_before)
    instance.send(Code.KILL)
    assert instance.wait_exit() == 0


def test_stop_handler_runs_then_stopped(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        import asyncio
        async def stop_handler():
            print("Cleaning up...", end=" ")
            await asyncio.sleep(0.2)
            print("Cleanup done.")
        async def run(context, input):
            context.set_stop_handler(lambda timeout=0, can_keep_alive=False: stop_handler())
            context.set_stop_handler(lambda timeout, can: context.logger.info(f"stop {timeout} {can}"))
            await asyncio.sleep(10**9)
        """
    )
    instance.pong()
    instance.wait_message(Code.PANG)
    instance.send(Code.STOP, {"timeout": 2000, "canCallKeepalive": False})
    instance.wait_message(Code.SEQUENCE_STOPPED)
    assert instance.wait_exit() == 0
    assert instance.stdout is not None
    assert instance.stdout.wait_eof() == b"Cleaning up... Cleanup done.\n"
    instance.log.wait_eof()
    assert any(r["msg"] == "stop 2.0 False" for r in instance.log_records())


def test_keep_alive_during_stop_keeps_running(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        import asyncio
        async def run(context, input):
            async def on_stop(timeout, can_keep_alive):
                if can_keep_alive:
                    await context.keep_alive(0.05)
            context.set_stop_handler(on_stop)
            await asyncio.sleep(10**9)
        """
    )
    instance.pong()
    instance.wait_message(Code.PANG)
    instance.send(Code.STOP, {"timeout": 1000, "canCallKeepalive": True})
    assert instance.wait_message(Code.ALIVE).data == {"keepAlive": 50}
    time.sleep(0.3)
    assert instance.proc.poll() is None
    assert not instance.messages(Code.SEQUENCE_STOPPED)
    instance.send(Code.STOP, {"timeout": 0, "canCallKeepalive": False})
    instance.wait_message(Code.SEQUENCE_STOPPED)
    assert instance.wait_exit() == 0


def test_kill_and_sigterm_end_at_once(spawn: Callable[..., Instance]) -> None:
    source = "import asyncio\nasync def run(context, input):\n    await asyncio.sleep(10**9)\n"
    killed, terminated = spawn(source), spawn(source)
    for instance in (killed, terminated):
        instance.pong()
        instance.wait_message(Code.PANG)
    killed.send(Code.KILL)
    terminated.proc.send_signal(signal.SIGTERM)
    assert killed.wait_exit(timeout=3) == 0
    assert terminated.wait_exit(timeout=3) == 0


def test_control_eof_exits_quietly(spawn: Callable[..., Instance]) -> None:
    instance = spawn("import asyncio\nasync def run(context, input):\n    await asyncio.sleep(10**9)\n")
    instance.pong()
    instance.wait_message(Code.PANG)
    instance.close_writer("control")
    assert instance.wait_exit(timeout=3) == 0
    assert instance.stderr.wait_eof() == b""


# --------------------------------------------------------------------------- failures

FAILURES = {
    "raise-in-run": (
        "def run(context, input):\n    raise TestException('This exception should appear on stderr')\n"
    ),
    "raise-while-iterating": (
        "async def run(context, input):\n    yield 'partial'\n"
        "    raise TestException('This exception should appear on stderr')\n"
    ),
    "raise-in-scramjet-map": (
        "from scramjet.streams import Stream\n"
        "def fail(x):\n    raise TestException('This exception should appear on stderr')\n"
        "def run(context, input):\n    return Stream.read_from([1, 2]).map(fail)\n"
    ),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=needs_scramjet) if "scramjet" in n else n for n in sorted(FAILURES)]
)
def test_uncaught_exception_fails_with_23(spawn: Callable[..., Instance], name: str) -> None:
    instance = spawn("class TestException(Exception):\n    pass\n" + FAILURES[name])
    instance.pong()
    error = instance.wait_message(Code.ERROR)
    assert error.data == {
        "message": "Sequence failed during execution: TestException: This exception should appear on stderr",
        "exitcode": 23,
    }
    assert instance.wait_exit() == 23
    stderr = instance.stderr.wait_eof().decode()
    assert "Traceback (most recent call last)" in stderr
    assert "TestException: This exception should appear on stderr" in stderr
    assert not instance.messages(Code.SEQUENCE_COMPLETED)


@pytest.mark.parametrize(("code", "exitcode"), [(0, 0), (5, 23)])
def test_sys_exit_in_run(spawn: Callable[..., Instance], code: int, exitcode: int) -> None:
    instance = spawn(
        f"import sys\nasync def run(context, input):\n    yield 'partial'\n    sys.exit({code})\n"
    )
    instance.pong()
    assert instance.wait_exit() == exitcode
    if exitcode:
        error = instance.wait_message(Code.ERROR).data
        assert error == {"message": "Sequence failed during execution: SystemExit: 5", "exitcode": 23}
    else:
        assert instance.output.wait_eof() == b"partial"
        instance.wait_message(Code.SEQUENCE_COMPLETED)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("import no_such_module_here\ndef run(context, input):\n    pass\n", "ModuleNotFoundError"),
        ("def run(context, input):\n    return (\n", "SyntaxError"),
        ("x = 1\n", "defines no callable run"),
    ],
)
def test_broken_module_fails_on_start_with_22(
    spawn: Callable[..., Instance], source: str, reason: str
) -> None:
    instance = spawn(source)
    error = instance.wait_message(Code.ERROR)
    assert error.data["exitcode"] == 22
    assert error.data["message"].startswith("Sequence failed on start: ")
    assert reason in error.data["message"]
    assert instance.wait_exit() == 22
    assert reason in instance.stderr.wait_eof().decode()
    assert not instance.messages(Code.PING)


@pytest.mark.parametrize("main", ["missing.py", "../outside.py", "data.txt", "."])
def test_invalid_main_fails_with_21(spawn: Callable[..., Instance], tmp_path: Path, main: str) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "outside.py").write_text("def run(context, input):\n    pass\n")
    instance = spawn("def run(context, input):\n    pass\n", main=main)
    message = f"Sequence entrypoint path {main} is invalid. Check `main` field in Sequence package.json"
    assert instance.wait_message(Code.ERROR).data == {"message": message, "exitcode": 21}
    assert instance.wait_exit() == 21
    assert message in instance.stderr.wait_eof().decode()


@pytest.mark.parametrize(
    "env",
    [
        {"SPACEHUB_INSTANCE_ID": None},
        {"SPACEHUB_RUNNER_INFO": "{not json"},
        {"SPACEHUB_RUNNER_INFO": '{"args": "not a list"}'},
        {"SPACEHUB_SEQUENCE_DIR": "relative/dir"},
    ],
)
def test_bad_environment_exits_20(spawn: Callable[..., Instance], env: dict[str, str | None]) -> None:
    instance = spawn("def run(context, input):\n    pass\n", env=env)
    assert instance.wait_exit() == 20
    stderr = instance.stderr.wait_eof().decode()
    assert stderr.count("\n") == 1 and "invalid environment" in stderr
    assert instance.monitoring.wait_eof() == b""


# --------------------------------------------------------------------------- logs and health


def test_logger_writes_ndjson_to_the_log_fd(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        def run(context, input):
            context.logger.debug("Debug log message")
            context.logger.warn("careful %s", 1)
            context.logger.error("with data", {"k": 1})
        """
    )
    instance.pong()
    _completed(instance)
    records = [r for r in (instance.log_records()) if r["from"] == "Sequence"]
    assert [(r["level"], r["msg"], r.get("data")) for r in records] == [
        ("DEBUG", "Debug log message", None),
        ("WARN", "careful 1", None),
        ("ERROR", "with data", [{"k": 1}]),
    ]
    assert all(isinstance(r["ts"], int) for r in records)
    assert any(r["from"] == "Runner" for r in instance.log_records())


@pytest.mark.parametrize(
    "check",
    [
        "lambda: {'healthy': False}",
        "unhealthy",
        "lambda: 1 / 0",
    ],
)
def test_health_check_false_is_reported(spawn: Callable[..., Instance], check: str) -> None:
    instance = spawn(
        f"""
        import asyncio
        async def unhealthy():
            await asyncio.sleep(0)
            return False
        async def run(context, input):
            context.set_health_check({check})
            await asyncio.sleep(10**9)
        """
    )
    instance.pong()
    instance.wait_message(Code.MONITORING, lambda m: m.data == {"healthy": False}, timeout=3)
    instance.send(Code.KILL)
    assert instance.wait_exit() == 0
