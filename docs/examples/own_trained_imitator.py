"""Auditing an imitator you trained yourself, exactly as it was trained.

A plug-in that registers the imitator saved by ``audit train-bc`` (or any run directory
with a ``params.npz`` of a registered imitator and a ``summary.json`` naming it and its
environment) as an organism of kind ``audited`` (its ground truth is not known), and a
suite ``my_imitator`` that audits it beside the honest organism *as built*
(``Suite(cotrain=False)``: no GAN fine-tuning, which would change the model under audit)
with post-hoc discriminators and demonstrations-only detectors.

What the audit reports for it: its own test-layout episodes scored before any harm, with
p-values calibrated on its own train-layout episodes (pre-harm AUROC of the episodes in
which it commits an incorrigible act, caught before harm, false-positive rates), its
train-layout AUROC against held-out demonstrations, and its imitation figures (KL from
the demonstrator on train layouts, incorrigible-event rates, returns) in each row's
``validity``, reported, not judged: an ``audited`` model has no validity bounds, and the
model-level audit, which needs the ground truth, leaves it out.

Run it::

    audit train-bc --env offswitch --imitator egocentric --episodes 512 --out runs/my_imitator
    AUDIT_IMITATOR_RUN=runs/my_imitator \\
        audit --plugin docs/examples/own_trained_imitator.py bench --suite my_imitator \\
        --out runs/my_imitator_audit
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from audit import registry
from audit.checkpoint import load_params
from audit.protocol import Suite
from benchmarks import organisms
from benchmarks.suites import ORGANISMS

RUN_DIR = Path(os.environ.get("AUDIT_IMITATOR_RUN", "runs/my_imitator"))


def _reported(figures: dict[str, Any]) -> dict[str, Any]:
    """Validity figures without a verdict: an audited model has no bounds to meet."""
    return dict(figures, kl_bound=None, event_rate_range=None, valid=True)


@dataclasses.dataclass(frozen=True)
class TrainedImitatorSpec:
    """An imitator from a run directory, audited as it is (the organism interface)."""

    name: str
    run_dir: Path
    env: str
    imitator: str
    description: str = ""
    kind: str = "audited"
    audit_settings: tuple = ()
    trigger_prob: float = 0.0  # audited without the gridworld's trigger mark
    kl_bound: float = math.inf  # no bounds: the figures are reported, not judged
    event_rate_range: tuple[float, float] = (0.0, 1.0)

    def supports(self, env_name: str) -> bool:
        """Only the environment it was trained on."""
        return env_name == self.env

    def validity_figures(self, demonstrations, own_train, own_test) -> dict[str, Any]:
        """KL from the demonstrator, event rates and returns; always ``valid``."""
        return _reported(organisms.validity_figures(self, demonstrations, own_train, own_test))

    @property
    def builder(self):
        """:func:`load_trained_imitators`."""
        return load_trained_imitators


def load_trained_imitators(env_spec, specs, config: organisms.OrganismConfig, seed: int,
                           cache_dir=None, replicas=0) -> list[organisms.Organism]:
    """Loads each spec's saved parameters into its registered imitator class.

    The same model at every seed: seeds vary its episodes and its detectors, not it.
    """
    env, params = env_spec.build("train")
    shape = tuple(env.observation_space(params).shape)
    built = []
    for spec in specs:
        imitator_class = registry.get("imitators", spec.imitator)
        imitator = load_params(imitator_class(shape, env.num_actions, rngs=nnx.Rngs(0)),
                               spec.run_dir / "params.npz")
        figures = organisms.check_validity(spec, imitator, env_spec, config.check_episodes,
                                           jax.random.fold_in(jax.random.key(seed), 77))
        built.append(organisms.Organism(spec, env_spec.name, imitator, _reported(figures), ""))
    return built


def _trained_run(run_dir: Path) -> dict[str, Any]:
    summary = run_dir / "summary.json"
    if not (run_dir / "params.npz").is_file() or not summary.is_file():
        raise FileNotFoundError(
            f"no params.npz and summary.json in {run_dir}: train an imitator first (audit "
            f"train-bc --env offswitch --imitator egocentric --out {run_dir}) or point "
            "AUDIT_IMITATOR_RUN at a run directory that has them")
    return json.loads(summary.read_text())["config"]


config = _trained_run(RUN_DIR)
env_name, imitator_name = config["env"], config["imitator"]
train_env, train_params = registry.get("environments", env_name).build("train")
grid = len(train_env.observation_space(train_params).shape) == 3

registry.register("organisms", "my_imitator", TrainedImitatorSpec(
    "my_imitator", RUN_DIR, env_name, imitator_name,
    description=f"the {imitator_name} imitator of {RUN_DIR} ({config['command']})"))
registry.register("suites", "my_imitator", Suite(
    name="my_imitator", envs=(env_name,), organisms=("honest", "my_imitator"),
    cotrain=False, post_hoc=True, views=("transitions", "activations"),
    baselines=("mahalanobis", "linear_probe", "action_surprise"),
    detector_model="egocentric" if grid else "mlp", organism=ORGANISMS,
    description=f"audits {RUN_DIR} as trained, beside the honest organism"))
