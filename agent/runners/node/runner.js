'use strict';
/*
 * Spacehub's Node.js runner: the hub runs `node runner.js` in every Instance of a
 * Node.js Sequence (a package whose package.json has no engines.python3).
 *
 * One self-contained CommonJS file, standard library only, Node >= 18. It speaks the
 * runner protocol of spacehub/protocol/runner.py and behaves like the Python runner
 * (agent/runners/python/); docs/node-sequences.md describes the contract.
 *
 * Theory of operation
 * -------------------
 * The hub starts us with the channels already open as fds 0-7 (0 stdin, 1 stdout,
 * 2 stderr, 3 control, 4 monitoring, 5 input, 6 output, 7 log) and the sequence
 * described by the environment: SPACEHUB_SEQUENCE_DIR (absolute), SPACEHUB_SEQUENCE_MAIN
 * (package.json `main`), SPACEHUB_INSTANCE_ID and SPACEHUB_RUNNER_INFO (JSON: appConfig,
 * args, inputTopic?, outputTopic?).
 *
 *   load the module -> PING -> wait for PONG -> PANG {requires} -> call the function(s)
 *   -> output known: PANG {provides} (if any) -> write the output to fd 6
 *   -> output ended: close fd 6, SEQUENCE_COMPLETED, exit 0
 *
 * Pipes and sockets are opened as net.Socket (epoll, no thread pool, real back-pressure:
 * input is read only as fast as the sequence consumes it, output waits for 'drain').
 * Every message on fd 4 is one write() of one whole line, so lines never interleave.
 * Before exiting, pending writes on fds 1, 2, 4 and 7 are flushed (bounded wait).
 *
 * Exit codes: 0 completed, stopped, killed or hub gone; 20 bad environment; 21 bad
 * entry point; 22 failed on start; 23 failed during execution.
 */

const CREATED = Date.now();

const fs = require('fs');
const net = require('net');
const path = require('path');
const util = require('util');
const { Readable } = require('stream');
const { StringDecoder } = require('string_decoder');
const { pathToFileURL } = require('url');

const FD_CONTROL = 3;
const FD_MONITORING = 4;
const FD_INPUT = 5;
const FD_OUTPUT = 6;
const FD_LOG = 7;

const PING = 3000;
const MONITORING = 3001;
const ERROR = 3003;
const SEQUENCE_STOPPED = 3006;
const ALIVE = 3010;
const SEQUENCE_COMPLETED = 3011;
const PANG = 3012;
const PONG = 4000;
const STOP = 4001;
const KILL = 4002;
const EVENT = 5001;

const EXIT_OK = 0;
const EXIT_BAD_ENV = 20;
const EXIT_BAD_MAIN = 21;
const EXIT_START_FAILED = 22;
const EXIT_RUN_FAILED = 23;

/** Longest message line, either way (as MAX_MESSAGE_BYTES in the protocol module). */
const MAX_MESSAGE_BYTES = 1024 * 1024;
/** Longest input preamble. */
const MAX_PREAMBLE_BYTES = 8 * 1024;
/** An NDJSON input record longer than this is dropped. */
const MAX_INPUT_LINE = 16 * 1024 * 1024;
/** Output items are coalesced into writes of up to this many bytes. */
const OUTPUT_FLUSH_BYTES = 64 * 1024;
const CHUNK_SIZE = 64 * 1024;
const HEARTBEAT_MS = 1000;
const HEALTH_CHECK_TIMEOUT_MS = 1000;
const DEFAULT_STOP_TIMEOUT_MS = 7000;
/** We wait at least this long for async stop handlers (the hub sends KILL on its own timeout). */
const MIN_STOP_WAIT_MS = 1000;
/** Longest wait for pending writes to fds 1, 2, 4 and 7 before exiting. */
const EXIT_FLUSH_MS = 1000;
const NDJSON_TYPES = new Set(['application/x-ndjson', 'text/x-ndjson']);

// ------------------------------------------------------------------------- helpers

function isThenable(value) {
    return value !== null && (typeof value === 'object' || typeof value === 'function') &&
        typeof value.then === 'function';
}

function mediaType(contentType) {
    return String(contentType || '').split(';', 1)[0].trim().toLowerCase();
}

/** JSON that never throws: circular references, BigInts and Errors become readable values. */
function safeJson(value) {
    const seen = new WeakSet();
    try {
        return JSON.stringify(value, function replacer(key, item) {
            if (typeof item === 'bigint') return item.toString();
            if (item instanceof Error) {
                return { name: errorName(item), message: item.message, stack: item.stack };
            }
            if (item !== null && typeof item === 'object') {
                if (seen.has(item)) return '[Circular]';
                seen.add(item);
            }
            return item;
        });
    } catch (err) {
        return JSON.stringify(util.inspect(value));
    }
}

/** The name an error is reported under: its class name when `name` was left generic. */
function errorName(err) {
    if (err === null || (typeof err !== 'object' && typeof err !== 'function')) return typeof err;
    let name = typeof err.name === 'string' ? err.name : '';
    const ctor = err.constructor && typeof err.constructor.name === 'string' ? err.constructor.name : '';
    if ((!name || name === 'Error') && ctor && ctor !== 'Object') name = ctor;
    return name || 'Error';
}

function errorText(err) {
    if (err instanceof Error || (err && typeof err === 'object' && 'message' in err)) {
        return `${errorName(err)}: ${err.message}`;
    }
    return `${typeof err === 'string' ? 'Error' : errorName(err)}: ${String(err)}`;
}

