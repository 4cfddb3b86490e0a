"""Developer scripts. A package so that `python3 -m scripts.kind_seed` (run from the repository
root, as scripts/kind-e2e does) can import the test helpers in `testkit`."""
