"""The Node.js runner (agent/runners/node/runner.js) as a real subprocess, without the hub.

Rules for these tests:
- each test spawns ``node runner.js`` with its own pipes mapped onto fds 0-7 exactly as
  the hub does (a tiny Python wrapper dup2's them into place, then execs node);
- the protocol is driven with spacehub.protocol.runner, as the hub drives it;
- every wait has a deadline (WAIT seconds) and a runner left running is SIGKILLed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
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
from tests.runner_harness import DUP_AND_EXEC, WAIT, Collector, messages

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

PROJECT = Path(__file__).resolve().parents[2]
RUNNER = PROJECT / "agent" / "runners" / "node" / "runner.js"
INSTANCE_ID = "5b1e0c1f-7d4e-4c0a-9a43-0e8f1f2d3c4b"


class NodeInstance:
    """One runner process with the hub's side of its eight channels."""

    def __init__(
        self,
        tmp_path: Path,
        files: dict[str, str | bytes],
        *,
        main: str = "index.js",
        info: dict[str, Any] | None = None,
        drain_stdout: bool = True,
    ) -> None:
        package = tmp_path / "package"
        package.mkdir(parents=True)
        for name, content in files.items():
            target = package / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(textwrap.dedent(content))
        # exitTimeout 0: these tests are about the runner's mechanics; the linger after the
        # output ended (10 s unless the hub says otherwise) has tests of its own.
        runner_info = {
            "appConfig": {},
            "args": [],
            "instanceId": INSTANCE_ID,
            "sequence": {"id": "seq"},
            "exitTimeout": 0,
        }
        runner_info.update(info or {})
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SPACEHUB_SEQUENCE_DIR": str(package),
            "SPACEHUB_SEQUENCE_MAIN": main,
            "SPACEHUB_INSTANCE_ID": INSTANCE_ID,
            "SPACEHUB_RUNNER_INFO": json.dumps(runner_info),
        }
        directions = [True, False, False, True, False, True, False, False]  # True: the hub writes
        hub_ends: list[int] = []
        runner_ends: list[int] = []
        for hub_writes in directions:
            read_end, write_end = os.pipe()
            hub_ends.append(write_end if hub_writes else read_end)
            runner_ends.append(read_end if hub_writes else write_end)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in runner_ends[3:]]
        mapping = ",".join(f"{source}:{target}" for target, source in enumerate(high, start=3))
        assert NODE is not None
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-c", DUP_AND_EXEC, mapping, NODE, str(RUNNER)],
            stdin=runner_ends[0],
            stdout=runner_ends[1],
            stderr=runner_ends[2],
            pass_fds=high,
            env=env,
            cwd=package,
            start_new_session=True,
        )
        for fd in runner_ends + high:
            os.close(fd)
        self._stdin, self._control, self._input = hub_ends[0], hub_ends[3], hub_ends[5]
        self._writers = {"stdin": self._stdin, "control": self._control, "input": self._input}
        self._stdout_fd = hub_ends[1]
        self.stdout = Collector(hub_ends[1]) if drain_stdout else None
        self.stderr = Collector(hub_ends[2])
        self.monitoring = Collector(hub_ends[4])
        self.output = Collector(hub_ends[6])
        self.log = Collector(hub_ends[7])

    # ---- hub -> runner

    def send(self, code: Code, data: dict[str, Any] | None = None) -> None:
        os.write(self._control, encode(Message(code, data or {})))

    def send_raw(self, data: bytes) -> None:
        os.write(self._control, data)

    def pong(self, app_config: dict[str, Any] | None = None, args: list[Any] | None = None) -> None:
        self.wait_message(Code.PING)
        self.send(Code.PONG, {"appConfig": app_config or {}, "args": args or []})

    def write_input(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._input, view) :]

    def write_stdin(self, data: bytes) -> None:
        os.write(self._stdin, data)

    def close_writer(self, name: str) -> None:
        fd = self._writers.pop(name, None)
        if fd is not None:
            os.close(fd)

    # ---- runner -> hub

    def messages(self, code: Code | None = None) -> list[Message]:
        return [m for m in messages(self.monitoring.data) if code is None or m.code is code]

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

    def wait_log(self, text: str, timeout: float = WAIT) -> list[dict[str, Any]]:
        """The log records, once one says ``text``: the log is a pipe of its own, so a record
        may come after messages the runner sent later on its other channels."""

        def said(data: bytes) -> bool:
            return any(text in json.loads(line)["msg"] for line in data.splitlines() if line.strip())

        self.log.wait_for(said, f"a log record saying {text!r}", timeout)
        return self.log_records()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT)
        for name in list(self._writers):
            self.close_writer(name)
        if self.stdout is None:
            os.close(self._stdout_fd)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., NodeInstance]]:
    instances: list[NodeInstance] = []

    def start(source: str | dict[str, str | bytes], **kwargs: Any) -> NodeInstance:
        files: dict[str, str | bytes] = dict(source) if isinstance(source, dict) else {"index.js": source}
        instance = NodeInstance(tmp_path / str(len(instances)), files, **kwargs)
        instances.append(instance)
        return instance

    yield start
    for instance in instances:
        instance.close()


