"""Deployment artefact: a policy directory without training state, for a robot that has no training code.

    robot-rl export-policy outputs/<run> deploy/lift_v1      # train/distill/session run dir, checkpoints/, a version
    policy = load_policy("deploy/lift_v1", device="auto")      # robot_rl.policies.checkpoint: the one loader

An artefact is exactly a policy directory of the one checkpoint format (robot_rl/policies/checkpoint.py):
`manifest.json` + `policy.safetensors` (+ `base/` for a residual policy), sha256-checked on load. Checkpoints in the
layout `robot-rl train` wrote before that format are converted on export.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from robot_rl.policies.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    copy_policy,
    find_policy_dir,
    load_policy,
    read_manifest,
    write_policy,
)

ArtifactError = CheckpointError  # the name this module used before the one checkpoint format
__all__ = ["FORMAT_VERSION", "ArtifactError", "export_artifact", "load_artifact", "read_manifest", "main_export"]


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / "manifest.json").is_file()


def load_artifact(path: str | os.PathLike, device: str = "auto"):
    """`load_policy` of a policy directory; the manifest is also attached as `policy.artifact_manifest`."""
    policy = load_policy(find_policy_dir(path), device)
    policy.artifact_manifest = policy.manifest
    return policy


# ------------------------------------------------------------------------------------------------ exporting


def checkpoint_context(ckpt: Path) -> dict:
    """What a checkpoint knows beyond its weights, found next to it: the training data's fps and robot config
    (from the episode store it was trained on), the training step and the run's git hash. Missing pieces are
    None (e.g. the data was moved)."""
    out: dict[str, Any] = {
        "fps": None,
        "robot_config": None,
        "robot": None,
        "task": None,
        "data": None,
        "step": None,
        "git": None,
    }
    state = ckpt / "trainer_state.json"
    if state.is_file():
        try:
            out["step"] = int(json.loads(state.read_text()).get("step"))
        except (ValueError, TypeError, json.JSONDecodeError):
            pass
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    if run_dir is not None and (run_dir / "run_info.json").is_file():
        try:
            out["git"] = json.loads((run_dir / "run_info.json").read_text()).get("git")
        except json.JSONDecodeError:
            pass
    cfg_path = ckpt / "config.yaml"
    if cfg_path.is_file():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        train = cfg.get("train") or {}
        data = train.get("data")
        if train.get("data_format") == "lerobot":
            data = train.get("import_dir") or (str(run_dir / "imported_store") if run_dir is not None else None)
        if data:
            out["data"] = str(data)
            meta_path = Path(data).expanduser() / "meta.json"
            if meta_path.is_file():
                meta = json.loads(meta_path.read_text())
                info = meta.get("info") or {}
                out.update(
                    fps=meta.get("fps"),
                    robot_config=info.get("robot_config"),
                    robot=info.get("robot"),
                    task=info.get("task"),
                )
    return out


def export_artifact(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False, version: int | None = None
) -> dict:
    """Copy the policy files of a checkpoint (run dir, checkpoints/, a policy dir; the newest or `version`) into
    `out_dir`, written under a temporary name and renamed; returns the manifest."""
    src = find_policy_dir(checkpoint, version)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"{out} exists and is not empty: choose a new directory or pass --overwrite")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if (src / "manifest.json").is_file():
            manifest = copy_policy(src, tmp)
        else:  # a `robot-rl train` checkpoint from before the one format: rebuild it, then write it in the format
            from robot_rl.config import git_hash

            ctx = checkpoint_context(src)
            policy = load_policy(src, device="cpu")
            manifest = write_policy(
                tmp,
                policy,
                fps=ctx["fps"],
                robot={"name": ctx["robot"], "config": ctx["robot_config"], "task": ctx["task"]},
                provenance={
                    "source": "train",
                    "checkpoint": str(src.resolve()),
                    "step": ctx["step"],
                    "git": ctx["git"],
                    "data": ctx["data"],
                    "ema": (src / "raw_model.safetensors").exists(),
                    "exported_with_git": git_hash(),
                },
            )
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main_export(argv: list[str] | None = None) -> int:
    """`robot-rl export-policy CHECKPOINT OUT_DIR [--version N] [--overwrite]`."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="robot-rl export-policy",
        description="Write a deployment artefact (manifest.json + policy.safetensors [+ base/]) "
        "that loads without hydra/omegaconf/the training code.",
    )
    ap.add_argument("checkpoint", help="a train/distill/session run directory, its checkpoints/, or a policy directory")
    ap.add_argument("out_dir", help="artefact directory to create")
    ap.add_argument(
        "--version",
        type=int,
        default=None,
        help="a session's weights version (v<N>) or a training step (step_<N>) instead of the newest",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing artefact directory")
    args = ap.parse_args(argv)
    try:
        m = export_artifact(args.checkpoint, args.out_dir, overwrite=args.overwrite, version=args.version)
    except (ArtifactError, FileNotFoundError) as e:
        print(f"robot-rl export-policy: {e}", file=sys.stderr)
        return 2
    robot = (m.get("robot") or {}).get("name") or "unknown robot (pass robot= when deploying)"
    t = m.get("training") or {}
    at = f"version {t['version']}" if t.get("version") is not None else f"step {t.get('step')}"
    base = f" on a frozen {m['base']['kind']} base" if m.get("base") else ""
    print(
        f"exported {m['kind']} policy{base} ({m['weights']['num_parameters']:,} parameters, {at}) for {robot} to "
        f"{args.out_dir}\n  sha256 {m['weights']['sha256']}\n  deploy: robot-rl deploy deploy.checkpoint={args.out_dir}"
    )
    return 0


main = main_export  # so the CLI's plain-verb table can point at this module


if __name__ == "__main__":
    sys.exit(main_export())
