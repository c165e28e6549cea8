"""Every bound the hub keeps, by name.

Nothing in the hub is buffered whole: each buffer, queue and upload has its bound
here, so that a reader of the code can see at once how much memory a flood of data
or requests can cost. Values that operators may want to change are also config
options (``agent.config``); these are their defaults.
"""

from __future__ import annotations

from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB

# --- Sequence uploads (see agent.sequences.unpack) ---------------------------
#: Largest compressed package accepted (bytes on the wire).
MAX_PACKAGE_COMPRESSED_BYTES: Final = 256 * MiB
#: Largest total size of the unpacked files.
MAX_PACKAGE_UNCOMPRESSED_BYTES: Final = 1 * GiB
#: Most members (files and directories) in one package.
MAX_PACKAGE_MEMBERS: Final = 20_000
#: Highest uncompressed/compressed ratio, checked once the unpacked size passes
#: RATIO_CHECK_FLOOR_BYTES (small packages compress well because of tar padding).
MAX_PACKAGE_COMPRESSION_RATIO: Final = 100
RATIO_CHECK_FLOOR_BYTES: Final = 16 * MiB
#: Longest member path, and longest single path component.
MAX_MEMBER_PATH_LENGTH: Final = 1024
MAX_MEMBER_NAME_LENGTH: Final = 255
#: Largest package.json read.
MAX_PACKAGE_JSON_BYTES: Final = 1 * MiB

# --- HTTP (the shared ones are in spacehub.server.limits) ---------------------
#: Chunk size used when reading pipes and files for streaming responses.
STREAM_CHUNK_BYTES: Final = 256 * KiB

# --- Instances ------------------------------------------------------------------
#: Longest stop timeout a request may ask for (a day, in ms): more is a mistake, not a wish.
MAX_STOP_TIMEOUT_MS: Final = 24 * 3600 * 1000
#: What a start's ``limits`` may ask for, each a positive number up to its bound:
#: memory in MB, cpu in cores (``cpus`` is taken as a synonym), pids a count.
MAX_LIMITS: Final = {"memory": 1024 * 1024, "cpu": 1024, "cpus": 1024, "pids": 4 * 1024 * 1024}
#: Bytes of output/stdout/stderr kept for readers that have not connected yet
#: (and the most any reader can lag behind the fastest one); past it the
#: instance is back-pressured, never dropped.
INSTANCE_STREAM_BUFFER_BYTES: Final = 256 * KiB
#: Bytes of each of an instance's output/stdout/stderr kept on disk behind the
#: stream's end (agent/instances/spool.py): what a hub that ended had read but not
#: handed on, and what a reader resuming with ``?offset=`` may ask again. At least
#: the buffer above, one chunk past it, and one chunk in flight to a reader.
INSTANCE_SPOOL_KEEP_BYTES: Final = 1 * MiB
#: Segment files the kept bytes are cut into (the oldest is deleted whole).
INSTANCE_SPOOL_SEGMENTS: Final = 4
#: Ended instances this hub remembers for the manager (newest kept): what started and
#: ended while the link, or the hub, was down reaches the Space's history on reconnect.
INSTANCE_HISTORY_RECORDS: Final = 200
#: Longest control/monitoring message line (an event with its payload).
MAX_CONTROL_LINE_BYTES: Final = 1 * MiB
#: Log records kept per instance for replay to late /log readers.
INSTANCE_LOG_RING_RECORDS: Final = 1000
#: Events queued per /events stream reader before it is told it fell behind.
EVENT_STREAM_QUEUE: Final = 256

# --- Topics ---------------------------------------------------------------------
#: Bytes a topic keeps while no reader is attached (and the most its slowest
#: reader may lag); past it, writers wait.
TOPIC_BUFFER_BYTES: Final = 1 * MiB

#: Bytes one topic's outbound spool may hold (records produced here that the Space's
#: manager has not acknowledged yet, e.g. while the link is down); past it the
#: topic's producers wait. The default of --topic-spool-bytes.
TOPIC_SPOOL_BYTES: Final = 256 * MiB
#: Bytes every outbound spool together may hold (--topic-spool-total-bytes).
TOPIC_SPOOL_TOTAL_BYTES: Final = 1 * GiB
#: Size of one spool segment file (the unit a spool is trimmed by).
TOPIC_SPOOL_SEGMENT_BYTES: Final = 8 * MiB

# --- The hub log ----------------------------------------------------------------
#: Hub log records kept for replay on /log.
HUB_LOG_RING_RECORDS: Final = 2000
