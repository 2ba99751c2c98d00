"""`robot-rl <verb> [hydra overrides]`: one entry point, one hydra config per verb family.

  robot-rl session   control process + learner on this machine (or attach to a remote learner)
  robot-rl control   only the control process (robot side of a two-machine session)
  robot-rl learner   only the learner (GPU side of a two-machine session)
  robot-rl keys DIR  make CURVE key pairs for a learner bound to a network address
  robot-rl train     behaviour cloning (diffusion policy or MLP) from an episode store or a LeRobotDataset
  robot-rl eval      N seeded sim episodes of a checkpoint: success with a 95% CI, mp4s, training curves
  robot-rl distill   one-step student from a diffusion teacher (same-noise DDIM targets, as RL-100)
  robot-rl train-classifier   image success classifier from labelled frames (sparse reward on hardware)
  robot-rl deploy    run a trained policy (checkpoint or artefact) at a fixed rate, chunks computed ahead
  robot-rl export-policy CKPT DIR   deployment artefact: weights + manifest, loads without the training code
  robot-rl record    teleoperate (or run the scripted expert) and record episodes to an episode store
  robot-rl dataset   list / inspect / stats / delete / keep / recover episodes of a store
  robot-rl replay    replay a recorded episode in MuJoCo (divergence report, mp4)
  robot-rl export    episode store -> LeRobotDataset v3
  robot-rl import    LeRobotDataset v3 or robomimic HDF5 -> episode store

hydra verbs (session, control, learner, record, train, eval, distill, deploy, train-classifier) take overrides
like `robot=stack record.episodes=5`; the others take plain arguments: `robot-rl <verb> --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

VERBS = {
    "session": ("session", "robot_rl.commands.session"),
    "control": ("session", "robot_rl.commands.session"),
    "learner": ("session", "robot_rl.commands.session"),
    "record": ("record", "robot_rl.commands.record"),
    "train": ("train", "robot_rl.commands.train"),
    "deploy": ("deploy", "robot_rl.commands.deploy"),
    "eval": ("eval", "robot_rl.commands.evaluate"),
    "distill": ("distill", "robot_rl.commands.distill"),
    "train-classifier": ("classifier", "robot_rl.reward.classifier"),
    # the pipelines: one command module each, with main(cfg, run_dir) -> exit code
    "rl100": ("rl100", "robot_rl.commands.rl100"),
    "label": ("label", "robot_rl.commands.label"),
    "reward-model": ("reward_model", "robot_rl.commands.reward_model"),
    "relabel": ("relabel", "robot_rl.commands.relabel"),
    "offline-rl": ("offline_rl", "robot_rl.commands.offline_rl"),
    "retrieve": ("retrieve", "robot_rl.commands.retrieve"),
}  # hydra verb -> (config name under configs/, module whose main(cfg, run_dir) returns the exit code)


PLAIN_VERBS = {
    "dataset": "robot_rl.data.tool",
    "replay": "robot_rl.commands.replay",
    "export": "robot_rl.data.interchange",
    "import": "robot_rl.data.interchange_import",
    "export-policy": "robot_rl.policies.artifact",
}  # verb -> module with main(argv) -> exit code


def _run_verb(verb: str, cfg) -> None:
    import importlib

    from hydra.core.hydra_config import HydraConfig

    from robot_rl.config import ConfigError, setup_logging, write_run_info

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_logging()
    try:
        module = importlib.import_module(VERBS[verb][1])
        if verb in ("session", "control", "learner"):
            module.validate_session(cfg)
            write_run_info(run_dir, cfg, verb)
            code = module.run_verb(verb, cfg, run_dir)
        else:
            write_run_info(run_dir, cfg, verb)
            code = module.main(cfg, run_dir)
    except ConfigError as e:
        print(f"robot-rl {verb}: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # a device that cannot be opened (DeviceUnavailableError) says why and what to do
        if type(e).__name__ != "DeviceUnavailableError":
            raise
        print(f"robot-rl {verb}: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


def _keys(argv: list[str]) -> int:
    """Server and client CURVE key pairs in one directory; the client's public key is authorised on the server."""
    import shutil

    from robot_rl.transport.security import generate_keys

    if len(argv) != 1:
        print("usage: robot-rl keys <directory>", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    server_public, server_secret = generate_keys(str(directory), "server")
    client_public, client_secret = generate_keys(str(directory), "client")
    (directory / "authorized_clients").mkdir(exist_ok=True)
    shutil.copy(client_public, directory / "authorized_clients" / "client.key")
    print(
        f"learner machine needs: {server_secret}, {directory / 'authorized_clients'}/\n"
        f"robot machine needs:   {client_secret}, {server_public}  (same directory layout)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from robot_rl.config import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb == "keys":
        return _keys(rest)
    if verb in PLAIN_VERBS:
        import importlib

        setup_logging()
        module = importlib.import_module(PLAIN_VERBS[verb])
        return module.main(rest)
    if verb not in VERBS:
        print(
            f"robot-rl: unknown verb {verb!r}; choose one of: {', '.join([*VERBS, *PLAIN_VERBS, 'keys'])}",
            file=sys.stderr,
        )
        return 2
    import importlib.util

    import hydra

    if importlib.util.find_spec(VERBS[verb][1]) is None:
        print(f"robot-rl {verb}: not part of this build yet ({VERBS[verb][1]} is missing)", file=sys.stderr)
        return 2
    sys.argv = [f"robot-rl {verb}", *rest]  # hydra reads its overrides from sys.argv
    hydra.main(config_path="pkg://robot_rl.configs", config_name=VERBS[verb][0], version_base=None)(
        lambda cfg: _run_verb(verb, cfg)
    )()
    return 0


if __name__ == "__main__":
    sys.exit(main())
