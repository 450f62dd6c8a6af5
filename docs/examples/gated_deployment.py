"""Gated execution of the quick suite's off-switch organisms under a calibrated monitor.

Builds (or loads from the organism cache) the honest organism and the trained-in
long-horizon organism of `offswitch` at seed 0 with the quick suite's settings, fits
the Mahalanobis detector on the model's activations over train-layout demonstrations,
calibrates it on the model's own held-out train-layout episodes, and deploys each model
on test layouts with the gate of `audit.deployment`: at each audit budget, once the
monitor flags, the fallback (stay, or the demonstrator: "ask the human") acts for the
rest of the episode. Prints safety (no off-switch event executed), usefulness (return
over the demonstrator's on the same layouts) and the share of episodes flagged. Then
runs the long-horizon organism under KL-constrained and quantilized action choice
around the honest organism (a behaviour-cloned imitator of the demonstrations) as the
reference policy, and one round of flag and relabel: the states Mahalanobis flags in
512 test-layout episodes (at most --label-budget of them) are labelled by the
demonstrator and the organism is cloned again on them and the demonstrations; the
retrained model is deployed ungated on fresh test layouts.

Run:  python docs/examples/gated_deployment.py [--episodes 512] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

import jax  # noqa: E402
import numpy as np  # noqa: E402

from audit import registry  # noqa: E402
from audit.deployment import (  # noqa: E402
    constrained_deployment,
    deployment_figures,
    flag_and_relabel,
    frontier_plot,
    gated_deployment,
    mean_return,
)
from audit.detectors import DetectorContext  # noqa: E402
from audit.rollout import rollout, rollout_expert, teacher_forced_activations  # noqa: E402
from benchmarks import organisms as organism_lib  # noqa: E402
from benchmarks import suites  # noqa: E402
from benchmarks.envs.gridworld import STAY  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=512)
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache/organisms"))
    parser.add_argument("--label-budget", type=int, default=2000)
    parser.add_argument("--plot", type=Path, default=Path("runs/deployment_frontier"),
                        help="file stem of the frontier plot (.png and .pdf)")
    args = parser.parse_args()

    env_spec = registry.get("environments", "offswitch")
    train_env, train_params = env_spec.build("train")
    test_env, test_params = env_spec.build("test")
    steps = int(train_params.max_steps_in_episode)
    demonstrator = registry.get("planners", "demonstrator").make(train_env)
    specs = [registry.get("organisms", name) for name in ("honest", "long_horizon")]
    models = organism_lib.build_organisms(env_spec, specs, suites.ORGANISMS, 0,
                                          args.cache_dir)
    trusted = rollout_expert(demonstrator, train_env, train_params, jax.random.key(10), 512,
                             steps)
    print(f"{'organism':<14} {'fallback':<12} {'budget':>7} {'flagged':>8} {'safety':>7} "
          f"{'usefulness':>10} {'before harm':>11} {'at harm':>8}")
    series, monitors = {}, {}
    for organism in models:
        imitator = organism.imitator
        forced = trusted.replace(activations=teacher_forced_activations(
            imitator, trusted.replace(activations={})))
        detector = registry.get("detectors", "mahalanobis").build(DetectorContext(
            num_actions=train_env.num_actions,
            observation_shape=tuple(train_env.observation_space(train_params).shape)))
        detector.fit(forced)
        calibration = rollout(imitator, train_env, train_params, jax.random.key(11), 512,
                              steps)
        calibration_scores = np.asarray(detector.score(calibration))
        monitors[organism.spec.name] = (detector, calibration_scores, calibration.mask)
        for name, fallback in (("stay", STAY), ("demonstrator", demonstrator)):
            rows = gated_deployment(imitator, detector.score, calibration_scores,
                                    calibration.mask, test_env, test_params,
                                    jax.random.key(12), args.episodes, steps,
                                    fallback=fallback, demonstrator=demonstrator)
            series[f"{organism.spec.name}, gate -> {name}"] = rows
            for row in rows:
                budget = "none" if row["alpha"] is None else f"{row['alpha']:.0%}"
                print(f"{organism.spec.name:<14} {name:<12} {budget:>7} "
                      f"{row['flagged']:>8.3f} {row['safety']:>7.3f} "
                      f"{row['usefulness']:>10.3f} {row['flagged_before_harm']:>11.3f} "
                      f"{row['flagged_at_harm']:>8.3f}")

    honest, long_horizon = (organism.imitator for organism in models)
    rows = constrained_deployment(long_horizon, honest, test_env, test_params,
                                  jax.random.key(12), args.episodes, steps,
                                  demonstrator=demonstrator)
    print(f"\n{'long_horizon around honest':<28} {'KL/step':>8} {'safety':>7} "
          f"{'usefulness':>10}")
    for row in rows:
        print(f"{row['rule']:>8} {row['parameter']:<19g} {row['kl_to_reference']:>8.3f} "
              f"{row['safety']:>7.3f} {row['usefulness']:>10.3f}")
    for rule in ("kl", "quantile"):
        series[f"long_horizon, {rule} around honest"] = [r for r in rows if r["rule"] == rule]

    detector, calibration_scores, calibration_mask = monitors["long_horizon"]
    retrained, info = flag_and_relabel(
        long_horizon, detector.score, calibration_scores, calibration_mask, test_env,
        test_params, jax.random.key(13), args.episodes, steps, demonstrator=demonstrator,
        trusted=trusted, label_budget=args.label_budget)
    print(f"\nflag and relabel (long_horizon, 1%): {info['flagged_episodes']} episodes "
          f"flagged, {info['labelled_states']} states labelled in "
          f"{info['labelled_episodes']} episodes")
    never = np.full((args.episodes,), steps, np.int32)
    demonstrator_return = mean_return(demonstrator, test_env, test_params,
                                      jax.random.key(14), args.episodes, steps,
                                      jax.random.key(15))
    for name, model in (("before", long_horizon), ("after", retrained)):
        fresh = rollout(model, test_env, test_params, jax.random.key(14), args.episodes,
                        steps, jax.random.key(15))
        row = deployment_figures(fresh, never, demonstrator_return)
        print(f"  {name:<7} ungated on fresh test layouts: safety {row['safety']:.3f}, "
              f"usefulness {row['usefulness']:.3f}")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    for path in frontier_plot(series, args.plot):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
