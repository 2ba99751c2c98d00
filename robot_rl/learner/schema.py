"""A transition schema, {key: (numpy dtype str, row shape)}: fixed by the replay's first batch, checked for every
later one. Its own module so the ingest process can check batches without importing the learner's heavy parts."""

from __future__ import annotations

import numpy as np

Schema = dict[str, tuple[str, tuple[int, ...]]]  # key -> (numpy dtype str, row shape), as the receiver checks it


def schema_of(arrays: dict[str, np.ndarray]) -> Schema:
    """The schema of one batch (leading axis = transitions)."""
    return {k: (np.asarray(a).dtype.str, tuple(np.shape(a)[1:])) for k, a in arrays.items()}


def schema_problem(expected: Schema, got: Schema) -> str | None:
    """What differs between a replay's schema and a batch's, in words (None: they agree)."""
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or extra:
        return f"keys differ from the replay's (missing {missing}, unexpected {extra})"
    for k, (dtype, shape) in expected.items():
        if got[k] != (dtype, shape):
            return (
                f"key {k!r} has dtype {np.dtype(got[k][0]).name} shape {got[k][1]} per transition, but the "
                f"replay holds dtype {np.dtype(dtype).name} shape {shape}"
            )
    return None
