"""Torch files a user names, checked before ``torch.load`` allocates what they declare."""

from __future__ import annotations

import zipfile
from pathlib import Path

from fewstep.errors import CheckpointError, one_line


def check_torch_archive(path: Path, legacy: bool = False) -> None:
    """Refuse a torch file that would make torch allocate more than the file holds: the legacy (pre-zip) format
    allocates each storage's declared size before reading it, and a zip member's declared size is allocated before
    it is inflated (torch.save writes only uncompressed members, never larger than the file). ``legacy``: let a
    legacy file through (torchvision's own pretrained weights are in it)."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError:
        return  # unreadable: torch.load's own error says so
    is_zip = head == b"PK\x03\x04"
    if not is_zip and head[:1] == b"\x80" and not legacy:  # a pickle stream: torch's legacy format
        raise CheckpointError(one_line(
            f"'{path}' is not a zip-format torch file (torch.save has written zip files since torch 1.6; the legacy "
            "format declares sizes fewstep cannot check before torch allocates them): re-save it with torch.save"
        ))
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError):
        return  # a legacy file, or not a readable zip: torch.load's own error says so
    size = path.stat().st_size
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED or member.file_size > size:
            name = member.filename if len(member.filename) <= 100 else member.filename[:97] + "..."
            raise CheckpointError(one_line(
                f"'{path}': refusing the member '{name}', which declares {member.file_size} bytes "
                f"{'compressed' if member.compress_type != zipfile.ZIP_STORED else 'in a file of ' + str(size)}: "
                "torch writes its files uncompressed, so this one was not written by torch.save"
            ))
