"""`robot-rl retrieve`: behavior retrieval. A few demos of a new task pull the relevant transitions out of a large
unlabelled prior store (the algorithm: robot_rl/algos/retrieval.py; the page: docs/behavior_retrieval.md).

    robot-rl retrieve retrieve.prior=data/prior retrieve.target=data/new_task hydra.run.dir=runs/ret
    robot-rl retrieve ... retrieve.select.rule=top_fraction retrieve.select.top_fraction=0.05
    robot-rl train policy=mlp train.data=[data/new_task,runs/ret/selection] train.weights=[0.5,0.5]

Steps: check that the target has the prior's observation keys and action size; fingerprint the prior's content
(robot_rl/data/selection.py); take the embedder and the prior's embeddings from the cache next to the prior when
its fingerprint matches (a changed prior is said so and recomputed, or refused with `on_stale=error`), else fit
the β-VAE on the prior with the offline training loop and embed every prior transition; embed the target; score
every prior transition by its distance to the nearest target transition (blocks on the device); select.

Written: the selection (`retrieve.output`, default `<run>/selection`: selection.json + rows.npz, a view, replaced
atomically; `copy_to` also copies the steps into a new store), `retrieve_report.json` (rule, counts, what was kept
from each source episode and task string, score quantiles, how many a few other δ would keep) and two pictures,
`retrieval_scores.png` (score histogram, the cut) and `retrieval_projection.png` (PCA of the embeddings: prior,
retrieved, target). Nothing is written when the selection would be empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from robot_rl.algos.retrieval import (
    RULES,
    RetrievalConfig,
    StateActionVAE,
    embed_blocks,
    nearest_distance,
    pca_2d,
    scores_from_distances,
    select,
    target_radius,
    transition_keys,
    vae_loss,
)
from robot_rl.config import ConfigError, git_hash, resolve_device, write_json
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.data.selection import (
    copy_selection,
    describe_change,
    read_selection,
    store_fingerprint,
    write_selection,
)
from robot_rl.data.sequence import SequenceSampler
from robot_rl.interfaces import OBS_PREFIX, Feature
from robot_rl.training.loop import LoopConfig, TrainingLoop, seed_everything, to_device

log = logging.getLogger("robot_rl.commands.retrieve")

CACHE_META, CACHE_WEIGHTS, CACHE_EMBEDDINGS = "cache.json", "embedder.safetensors", "embeddings.npy"
REPORT_DELTAS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # the report says how much each δ would keep
REPORT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)  # ... and each q of rule=target_quantile
BLOCK_ROWS = 8192  # image stores are read and embedded this many rows at a time


class Stopped(RuntimeError):
    """Ctrl-C / SIGTERM during the embedder fit."""


# ---------------------------------------------------------------------------------------------- config, input


def validate(cfg: DictConfig) -> tuple[RetrievalConfig, LoopConfig]:
    r = cfg.retrieve
    for key in ("prior", "target"):
        if not r.get(key):
            raise ConfigError(f"retrieve.{key} is empty: give the {key} episode store")
    algo = RetrievalConfig.from_sections(r.embedder, r.select)
    if algo.rule not in RULES:
        raise ConfigError(f"retrieve.select.rule must be one of {', '.join(RULES)}, got {algo.rule!r}")
    checks = {
        "select.top_k": algo.top_k >= 1,
        "select.top_fraction": 0 < float(algo.top_fraction) <= 1,
        "select.chunk_size": int(algo.chunk_size) >= 1,
        "select.threshold": np.isfinite(float(algo.threshold)),
        "select.radius": np.isfinite(float(algo.radius)) and float(algo.radius) >= 0,
        "select.target_quantile": 0 <= float(algo.target_quantile) <= 1,
        "embedder.latent_dim": int(algo.latent_dim) >= 1,
        "embedder.kl_weight": float(algo.kl_weight) >= 0,
        "embed_batch": int(r.embed_batch) >= 1,
    }
    for name, ok in checks.items():
        if not ok:
            raise ConfigError(f"retrieve.{name}={OmegaConf.select(r, name)!r} is out of range")
    if r.on_stale not in ("recompute", "error"):
        raise ConfigError(f"retrieve.on_stale must be recompute or error, got {r.on_stale!r}")
    return algo, LoopConfig.from_section(r.embedder, "retrieve.embedder")


def open_store(path, what: str) -> EpisodeStore:
    try:
        store = EpisodeStore.open(Path(str(path)).expanduser())
    except Exception as e:  # StoreError says what is wrong; anything else is an unreadable path
        raise ConfigError(f"retrieve.{what}={str(path)!r}: {e}") from None
    if store.num_steps == 0:
        raise ConfigError(f"retrieve.{what}={str(path)!r} has no episodes")
    return store


def embedded_features(prior: EpisodeStore, target: EpisodeStore, obs_keys) -> dict[str, Feature]:
    """The observation features (store names) the embedder reads; the target must have each with the same shape,
    and the same action size, else a ConfigError naming the difference."""
    obs = {k: f for k, f in prior.features.items() if k.startswith(OBS_PREFIX)}
    if obs_keys:
        wanted = [OBS_PREFIX + k for k in obs_keys]
        missing = [k for k in wanted if k not in obs]
        if missing:
            raise ConfigError(f"retrieve.obs_keys {missing} are not in the prior; it has {sorted(obs)}")
        obs = {k: obs[k] for k in wanted}
    if not obs or "action" not in prior.features:
        raise ConfigError(f"retrieve.prior={prior.path}: needs observations (obs.*) and an action to embed")
    problems = []
    for k, f in obs.items():
        if k not in target.features:
            problems.append(f"{k} is missing")
        elif target.features[k].shape != f.shape:
            problems.append(f"{k} is {target.features[k].shape}, the prior's {f.shape}")
    if "action" not in target.features:
        problems.append("there is no action")
    elif target.features["action"].shape != prior.features["action"].shape:
        problems.append(
            f"the action is {target.features['action'].shape}, the prior's {prior.features['action'].shape}"
        )
    if problems:
        raise ConfigError(
            f"retrieve.target={target.path} does not match the prior {prior.path}: {'; '.join(problems)}. Both "
            f"must share the observation keys the embedder reads and the action size (retrieve.obs_keys picks a "
            f"shared subset)"
        )
    return obs


def store_blocks(store: EpisodeStore, keys: list[str]):
    """The store's committed rows of `keys` in order: all at once for low-dim stores, blocks of whole episodes
    (about BLOCK_ROWS rows) when images are read."""
    if not any(store.features[k].is_image for k in keys):
        yield {k: store.array(k) for k in keys}
        return
    parts: list[dict] = []
    rows = 0
    for i in range(store.num_episodes):
        parts.append(store.episode(i, keys))
        rows += len(parts[-1][keys[0]])
        if rows >= BLOCK_ROWS or i == store.num_episodes - 1:
            yield {k: np.concatenate([p[k] for p in parts]) for k in keys}
            parts, rows = [], 0


# ------------------------------------------------------------------------------------------ embedder + cache


def cache_dir(cfg: DictConfig, obs: dict[str, Feature]) -> Path:
    """One folder per embedder config and embedded keys, under the prior (or retrieve.cache_dir)."""
    r = cfg.retrieve
    spec = {"embedder": OmegaConf.to_container(r.embedder, resolve=True), "keys": sorted(obs)}
    for k in ("progress", "tensorboard", "log_every", "checkpoint_every", "keep_last"):
        spec["embedder"].pop(k, None)  # how the fit reports itself does not change the embedder
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = (
        Path(str(r.cache_dir)).expanduser()
        if r.get("cache_dir")
        else Path(str(r.prior)).expanduser() / "retrieval_cache"
    )
    return root / f"vae_{key}"


def load_cache(cfg, where: Path, fingerprint: dict, vae: StateActionVAE) -> np.ndarray | None:
    """The cached prior embeddings (and the embedder's weights into `vae`) if they match the prior's content."""
    meta_path = where / CACHE_META
    if not (cfg.retrieve.cache and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fingerprint:
        msg = (
            f"the prior {cfg.retrieve.prior} changed since its embeddings were cached in {where} "
            f"({describe_change(meta.get('fingerprint', {}), fingerprint)})"
        )
        if cfg.retrieve.on_stale == "error":
            raise ConfigError(f"{msg}; set retrieve.on_stale=recompute to refit the embedder, or delete {where}")
        log.warning("%s: refitting the embedder and re-embedding the prior", msg)
        return None
    vae.load_state_dict(load_file(str(where / CACHE_WEIGHTS)))
    emb = np.load(where / CACHE_EMBEDDINGS)
    log.info("reusing the cached embedder and %d prior embeddings from %s", len(emb), where)
    return emb


def fit_embedder(cfg, vae: StateActionVAE, prior: EpisodeStore, keys: list[str], loop_cfg, run_dir, device):
    """The β-VAE on every prior transition, on the offline training loop (checkpoints, Ctrl-C, tensorboard)."""
    obs_keys = [k for k in keys if k != "action"]
    sampler = SequenceSampler.from_store(prior, obs_keys, obs_horizon=1, action_horizon=1)
    vae.fit_normalizer(lambda k: sampler.data[k])
    vae.to(device).train()

    def batches(rng):
        b = sampler.sample(loop_cfg.batch_size, rng)
        return to_device({k: b[k][:, 0] for k in keys}, device)

    loop = TrainingLoop(
        run_dir,
        vae,
        lambda batch: vae_loss(vae, batch, float(cfg.retrieve.embedder.kl_weight)),
        batches,
        loop_cfg,
        name="embedder",
        weights_file=CACHE_WEIGHTS,
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
    )
    summary = loop.run()
    if not summary["finished"]:
        raise Stopped(f"the embedder fit stopped at step {summary['step']}; nothing was cached or selected")
    log.info("embedder: %d steps, final loss %.4f, %.1f s", summary["step"], summary["final_loss"], summary["wall_s"])
    return summary


def prior_embeddings(cfg, algo, loop_cfg, prior, fingerprint, obs, run_dir: Path, device) -> tuple:
    """(vae, prior embeddings, where they came from): cached, or fitted + embedded (and cached atomically)."""
    r = cfg.retrieve
    vae = StateActionVAE(obs, prior.features["action"], algo)
    keys = transition_keys(obs)
    where = cache_dir(cfg, obs)
    emb = load_cache(cfg, where, fingerprint, vae)
    if emb is not None:
        return vae.to(device), emb, {"cache": str(where), "reused": True}
    work = where.with_name(f"{where.name}.tmp-{os.getpid()}") if r.cache else run_dir / "embedder"
    if work.exists():
        shutil.rmtree(work)
    t0 = time.monotonic()
    summary = fit_embedder(cfg, vae, prior, keys, loop_cfg, work, device)
    fit_s = time.monotonic() - t0
    t0 = time.monotonic()
    emb = embed_blocks(vae, store_blocks(prior, keys), device, int(r.embed_batch))
    embed_s = time.monotonic() - t0
    if not np.isfinite(emb).all():
        raise FloatingPointError("the embedder produced non-finite embeddings; lower retrieve.embedder.lr")
    info = {"fit_s": fit_s, "embed_s": embed_s, "final_loss": summary["final_loss"], "reused": False}
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, str(work / CACHE_WEIGHTS))
    np.save(work / CACHE_EMBEDDINGS, emb.astype(np.float32))
    meta = {"fingerprint": fingerprint, "prior": str(prior.path), "keys": keys, "created": time.time(), **info}
    write_json(work / CACHE_META, meta)
    if r.cache:  # swap the finished folder in: a reader sees the old cache or the new one, never half of one
        old = where.with_name(where.name + ".old")
        if where.exists():
            os.replace(where, old)
        os.replace(work, where)
        shutil.rmtree(old, ignore_errors=True)
        log.info("cached the embedder and %d prior embeddings in %s", len(emb), where)
    return vae, emb, {"cache": str(where) if r.cache else None, **info}


# ----------------------------------------------------------------------------------------------------- report


def episode_task(store: EpisodeStore, i: int) -> str | None:
    info = store.meta.get("info") or {}
    return store.episodes[i].get("task") or info.get("task")


def calibration_report(loo: np.ndarray, distances: np.ndarray, algo, radius: float | None) -> dict | None:
    """What the target's leave-one-episode-out distances say: the radius each q gives and how much it keeps."""
    if loo is None:
        return None
    radii = {str(q): float(np.quantile(loo, q)) for q in REPORT_QUANTILES}
    return {
        "q": float(algo.target_quantile) if algo.rule == "target_quantile" else None,
        "radius": radius,
        "target_transitions": int(len(loo)),
        "radius_at_q": radii,
        "kept_at_q": {q: int((distances <= r).sum()) for q, r in radii.items()},
    }


def build_report(prior, keep, scores, distances, ep, algo, extra) -> dict:
    lengths = np.diff(np.concatenate([[0], prior.episode_ends]))
    kept = np.bincount(ep, minlength=prior.num_episodes)
    per_episode = [
        {"episode": i, "task": episode_task(prior, i), "length": int(n), "kept": int(k), "fraction": float(k / n)}
        for i, (n, k) in enumerate(zip(lengths, kept))
    ]
    per_task: dict[str, dict] = {}
    for e in per_episode:
        t = per_task.setdefault(str(e["task"]), {"episodes": 0, "steps": 0, "kept": 0, "episodes_touched": 0})
        t["episodes"] += 1
        t["steps"] += e["length"]
        t["kept"] += e["kept"]
        t["episodes_touched"] += e["kept"] > 0
    for t in per_task.values():
        t["fraction"] = t["kept"] / max(t["steps"], 1)
    return {
        "rule": algo.rule,
        "threshold": algo.threshold if algo.rule == "threshold" else None,
        "top_k": algo.top_k if algo.rule == "top_k" else None,
        "top_fraction": algo.top_fraction if algo.rule == "top_fraction" else None,
        "radius": algo.radius if algo.rule == "radius" else None,
        "target_quantile": algo.target_quantile if algo.rule == "target_quantile" else None,
        "prior_steps": int(len(scores)),
        "kept": int(len(keep)),
        "kept_fraction": float(len(keep) / len(scores)),
        "episodes_touched": int((kept > 0).sum()),
        "score_quantiles": {str(q): float(np.quantile(scores, q)) for q in (0.01, 0.1, 0.5, 0.9, 0.99)},
        "distance_range": [float(distances.min()), float(distances.max())],
        "kept_at_threshold": {str(d): int((scores >= d).sum()) for d in REPORT_DELTAS},
        "per_task": per_task,
        "per_episode": per_episode,
        **extra,
    }


def plot_report(run_dir: Path, scores, keep, prior_emb, target_emb, r, algo, cut: float | None) -> list[str]:
    """retrieval_scores.png (histogram with the cut) and retrieval_projection.png (PCA: prior, retrieved, target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = np.zeros(len(scores), bool)
    kept[keep] = True
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(0, 1, int(r.histogram_bins) + 1)
    ax.hist(scores[~kept], bins=bins, color="0.6", label="not retrieved")
    ax.hist(scores[kept], bins=bins, color="tab:blue", label=f"retrieved ({kept.sum()})")
    if cut is not None:  # δ, or a radius in score units
        label = f"δ = {algo.threshold:g}" if algo.rule == "threshold" else f"{algo.rule} (score {cut:.3f})"
        ax.axvline(cut, color="k", ls="--", lw=1, label=label)
    ax.set(xlabel="score (1 = nearest to the target)", ylabel="prior transitions", yscale="log")
    ax.set_title(f"retrieval scores: {kept.sum()} of {len(scores)} kept ({algo.rule})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "retrieval_scores.png", dpi=110)
    plt.close(fig)

    rng = np.random.default_rng(0)
    n = int(r.projection_points)
    idx = np.sort(rng.choice(len(scores), size=min(n, len(scores)), replace=False))
    fit_on = np.concatenate([prior_emb[idx], target_emb])
    p, t = pca_2d(prior_emb[idx], fit_on), pca_2d(target_emb, fit_on)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(*p[~kept[idx]].T, s=3, c="0.75", label="prior")
    ax.scatter(*p[kept[idx]].T, s=4, c="tab:blue", label="retrieved")
    ax.scatter(*t.T, s=12, c="tab:red", marker="x", label="target")
    ax.set(xlabel="PC 1", ylabel="PC 2", title=f"embeddings (μ ⊕ a), PCA; {len(idx)} prior points shown")
    ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    fig.savefig(run_dir / "retrieval_projection.png", dpi=110)
    plt.close(fig)
    return [str(run_dir / "retrieval_scores.png"), str(run_dir / "retrieval_projection.png")]


# ------------------------------------------------------------------------------------------------------- main


def retrieve(cfg: DictConfig, run_dir: str | os.PathLike) -> dict:
    """Everything `robot-rl retrieve` does; returns the report (also written to retrieve_report.json)."""
    algo, loop_cfg = validate(cfg)
    r = cfg.retrieve
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(str(r.device))
    seed_everything(int(r.embedder.seed), r.get("num_threads"))
    prior, target = open_store(r.prior, "prior"), open_store(r.target, "target")
    obs = embedded_features(prior, target, r.obs_keys)
    if algo.rule == "target_quantile" and target.num_episodes < 2:
        raise ConfigError(
            f"retrieve.select.rule=target_quantile calibrates its radius on how far each target episode is from the "
            f"others, and retrieve.target={target.path} has {target.num_episodes} episode; record at least 2 demos, "
            f"or use rule=radius / threshold. Nothing was written"
        )
    keys = transition_keys(obs)

    t0 = time.monotonic()
    fingerprint = store_fingerprint(prior)
    fingerprint_s = time.monotonic() - t0
    vae, prior_emb, origin = prior_embeddings(cfg, algo, loop_cfg, prior, fingerprint, obs, run_dir, device)
    target_emb = embed_blocks(vae, store_blocks(target, keys), device, int(r.embed_batch))
    if len(prior_emb) != prior.num_steps:
        raise ConfigError(f"cached embeddings cover {len(prior_emb)} rows, the prior has {prior.num_steps}")

    t0 = time.monotonic()
    distances = nearest_distance(prior_emb, target_emb, algo.chunk_size, device)
    scores = scores_from_distances(distances)
    score_s = time.monotonic() - t0
    radius, loo = None, None
    if target.num_episodes >= 2:  # the target's own spread: the radius of rule=target_quantile (reported always)
        radius, loo = target_radius(target_emb, target.episode_ends, algo.target_quantile, algo.chunk_size, device)
    keep = select(scores, distances, algo, radius)
    if len(keep) == 0:
        what = {
            "threshold": f"scores >= δ={algo.threshold:g} (scores lie in [0, 1]; {int((scores >= 0.8).sum())} "
            f"reach 0.8); lower retrieve.select.threshold",
            "radius": f"lies within radius {algo.radius:g} of a target transition (the nearest is at "
            f"{distances.min():.4g}); raise retrieve.select.radius or use rule=threshold",
            "target_quantile": f"lies within the calibrated radius {radius if radius is not None else 0:.4g} "
            f"(q={algo.target_quantile:g} of the target's leave-one-episode-out distances; the nearest prior "
            f"transition is at {distances.min():.4g}); raise retrieve.select.target_quantile",
        }.get(algo.rule, "was selected")
        raise ConfigError(f"empty selection: no prior transition {what}. Nothing was written")

    starts = np.concatenate([[0], prior.episode_ends[:-1]]).astype(np.int64)
    ep = np.searchsorted(prior.episode_ends, keep, side="right").astype(np.int64)
    step = keep - starts[ep]
    out = Path(str(r.output)).expanduser() if r.get("output") else run_dir / "selection"
    rule_info = {"rule": algo.rule, "select": OmegaConf.to_container(r.select, resolve=True)}
    if algo.rule == "target_quantile":
        rule_info["calibrated_radius"] = radius
    write_selection(out, prior, fingerprint, ep, step, scores[keep], {**rule_info, "target": str(target.path)})
    extra = {
        "prior": str(prior.path),
        "target": str(target.path),
        "target_steps": int(target.num_steps),
        "selection": str(out),
        "embedding_dim": int(prior_emb.shape[1]),
        "embedder": origin,
        "timing_s": {"fingerprint": fingerprint_s, "score": score_s},
        "target_episodes": int(target.num_episodes),
        "target_calibration": calibration_report(loo, distances, algo, radius),
        "device": str(device),
        "git": git_hash(),
    }
    report = build_report(prior, keep, scores, distances, ep, algo, extra)
    lo, hi = float(distances.min()), float(distances.max())
    cut = {"threshold": algo.threshold, "radius": algo.radius, "target_quantile": radius}.get(algo.rule)
    if cut is not None and algo.rule != "threshold":
        cut = float(np.clip((hi - cut) / (hi - lo), 0, 1)) if hi > lo else 1.0
    report["figures"] = plot_report(run_dir, scores, keep, prior_emb, target_emb, r, algo, cut)
    if r.get("copy_to"):
        sel, _ = read_selection(out, check_store=False)
        report["copy"] = str(copy_selection(sel, prior, Path(str(r.copy_to)).expanduser()).path)
    write_json(run_dir / "retrieve_report.json", report)
    return report


def main(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    """Entry point of `robot-rl retrieve` (the CLI passes hydra's run directory). Returns an exit code."""
    try:
        report = retrieve(cfg, run_dir)
    except Stopped as e:
        log.warning("%s", e)
        return 130
    tasks = ", ".join(f"{t}: {v['kept']}/{v['steps']}" for t, v in report["per_task"].items())
    line = (
        f"kept {report['kept']} of {report['prior_steps']} prior transitions ({100 * report['kept_fraction']:.1f} %) "
        f"from {report['episodes_touched']} episodes [{tasks}] -> {report['selection']}"
    )
    if report["rule"] == "target_quantile":
        cal = report["target_calibration"]
        line += f" (radius {cal['radius']:.4g} = q {cal['q']:g} of the target's leave-one-episode-out distances)"
    log.info(line)
    print(line)
    return 0
