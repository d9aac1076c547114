"""Where a recipe's references point: ``embedded:<path>`` names a file of the embedded
benchmark (built or copied on first use); anything else, a local path or a Hub id, is
passed through unchanged. Every loader resolves its references here."""

from __future__ import annotations

EMBEDDED_PREFIX = "embedded:"


def resolve(ref: str) -> str:
    """Map ``embedded:<relative path>`` to a file in the benchmark; pass others through."""
    if not ref.startswith(EMBEDDED_PREFIX):
        return ref
    from blurctl.data.bench.build import ensure_benchmark

    return str(ensure_benchmark() / ref[len(EMBEDDED_PREFIX):])
