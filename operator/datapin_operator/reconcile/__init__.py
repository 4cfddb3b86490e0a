"""The Dataset controller: observe the world, then compute a status.

`controller` observes (revisions, remote, agents); `remotecheck` reads the remote as the sidecar
will; `fleet` is what the node agents keep warm and report; `status` is the pure function from
observations to conditions and Events.
"""
