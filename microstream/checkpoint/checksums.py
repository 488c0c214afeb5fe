"""CRC-32 checksums on the JSON files of a checkpoint.

Every JSON file a checkpoint's :class:`~microstream.checkpoint.storage.Storage`
writes (``metadata.json``, the WAL, commits, source logs, state metadata and
version manifests) ends with one more member, ``"crc32"``: the CRC-32 of every
byte of the file before the ``,`` that opens that member. A read checks it
before it parses anything, so a flipped byte, a truncated file or a file
rewritten with other valid JSON (an edited end offset) is a
:class:`~microstream.exceptions.CheckpointCorruptError` naming the file, never
a silently different offset or state. The files stay plain, readable JSON::

    {
     "batch_id": 3,
     ...
     "sources": [...],
     "crc32": 2514006953
    }

The checksum covers the exact bytes, whitespace included: a file
re-indented by an editor is reported too (it was changed by hand).
"""

from __future__ import annotations

import re
import zlib

from microstream.exceptions import CheckpointCorruptError

__all__ = ["CHECKSUM_MEMBER", "is_sealed", "seal", "unseal"]

CHECKSUM_MEMBER = "crc32"
_OPENING = b',\n "' + CHECKSUM_MEMBER.encode() + b'": '
_TAIL = re.compile(rb"([0-9]{1,10})\n}\Z")


def seal(document: bytes) -> bytes:
    """``document`` (a JSON object of at least one member, indented by one space per
    level and ending in ``\\n}``) with its checksum as the last member.

    Examples
    --------
    >>> sealed = seal(b'{\\n "batch_id": 3\\n}')
    >>> print(sealed.decode())
    {
     "batch_id": 3,
     "crc32": 1132061797
    }
    >>> unseal(sealed, "offsets/3.json")
    b'{\\n "batch_id": 3\\n}'
    """
    if not (document.startswith(b"{") and document.endswith(b"\n}")) or document == b"{\n}":
        msg = f"only a non-empty JSON object written with indent=1 can be sealed; got {document[:40]!r}"
        raise ValueError(msg)
    prefix = document[:-2]
    return prefix + _OPENING + str(zlib.crc32(prefix)).encode() + b"\n}"


def is_sealed(raw: bytes) -> bool:
    """Whether ``raw`` ends with a checksum member (right or wrong).

    Examples
    --------
    >>> is_sealed(seal(b'{\\n "a": 1\\n}')), is_sealed(b'{\\n "a": 1\\n}')
    (True, False)
    """
    return _split(raw) is not None


def _split(raw: bytes) -> tuple[bytes, int] | None:
    """``raw`` before its checksum member, and the checksum recorded (None: no member)."""
    at = raw.rfind(_OPENING)
    tail = _TAIL.match(raw, at + len(_OPENING)) if at >= 0 else None
    return None if tail is None else (raw[:at], int(tail.group(1)))


def unseal(raw: bytes, where: str) -> bytes:
    """The document :func:`seal` was given, after checking the checksum of ``raw``.

    ``where`` names the file in messages.

    Raises
    ------
    CheckpointCorruptError
        ``raw`` has no checksum member at its end, or its bytes do not match it.

    Examples
    --------
    >>> sealed = seal(b'{\\n "end": 2\\n}')
    >>> unseal(sealed.replace(b"2", b"3", 1), "offsets/0.json")
    Traceback (most recent call last):
    ...
    microstream.exceptions.CheckpointCorruptError: checkpoint file offsets/0.json is corrupt: the CRC-32 of its bytes is 374705592, its "crc32" records 1632812334 (a changed byte, or the file was edited). Restore it from a backup, or start over with `microstream reset CHECKPOINT` (deletes the checkpoint, never the output); microstream never restarts from zero on its own
    """
    split = _split(raw)
    after = (
        ". Restore it from a backup, or start over with `microstream reset CHECKPOINT` "
        "(deletes the checkpoint, never the output); microstream never restarts from zero "
        "on its own"
    )
    if split is None:
        msg = (
            f"checkpoint file {where} is corrupt or truncated ({len(raw)} bytes): it does not "
            f'end with its "{CHECKSUM_MEMBER}" member, which every JSON file of the checkpoint '
            f"carries{after}"
        )
        raise CheckpointCorruptError(msg)
    prefix, recorded = split
    found = zlib.crc32(prefix)
    if found != recorded:
        msg = (
            f"checkpoint file {where} is corrupt: the CRC-32 of its bytes is {found}, its "
            f'"{CHECKSUM_MEMBER}" records {recorded} (a changed byte, or the file was '
            f"edited){after}"
        )
        raise CheckpointCorruptError(msg)
    return prefix + b"\n}"