function describeError(err) {
    if (err instanceof Error) return util.inspect(err);
    return `Uncaught ${util.inspect(err)}`;
}

function isPipeOrSocket(fd) {
    try {
        const stat = fs.fstatSync(fd);
        return stat.isFIFO() || stat.isSocket();
    } catch (err) {
        return false;
    }
}

/** A writable stream on an inherited fd; errors (the hub went away) are swallowed. */
function openWritable(fd) {
    let stream;
    if (isPipeOrSocket(fd)) {
        stream = new net.Socket({ fd, readable: false, writable: true });
    } else {
        stream = fs.createWriteStream(null, { fd, autoClose: true });
    }
    stream.on('error', () => { stream.destroy(); });
    return stream;
}

/** A readable stream on an inherited fd, paused until read. */
function openReadable(fd) {
    let stream;
    if (isPipeOrSocket(fd)) {
        stream = new net.Socket({ fd, readable: true, writable: false });
    } else {
        stream = fs.createReadStream(null, { fd, highWaterMark: CHUNK_SIZE, autoClose: true });
    }
    return stream;
}

function withTimeout(value, ms) {
    if (!isThenable(value)) return Promise.resolve(value);
    let timer;
    return Promise.race([
        Promise.resolve(value),
        new Promise((resolve, reject) => {
            timer = setTimeout(() => reject(Object.assign(new Error('timed out'), { timedOut: true })), ms);
        }),
    ]).finally(() => clearTimeout(timer));
}

// ------------------------------------------------------------------------- environment

function readEnv(environ) {
    const env = {};
    env.sequenceDir = environ.SPACEHUB_SEQUENCE_DIR || '';
    if (!env.sequenceDir || !path.isAbsolute(env.sequenceDir)) {
        throw new Error('SPACEHUB_SEQUENCE_DIR must be an absolute path');
    }
    env.main = environ.SPACEHUB_SEQUENCE_MAIN || '';
    if (!env.main) throw new Error('SPACEHUB_SEQUENCE_MAIN is missing');
    env.instanceId = environ.SPACEHUB_INSTANCE_ID || '';
    if (!env.instanceId) throw new Error('SPACEHUB_INSTANCE_ID is missing');
    let info;
    try {
        info = JSON.parse(environ.SPACEHUB_RUNNER_INFO || '');
    } catch (err) {
        throw new Error('SPACEHUB_RUNNER_INFO is missing or not JSON');
    }
    if (info === null || typeof info !== 'object' || Array.isArray(info)) {
        throw new Error('SPACEHUB_RUNNER_INFO must be a JSON object');
    }
    const appConfig = info.appConfig || {};
    const args = info.args || [];
    if (typeof appConfig !== 'object' || Array.isArray(appConfig) || !Array.isArray(args)) {
        throw new Error('SPACEHUB_RUNNER_INFO: appConfig must be an object and args a list');
    }
    env.appConfig = appConfig;
    env.args = args;
    env.inputTopic = typeof info.inputTopic === 'string' ? info.inputTopic : '';
    env.outputTopic = typeof info.outputTopic === 'string' ? info.outputTopic : '';
    env.exitTimeout = Number.isFinite(info.exitTimeout) && info.exitTimeout >= 0 ? info.exitTimeout : 10000;
    env.hubUrl = environ.SPACEHUB_HUB_URL || '';
    for (const fd of [FD_CONTROL, FD_MONITORING, FD_INPUT, FD_OUTPUT, FD_LOG]) {
        try {
            fs.fstatSync(fd);
        } catch (err) {
            throw new Error(`fd ${fd} is not open (the hub sets up fds 3-7)`);
        }
    }
    return env;
}

/** The entry point's real path (sequence §2.3: `main`, `main.js` or `main/index.js`), or null. */
function resolveMain(sequenceDir, main) {
    let root;
    try {
        root = fs.realpathSync(sequenceDir);
    } catch (err) {
        return null;
    }
    const base = path.resolve(root, main);
    const candidates = [base, `${base}.js`, path.join(base, 'index.js')];
    for (const candidate of candidates) {
        let real;
        try {
            real = fs.realpathSync(candidate);
            if (!fs.statSync(real).isFile()) continue;
        } catch (err) {
            continue;
        }
        if (real === root || !real.startsWith(root + path.sep)) continue;
        return real;
    }
    return null;
}

async function loadModule(file) {
    if (file.endsWith('.mjs')) return import(pathToFileURL(file).href);
    try {
        return require(file);
    } catch (err) {
        if (err && (err.code === 'ERR_REQUIRE_ESM' || err.code === 'ERR_REQUIRE_ASYNC_MODULE')) {
            return import(pathToFileURL(file).href);
        }
        throw err;
    }
}

/** {functions, requires, contentType} from the module's export, or a reason string. */
function parseExport(exported) {
    let value = exported;
    if (value !== null && typeof value === 'object' && !Array.isArray(value) && 'default' in value) {
        value = value.default;
        // a CommonJS module imported as ESM, or TypeScript's `exports.default`
        if (value !== null && typeof value === 'object' && !Array.isArray(value) && 'default' in value) {
            value = value.default;
        }
    }
    if (typeof value === 'function') return { functions: [value], requires: '', contentType: '' };
    if (!Array.isArray(value)) {
        return 'the module exports no function (module.exports or default export must be a function or an array of functions)';
    }
    const items = value.slice();
    let requires = '';
    let contentType = '';
    if (items.length && items[0] !== null && typeof items[0] === 'object') {
        const head = items.shift();
        requires = typeof head.requires === 'string' ? head.requires : '';
        contentType = typeof head.contentType === 'string' ? head.contentType : '';
    }
    if (!items.length) return 'the exported array holds no function';
    const bad = items.findIndex((item) => typeof item !== 'function');
    if (bad >= 0) return `element ${bad + (items.length < value.length ? 1 : 0)} of the exported array is not a function`;
    return { functions: items, requires, contentType };
}

