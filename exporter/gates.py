"""Verification pass marks, each defined once with its reason (torch-free, so the CLI can show them)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Gates:
    """Exact variants (moe, dense) differ from the fp32 reference only by summation order."""

    min_cosine: float = dataclasses.field(
        default=0.99999, metadata={"help": "moe/dense: minimum sentence-embedding cosine (fp32 reordering only)"}
    )
    max_rel_abs: float = dataclasses.field(
        default=1e-4,
        metadata={"help": "moe/dense: max |h - h_ref| / max |h_ref| over real tokens (cosine alone misses trap 4)"},
    )
    min_cosine_ortmoe: float = dataclasses.field(
        default=0.999, metadata={"help": "ortmoe: minimum cosine (com.microsoft::MoE's GELU is the tanh approximation)"}
    )


GATE_FIELDS = dataclasses.fields(Gates)
