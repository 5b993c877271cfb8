"""Raw MCAP bags in ROS 2 encoding (CDR messages, ``ros2msg`` schemas), as rosbag2's MCAP storage writes them.

Messages are serialized with rclpy (``serialize_message``: the exact bytes that travelled over DDS) and
written on a worker thread, so a subscriber callback only queues bytes. Schemas are the ``.msg`` texts of
the installed message packages with their dependencies appended (``====...`` / ``MSG: pkg/Type``
sections), which the ``mcap_ros2`` reader and Foxglove decode.

One bag per episode: it is written as ``<name>.mcap.partial`` and renamed to ``<name>.mcap`` once
complete and fsync'd, so a bag left as ``.partial`` after a crash is detectably incomplete (MCAP readers
can still stream what was written before the kill).
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
from functools import cache
from pathlib import Path

from magma_ros.core.errors import ConfigError
from magma_ros.data.video import fsync_path

PRIMITIVES = {"bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
              "uint32", "int64", "uint64", "string", "wstring"}
SEPARATOR = "=" * 80


def _share_dirs() -> list[Path]:
    dirs = [Path(sys.prefix) / "share"]
    for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if p:
            dirs.append(Path(p) / "share")
    return dirs


def _msg_file(pkg: str, name: str) -> Path:
    for d in _share_dirs():
        p = d / pkg / "msg" / f"{name}.msg"
        if p.is_file():
            return p
    raise ConfigError(f"no message definition {pkg}/msg/{name}.msg under {', '.join(map(str, _share_dirs()))}")


def _deps(pkg: str, text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        typ = line.split()[0]
        typ = re.sub(r"\[.*\]$", "", typ)
        typ = re.sub(r"<=\d+$", "", typ)
        if typ in PRIMITIVES:
            continue
        if "/" in typ:
            parts = typ.split("/")
            out.append((parts[0], parts[-1]))
        else:
            out.append((pkg, typ))
    return out


@cache
def msg_definition(type_name: str) -> str:
    """Full ``ros2msg`` schema text of ``pkg/msg/Type`` (its .msg file, then every dependency once)."""
    parts = type_name.split("/")
    if len(parts) != 3 or parts[1] != "msg":
        raise ConfigError(f"message type must look like 'pkg/msg/Type', got '{type_name}'")
    pkg, _, name = parts
    main = _msg_file(pkg, name).read_text()
    seen = {(pkg, name)}
    order: list[tuple[str, str, str]] = []
    todo = _deps(pkg, main)
    while todo:
        p, n = todo.pop(0)
        if (p, n) in seen:
            continue
        seen.add((p, n))
        t = _msg_file(p, n).read_text()
        order.append((p, n, t))
        todo.extend(_deps(p, t))
    text = main.rstrip("\n") + "\n"
    for p, n, t in order:
        text += f"{SEPARATOR}\nMSG: {p}/{n}\n{t.rstrip(chr(10))}\n"
    return text


def type_name_of(msg_or_cls) -> str:
    """``sensor_msgs/msg/Image`` for an rclpy message (class or instance)."""
    cls = msg_or_cls if isinstance(msg_or_cls, type) else type(msg_or_cls)
    pkg = cls.__module__.split(".")[0]
    return f"{pkg}/msg/{cls.__name__}"


class BagWriter:
    """Write serialized ROS 2 messages to an MCAP file on a worker thread.

    ``write(topic, msg, log_time_ns)`` queues the message (serialized by rclpy); an error of the
    worker (disk full) is raised by the next ``write`` or by :meth:`close`.
    """

    def __init__(self, path: str | Path, max_queue: int = 2000, compression: str = "lz4",
                 max_queued_bytes: int = 256 * 2**20):
        from mcap.writer import CompressionType, Writer

        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.messages = 0
        self._error: BaseException | None = None
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.max_queued_bytes = max_queued_bytes  # a slow disk must not fill the memory with images
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():  # left by a killed session for the same episode number: keep it aside
            os.replace(self.partial, self.path.with_name(f"{self.path.stem}.incomplete-{os.getpid()}-"
                                                         f"{self.partial.stat().st_mtime_ns}.mcap.partial"))
        self._f = open(self.partial, "wb")
        comp = {"lz4": CompressionType.LZ4, "zstd": CompressionType.ZSTD, "none": CompressionType.NONE}[compression]
        self._w = Writer(self._f, compression=comp)
        self._w.start(profile="ros2", library="magma_ros recorder")
        self._thread = threading.Thread(target=self._run, name=f"mcap:{self.path.name}", daemon=True)
        self._thread.start()

    def write(self, topic: str, msg, log_time_ns: int, publish_time_ns: int | None = None) -> None:
        """Queue one message (rclpy message object) for ``topic`` with its receive time [ns]."""
        if self._error is not None:
            raise self._error
        from rclpy.serialization import serialize_message

        item = (topic, type_name_of(msg), serialize_message(msg), int(log_time_ns),
                int(publish_time_ns if publish_time_ns is not None else log_time_ns))
        with self._bytes_lock:
            if self._queued_bytes + len(item[2]) > self.max_queued_bytes:
                raise RuntimeError(f"MCAP writer for {self.path} is {self._queued_bytes / 2**20:.0f} MiB behind "
                                   "(disk too slow)")
            self._queued_bytes += len(item[2])
        try:
            self._q.put(item, timeout=1.0)
        except queue.Full:
            raise RuntimeError(f"MCAP writer for {self.path} is {self._q.qsize()} messages behind") from None

    def _channel(self, topic: str, type_name: str) -> int:
        if topic not in self._channels:
            if type_name not in self._schemas:
                self._schemas[type_name] = self._w.register_schema(
                    name=type_name, encoding="ros2msg", data=msg_definition(type_name).encode())
            self._channels[topic] = self._w.register_channel(
                topic=topic, message_encoding="cdr", schema_id=self._schemas[type_name])
        return self._channels[topic]

    def _run(self) -> None:
        seq = 0
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue
            topic, type_name, data, t_log, t_pub = item
            with self._bytes_lock:
                self._queued_bytes -= len(data)
            try:
                self._w.add_message(channel_id=self._channel(topic, type_name), log_time=t_log, data=data,
                                    publish_time=t_pub, sequence=seq)
                seq += 1
                self.messages += 1
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e

    def close(self) -> Path:
        """Finish the file (summary, footer), fsync, rename to ``.mcap``; returns the path."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if self._error is not None:
            self._abandon()
            raise self._error
        try:
            self._w.finish()
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.partial, self.path)
            fsync_path(self.path.parent)
        except BaseException:
            self._abandon()
            raise
        return self.path

    def discard(self) -> None:
        """Stop and delete the file (discarded episode)."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._abandon()
        self.partial.unlink(missing_ok=True)

    def _abandon(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
