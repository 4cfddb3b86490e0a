"""datapin operator: the Dataset resource, revision pinning, the webhook, status and prefetch.

`main` (console script) and `app` (the app factory) wire the packages; `handlers` adapts kopf's
callbacks to them. `api` declares what the operator puts in the cluster (the Dataset models, the
CRD generated from them, its RBAC); `webhook` admits Jobs and Pods (annotations in, pins and the
injected sidecar out); `resolve` turns a revision into a pin through the DVC repository's git;
`reconcile` observes a Dataset and computes its status; `kube` is the API calls it makes itself.
"""
