"""tokens: fewer prompt tokens in flight scores higher (FastDeploy's ``process_tokens``).

Counts the estimated prompt tokens of this process's requests still in flight on each
endpoint: the prefill work it has handed there and not seen finish. Long prompts weigh
what they cost, where a request count treats a 100-token and a 100k-token prompt alike.
Min-max normalised. No parameters.
"""

from __future__ import annotations

from ..framework import Candidate, Scorer, Snapshot, inverse_minmax


class Tokens(Scorer):
    name = "tokens"
    uses_tokens = True

    def score(self, snap: Snapshot, cands: list[Candidate]) -> list[float]:
        return inverse_minmax([c.load.tokens for c in cands])


PLUGIN = Tokens
