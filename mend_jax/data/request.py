"""The edit request record shared by every dataset, and the error raised on bad input files."""

from __future__ import annotations

from dataclasses import dataclass, field

from mend_jax.errors import DataError  # noqa: F401  (re-exported: defined with the others)


@dataclass(frozen=True)
class EditRequest:
    """One edit descriptor (x_e, y_e) with its generality, locality and portability probes."""

    prompt: str  # x_e, e.g. "The capital of France is"
    target_new: str  # y_e, the edited answer, e.g. "Lyon"
    target_true: str | None  # the original answer, if known
    rephrases: tuple[str, ...]  # equivalent prompts x'_e; empty means "use prompt"
    loc_prompt: str  # an unrelated prompt (locality)
    loc_target: str  # its answer (the base model's or the true one)
    # CounterFact-style (prompt, true target) of other subjects sharing the true object.
    neighborhood: tuple[tuple[str, str], ...] = ()
    portability: tuple[tuple[str, str], ...] = ()  # optional (prompt, answer)
    subject: str | None = None
    # The surface form of each rephrase (e.g. "statement", "question"), parallel to `rephrases`;
    # empty when unknown. Evaluation reports generality per form when it is given.
    rephrase_forms: tuple[str, ...] = ()
    # The relation the fact belongs to (e.g. "capital"), when known: evaluation then reports
    # the metrics per relation as well (`by_relation`).
    relation: str | None = None
    # Where the request was read ("train.json: record 3 (0-based)"), for errors that name it;
    # None for a request built in memory. Not part of the request's value.
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.rephrase_forms and len(self.rephrase_forms) != len(self.rephrases):
            raise ValueError(f"{len(self.rephrase_forms)} rephrase_forms for "
                             f"{len(self.rephrases)} rephrases")