// ------------------------------------------------------------------------- the runner

class Runner {
    constructor(env) {
        this.env = env;
        this.appConfig = env.appConfig;
        this.args = env.args;
        this.monitoring = openWritable(FD_MONITORING);
        this.logStream = openWritable(FD_LOG);
        this.phase = 'loading'; // -> 'handshake' -> 'running'
        this.exiting = false;
        this.finished = false;
        this.context = null;
        this.heartbeat = null;
        this.healthPending = false;
        this.eventHandlers = new Map();
        this.stopHandlers = [];
        this.killHandlers = [];
        this.monitoringHandlers = [];
        this.keepAliveRequested = false;
        this.lingerUntil = 0;
        this.stopChain = Promise.resolve();
        this.output = null;
        this.outputClosed = false;
        this.controlBuffer = Buffer.alloc(0);
        this.pongWaiter = null;
        /** Control messages held back between PONG and the sequence's start, or null. */
        this.early = null;
        this.ignoredCodes = new Set();
    }

    // ---- fds 4 and 7

    send(code, data) {
        const line = JSON.stringify([code, data]) + '\n';
        if (Buffer.byteLength(line) > MAX_MESSAGE_BYTES) {
            throw new RangeError(`message ${code} is over ${MAX_MESSAGE_BYTES} bytes`);
        }
        if (!this.monitoring.destroyed) this.monitoring.write(line);
    }

    log(level, msg, from = 'Runner', data = undefined) {
        const record = { ts: Date.now(), level, from, msg };
        if (data && data.length) record.data = data;
        if (!this.logStream.destroyed) this.logStream.write(safeJson(record) + '\n');
    }

    // ---- endings

    /** Exit once pending writes to fds 1, 2, 4 and 7 are flushed (bounded). */
    exit(code) {
        if (this.exiting) return;
        this.exiting = true;
        if (this.heartbeat) clearInterval(this.heartbeat);
        const streams = [this.monitoring, this.logStream, process.stdout, process.stderr];
        const deadline = Date.now() + EXIT_FLUSH_MS;
        const check = () => {
            const pending = streams.some((s) => !s.destroyed && s.writableLength > 0);
            if (!pending || Date.now() >= deadline) {
                process.exit(code);
            } else {
                setTimeout(check, 5);
            }
        };
        check();
    }

    /** Report ERROR and exit with `code` (the details are on stderr already). */
    fail(code, message) {
        if (this.exiting || this.finished) return;
        this.finished = true;
        this.log('ERROR', message);
        this.send(ERROR, { message, exitcode: code });
        this.exit(code);
    }

    failWith(err, during) {
        try {
            process.stderr.write(describeError(err) + '\n');
        } catch (writeErr) {
            // stderr is gone: the ERROR message still says why
        }
        if (during === 'start') {
            this.fail(EXIT_START_FAILED, `Sequence failed on start: ${errorText(err)}`);
        } else {
            this.fail(EXIT_RUN_FAILED, `Sequence failed during execution: ${errorText(err)}`);
        }
    }

    onUncaught(err) {
        this.failWith(err, this.phase === 'running' ? 'run' : 'start');
    }

    async closeOutput() {
        if (this.outputClosed) return;
        this.outputClosed = true;
        const out = this.output || openWritable(FD_OUTPUT);
        this.output = out;
        if (out.destroyed) return;
        await new Promise((resolve) => {
            out.once('close', resolve);
            out.once('error', resolve);
            out.end(() => { out.destroy(); resolve(); });
        });
    }

    /** The output ended (or there is none): close fd 6, SEQUENCE_COMPLETED, exit 0. */
    async complete() {
        if (this.finished) return;
        this.finished = true;
        await this.closeOutput();
        this.send(SEQUENCE_COMPLETED, {});
        this.log('INFO', 'Sequence completed');
        const linger = Math.max(this.lingerUntil - Date.now(), Number(this.context && this.context.exitTimeout) || 0);
        if (linger > 0) {
            // keepAlive(ms) or exitTimeout: STOP and KILL still end us meanwhile
            setTimeout(() => this.exit(EXIT_OK), linger);
        } else {
            this.exit(EXIT_OK);
        }
    }

    /** this.end(): the sequence ends itself as if stopped. */
    async endBySequence() {
        if (this.finished) return;
        this.finished = true;
        await withTimeout(this.closeOutput(), 1000).catch(() => {});
        this.send(SEQUENCE_STOPPED, {});
        this.log('INFO', 'Ended by the sequence');
        this.exit(EXIT_OK);
    }

    killed(why) {
        if (this.exiting) return;
        this.finished = true;
        for (const handler of this.killHandlers) {
            try {
                handler.call(this.context);
            } catch (err) {
                this.log('ERROR', `Kill handler failed: ${errorText(err)}`, 'Runner', [err && err.stack]);
            }
        }
        this.log('INFO', why);
        this.exit(EXIT_OK);
    }

