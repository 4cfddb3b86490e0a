"""Remotes: where missing objects come from, behind one protocol.

`base` is the `Remote` protocol the engine calls; `opening` opens the remote a dataset's
settings name. The S3 / Backblaze B2 remote is our own client: `sigv4` signs, `s3` fetches
(verified, once per node), `s3config` resolves the endpoint and credentials from settings and
DVC's config. A plain directory (a DVC local remote) is in `base`.
"""
