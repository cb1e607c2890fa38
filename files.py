"""The one way this project writes a file: atomically, so that a crash or a full disk leaves either
the old file or the whole new one, never half of one; and the one way it hashes one."""
import hashlib
import json
import os
import tempfile
from pathlib import Path


def write_atomic(path, data: bytes | str) -> Path:
    """Writes `data` (text as UTF-8) to a temporary file beside `path`, flushes it to disk and renames
    it over `path`. The file gets the permissions a plain open() would give it (0666 less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path, data) -> Path:
    """write_atomic of `data` as indented JSON, non-ASCII text kept as it is."""
    return write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path) -> str:
    """The hex SHA-256 of the file at `path`, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
