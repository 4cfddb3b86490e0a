"""The node plugin: the agent serves datasets to pods through a CSI inline volume.

Kubelet calls the plugin's Node service (`NodePublishVolume`/`NodeUnpublishVolume`) over a
unix socket; the plugin authorises the request from the pod's own namespace (`access`), builds
one read-only tree per (node, revision, layout) once (`trees`), and bind-mounts it into the pod
(`publisher`, `mounts`). See docs/architecture.md, "The CSI contract".
"""
