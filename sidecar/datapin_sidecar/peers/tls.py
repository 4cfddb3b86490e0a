"""Mutual TLS between agents: who may ask an agent for objects, and who may hear the answer.

The chart provisions one Secret for all agents (`ca.crt`, `tls.crt`, `tls.key`: a CA and a
certificate it signed) and mounts it read-only into the agent only. Both ends present the
certificate and require the other's to chain to the CA, so only agents take part; objects
cross the cluster network encrypted, as they came from B2. Hostnames are not checked: peers are
addressed by pod IP, and the identity that matters is "holds a key the peer CA signed", which
no tenant pod does (training namespaces never see the Secret). TLS 1.3 only.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final

CA: Final = "ca.crt"
CERT: Final = "tls.crt"
KEY: Final = "tls.key"


def _context(purpose: ssl.Purpose, directory: Path) -> ssl.SSLContext:
    missing = [name for name in (CA, CERT, KEY) if not (directory / name).is_file()]
    if missing:
        raise ValueError(
            f"peer TLS directory {directory} lacks {', '.join(missing)}. Fix: mount the "
            "chart's peer Secret there (agent.peers), or turn peer fetch off "
            "(DATAPIN_PEER_PORT=0)"
        )
    context = ssl.create_default_context(purpose, cafile=str(directory / CA))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(directory / CERT, directory / KEY)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(directory: Path) -> ssl.SSLContext:
    """An agent serving its peers: client certificates required."""
    return _context(ssl.Purpose.CLIENT_AUTH, directory)


def client_context(directory: Path) -> ssl.SSLContext:
    """An agent asking a peer: the peer's certificate must chain to the CA."""
    return _context(ssl.Purpose.SERVER_AUTH, directory)