    // ---- control (fd 3)

    startControl() {
        const control = openReadable(FD_CONTROL);
        control.on('data', (chunk) => this.onControlData(chunk));
        const gone = () => {
            if (this.exiting) return;
            this.log('INFO', 'The hub closed the control channel; exiting');
            this.finished = true;
            this.exit(EXIT_OK);
        };
        control.on('end', gone);
        control.on('error', gone);
    }

    onControlData(chunk) {
        let buffer = this.controlBuffer.length ? Buffer.concat([this.controlBuffer, chunk]) : chunk;
        let newline;
        while ((newline = buffer.indexOf(10)) >= 0) {
            const line = buffer.subarray(0, newline).toString('utf8').trim();
            buffer = buffer.subarray(newline + 1);
            if (line) this.onControlLine(line);
        }
        if (buffer.length > MAX_MESSAGE_BYTES) {
            this.log('WARN', `Control line over ${MAX_MESSAGE_BYTES} bytes dropped`);
            buffer = Buffer.alloc(0);
        }
        this.controlBuffer = Buffer.from(buffer);
    }

    onControlLine(line) {
        let code;
        let data;
        try {
            const value = JSON.parse(line);
            if (!Array.isArray(value) || typeof value[0] !== 'number') throw new Error('not [code, payload]');
            code = value[0];
            data = value[1] && typeof value[1] === 'object' ? value[1] : {};
        } catch (err) {
            this.log('WARN', `Control message ignored: ${err.message}`);
            return;
        }
        if (this.exiting) return;
        if (code === PONG) {
            if (this.pongWaiter) {
                const resolve = this.pongWaiter;
                this.pongWaiter = null;
                // Events and STOP that follow PONG wait until the function has been
                // called and could register its handlers (see runSequence).
                this.early = [];
                resolve(data);
            }
        } else if (code === KILL) {
            this.killed('Killed by the hub');
        } else if (this.early && (code === STOP || code === EVENT)) {
            this.early.push([code, data]);
        } else {
            this.dispatch(code, data);
        }
    }

    dispatch(code, data) {
        if (this.exiting) return;
        if (code === KILL) {
            this.killed('Killed by the hub');
        } else if (code === STOP) {
            if (this.phase !== 'running') {
                this.finished = true;
                this.send(SEQUENCE_STOPPED, {});
                this.exit(EXIT_OK);
                return;
            }
            this.stopChain = this.stopChain.then(() => this.handleStop(data));
        } else if (code === EVENT) {
            this.deliverEvent(data);
        } else if (!this.ignoredCodes.has(code)) {
            this.ignoredCodes.add(code); // once per code: a reply sent every second must not flood the log
            this.log('DEBUG', `Ignored control message ${code}`);
        }
    }

    deliverEvent(data) {
        const name = data.eventName;
        if (typeof name !== 'string') return;
        const handlers = (this.eventHandlers.get(name) || []).slice();
        for (const entry of handlers) {
            if (entry.once) this.removeHandler(name, entry.handler);
            this.callUser(entry.handler, [data.message], `Event handler for ${JSON.stringify(name)}`);
        }
    }

    removeHandler(name, handler) {
        const list = this.eventHandlers.get(name) || [];
        const index = list.findIndex((entry) => entry.handler === handler);
        if (index >= 0) list.splice(index, 1);
        if (!list.length) this.eventHandlers.delete(name);
    }

    get hasHandlers() {
        return this.eventHandlers.size > 0;
    }

    /** Call a user callback; its failure (sync or async) is logged, never fatal. */
    callUser(fn, args, what) {
        let result;
        try {
            result = fn.apply(this.context, args);
        } catch (err) {
            this.log('ERROR', `${what} failed: ${errorText(err)}`, 'Runner', [err && err.stack]);
            return Promise.resolve();
        }
        if (!isThenable(result)) return Promise.resolve(result);
        return Promise.resolve(result).catch((err) => {
            this.log('ERROR', `${what} failed: ${errorText(err)}`, 'Runner', [err && err.stack]);
        });
    }

    async handleStop(data) {
        if (this.exiting) return;
        let timeout = data.timeout;
        if (typeof timeout !== 'number' || !(timeout >= 0)) timeout = DEFAULT_STOP_TIMEOUT_MS;
        const canKeepAlive = Boolean(data.canCallKeepalive);
        this.keepAliveRequested = false;
        const deadline = Date.now() + Math.max(timeout, MIN_STOP_WAIT_MS);
        for (const handler of this.stopHandlers.slice()) {
            try {
                await withTimeout(this.callUser(handler, [timeout, canKeepAlive], 'Stop handler'),
                    Math.max(deadline - Date.now(), 0));
            } catch (err) {
                this.log('WARN', 'Stop handler did not finish in time');
                break;
            }
        }
        if (this.exiting) return;
        if (canKeepAlive && this.keepAliveRequested) {
            this.log('INFO', 'Kept alive by the sequence');
            return;
        }
        this.finished = true;
        this.send(SEQUENCE_STOPPED, {});
        this.log('INFO', 'Stopped');
        this.exit(EXIT_OK);
    }

    keepAlive(ms) {
        let value = Number(ms);
        if (!Number.isFinite(value) || value < 0) value = 0;
        value = Math.round(value);
        this.keepAliveRequested = true;
        this.lingerUntil = Math.max(this.lingerUntil, Date.now() + value);
        this.send(ALIVE, { keepAlive: value });
    }

