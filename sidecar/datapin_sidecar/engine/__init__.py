"""The engine: a revision in, a verified tree out, on one node.

`revision` (what a user can name) and `hashing` (how DVC names objects; `Layout` and
`LayoutChoice`) are the vocabulary; `manifest` reads a `.dir` into a sorted table and plans
(`diff(current, target)`); `cache` is the node cache laid out like DVC's; `linker` puts one
object at one path (reflink, hardlink, copy); `destination` claims a directory and `workspace`
owns its publish contract; `fetching` fetches what is missing, verified, and `treebuild` builds
a tree from the cache; `materialize` runs plan then apply; `prefetch` warms the cache without a
tree. Nothing here talks to a network: objects come in through the `remote.Remote` protocol,
which the engine defines and `datapin_sidecar.remotes` implements.
"""
