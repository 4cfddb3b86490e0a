"""The node programs: what `datapin-sidecar` runs in a pod or as the node agent.

`main` is the entry point and `settings` its one `Settings`; `sidecar` serves a pod (`once`,
`run`), `agent` owns the node cache (prefetch, GC, reaping); `gc` keeps the volume; `server`
is the HTTP face (`/readyz`, `/healthz`, `/metrics`, `/status`) and `metrics` the Prometheus
metrics on an injected registry.
"""