    // ---- monitoring (fd 4)

    startHeartbeat() {
        const beat = () => {
            if (this.healthPending || this.exiting || this.finished) return;
            this.healthPending = true;
            this.healthy().then((healthy) => {
                this.healthPending = false;
                if (!this.exiting && !this.finished) this.send(MONITORING, { healthy });
            });
        };
        beat();
        this.heartbeat = setInterval(beat, HEARTBEAT_MS);
    }

    async healthy() {
        let healthy = true;
        for (const handler of this.monitoringHandlers.slice()) {
            try {
                const result = await withTimeout(handler.call(this.context, { healthy }), HEALTH_CHECK_TIMEOUT_MS);
                if (result === undefined || result === null) continue; // no opinion
                const value = typeof result === 'object' ? result.healthy : result;
                healthy = healthy && Boolean(value);
            } catch (err) {
                healthy = false;
            }
        }
        return healthy;
    }

    // ---- start

    async start() {
        const env = this.env;
        process.on('uncaughtException', (err) => this.onUncaught(err));
        process.on('unhandledRejection', (reason) => this.onUncaught(reason));
        process.on('SIGTERM', () => this.killed('Terminated by SIGTERM'));
        for (const stream of [process.stdout, process.stderr]) stream.on('error', () => {});
        this.startControl();

        const file = resolveMain(env.sequenceDir, env.main);
        if (file === null) {
            const message = `Sequence entrypoint path ${env.main} is invalid. Check \`main\` field in Sequence package.json`;
            process.stderr.write(message + '\n');
            this.fail(EXIT_BAD_MAIN, message);
            return;
        }
        let exported;
        try {
            exported = await loadModule(file);
        } catch (err) {
            this.failWith(err, 'start');
            return;
        }
        if (this.exiting) return;
        const parsed = parseExport(exported);
        if (typeof parsed === 'string') {
            const message = `Sequence failed on start: ${env.main}: ${parsed}`;
            process.stderr.write(message + '\n');
            this.fail(EXIT_START_FAILED, message);
            return;
        }
        this.log('DEBUG', `Sequence loaded from ${file}`);

        this.phase = 'handshake';
        const pong = new Promise((resolve) => { this.pongWaiter = resolve; });
        this.send(PING, { id: env.instanceId, pid: process.pid, created: CREATED });
        const data = await pong;
        if (this.exiting) return;
        if (data.appConfig && typeof data.appConfig === 'object' && !Array.isArray(data.appConfig)) {
            this.appConfig = data.appConfig;
        }
        if (Array.isArray(data.args)) this.args = data.args;

        this.context = new AppContext(this);
        const requires = env.inputTopic || parsed.requires;
        this.declaredInputType = parsed.contentType;
        this.phase = 'running';
        this.send(PANG, { requires, provides: '', contentType: parsed.contentType });
        this.startHeartbeat();
        await this.runSequence(parsed.functions);
    }

    async runSequence(functions) {
        const context = this.context;
        // Runs once the synchronous part of the call(s) below is done: by then the
        // handlers registered at the top of the function(s) are in place.
        setImmediate(() => {
            const early = this.early || [];
            this.early = null;
            for (const [code, data] of early) this.dispatch(code, data);
        });
        let value = new InputStream(this);
        for (let index = 0; index < functions.length; index++) {
            value = functions[index].call(context, value, ...this.args);
            if (index < functions.length - 1) {
                while (isThenable(value)) value = await value;
                value = toStream(value, index);
            }
        }
        while (isThenable(value)) value = await value;
        if (this.finished || this.exiting) return;
        await this.writeResult(value);
    }

    async writeResult(result) {
        const kind = outputKind(result);
        const topic = kind !== 'none' && typeof result === 'object' && typeof result.topic === 'string' ? result.topic : '';
        const declared = kind !== 'none' && typeof result === 'object' && typeof result.contentType === 'string'
            ? result.contentType : '';
        const provides = this.env.outputTopic || topic;
        if (provides || declared) {
            const fallback = kind === 'iterable' || kind === 'datastream' ? 'application/x-ndjson' : 'text/plain';
            this.send(PANG, { provides, contentType: declared || fallback });
        }
        if (kind === 'none') {
            if (this.hasHandlers) {
                // Nothing to output, but the sequence listens for events: it lives until
                // STOP, KILL, this.end() or the hub going away.
                await this.closeOutput();
                this.log('DEBUG', 'No output; waiting for events');
                return;
            }
            await this.complete();
            return;
        }
        const out = new Output(this);
        const ndjson = NDJSON_TYPES.has(mediaType(declared)) || kind === 'iterable' || kind === 'datastream';
        const encode = ndjson ? encodeNdjson : encodeRaw;
        if (kind === 'bytes' || kind === 'text' || kind === 'primitive') {
            await out.write(encodeRaw(kind === 'primitive' ? String(result) : result));
        } else if (kind === 'object') {
            await out.write(encodeNdjson(result));
        } else {
            const source = kind === 'stream' || kind === 'datastream' ? asIterable(result) : result;
            if (Symbol.asyncIterator in Object(source)) {
                for await (const item of source) {
                    if (this.finished || !(await out.write(encode(item)))) break;
                }
            } else {
                let count = 0;
                for (const item of source) {
                    if (this.finished || !(await out.write(encode(item)))) break;
                    if (++count % 1024 === 0) await new Promise((resolve) => setImmediate(resolve));
                }
            }
        }
        await out.flush();
        if (out.gone && !this.finished) this.log('WARN', 'The hub closed the output; the rest of it was dropped');
        await this.complete();
    }
}

