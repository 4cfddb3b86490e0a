"""Revisions to pins: a tag, branch, commit, name or `.dir` md5 in, `<md5>.dir` out.

`resolver` decides what a revision is; `gitsource` reads the DVC repository's git refs and its
`.dvc` / `dvc.lock` files.
"""
