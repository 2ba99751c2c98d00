"""Sparse success rewards for on-robot RL: the simulator's check, an operator key, or a trained image classifier.

See docs/rewards.md. The classifier module (and safetensors loading) is imported only when asked for.
"""

from robot_rl.reward.success import (
    ClassifierSuccess,
    OperatorSuccess,
    SimSuccess,
    SuccessDetector,
    make_success_detector,
)

__all__ = [
    "SuccessDetector",
    "SimSuccess",
    "OperatorSuccess",
    "ClassifierSuccess",
    "make_success_detector",
    "SuccessClassifier",
    "train_classifier",
    "load_classifier",
]


def __getattr__(name):  # the classifier (and torch) only when asked for
    if name in ("SuccessClassifier", "train_classifier", "load_classifier"):
        from robot_rl.reward import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'robot_rl.reward' has no attribute {name!r}")
