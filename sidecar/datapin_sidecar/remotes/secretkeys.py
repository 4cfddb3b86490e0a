"""Secret key names: which names hold an S3 key pair, and which name wins.

A Kubernetes Secret (mounted as files for the sidecar and agent, read through the API by the
operator) holds the key id and the secret under names. The dataset may name them
(`accessKeyIdKey`/`secretAccessKeyKey`, `DATAPIN_*_FILE`); otherwise the defaults cover the
AWS names, DVC's option names and B2's keyID/applicationKey, tried in order. `key_names` is
that rule, and `first_present` picks the first name a Secret's data holds a value for: the one
definition both the node programs and the operator's remote check use.

Names are shown in messages only when they look like names (`shown_name`): people paste a key
where its name goes, and a message must never show a key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

DEFAULT_ID_KEYS: Final = (
    "AWS_ACCESS_KEY_ID",
    "access_key_id",
    "keyID",
    "B2_APPLICATION_KEY_ID",
    "applicationKeyId",
)
DEFAULT_SECRET_KEYS: Final = (
    "AWS_SECRET_ACCESS_KEY",
    "secret_access_key",
    "applicationKey",
    "B2_APPLICATION_KEY",
)
DEFAULT_TOKEN_KEYS: Final = ("AWS_SESSION_TOKEN", "session_token")
_DEFAULT_NAMES: Final = frozenset((*DEFAULT_ID_KEYS, *DEFAULT_SECRET_KEYS, *DEFAULT_TOKEN_KEYS))


def key_names(configured: str | None, defaults: Sequence[str]) -> tuple[str, ...]:
    """The Secret key names tried for one role, in order: the one configured, else `defaults`."""
    return (configured,) if configured else tuple(defaults)


def first_present(data: Mapping[str, str], names: Sequence[str]) -> str | None:
    """The first of `names` that `data` (a Secret's data) holds a non-blank value for."""
    return next((name for name in names if data.get(name, "").strip()), None)


#: A run of 16+ letters and digits with a digit or mixed case in it looks like a key
#: (AWS key ids are 20, B2's 25, secrets 31-40), not like a file name such as `keyID`.
_KEY_LIKE: Final = re.compile(r"[A-Za-z0-9+/=]{16,}")
#: What Kubernetes allows as a Secret (and ConfigMap) key.
SECRET_KEY_NAME: Final = re.compile(r"[-._a-zA-Z0-9]{1,253}")


def shown_name(name: str) -> str:
    """`name` (a Secret key or file name) as a message may show it: not if it looks like a
    key value someone pasted where the name goes."""
    if name in _DEFAULT_NAMES:
        return name
    for run in _KEY_LIKE.findall(name):
        if any(c.isdigit() for c in run) or (run.lower() != run and run.upper() != run):
            return "<a name that looks like a key, not shown>"
    if SECRET_KEY_NAME.fullmatch(name) is None:
        return "<a name with characters a Secret key cannot have, not shown>"
    return name
