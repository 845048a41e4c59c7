"""Zip archives (`.keras` model files, `.npz` data) read within a budget: a member that would
inflate far past what real weights or data compress to is refused before it is inflated."""

from __future__ import annotations

import zipfile

from kshrink.errors import KshrinkError

# Real float weights and images deflate 1-10x; a pruned model saved dense, a few hundred
# times. A member past BOMB_FLOOR bytes that claims more than MAX_RATIO is padding.
MAX_RATIO = 200
BOMB_FLOOR = 256 << 20
MAX_INFLATED = 16 << 30  # every member together: past this, refused whatever the ratio


def check_inflation(archive: zipfile.ZipFile, what: str, *,
                    max_inflated: int = MAX_INFLATED) -> None:
    """Raises `KshrinkError` if a member of `archive` declares a size it cannot honestly hold
    (`MAX_RATIO` over its compressed size, past `BOMB_FLOOR`), or all together more than
    `max_inflated` bytes. `what` names the file in the message."""
    total = 0
    for member in archive.infolist():
        total += member.file_size
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > BOMB_FLOOR and ratio > MAX_RATIO:
            raise KshrinkError(
                f"{what}: member {member.filename!r} would inflate {ratio:,.0f}x, to "
                f"{member.file_size:,} bytes from {member.compress_size:,}; real weights and "
                f"data do not compress past {MAX_RATIO}x, so it is refused unread")
    if total > max_inflated:
        raise KshrinkError(f"{what}: its members would inflate to {total:,} bytes, more than "
                           f"the {max_inflated:,} kshrink reads")