// ------------------------------------------------------------------------- output

/** 'none' | 'bytes' | 'text' | 'primitive' | 'stream' | 'datastream' | 'iterable' | 'object' */
function outputKind(result) {
    if (result === undefined || result === null) return 'none';
    if (Buffer.isBuffer(result) || result instanceof Uint8Array) return 'bytes';
    if (typeof result === 'string') return 'text';
    if (typeof result !== 'object' && typeof result !== 'function') return 'primitive';
    if (typeof result.pipe === 'function' && typeof result.on === 'function') {
        // a scramjet DataStream (not String/BufferStream) is written as NDJSON, as originally
        const name = result.constructor && result.constructor.name;
        if (typeof result.whenWrote === 'function' && name !== 'StringStream' && name !== 'BufferStream') {
            return 'datastream';
        }
        return 'stream';
    }
    if (Symbol.asyncIterator in result || Symbol.iterator in result) return 'iterable';
    if (typeof result === 'function') return 'none';
    return 'object';
}

/** A stream as an async iterable (old-style streams without async iteration are wrapped). */
function asIterable(stream) {
    if (Symbol.asyncIterator in stream) return stream;
    return new Readable({ objectMode: true }).wrap(stream);
}

/** An intermediate function's result as the next function's input stream. */
function toStream(value, index) {
    const kind = outputKind(value);
    if (kind === 'stream' || kind === 'datastream') return value;
    if (kind === 'iterable') return Readable.from(value);
    throw new TypeError(`function ${index} of the exported array returned no stream or iterable to chain`);
}

function encodeRaw(item) {
    if (Buffer.isBuffer(item)) return item;
    if (item instanceof Uint8Array) return Buffer.from(item.buffer, item.byteOffset, item.byteLength);
    if (typeof item === 'string') return Buffer.from(item, 'utf8');
    if (item === undefined || item === null) return null;
    if (typeof item === 'object') return encodeNdjson(item);
    return Buffer.from(String(item), 'utf8');
}

function encodeNdjson(item) {
    if (Buffer.isBuffer(item)) return item; // already encoded by the sequence
    if (item instanceof Uint8Array) return Buffer.from(item.buffer, item.byteOffset, item.byteLength);
    const text = JSON.stringify(item);
    return text === undefined ? null : Buffer.from(text + '\n', 'utf8');
}

/** The sequence's output (fd 6): coalesced writes with back-pressure. */
class Output {
    constructor(runner) {
        this.runner = runner;
        this.stream = runner.output || openWritable(FD_OUTPUT);
        runner.output = this.stream;
        this.pending = [];
        this.pendingSize = 0;
        this.scheduled = false;
    }

    get gone() {
        return this.stream.destroyed || this.runner.outputClosed;
    }

    /** Queue `data`; false once the output is gone (the hub closed it, or the sequence ended). */
    async write(data) {
        if (this.gone) return false;
        if (!data || !data.length) return true;
        if (this.stream.writableNeedDrain) await this.drained();
        this.pending.push(data);
        this.pendingSize += data.length;
        if (this.pendingSize >= OUTPUT_FLUSH_BYTES) {
            this.flushNow();
        } else if (!this.scheduled) {
            this.scheduled = true;
            setImmediate(() => this.flushNow());
        }
        return true;
    }

    flushNow() {
        this.scheduled = false;
        if (!this.pending.length) return;
        const data = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending, this.pendingSize);
        this.pending = [];
        this.pendingSize = 0;
        if (!this.gone) this.stream.write(data);
    }

    drained() {
        const stream = this.stream;
        if (!stream.writableNeedDrain || stream.destroyed) return Promise.resolve();
        return new Promise((resolve) => {
            const done = () => {
                stream.off('drain', done);
                stream.off('close', done);
                resolve();
            };
            stream.on('drain', done);
            stream.on('close', done);
        });
    }

    async flush() {
        this.flushNow();
        await this.drained();
    }
}

// ------------------------------------------------------------------------- input

/**
 * The sequence's input (fd 5), typed by its content type: NDJSON -> parsed values (one
 * per non-empty line; `null` skipped, it would end the stream), text/plain -> UTF-8 string
 * chunks (not split into lines), anything else -> Buffers. fd 5 is opened on the first
 * read and read only as fast as the items are consumed.
 */
class InputStream extends Readable {
    constructor(runner) {
        super({ objectMode: true, highWaterMark: 16 });
        this._runner = runner;
        this._source = null;
        this._state = runner.declaredInputType ? 'sniff' : 'preamble';
        this._kind = '';
        this._head = Buffer.alloc(0);
        this._tail = Buffer.alloc(0);
        this._skipping = false;
        this._decoder = null;
        this._full = false;
        this._ended = false;
        if (runner.declaredInputType) this._setKind(runner.declaredInputType);
    }

    _setKind(contentType) {
        const type = mediaType(contentType);
        this._kind = NDJSON_TYPES.has(type) ? 'ndjson' : type === 'text/plain' ? 'text' : 'bytes';
        if (this._kind === 'text') this._decoder = new StringDecoder('utf8');
        this._runner.log('DEBUG', `Input content type: ${contentType}`);
    }

