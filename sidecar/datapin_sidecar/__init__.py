"""datapin's node side: DVC-compatible node cache, reflink materialiser, and the `datapin` CLI.

Start with `materialize` (the orchestration) and `workspace` (the publish contract); every
module opens with a docstring on its design. docs/architecture.md has the whole picture.
"""

__version__ = "0.1.0"
