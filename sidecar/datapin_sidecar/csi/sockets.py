"""Serving unary gRPC services on a unix socket, the way kubelet's plugins are reached.

Both of the node plugin's servers (the CSI socket and the kubelet registration socket) are
grpc.aio servers on a unix socket that this module owns from bind to removal:

- **Handlers without generated stubs.** `unary` registers an async method from the message
  classes' own `FromString`/`SerializeToString`, so every handler is typed against the
  generated `.pyi` and no untyped `*_pb2_grpc` module is needed.
- **A stale socket is replaced, nothing else is.** A restarted agent finds its previous
  socket file (kubelet re-discovers the new one through inotify). It is removed only if
  `lstat` says it is a socket: a symlink is never followed (the directory is a hostPath
  shared with kubelet), and any other file there is an error naming the path, not something
  to delete.
- **Only root connects.** kubelet runs as root; the socket is chmod 0600 after it is bound and
  before the server starts accepting, so there is no window in which anyone else can call.
- **Removed on stop.** grpc core unlinks its unix socket's path when the server stops, and
  we remove it too if it is still ours (same inode), so kubelet's plugin watcher drops the
  plugin. grpc's unlink does not check whose socket is there, so two agents must never
  overlap on one node: the DaemonSet's rolling update (no surge) stops the old one first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import Message

from datapin_sidecar.errors import BadSettingsError

log = logging.getLogger(__name__)

#: sockaddr_un's sun_path holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH: Final = 107
#: How long a stopping server lets calls in flight finish before cancelling them.
STOP_GRACE_SECONDS: Final = 5.0

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

#: An async handler: the parsed request and the call's context, to the response.
Behavior = Callable[[Req, "grpc.aio.ServicerContext[Req, Resp]"], Awaitable[Resp]]


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def unary(
    behavior: Behavior[Req, Resp], request: type[Req], response: type[Resp]
) -> grpc.RpcMethodHandler[Req, Resp]:
    """A unary-unary method handler; `response` only types the behaviour's result."""
    del response
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=request.FromString, response_serializer=_serialize
    )


def service(
    name: str, methods: dict[str, grpc.RpcMethodHandler[Any, Any]]
) -> grpc.GenericRpcHandler:
    """A service (`<proto package>.<Service>`) and its methods by their proto names."""
    return grpc.method_handlers_generic_handler(name, methods)


def check_socket_path(path: Path) -> Path:
    """An absolute path short enough for a unix socket address."""
    if not path.is_absolute() or len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise BadSettingsError(
            [
                f"socket path {str(path)[:200]!r} must be absolute and at most "
                f"{MAX_SOCKET_PATH} bytes (a unix socket address). Fix: a shorter directory"
            ]
        )
    return path


def remove_stale_socket(path: Path) -> bool:
    """Remove a socket left at `path` by an earlier run; True if one was removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise BadSettingsError(
            [
                f"socket path {path}: a file is there and it is {kind}, so it is not a socket "
                "an earlier agent left. Fix: remove it, or point the setting at another path"
            ]
        )
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    log.info("removed the stale socket %s an earlier run left", path)
    return True


@contextlib.asynccontextmanager
async def serve_unix(
    path: Path, handlers: list[grpc.GenericRpcHandler], *, what: str
) -> AsyncIterator[grpc.aio.Server]:
    """Serve `handlers` on the unix socket `path` (mode 0600) until the block exits."""
    check_socket_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_socket(path)
    server = grpc.aio.server(handlers=handlers)
    # grpc binds here (and listens only at start), so the mode is set before any connect.
    server.add_insecure_port(f"unix:{path}")
    mine = os.lstat(path)
    try:
        os.chmod(path, 0o600)
        await server.start()
        log.info("serving %s on %s", what, path)
        yield server
    finally:
        await server.stop(STOP_GRACE_SECONDS)
        _remove_if_ours(path, mine)
        log.info("stopped serving %s on %s", what, path)


def _remove_if_ours(path: Path, mine: os.stat_result) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
