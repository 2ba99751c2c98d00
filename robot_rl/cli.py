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
  robot-rl rl100     RL-100: iterative offline RL on a diffusion policy, gated by off-policy evaluation; distil
  robot-rl label     preference labels for image pairs from any OpenAI-compatible vision-language model
  robot-rl reward-model   Bradley-Terry reward model (CNN ensemble) from those labels
  robot-rl relabel   a versioned reward column for every step of a store, from a reward model
  robot-rl offline-rl     IQL from images + proprioception on a (relabelled) store, compared with BC in sim
  robot-rl retrieve  behavior retrieval: a few target demos select matching transitions of a large store

hydra verbs (session, control, learner, record, train, eval, distill, deploy, train-classifier, rl100, label,
reward-model, relabel, offline-rl, retrieve) take overrides like `robot=stack record.episodes=5`; the others take
plain arguments. `robot-rl <verb> --help` for each.
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


EXAMPLES = {
    "session": [
        "robot-rl session session.episodes=10 hydra.run.dir=runs/quick      # expert demos, then the policy learns",
        "robot-rl session algo=residual algo.base_checkpoint=runs/base algo.demos=data/lift   # residual RL on a BC base",
    ],
    "control": [
        "robot-rl control session.learner=remote session.host=10.0.0.5 hydra.run.dir=runs/robot   # the robot side",
        "robot-rl control session.learner=remote session.curve_keys_dir=keys/ session.host=10.0.0.5",
    ],
    "learner": [
        "robot-rl learner session.host=0.0.0.0 session.curve_keys_dir=keys/ hydra.run.dir=runs/gpu   # the GPU side",
        "robot-rl learner algo=residual algo.base_checkpoint=runs/base device=cuda",
    ],
    "record": [
        "robot-rl record record.path=data/lift record.episodes=50      # the scripted expert drives (sim Lift)",
        "robot-rl record teleop=keyboard record.path=data/mine record.resume=true   # you drive, appending",
    ],
    "train": [
        "robot-rl train train.data=data/lift hydra.run.dir=runs/dp        # diffusion policy",
        "robot-rl train train.data=data/lift policy=mlp train.steps=2000  # plain MLP behaviour cloning",
    ],
    "eval": [
        "robot-rl eval eval.checkpoint=runs/dp eval.episodes=50          # success with a 95% CI, mp4s",
        "robot-rl eval eval.checkpoint=runs/res eval.version=40 eval.video_episodes=0   # a session's weights v40",
    ],
    "distill": [
        "robot-rl distill distill.teacher=runs/dp hydra.run.dir=runs/dp1",
        "robot-rl distill distill.teacher=runs/dp +preset=smoke          # a one-minute check",
    ],
    "deploy": [
        "robot-rl deploy deploy.checkpoint=runs/dp1                       # sim robot of the checkpoint, fixed rate",
        "robot-rl deploy deploy.checkpoint=artefacts/lift deploy.episodes=3 robot=lift",
    ],
    "train-classifier": [
        "robot-rl train-classifier classifier.data=data/labelled classifier.image_keys=[wrist_image]",
        "robot-rl train-classifier classifier.data=data/labelled hydra.run.dir=runs/clf",
    ],
}  # two command lines per hydra verb for `robot-rl <verb> --help`
MAIN_GROUPS = ("session", "algo")  # config groups whose settings `--help` lists (the others: their choices)
HYDRA_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
    "-i",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}


def _configs_dir() -> Path:
    import robot_rl.configs

    return Path(robot_rl.configs.__file__).parent


def _yaml_comments(path: Path, prefix: str = "") -> dict[str, str]:
    """dotted key -> the comment written next to it, read from a config file's text (YAML loaders drop comments).
    A group file's keys sit under its group unless it says `# @package _global_`."""
    out, stack = {}, []  # stack of (indent, key)
    text = path.read_text()
    if "# @package _global_" in text:
        prefix = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        key, _, rest = stripped.partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key.strip()))
        dotted = ".".join(k for _, k in stack)
        comment = rest.partition(" #")[2].strip() if " #" in rest else ""
        out[(prefix + "." if prefix else "") + dotted] = comment
    return out


