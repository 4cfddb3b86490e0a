"""The caps datapin puts on what it is given, in one place.

Every number a user, a pod spec or a remote can push to an absurd value has a stated maximum,
checked where the value enters (the CLI, `Settings`, the manifest parser, the S3 client) and
quoted in the error and the docs. They live here, in a module with no imports, so the CLI can
check them without loading the libraries behind the modules that enforce them again deeper
down (a `Remote` built by code other than the CLI gets the same cap).
"""

from __future__ import annotations

from typing import Final

#: Most requests in flight (`--jobs`, and any `S3Options.jobs`): each holds a connection and a
#: buffer, so a billion would exhaust memory before the first byte.
MAX_JOBS: Final = 1024
#: Longest cache, destination or node-volume path: what datapin creates beneath it (shards,
#: `.revs/.build-<key>-<r>/`, a manifest's relpath) must still fit in `PATH_MAX`.
MAX_DIR_PATH_BYTES: Final = 1024
#: Longest file or directory name on XFS and ext4 (`NAME_MAX`).
NAME_MAX: Final = 255
#: Linux's longest path, with its terminating NUL (`PATH_MAX`).
PATH_MAX: Final = 4096
