"""Benchmarks for datapin, run by hand (`python -m bench.bench_materialize`), never by pytest.

Why a separate package: timings on a shared 2-core machine are noisy, so they must never decide
whether a test passes. Benchmarks here measure datapin beside its peers (`cp --reflink`, real
`dvc checkout`) in one run, on one throw-away XFS volume, and print medians and ratios against
the project's targets; the figures worth keeping go to docs/benchmarks.md together with the
exact command that produced them. Raw per-run reports land in bench/results/ (gitignored).
"""
