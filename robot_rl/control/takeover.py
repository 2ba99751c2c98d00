"""Who acts this tick: the policy, or the teleop/expert taking over. Shared by sessions, recording and deploy."""

from __future__ import annotations

import numpy as np

from robot_rl.interfaces import Teleop

SOURCES = ("none", "policy", "teleop")  # who acted, stored per tick as an index into this tuple


def pick_source(
    teleop: Teleop | None, label: np.ndarray | None, policy_action: np.ndarray | None, teleop_drives: bool = False
) -> tuple[str, np.ndarray | None]:
    """(source, proposed action). The teleop acts when it says it is intervening, when it is told to drive
    (expert episodes, demo recording) or when there is no policy action; otherwise the policy acts.

    A simulated intervener decides from the policy's proposal, so it is shown the proposal first."""
    if teleop is not None:
        observe = getattr(teleop, "observe_policy_action", None)
        if observe is not None:
            observe(policy_action)
        if teleop_drives or policy_action is None or teleop.intervening:
            return "teleop", label
    if policy_action is not None:
        return "policy", policy_action
    return "none", None