def completed(instance: NodeInstance) -> bytes:
    """Waits for the runner to end normally; returns its output."""
    output = instance.output.wait_eof()
    instance.wait_message(Code.SEQUENCE_COMPLETED)
    assert instance.wait_exit() == 0, instance.stderr.data
    return output


def error_of(instance: NodeInstance, code: int) -> dict[str, Any]:
    assert instance.wait_exit() == code, instance.stderr.data
    errors = instance.messages(Code.ERROR)
    assert len(errors) == 1
    assert errors[0].data["exitcode"] == code
    return errors[0].data


# --------------------------------------------------------------------------- handshake


def test_handshake_order_and_payloads(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        module.exports = function (input, ...args) {
            return JSON.stringify({ args, config: this.config, id: this.instanceId });
        };
        """,
        info={"appConfig": {"from": "env"}, "args": ["env"]},
    )
    ping = instance.wait_message(Code.PING)
    assert ping.data["id"] == INSTANCE_ID and ping.data["pid"] == instance.proc.pid
    assert abs(ping.data["created"] - time.time() * 1000) < 60_000
    time.sleep(0.2)
    assert not instance.messages(Code.PANG)  # nothing runs before PONG
    instance.send(Code.PONG, {"appConfig": {"x": 1}, "args": ["Hello", 123, {"abc": 456}]})
    output = completed(instance)
    assert json.loads(output) == {"args": ["Hello", 123, {"abc": 456}], "config": {"x": 1}, "id": INSTANCE_ID}
    codes = [m.code for m in instance.messages()]
    assert codes[0] is Code.PING and codes[1] is Code.PANG and codes[-1] is Code.SEQUENCE_COMPLETED
    assert instance.messages(Code.PANG)[0].data == {"requires": "", "provides": "", "contentType": ""}


def test_declared_requires_and_provided_topic(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        const { Readable } = require("stream");
        module.exports = [
            { requires: "cities", contentType: "application/x-ndjson" },
            async function (input) {
                const out = Readable.from((async function* () {
                    for await (const city of input) yield `${city.name};`;
                })());
                out.topic = "names";
                out.contentType = "text/plain";
                return out;
            },
        ];
        """
    )
    instance.pong()
    # the hub may send a preamble on topic input although the type is declared: skipped
    instance.write_input(encode_preamble("application/x-ndjson") + b'{"name":"Oslo"}\n{"name":"Rome"}\n')
    instance.close_writer("input")
    assert completed(instance) == b"Oslo;Rome;"
    assert [m.data for m in instance.messages(Code.PANG)] == [
        {"requires": "cities", "provides": "", "contentType": "application/x-ndjson"},
        {"provides": "names", "contentType": "text/plain"},
    ]


def test_output_topic_from_runner_info(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        "module.exports = async function* () { yield {a: 1}; };\n", info={"outputTopic": "ranger"}
    )
    instance.pong()
    assert completed(instance) == b'{"a":1}\n'
    assert instance.messages(Code.PANG)[-1].data == {
        "provides": "ranger",
        "contentType": "application/x-ndjson",
    }


def test_esm_default_export(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        {"main.mjs": "export default async function (input, name) { return `hi ${name}`; }\n"},
        main="main.mjs",
    )
    instance.pong(args=["esm"])
    assert completed(instance) == b"hi esm"


def test_type_module_package_and_main_without_extension(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        {
            "package.json": '{"type": "module"}',
            "lib/index.js": "export default [function () { return [1, 2]; }, async function* (input) {"
            " for await (const n of input) yield n * 10; }];\n",
        },
        main="./lib",
    )
    instance.pong()
    assert completed(instance) == b"10\n20\n"


