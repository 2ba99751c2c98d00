"""The operator's takeovers as the reward (RLIF, Luo et al. 2024): pure functions over replay columns.

RLIF's rule (reference: the released code, `examples/train_rlif_main.py`): the *last policy transition before a
takeover starts* gets reward -1, every other transition 0; the -1 is not terminal (the episode goes on under the
operator). A takeover that lasts k steps still costs one -1, and a takeover starting at step 0 costs nothing (no
policy step led into it). No task reward is used; task success is only measured.

Rows are control steps as stored in the learner's replay (`intervention`: the teleop acted this step). Which row
follows which is given by `next_idx` (`robot_rl.algos.nstep.EpisodeLinks`: same sender, same episode, step + 1, so
episode boundaries, interleaved robots and a control process restarted mid-session, whose step numbering starts
again, never link). Everything here is a function of stored columns only: a learner resumed from its replay on disk
computes the same labels.

Cases, as row sequences of one episode (P = policy acted, T = teleop acted; -1 lands on the marked P):
- `P P P* T T P P`: one takeover, one -1.
- `T T P P`: takeover at step 0: no policy step before it, no -1.
- `P* T P* T`: back-to-back takeovers with one policy step between them: two -1 (each start is a new takeover).
- `P P* T` (episode ends under takeover): -1 on the step before, the takeover rows stay 0.
- `... P | P T` across an episode (or control-process restart) boundary: not linked, no -1.
"""

from __future__ import annotations

import numpy as np


def takeover_starts(intervention: np.ndarray, next_idx: np.ndarray) -> np.ndarray:
    """Bool per row: the policy acted here and the operator took over on the next row of the same episode."""
    itv = np.asarray(intervention, dtype=bool)
    nxt = np.asarray(next_idx, dtype=np.int64)[: len(itv)]
    out = np.zeros(len(itv), dtype=bool)
    linked = np.flatnonzero(nxt >= 0)
    out[linked] = ~itv[linked] & itv[nxt[linked]]
    return out


def intervention_rewards(intervention: np.ndarray, next_idx: np.ndarray, penalty: float = -1.0) -> np.ndarray:
    """float32 reward per row: `penalty` on the last policy row before each takeover starts, 0 elsewhere."""
    return np.where(takeover_starts(intervention, next_idx), np.float32(penalty), np.float32(0.0)).astype(np.float32)


def takeover_first_rows(intervention: np.ndarray, next_idx: np.ndarray) -> np.ndarray:
    """Bool per row: the operator acted here and not on the linked row before it (or there is none): each takeover
    counted once, where it starts, including one at an episode's first row."""
    itv = np.asarray(intervention, dtype=bool)
    nxt = np.asarray(next_idx, dtype=np.int64)[: len(itv)]
    prev_itv = np.zeros(len(itv), dtype=bool)  # the linked previous row was itself a takeover row
    linked = np.flatnonzero(nxt >= 0)
    prev_itv[nxt[linked]] = itv[linked]
    return itv & ~prev_itv


def rejected_proposal_rows(intervention: np.ndarray, next_idx: np.ndarray, policy_action: np.ndarray) -> np.ndarray:
    """Indices of the rows where a takeover starts and the policy's proposal of that step was recorded: the one
    action the operator was seen to refuse."""
    proposed = np.isfinite(np.asarray(policy_action, dtype=np.float32)).all(axis=1)
    return np.flatnonzero(takeover_first_rows(intervention, next_idx) & proposed)


def learnable_rows(intervention: np.ndarray, keep_intervener: bool) -> np.ndarray:
    """Bool per row: may this row start a transition? The operator's own steps (reward 0) are kept by default; the
    released code drops all but the last one of each takeover (`keep_intervener=False` drops them all)."""
    itv = np.asarray(intervention, dtype=bool)
    return np.ones(len(itv), dtype=bool) if keep_intervener else ~itv


def episode_takeovers(
    intervention: np.ndarray, next_idx: np.ndarray, episode_key: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(episode keys, takeovers per episode) in first-seen order; `episode_key` is one int per row naming its
    episode uniquely (e.g. sender * 2**40 + episode). A takeover is counted where it starts: a policy row followed
    by a takeover row, or a takeover row that starts its episode's rows (no linked predecessor)."""
    first_of_run = takeover_first_rows(intervention, next_idx)
    keys, first, inverse = np.unique(np.asarray(episode_key), return_index=True, return_inverse=True)
    counts = np.bincount(inverse, weights=first_of_run, minlength=len(keys)).astype(np.int64)
    order = np.argsort(first)
    return keys[order], counts[order]
