"""datapin operator: Dataset CRD, revision pinning and sidecar injection (issue 5)."""