def _flat(cfg, prefix: str = "") -> dict:
    from omegaconf import DictConfig

    out = {}
    for key in cfg:
        dotted = f"{prefix}{key}"
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none():
            out[dotted] = None
            out.update(_flat(node, dotted + "."))
        else:
            out[dotted] = node
    return out


def _compose(verb: str, overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside the verb's own hydra run
        return compose(VERBS[verb][0], overrides=overrides, return_hydra_config=False)
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose(VERBS[verb][0], overrides=overrides, return_hydra_config=False)


def _show(node) -> str:
    import json

    from omegaconf import OmegaConf

    if node is None or (hasattr(node, "_is_interpolation") and node._is_interpolation()):
        return str(node._value()) if node is not None else "null"
    value = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node._value()
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


def verb_help(verb: str, overrides: list[str]) -> str:
    """What `robot-rl <verb> --help` prints: what the verb does, its config groups and their choices, its main
    options with their current values and comments, two examples."""
    configs = _configs_dir()
    primary = configs / f"{VERBS[verb][0]}.yaml"
    if not primary.exists():
        return f"robot-rl {verb}: its config {primary.name} is not part of this build yet"
    what = next(
        (ln.split(None, 2)[2] for ln in (__doc__ or "").splitlines() if ln.startswith(f"  robot-rl {verb} ")), ""
    )
    header = [ln[1:].strip() for ln in primary.read_text().splitlines() if ln.startswith("#")]
    lines = [f"robot-rl {verb}: {what.strip() or (header[0] if header else '')}"]
    lines += [f"  {h}" for h in header if h and not h.startswith("robot-rl")]
    cfg = _compose(verb, overrides)
    comments = _yaml_comments(primary)
    groups = sorted(p.name for p in configs.iterdir() if p.is_dir() and not p.name.startswith("_"))
    lines.append("\nconfig groups (name=choice):")
    for group in groups:
        if group not in cfg and group != "preset":
            continue
        choices = sorted(f.stem for f in (configs / group).glob("*.yaml"))
        if group in MAIN_GROUPS:
            for f in (configs / group).glob("*.yaml"):
                comments = {**_yaml_comments(f, group), **comments}
        current = f"  {group}=..." if group == "preset" else f"  {group}"
        lines.append(
            f"{current:<22} choices: {', '.join(choices)}" + ("  (with +: +preset=smoke)" if group == "preset" else "")
        )
    lines.append("\nmain options (key=value  # current value is shown; what it means):")
    flat = _flat(cfg)
    for key, node in flat.items():
        top = key.split(".")[0]
        if top in groups and top not in MAIN_GROUPS or top == "hydra" or node is None:
            continue
        if key not in comments and top not in MAIN_GROUPS:
            continue
        entry = f"  {key}={_show(node)}"
        comment = comments.get(key, "")
        lines.append(f"{entry:<44} # {comment}" if comment else entry)
    lines.append("\nexamples:")
    lines += [f"  {e}" for e in EXAMPLES.get(verb, [f"robot-rl {verb} hydra.run.dir=runs/{verb}"])]
    lines.append(
        f"\nevery key of the config: robot-rl {verb} --cfg job  (one group: --cfg job --package robot); "
        "run dir: hydra.run.dir=<dir>"
    )
    return "\n".join(lines)


def _closest(word: str, candidates) -> str:
    import difflib

    near = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" did you mean {near[0]}?" if near else ""


def check_overrides(verb: str, args: list[str]) -> str | None:
    """What is wrong with a hydra verb's overrides, said plainly, or None: a key that does not exist (with the
    closest existing key; hydra would advise `+key=...`, which only adds an unused setting), a config group or
    choice that does not exist, and a value of the wrong kind for its key (`record.episodes=abc`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    if any(a.startswith("-") for a in args):  # hydra's own flags (--cfg job, --multirun): hydra checks them
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as e:
        return f"cannot read the overrides: {e}"
    configs = _configs_dir()
    groups = {p.name for p in configs.iterdir() if p.is_dir() and not p.name.startswith("_")}
    group_overrides = [a for a, o in zip(args, parsed) if o.key_or_group.split("/")[0] in groups]
    try:
        base = _compose(verb, group_overrides)
    except HydraException as e:
        for o in parsed:
            group = o.key_or_group
            if group in groups:
                choices = sorted(f.stem for f in (configs / group).glob("*.yaml"))
                value = o.value()
                if isinstance(value, str) and value not in choices:
                    return f"{group}={value}: no such {group} config;{_closest(value, choices)} (choices: {', '.join(choices)})"
        return str(e).splitlines()[0]
    keys = _flat(base)
    for arg, o in zip(args, parsed):
        key = o.key_or_group
        if key in groups or key.startswith("hydra.") or key == "hydra" or o.is_delete():
            continue
        if key not in keys:
            if o.is_add() or o.is_force_add():
                continue  # `+key=value` asks for a new key on purpose
            return (
                f"{arg}: there is no setting {key!r} in robot-rl {verb}'s config;{_closest(key, keys) or ' see'}"
                f" (every key: robot-rl {verb} --cfg job; --help for the main ones)"
            )
        old = keys[key]
        if old is None or old._is_none() or old._is_interpolation() or OmegaConf.is_config(old):
            continue
        default, value = old._value(), o.value()
        if value is None or (isinstance(value, str) and "${" in value):
            continue  # null: "unset / the default behaviour" for many settings; interpolations resolve later
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{arg}: {key} must be a number (default {default}), got {value!r}"
        if isinstance(default, bool) and not isinstance(value, bool):
            return f"{arg}: {key} must be true or false (default {str(default).lower()}), got {value!r}"
    return None


def fit_preset(verb: str, cfg, overrides: list[str]) -> None:
    """A preset (`+preset=smoke`) holds settings for every verb: keep only the sections this verb's own config has
    (config.yaml shows what ran, nothing else), and merge `by_choice.algo.<algo.name>` into `algo` and
    `by_choice.policy.<policy.type>` into `policy` (settings that exist for one algorithm or policy only). A key
    given on the command line wins over the preset."""
    from omegaconf import OmegaConf, open_dict

    if not any(a.lstrip("+").startswith("preset=") for a in overrides):
        return
    base = _compose(verb, [a for a in overrides if not a.lstrip("+").startswith("preset=")])
    explicit = {a.split("=", 1)[0].lstrip("+") for a in overrides if "=" in a}
    with open_dict(cfg):
        by_choice = cfg.pop("by_choice", None) or {}
        for group, name_key in (("algo", "name"), ("policy", "type")):
            choice = cfg[group].get(name_key) if group in cfg and cfg[group] is not None else None
            if choice is None:
                continue
            settings = (by_choice.get(group) or {}).get(str(choice)) or {}
            for key, value in settings.items():
                if f"{group}.{key}" not in explicit:
                    OmegaConf.update(cfg, f"{group}.{key}", value, merge=False)
        for key in [k for k in cfg if k not in base and k != "hydra"]:
            cfg.pop(key)


def _run_verb(verb: str, cfg) -> None:
    import importlib

    from hydra.core.hydra_config import HydraConfig

    from robot_rl.config import ConfigError, setup_logging, write_run_info

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_logging()
    fit_preset(verb, cfg, list(HydraConfig.get().overrides.task))
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

    usage = "usage: robot-rl keys <directory>   (server and client CURVE key pairs, for a learner on a network address)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(usage, file=sys.stderr)
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
    if any(a in ("-h", "--help") for a in rest):
        print(verb_help(verb, [a for a in rest if a not in ("-h", "--help")]))
        return 0
    problem = check_overrides(verb, rest)
    if problem:
        print(f"robot-rl {verb}: config error: {problem}", file=sys.stderr)
        return 2
    sys.argv = [f"robot-rl {verb}", *rest]  # hydra reads its overrides from sys.argv
    hydra.main(config_path="pkg://robot_rl.configs", config_name=VERBS[verb][0], version_base=None)(
        lambda cfg: _run_verb(verb, cfg)
    )()
    return 0


if __name__ == "__main__":
    sys.exit(main())
