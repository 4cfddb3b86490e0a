"""The process's registry of secret values, and `redact` that hides them in any text.

A net under every other rule about secrets: every `Credentials` built registers its key id,
secret and token (`register`), and `redact()` replaces them by `[redacted]` wherever they turn
up, in what the S3 server sends back or what another module quotes. The CLI's error line, the
sidecar's termination message and every log line go through it. A foundation module (no
datapin imports), so logging can use it without loading the remotes.
"""

from __future__ import annotations

import json
import threading
from typing import Final

#: Values `redact` hides: every key id, secret and token registered (each `Credentials`),
#: longest first. Replaced whole, never mutated, so a thread formatting a log line while
#: another reads a rotated Secret iterates a consistent tuple.
_REGISTERED: tuple[str, ...] = ()
_REGISTERING: Final = threading.Lock()
#: Shorter values are not registered: hiding every "abc" would garble messages, and a key
#: that short is refused by every store anyway.
_MIN_REDACTED: Final = 6
#: What a hidden value becomes (logs write it for secret-named fields too).
REDACTED: Final = "[redacted]"


def register(value: str | None) -> None:
    """Hide `value` (a key id, secret or token) from now on; short values are not."""
    global _REGISTERED  # noqa: PLW0603 - the one registry of the process, see above
    if value is None or len(value) < _MIN_REDACTED:
        return
    # Also as json.dumps writes it (`"` and `\` escaped), for JSON log lines.
    forms = {value, json.dumps(value)[1:-1]}
    with _REGISTERING:
        if forms.issubset(_REGISTERED):
            return
        _REGISTERED = tuple(sorted(forms.union(_REGISTERED), key=len, reverse=True))


def redact(text: str) -> str:
    """`text` with every key value datapin has read replaced by `[redacted]`."""
    for value in _REGISTERED:
        if value in text:
            text = text.replace(value, REDACTED)
    return text
