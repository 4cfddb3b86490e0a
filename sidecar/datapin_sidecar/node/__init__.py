"""The node programs: what `datapin-sidecar` runs in a pod or as the node agent.

`main` is the entry point and `settings` its one `Settings`; `program` is what the two
long-running programs share (construction, `stop()`, backoff); `sidecar` serves a pod (`once`,
`run`), `agent` owns the node cache (prefetch, GC, reaping) and `housekeeping` keeps the volume
(one module a job); `remotes` opens a dataset's remote from its settings; `server` is the HTTP
face (`/readyz`, `/healthz`, `/metrics`, `/status`) and `metrics` the Prometheus metrics on an
injected registry.
"""
