"""Offline training: the loop shared by `robot-rl train`, `distill` and the offline RL verbs."""
