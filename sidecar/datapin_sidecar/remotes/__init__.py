"""Remotes: where missing objects come from. Each implements the engine's `Remote` protocol
(`datapin_sidecar.engine.remote`: find, key, fetch, abort), so the engine never imports them.

* `directory` — `DirectoryRemote`, a DVC directory remote (a plain path).
* `opening` — `open_s3_remote`, the one builder of an S3 remote (CLI, node programs, the
  operator's check).
* The S3 / Backblaze B2 remote, our own client: `s3` (`S3Remote`, which ties the parts),
  `s3client` (signed requests, retries, S3 errors), `s3fetch` (one fetch: claims, workers,
  committer), `slotfiles` (claims, part files, journals and durability, in worker threads),
  `sigv4` (signing).
* Its configuration: `endpoint` (`RemoteConfig`: where the bucket is and how to address it),
  `credentials` (keys and the sources they come from), `secretkeys` (which Secret key names
  hold them), `dvcconfig` (a DVC repository's remote, read as DVC reads it).

The secret-redaction registry every `Credentials` registers with is `datapin_sidecar.redaction`.
"""
