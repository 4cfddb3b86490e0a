"""datapin's node side, and the core library the operator also imports.

Packages, each importing only those before it:

* the foundation modules here: `errors` (every error, its exit code, `RemoteCause`), `limits`,
  `redaction`, `safefs` (no-follow access to paths someone else controls), `logs`;
* `engine`: a revision in, a verified tree out, on one node (no network; objects come through
  its `Remote` protocol);
* `remotes`: where missing objects come from (a DVC directory, S3 / Backblaze B2);
* `pins` (the `datapin.dev/pins` format), `cli` (`datapin materialize`) and `node` (the
  programs of `datapin-sidecar`: sidecar, agent, housekeeping, metrics).

Start with `engine.materialize` (the orchestration) and `engine.workspace` (the publish
contract). docs/architecture.md has the whole picture.
"""

__version__ = "0.1.0"
