"""Atomic file writes: write beside the target, then `os.replace`."""

import gzip
import json
import os
import secrets


def write_bytes_atomic(path, data):
    """Writes `data` to `path` so that readers see the old file or the whole new one.

    The temporary file lives in the target's folder so `os.replace` stays a
    rename on one file system (atomic on POSIX and Windows). It is created
    with mode 0o666 minus the umask, like any plain `open(path, "wb")`
    (`tempfile.mkstemp` would make it 0o600, unreadable to other users).
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj):
    """Writes `obj` as indented JSON to `path` atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def tree_size_bytes(path):
    """Size of a file, or the summed size of every file under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


def gzip_size_bytes(path, level=9):
    """Bytes of the file gzip-compressed (level 9), or the sum over every file under a folder.

    What a download or an over-the-air update of the artifact costs: zeros
    left by weight pruning compress away here even in a dense file.
    """
    if os.path.isfile(path):
        files = [path]
    else:
        files = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    total = 0
    for name in files:
        with open(name, "rb") as f:
            # mtime=0: the same bytes give the same size on every run.
            total += len(gzip.compress(f.read(), compresslevel=level, mtime=0))
    return total