# --------------------------------------------------------------------------- input


def test_text_input_is_string_chunks(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        module.exports = async function* (input) {
            let text = "";
            for await (const chunk of input) {
                if (typeof chunk !== "string") throw new Error("not a string: " + typeof chunk);
                text += chunk;
            }
            yield text;
        };
        """
    )
    instance.pong()
    instance.write_input(encode_preamble("text/plain") + "foo\nbar ż".encode()[:-1])
    time.sleep(0.1)  # the multibyte character arrives split across reads
    instance.write_input("ż".encode()[-1:] + b"\nlast")
    instance.close_writer("input")
    assert completed(instance) == json.dumps("foo\nbar ż\nlast", ensure_ascii=False).encode() + b"\n"


def test_ndjson_input_is_parsed_values(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        module.exports = async function* (input) {
            for await (const item of input) yield [typeof item, item];
        };
        """
    )
    instance.pong()
    instance.write_input(encode_preamble("application/x-ndjson") + b'{"a": 1}\n\n"s"\n12\nnot json\nnull\n[1')
    instance.write_input(b"]\n")
    instance.close_writer("input")
    lines = [json.loads(line) for line in completed(instance).splitlines()]
    assert lines == [["object", {"a": 1}], ["string", "s"], ["number", 12], ["object", [1]]]
    assert any("Invalid NDJSON" in r["msg"] for r in instance.wait_log("Invalid NDJSON"))


def test_octet_stream_input_is_buffers_and_passes_through(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        const { Transform } = require("stream");
        module.exports = function (input) {
            return input.pipe(new Transform({
                transform(chunk, enc, done) {
                    if (!Buffer.isBuffer(chunk)) return done(new Error("not a Buffer"));
                    done(null, chunk);
                },
            }));
        };
        """
    )
    instance.pong()
    data = os.urandom(3 * 1024 * 1024 + 17)

    def feed() -> None:
        instance.write_input(encode_preamble("application/octet-stream") + data)
        instance.close_writer("input")

    writer = threading.Thread(target=feed)
    writer.start()
    output = completed(instance)
    writer.join(WAIT)
    assert hashlib.sha256(output).hexdigest() == hashlib.sha256(data).hexdigest()


def test_no_preamble_before_eof_is_empty_input(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        module.exports = async function (input) {
            let n = 0;
            for await (const chunk of input) n++;
            return `chunks: ${n}`;
        };
        """
    )
    instance.pong()
    instance.close_writer("input")
    assert completed(instance) == b"chunks: 0"


def test_input_back_pressure(spawn: Callable[..., NodeInstance]) -> None:
    """A sequence that reads nothing leaves the input in the pipe: the hub's writes block."""
    instance = spawn("module.exports = function (input) { return new Promise(() => {}); };\n")
    instance.pong()
    instance.wait_message(Code.PANG)
    fd = instance._writers["input"]
    os.set_blocking(fd, False)
    written = 0
    try:
        while written < 64 * 1024 * 1024:
            written += os.write(fd, b"x" * 65536)
    except BlockingIOError:
        pass
    assert written < 16 * 1024 * 1024


# --------------------------------------------------------------------------- output


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("module.exports = function () { return 'plain text'; };", b"plain text"),
        ("module.exports = async function () { return 42; };", b"42"),
        ("module.exports = async function () { return Buffer.from([0, 255, 1]); };", b"\x00\xff\x01"),
        ("module.exports = async function () {};", b""),
        ("module.exports = function () { return [1, 'two', {three: 3}]; };", b'1\n"two"\n{"three":3}\n'),
        (
            "module.exports = async function* () { yield 'a'; yield {b: 2}; yield undefined; };",
            b'"a"\n{"b":2}\n',
        ),
        ("module.exports = function () { return {a: [1]}; };", b'{"a":[1]}\n'),
        (
            "const {Readable} = require('stream');\n"
            "module.exports = function () { return Readable.from(['x', Buffer.from('y'), {z: 1}]); };",
            b'xy{"z":1}\n',
        ),
        (
            "const {Readable} = require('stream');\nmodule.exports = function () {"
            " const s = Readable.from(['x', 'y']); s.contentType = 'application/x-ndjson'; return s; };",
            b'"x"\n"y"\n',
        ),
    ],
    ids=[
        "string",
        "number",
        "buffer",
        "undefined",
        "array",
        "async-generator",
        "object",
        "stream",
        "ndjson-stream",
    ],
)
def test_output_kinds(spawn: Callable[..., NodeInstance], source: str, expected: bytes) -> None:
    instance = spawn(source)
    instance.pong()
    assert completed(instance) == expected