    _read() {
        if (this._source === null) {
            const source = this._source = openReadable(FD_INPUT);
            source.on('data', (chunk) => {
                this._full = false;
                this._onData(chunk);
                if (this._full) source.pause();
            });
            source.on('end', () => this._finish());
            source.on('error', (err) => {
                this._runner.log('ERROR', `Reading the input failed: ${err.message}`);
                this._finish();
            });
        } else if (!this._ended) {
            this._source.resume();
        }
    }

    _push(item) {
        if (!this.push(item)) this._full = true;
    }

    _onData(chunk) {
        if (this._state === 'data') {
            this._decode(chunk);
            return;
        }
        this._head = Buffer.concat([this._head, chunk]);
        if (this._state === 'sniff') {
            // The type is declared; the hub may still have sent a preamble: skip it.
            const prefix = 'content-type:';
            const start = this._head.subarray(0, prefix.length).toString('latin1').toLowerCase();
            if (!prefix.startsWith(start)) {
                this._toData();
                return;
            }
            if (this._head.length < prefix.length) return;
            this._state = 'preamble';
        }
        const end = this._head.indexOf('\r\n\r\n');
        if (end < 0) {
            if (this._head.length > MAX_PREAMBLE_BYTES) {
                this._runner.log('ERROR', 'Input preamble missing or too long; input ignored');
                this._ended = true;
                this._source.destroy();
                this.push(null);
            }
            return;
        }
        const headers = {};
        for (const line of this._head.subarray(0, end).toString('latin1').split('\r\n')) {
            const colon = line.indexOf(':');
            if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
        }
        const rest = this._head.subarray(end + 4);
        this._head = Buffer.alloc(0);
        if (!this._kind) this._setKind(headers['content-type'] || 'application/octet-stream');
        this._state = 'data';
        if (rest.length) this._decode(rest);
    }

    _toData() {
        const head = this._head;
        this._head = Buffer.alloc(0);
        this._state = 'data';
        if (head.length) this._decode(head);
    }

    _decode(chunk) {
        if (this._kind === 'text') {
            const text = this._decoder.write(chunk);
            if (text) this._push(text);
        } else if (this._kind === 'ndjson') {
            let data = this._tail.length ? Buffer.concat([this._tail, chunk]) : chunk;
            let newline;
            while ((newline = data.indexOf(10)) >= 0) {
                const line = data.subarray(0, newline);
                data = data.subarray(newline + 1);
                if (this._skipping) {
                    this._skipping = false;
                    continue;
                }
                this._parse(line);
            }
            if (data.length > MAX_INPUT_LINE) {
                this._runner.log('ERROR', `NDJSON input record over ${MAX_INPUT_LINE} B dropped`);
                this._skipping = true;
                data = Buffer.alloc(0);
            }
            this._tail = Buffer.from(data);
        } else {
            this._push(chunk);
        }
    }

    _parse(line) {
        const text = line.toString('utf8').trim();
        if (!text) return;
        let value;
        try {
            value = JSON.parse(text);
        } catch (err) {
            this._runner.log('ERROR', `Invalid NDJSON input record skipped: ${err.message}`);
            return;
        }
        if (value !== null) this._push(value);
    }

    _finish() {
        if (this._ended) return;
        this._ended = true;
        if (this._state === 'sniff' && this._head.length) this._toData();
        else if (this._state === 'preamble' && this._head.length) {
            this._runner.log('ERROR', 'Input ended inside its Content-Type preamble');
        }
        if (this._kind === 'text' && this._decoder) {
            const rest = this._decoder.end();
            if (rest) this.push(rest);
        } else if (this._kind === 'ndjson' && this._tail.length && !this._skipping) {
            this._parse(this._tail);
        }
        this.push(null);
    }
}

// ------------------------------------------------------------------------- context

const LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal'];

function makeLogger(runner) {
    const logger = {};
    for (const level of LEVELS) {
        logger[level] = (msg, ...data) => {
            let text;
            if (typeof msg === 'string') text = msg;
            else if (msg instanceof Error) text = msg.stack || String(msg);
            else text = util.inspect(msg);
            runner.log(level.toUpperCase(), text, 'Sequence', data);
        };
    }
    logger.log = logger.info;
    return logger;
}

// ------------------------------------------------------------------------- this.hub

/** Longest answer of the hub read by `this.hub` (lists of a busy hub included). */
const HUB_MAX_ANSWER_BYTES = 16 * 1024 * 1024;
/** ms one `this.hub` call may take. */
const HUB_CALL_TIMEOUT_MS = 30000;

/**
 * `this.hub`: the hub's API over loopback at SPACEHUB_HUB_URL, with the method names of the
 * original's HostClient (which reached the hub through a tunnel of its own; ours is plain
 * HTTP, so it needs the process runtime, or Podman with the host network).
 */
class HostClient {
    constructor(baseUrl) {
        this.apiBase = (baseUrl || '').replace(/\/+$/, '');
    }

