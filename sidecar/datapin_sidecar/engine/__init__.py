"""The engine: a revision in, a verified tree out, on one node.

`revision` (what a user can name) and `hashing` (how DVC names objects, the `Layout` of a cache
or remote) are the vocabulary; `manifest` reads a `.dir` into a sorted table and plans
(`diff(current, target)`); `cache` is the node cache laid out like DVC's; `linker` puts one
object at one path (reflink, hardlink, copy); `workspace` owns a destination and its publish
contract; `materialize` runs plan then apply; `prefetch` warms the cache without a tree.
Nothing here talks to a network: objects come in through the `datapin_sidecar.engine.remote.Remote`
protocol.
"""
