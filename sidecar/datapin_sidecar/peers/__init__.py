"""Peer fetch: node agents share verified objects, so the cluster reads each from the remote once.

`protocol` is the wire contract, `rendezvous` picks each object's home agent, `membership`
knows the agents, `leases` is a home's table of who fetches what, `transfer` verifies bytes
into the cache, `client` and `server` are the two ends, `tls` their mutual TLS, and
`remote.PeeredRemote` puts it all behind the engine's `Remote` protocol.
"""