def test_large_generator_output_is_complete_and_in_order(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn("module.exports = function* () { for (let i = 0; i < 200000; i++) yield i; };\n")
    instance.pong()
    output = completed(instance)
    assert output == b"".join(b"%d\n" % i for i in range(200000))


def test_stdout_stderr_and_log(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        module.exports = async function () {
            console.log("to stdout", 1);
            console.error("to stderr");
            this.logger.info("info message", {k: "v"});
            this.logger.warn("warned");
            for (let i = 0; i < 2000; i++) process.stdout.write(`line ${i}\\n`);
        };
        """
    )
    instance.pong()
    completed(instance)
    assert instance.stdout is not None
    stdout = instance.stdout.wait_eof().decode()
    assert stdout.startswith("to stdout 1\n") and stdout.endswith("line 1999\n")
    assert instance.stderr.wait_eof() == b"to stderr\n"
    records = [r for r in instance.log_records() if r["from"] == "Sequence"]
    assert records[0]["level"] == "INFO" and records[0]["msg"] == "info message"
    assert records[0]["data"] == [{"k": "v"}] and isinstance(records[0]["ts"], int)
    assert records[1]["level"] == "WARN"


def test_stdin_feeds_process_stdin(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        const readline = require("readline");
        module.exports = async function () {
            for await (const line of readline.createInterface({ input: process.stdin })) {
                console.log(`>>> ${line}`);
            }
        };
        """
    )
    instance.pong()
    instance.write_stdin(b"Hello Alice!\n")
    instance.close_writer("stdin")
    completed(instance)
    assert instance.stdout is not None
    assert instance.stdout.wait_eof() == b">>> Hello Alice!\n"


# --------------------------------------------------------------------------- events, health


def _with_message(text: str) -> Callable[[Message], bool]:
    return lambda message: bool(message.data.get("message") == text)


def test_events_both_ways(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        module.exports = function () {
            this.on("test-event", (message) => this.emit("test-response", `reply to ${message}`));
            this.on("async-event", async (message) => { throw new Error("handler broke"); });
        };
        """
    )
    instance.pong()
    instance.wait_message(Code.PANG)
    instance.send(Code.EVENT, {"eventName": "async-event", "message": 0, "source": "api"})
    for word in ("foo", "bar"):
        instance.send(Code.EVENT, {"eventName": "test-event", "message": word, "source": "api"})
        reply = instance.wait_message(Code.EVENT, _with_message(f"reply to {word}"))
        assert reply.data == {"eventName": "test-response", "message": f"reply to {word}"}
    assert any("handler broke" in r["msg"] for r in instance.wait_log("handler broke"))
    # handlers and no output: it lives until told otherwise, with its output ended
    assert instance.output.wait_eof() == b""
    assert instance.proc.poll() is None
    instance.send(Code.KILL)
    assert instance.wait_exit() == 0


def test_events_right_after_pong_reach_the_handlers(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        module.exports = async function () {
            this.on("early", (message) => this.emit("seen", message));
            this.addStopHandler(() => console.log("stop handler ran"));
            await new Promise(() => {});
        };
        """
    )
    instance.wait_message(Code.PING)
    pong = encode(Message(Code.PONG, {"appConfig": {}, "args": []}))
    event = encode(Message(Code.EVENT, {"eventName": "early", "message": 1}))
    stop = encode(Message(Code.STOP, {"timeout": 0, "canCallKeepalive": False}))
    instance.send_raw(pong + event + stop)  # one write: one read in the runner
    assert instance.wait_message(Code.EVENT).data == {"eventName": "seen", "message": 1}
    instance.wait_message(Code.SEQUENCE_STOPPED)
    assert instance.wait_exit() == 0
    assert instance.stdout is not None
    assert instance.stdout.wait_eof() == b"stop handler ran\n"


def test_stop_before_pong_stops_at_once(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn("module.exports = function () { return new Promise(() => {}); };\n")
    instance.wait_message(Code.PING)
    instance.send(Code.STOP, {"timeout": 0, "canCallKeepalive": False})
    instance.wait_message(Code.SEQUENCE_STOPPED)
    assert instance.wait_exit() == 0
    assert not instance.messages(Code.PANG)


def test_flooded_stdout_nobody_reads_still_answers(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        const { once } = require("events");
        module.exports = async function () {
            this.on("ping", (message) => this.emit("pong", message));
            const line = "x".repeat(1000) + "\\n";
            for (;;) {
                if (!process.stdout.write(line)) await once(process.stdout, "drain");
            }
        };
        """,
        drain_stdout=False,
    )
    instance.pong()
    time.sleep(0.5)
    instance.send(Code.EVENT, {"eventName": "ping", "message": "hello"})
    assert instance.wait_message(Code.EVENT).data == {"eventName": "pong", "message": "hello"}
    instance.wait_message(Code.MONITORING)
    instance.send(Code.KILL)
    assert instance.wait_exit() == 0  # the exit flush gives up on a stdout nobody reads


def test_health_from_monitoring_handlers(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        let calls = 0;
        module.exports = function () {
            this.addMonitoringHandler(() => ({ healthy: true }));
            this.addMonitoringHandler(async () => ({ healthy: ++calls < 2 }));
            return new Promise(() => {});
        };
        """
    )
    instance.pong()
    first = instance.wait_message(Code.MONITORING)
    assert first.data == {"healthy": True}
    second = instance.wait_message(Code.MONITORING, lambda m: m.data["healthy"] is False, timeout=3)
    assert second.data == {"healthy": False}


# --------------------------------------------------------------------------- stop, kill


STOPPABLE = """
module.exports = function () {
    this.addStopHandler(async (timeout, canCallKeepalive) => {
        console.log(`stop ${timeout} ${canCallKeepalive}`);
        await new Promise((resolve) => setTimeout(resolve, 50));
        if (canCallKeepalive) this.keepAlive(3000);
    });
    this.addKillHandler(() => console.log("killed"));
    return new Promise(() => {});
};
"""


def test_stop_with_keep_alive_then_stop(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(STOPPABLE)
    instance.pong()
    instance.wait_message(Code.PANG)
    instance.send(Code.STOP, {"timeout": 1000, "canCallKeepalive": True})
    alive = instance.wait_message(Code.ALIVE)
    assert alive.data == {"keepAlive": 3000}
    time.sleep(0.2)
    assert instance.proc.poll() is None and not instance.messages(Code.SEQUENCE_STOPPED)
    instance.send(Code.STOP, {"timeout": 0, "canCallKeepalive": False})
    instance.wait_message(Code.SEQUENCE_STOPPED)
    assert instance.wait_exit() == 0
    assert instance.stdout is not None
    assert instance.stdout.wait_eof() == b"stop 1000 true\nstop 0 false\n"


def test_kill_message_and_sigterm_run_kill_handlers(spawn: Callable[..., NodeInstance]) -> None:
    for how in ("message", "sigterm"):
        instance = spawn(STOPPABLE)
        instance.pong()
        instance.wait_message(Code.PANG)
        if how == "message":
            instance.send(Code.KILL)
        else:
            instance.proc.send_signal(signal.SIGTERM)
        assert instance.wait_exit() == 0
        assert instance.stdout is not None
        assert instance.stdout.wait_eof() == b"killed\n"


def test_hub_gone_ends_the_runner(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(STOPPABLE)
    instance.pong()
    instance.wait_message(Code.PANG)
    instance.close_writer("control")
    assert instance.wait_exit() == 0


def test_end_and_keep_alive_linger(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn(
        """
        module.exports = function () {
            setTimeout(() => this.end(), 100);
            return new Promise(() => {});
        };
        """
    )
    instance.pong()
    instance.wait_message(Code.SEQUENCE_STOPPED)
    assert instance.wait_exit() == 0
    lingering = spawn("module.exports = function () { this.keepAlive(700); return 'done'; };\n")
    lingering.pong()
    assert lingering.output.wait_eof() == b"done"
    started = time.monotonic()
    lingering.wait_message(Code.SEQUENCE_COMPLETED)
    assert lingering.wait_exit() == 0
    assert 0.3 < time.monotonic() - started < 3


def test_natural_completion_lingers_for_the_exit_timeout_and_stays_alive(
    spawn: Callable[..., NodeInstance],
) -> None:
    """As on the original: once the output ended the instance lingers its exitTimeout (10 s
    unless the hub says otherwise), and events still reach it meanwhile; then it exits 0."""
    source = """
        module.exports = function () {
            this.on('ping', (message) => this.emit('pong', message));
            return 'done';
        };
        """
    instance = spawn(source, info={"exitTimeout": 1500})
    instance.pong()
    assert instance.output.wait_eof() == b"done"
    instance.wait_message(Code.SEQUENCE_COMPLETED)
    started = time.monotonic()
    instance.send(Code.EVENT, {"eventName": "ping", "message": "in the window", "source": "api"})
    assert instance.wait_message(Code.EVENT).data == {"eventName": "pong", "message": "in the window"}
    assert instance.wait_exit() == 0
    assert 1.0 < time.monotonic() - started < 5
    # no exitTimeout from the hub: the original's 10 s
    default = spawn("module.exports = function () { return 'x'; };\n", info={"exitTimeout": None})
    default.pong()
    default.wait_message(Code.SEQUENCE_COMPLETED)
    with pytest.raises(subprocess.TimeoutExpired):
        default.proc.wait(timeout=2)  # still lingering
    default.send(Code.STOP, {"timeout": 1000, "canCallKeepalive": False})
    assert default.wait_exit() == 0  # a stop in the window ends it at once


# --------------------------------------------------------------------------- failures


def test_missing_main_exits_21(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn("module.exports = () => 1;\n", main="app.js")
    error = error_of(instance, 21)
    expected = "Sequence entrypoint path app.js is invalid. Check `main` field in Sequence package.json"
    assert error["message"] == expected
    assert expected.encode() in instance.stderr.wait_eof()
    assert not instance.messages(Code.PING)


def test_main_outside_the_package_is_refused(spawn: Callable[..., NodeInstance], tmp_path: Path) -> None:
    (tmp_path / "outside.js").write_text("module.exports = () => 1;\n")
    instance = spawn("module.exports = () => 1;\n", main="../../outside.js")
    error_of(instance, 21)


def test_throwing_module_exits_22_before_ping(spawn: Callable[..., NodeInstance]) -> None:
    instance = spawn("class BadThing extends Error {}\nthrow new BadThing('broken at load');\n")
    error = error_of(instance, 22)
    assert error["message"] == "Sequence failed on start: BadThing: broken at load"
    assert b"broken at load" in instance.stderr.wait_eof()
    assert not instance.messages(Code.PING)


def test_syntax_error_and_no_function_exit_22(spawn: Callable[..., NodeInstance]) -> None:
    broken = spawn("module.exports = function ( {\n")
    assert error_of(broken, 22)["message"].startswith("Sequence failed on start: SyntaxError")
    nothing = spawn("module.exports = { a: 1 };\n")
    assert "exports no function" in error_of(nothing, 22)["message"]


@pytest.mark.parametrize(
    "source",
    [
        "class TestException extends Error {}\nmodule.exports = function () {"
        " throw new TestException('This exception should appear on stderr'); };",
        "class TestException extends Error {}\nmodule.exports = async function () {"
        " await null; throw new TestException('This exception should appear on stderr'); };",
        "class TestException extends Error {}\nmodule.exports = function () {"
        " setTimeout(() => { throw new TestException('This exception should appear on stderr'); }, 10);"
        " return new Promise(() => {}); };",
        "class TestException extends Error {}\nmodule.exports = function () {"
        " this.destroy(new TestException('This exception should appear on stderr'));"
        " return new Promise(() => {}); };",
    ],
    ids=["sync", "async", "uncaught", "destroy"],
)
def test_failure_during_execution_exits_23(spawn: Callable[..., NodeInstance], source: str) -> None:
    instance = spawn(source)
    instance.pong()
    error = error_of(instance, 23)
    assert error["message"] == (
        "Sequence failed during execution: TestException: This exception should appear on stderr"
    )
    assert b"This exception should appear on stderr" in instance.stderr.wait_eof()
    assert not instance.messages(Code.SEQUENCE_COMPLETED)


def test_bad_environment_exits_20(tmp_path: Path) -> None:
    assert NODE is not None
    result = subprocess.run(
        [NODE, str(RUNNER)], env={"PATH": os.environ.get("PATH", "")}, capture_output=True, timeout=WAIT
    )
    assert result.returncode == 20 and b"invalid environment" in result.stderr
