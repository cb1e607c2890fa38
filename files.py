"""The one way this project writes a file: atomically, so that a crash or a full disk leaves either
the old file or the whole new one, never half of one; the one way it hashes one; and the one way text
that came from outside (file names, configs, server replies) is made safe to print on a terminal."""
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path


def write_atomic(path, data: bytes | str) -> Path:
    """Writes `data` (text as UTF-8) to a temporary file beside `path` and `settle`s it there."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        settle(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def settle(tmp, path: Path):
    """Renames the whole written file `tmp` over `path` once it is on disk, with the permissions a plain open() would
    give it (0666 less the umask); never over a device or a pipe (renamed over, /dev/null would be gone)."""
    if path.exists() and not (path.is_symlink() or path.is_file() or path.is_dir()):
        raise FileExistsError(f"{path} is not a regular file (a device or a pipe); not replaced")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's files (and safetensors') are 0600
    os.replace(tmp, path)


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


# C0 and C1 control characters, DEL, and the bidirectional overrides and isolates that reorder
# what a terminal shows (as in "Trojan Source", Boucher & Anderson 2021)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, keep: str = "") -> str:
    """`text` with each control character (C0, DEL, C1) and bidi override as its Python escape (\\x1b,
    \\u202e), which a terminal shows rather than obeys (ESC [2J clears it); those in `keep` ("\\n") stay."""
    return _UNPRINTABLE.sub(lambda m: m[0] if m[0] in keep else ascii(m[0])[1:-1], text)
