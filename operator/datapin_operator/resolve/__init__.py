"""Revisions to pins: a tag, branch, commit, name or `.dir` md5 in, `<md5>.dir` out.

`resolver` decides what a revision is (and reads the git Secret); `gitsource` keeps the
repository cache, refs and fetches; `gitrun` runs git (credentials, a sealed environment,
timeouts, redaction); `dvcfile` reads the pin a `.dvc` / `dvc.lock` names at a commit.
"""
