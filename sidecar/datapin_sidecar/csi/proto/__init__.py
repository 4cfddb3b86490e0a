"""The wire formats the node plugin speaks: CSI's `csi.v1` subset and kubelet's plugin
registration, as .proto files; `csi_pb2`/`registration_pb2` are generated from them when the
package is built (setup.py) and are not in the source tree."""
