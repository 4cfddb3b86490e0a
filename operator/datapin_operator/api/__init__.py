"""What the operator declares to the cluster: the `Dataset` resource and its own RBAC.

`models` is the one source of truth for a Dataset (pydantic); `crd` generates the
CustomResourceDefinition from it; `rbac` is the least-privilege ClusterRole as data.
"""