    request(method, path, body) {
        if (!this.apiBase) return Promise.reject(new Error('this instance has no hub URL (SPACEHUB_HUB_URL)'));
        const http = require('http');
        const data = body === undefined ? null : Buffer.from(JSON.stringify(body));
        return new Promise((resolve, reject) => {
            const req = http.request(`${this.apiBase}/${path}`, {
                method,
                timeout: HUB_CALL_TIMEOUT_MS,
                headers: data ? { 'content-type': 'application/json', 'content-length': data.length } : {},
            }, (res) => {
                const chunks = [];
                let size = 0;
                res.on('data', (chunk) => {
                    size += chunk.length;
                    if (size > HUB_MAX_ANSWER_BYTES) req.destroy(new Error('the hub answered too much'));
                    else chunks.push(chunk);
                });
                res.on('end', () => {
                    const text = Buffer.concat(chunks).toString('utf8');
                    let value = null;
                    try {
                        value = text.trim() ? JSON.parse(text) : null;
                    } catch (err) {
                        value = text;
                    }
                    if (res.statusCode >= 400) {
                        const message = value && typeof value === 'object' ? value.error || value.message : text;
                        reject(Object.assign(new Error(`${res.statusCode}: ${message}`), { code: res.statusCode, body: value }));
                    } else {
                        resolve(value);
                    }
                });
                res.on('error', reject);
            });
            req.on('timeout', () => req.destroy(new Error('the hub did not answer in time')));
            req.on('error', reject);
            req.end(data || undefined);
        });
    }

    getVersion() { return this.request('GET', 'version'); }
    getLoadCheck() { return this.request('GET', 'load-check'); }
    getConfig() { return this.request('GET', 'config'); }
    getStatus() { return this.request('GET', 'status'); }
    listSequences() { return this.request('GET', 'sequences'); }
    listInstances() { return this.request('GET', 'instances'); }
    listTopics() { return this.request('GET', 'topics'); }
    getSequenceClient(id) { return new HubSequenceClient(id, this); }
    getInstanceClient(id) { return new HubInstanceClient(id, this); }
}

class HubSequenceClient {
    constructor(id, host) {
        this.id = id;
        Object.defineProperty(this, '_host', { value: host });
    }

    getInfo() { return this._host.request('GET', `sequence/${encodeURIComponent(this.id)}`); }

    /** Start an instance; resolves to its client (`.id`, and `._id` as the original's). */
    async start(payload) {
        const body = payload && typeof payload === 'object' && !Array.isArray(payload) ? payload : {};
        const started = await this._host.request('POST', `sequence/${encodeURIComponent(this.id)}/start`, body);
        return new HubInstanceClient(started.id, this._host);
    }
}

class HubInstanceClient {
    constructor(id, host) {
        this.id = id;
        this._id = id;
        Object.defineProperty(this, '_host', { value: host });
    }

    getInfo() { return this._host.request('GET', `instance/${encodeURIComponent(this.id)}`); }
    stop(timeout = 7000, canCallKeepalive = false) {
        return this._host.request('POST', `instance/${encodeURIComponent(this.id)}/_stop`, { timeout, canCallKeepalive });
    }
    kill() { return this._host.request('POST', `instance/${encodeURIComponent(this.id)}/_kill`, {}); }
    sendEvent(eventName, message) {
        return this._host.request('POST', `instance/${encodeURIComponent(this.id)}/_event`, { eventName, message });
    }
}

/** `this` of the sequence's function(s); names follow the original platform's AppContext. */
class AppContext {
    constructor(runner) {
        Object.defineProperty(this, '_runner', { value: runner, enumerable: false });
        this.config = runner.appConfig;
        this.instanceId = runner.env.instanceId;
        this.logger = makeLogger(runner);
        /** ms to linger after the output ended: the hub's --node-exit-timeout, 10 s by default
         * as on the original; events, stop handlers and keepAlive work meanwhile. */
        this.exitTimeout = runner.env.exitTimeout;
        this.space = undefined;
    }

    /** A client of the hub this instance runs on, as the original's HostClient (made on first use). */
    get hub() {
        if (!this._hubClient) {
            Object.defineProperty(this, '_hubClient', { value: new HostClient(this._runner.env.hubUrl) });
        }
        return this._hubClient;
    }

    on(eventName, handler) {
        if (typeof handler !== 'function') throw new TypeError('handler must be a function');
        const list = this._runner.eventHandlers.get(eventName) || [];
        list.push({ handler, once: false });
        this._runner.eventHandlers.set(eventName, list);
        return this;
    }

    once(eventName, handler) {
        this.on(eventName, handler);
        const list = this._runner.eventHandlers.get(eventName);
        list[list.length - 1].once = true;
        return this;
    }

    off(eventName, handler) {
        this._runner.removeHandler(eventName, handler);
        return this;
    }

    emit(eventName, message) {
        this._runner.send(EVENT, { eventName: String(eventName), message });
        return this;
    }

    addStopHandler(handler) {
        this._runner.stopHandlers.push(handler);
        return this;
    }

    addKillHandler(handler) {
        this._runner.killHandlers.push(handler);
        return this;
    }

    addMonitoringHandler(handler) {
        this._runner.monitoringHandlers.push(handler);
        return this;
    }

    keepAlive(milliseconds) {
        this._runner.keepAlive(milliseconds);
        return this;
    }

    end() {
        this._runner.endBySequence();
        return this;
    }

    destroy(error) {
        const err = error === undefined ? new Error('destroyed by the sequence') : error;
        this._runner.failWith(err, 'run');
        return this;
    }
}

// ------------------------------------------------------------------------- main

function main() {
    let env;
    try {
        env = readEnv(process.env);
    } catch (err) {
        process.stderr.write(`spacehub node runner: invalid environment: ${err.message}\n`);
        process.exitCode = EXIT_BAD_ENV;
        return;
    }
    const runner = new Runner(env);
    runner.start().catch((err) => runner.onUncaught(err));
}

main();
