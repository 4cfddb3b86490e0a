"""The mutating webhook: a Job or Pod in, pinned and injected out.

`requests` parses the `datapin.dev/*` annotations a user writes; `admission` resolves and pins;
`inject` is the pure builder that adds what the pod needs (`inject_csi` for the csi mode, the
default; `mounts` holds what the modes share); `certs` and `tls` keep the webhook's HTTPS
certificate.
"""
