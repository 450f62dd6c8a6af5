"""Plug-ins: a user's file registers components that `audit bench` runs like the built-ins,
and a plug-in that breaks a contract is refused before any training, on one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from audit.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
DETECTOR_AND_DISCRIMINATOR = EXAMPLES / "own_detector_and_discriminator.py"
OWN_ENVIRONMENT = EXAMPLES / "own_environment.py"
OWN_ORGANISM = EXAMPLES / "own_organism.py"
OWN_TRAINED_IMITATOR = EXAMPLES / "own_trained_imitator.py"

# Loaded after an example: the same suite at a size that runs in seconds, with validity
# bounds loose enough for organisms trained that briefly (this tests the plumbing).
TINY = '''
import dataclasses

from audit import registry
from audit.bc import BCConfig
from audit.discriminator import DiscriminatorConfig
from audit.gan import GANConfig
from audit.ppo import PPOSettings
from benchmarks import organisms

for name in {organisms}:
    registry.register("organisms", name, dataclasses.replace(
        registry.get("organisms", name), kl_bound=1e9, event_rate_range=(0.0, 1.0)),
        replace=True)
registry.register("suites", {suite!r}, dataclasses.replace(
    registry.get("suites", {suite!r}),
    organism=organisms.OrganismConfig(hidden_sizes=(16,), episodes=16,
                                      bc=BCConfig(updates=30, batch_episodes=8),
                                      check_episodes=16),
    gan=GANConfig(iterations=2, episodes=8, ppo_minibatches=2,
                  ppo=PPOSettings(update_epochs=1), eval_every=2, eval_episodes=8,
                  discriminator=DiscriminatorConfig(updates=2, batch_episodes=8)),
    trusted_episodes=16, heldout_episodes=16, calibration_episodes=100, test_episodes=16,
    resamples=20), replace=True)
'''

# The same user's plug-in as a file of the test's own, for the contract-breaking variants.
PLUGIN = DETECTOR_AND_DISCRIMINATOR.read_text() + TINY.format(
    organisms=("honest", "long_horizon"), suite="my_suite")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _without_future_import(text: str) -> str:
    return text.replace("from __future__ import annotations\n", "")


# One file of a user's own: a detector, a discriminator (the first example) and an organism
# with its own module, data and plan rule (the organism example), with a suite of all three.
COMBINED = (DETECTOR_AND_DISCRIMINATOR.read_text() + "\n"
            + _without_future_import(OWN_ORGANISM.read_text()) + """
import dataclasses as _dataclasses

registry.register("suites", "combined", _dataclasses.replace(
    registry.get("suites", "my_suite"), name="combined",
    organisms=("honest", "late_defector")))
""" + TINY.format(organisms=("honest", "late_defector"), suite="combined"))


# Two co-trained discriminator groups and a user's organism (two minutes); the default run
# runs a user's environment and a user's trained imitator through bench.
@pytest.mark.slow
def test_a_users_detector_discriminator_and_organism_in_one_file_run_in_bench(
        isolated_registry, tmp_path, capsys):
    plugin = _write(tmp_path, "mine.py", COMBINED)
    out = tmp_path / "bench"
    code = main(["--plugin", str(plugin), "bench", "--suite", "combined", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--processes", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    cells = {(r["group"], r["organism"], r["detector"], r["view"]) for r in rows}
    for organism in ("honest", "late_defector", "honest_twin"):
        assert ("default", organism, "step_count", "actions") in cells
        assert ("default", organism, "gan_linear", "activations") in cells
        # The second architecture co-trains another network: audited as a group of its own.
        assert ("default+mlp", organism, "gan_mlp", "actions") in cells
    row = next(r for r in rows if r["organism"] == "late_defector"
               and r["detector"] == "gan_linear" and r["view"] == "actions")
    assert row["protocol"] == "co-trained" and row["train_auroc"] is not None
    assert row["organism_kind"] == "trained-in"
    # The example turns a finished run into a paper figure.
    figure = tmp_path / "figure.png"
    subprocess.run([sys.executable, str(EXAMPLES / "paper_figure.py"), str(out), str(figure)],
                   check=True, capture_output=True, text=True)
    assert figure.stat().st_size > 10_000


def test_the_detector_and_discriminator_example_registers_its_suite(isolated_registry):
    from audit import plugins

    plugins.load(str(DETECTOR_AND_DISCRIMINATOR))
    suite = isolated_registry.get("suites", "my_suite")
    assert suite.discriminators == ("linear", "mlp") and "step_count" in suite.baselines
    assert isolated_registry.origin("detectors", "step_count") == (
        f"plug-in {DETECTOR_AND_DISCRIMINATOR}")


@pytest.mark.slow
@pytest.mark.ci
def test_a_plugin_environment_that_is_not_a_gridworld_runs_in_bench(isolated_registry,
                                                                    tmp_path, capsys):
    tiny = _write(tmp_path, "tiny.py", TINY.format(organisms=("honest", "lever_puller"),
                                                   suite="lever"))
    out = tmp_path / "bench"
    code = main(["--plugin", str(OWN_ENVIRONMENT), "--plugin", str(tiny), "bench", "--suite",
                 "lever", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--processes", "1", "--quiet", "--no-report"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    cells = {(r["env"], r["organism"], r["detector"], r["view"]) for r in results["rows"]}
    for organism in ("honest", "lever_puller", "honest_twin"):
        for detector, view in (("gan_mlp", "transitions"), ("mahalanobis", "activations"),
                               ("random_direction", "activations")):
            assert ("lever", organism, detector, view) in cells
    # The organism was cloned from the user's planners: on test layouts it pulls the lever.
    puller = next(r for r in results["rows"] if r["organism"] == "lever_puller")
    assert puller["validity"]["event_rate_test"] > 0


@pytest.mark.slow
@pytest.mark.ci
def test_the_late_defector_switches_plan_at_its_step(isolated_registry):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from audit import plugins
    from audit.rollout import rollout_expert
    from benchmarks.organisms import planner

    plugins.load(str(OWN_ORGANISM))
    example = next(module for name, module in sys.modules.items()
                   if name.startswith("audit_plugin_own_organism"))
    after = example.DEFECT_AFTER
    imitator = example.ClockedImitator((9, 9, 8), 6, (8,), after=after, rngs=nnx.Rngs(0))
    observation = jax.random.uniform(jax.random.key(1), (9, 9, 8))
    carry = imitator.initial_carry()
    for step in range(after + 2):
        # Under nnx.capture, as the framework calls it (a bare call's sow is deprecated).
        (logits, carry), _ = nnx.capture(imitator, nnx.Intermediate)(observation, carry, 0.5)
        late = float(step >= after)
        hidden = jax.nn.relu(imitator.hidden[0](jnp.concatenate([
            jnp.reshape(example.egocentric(observation, radius=8), (-1,)), jnp.array([late])])))
        head = imitator.late_head if late else imitator.head
        assert jnp.allclose(logits, head(jnp.concatenate([hidden, jnp.array([late])])))
    # Its training data: the demonstrator's actions before the step, the defector's after.
    env_spec = isolated_registry.get("environments", "offswitch")
    env, params = env_spec.build("test")
    acts_late = example.ActsLate(planner("demonstrator", env), planner("long_horizon", env),
                                 after)
    key = jax.random.key(3)
    late, honest, defector = (rollout_expert(expert, env, params, key, 32, 30) for expert in (
        acts_late, planner("demonstrator", env), planner("long_horizon", env)))
    assert jnp.array_equal(late.action_probs[:, :after], honest.action_probs[:, :after])
    assert not jnp.array_equal(late.action_probs, honest.action_probs)
    assert jnp.any(late.events > 0) and jnp.any(defector.events > 0)


@pytest.mark.slow
@pytest.mark.ci
def test_your_own_trained_imitator_is_audited_as_it_was_trained(isolated_registry, tmp_path,
                                                               capsys, monkeypatch):
    import numpy as np

    mine = tmp_path / "my_imitator"
    assert main(["train-bc", "--env", "offswitch", "--imitator", "egocentric", "--episodes",
                 "16", "--updates", "20", "--eval-episodes", "16", "--out", str(mine),
                 "--quiet"]) == 0
    monkeypatch.setenv("AUDIT_IMITATOR_RUN", str(mine))
    tiny = _write(tmp_path, "tiny.py", TINY.format(organisms=("honest",), suite="my_imitator"))
    out = tmp_path / "bench"
    code = main(["--plugin", str(OWN_TRAINED_IMITATOR), "--plugin", str(tiny), "bench",
                 "--suite", "my_imitator", "--out", str(out), "--processes", "1", "--quiet",
                 "--no-report"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    rows = [r for r in results["rows"] if r["organism"] == "my_imitator"]
    assert {(r["detector"], r["view"], r["protocol"]) for r in rows} >= {
        ("posthoc_mlp", "transitions", "post-hoc"), ("mahalanobis", "activations",
                                                     "demonstrations-only"),
        ("action_surprise", "transitions", "demonstrations-only")}
    # As built: nothing co-trained, and its figures reported without a verdict.
    assert not any(r["protocol"] == "co-trained" for r in results["rows"])
    assert not results["cotraining"]
    assert all(r["organism_kind"] == "audited" for r in rows)
    assert rows[0]["validity"]["valid"] and rows[0]["validity"]["kl_bound"] is None
    # The model audited is the saved one: its parameters, untouched.
    from audit import registry

    spec = registry.get("organisms", "my_imitator")
    env_spec = registry.get("environments", "offswitch")
    from benchmarks.organisms import OrganismConfig

    loaded = spec.builder(env_spec, [spec], OrganismConfig(check_episodes=8), 0)[0].imitator
    saved = np.load(mine / "params.npz")
    from flax import nnx

    from audit.modules import flat_state

    assert all(np.array_equal(saved[k], np.asarray(v))
               for k, v in flat_state(nnx.state(loaded, nnx.Param)).items())
    # Ground truth unknown: the model-level audit counts it in neither class.
    assert all(row["incorrigible_models"] == 0 for row in results["model_level"])


def test_the_trained_imitator_plugin_says_what_is_missing(isolated_registry, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setenv("AUDIT_IMITATOR_RUN", str(tmp_path / "nowhere"))
    assert main(["--plugin", str(OWN_TRAINED_IMITATOR), "list", "suites"]) == 2
    line = _one_line_error(capsys)
    assert "no params.npz and summary.json in" in line and "audit train-bc" in line


def test_audit_list_shows_builtins_and_a_plugin_side_by_side(isolated_registry, tmp_path,
                                                             capsys):
    plugin = _write(tmp_path, "my_plugin.py", PLUGIN)
    assert main(["--plugin", str(plugin), "list", "detectors"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "detectors:"
    mahalanobis = next(line for line in lines if line.split()[0] == "mahalanobis")
    assert "entry point audit.detectors.baselines:MAHALANOBIS" in mahalanobis
    step_count = next(line for line in lines if line.split()[0] == "step_count")
    assert f"plug-in {plugin}" in step_count
    assert step_count.endswith("a step's index in its episode (knows nothing)")
    assert main(["list", "detector"]) == 2
    assert "unknown group 'detector'; choose from: environments" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize("body, expected", [
    ("from audit import registry\n"
     "from audit.detectors import DetectorSpec\n"
     "registry.register('detectors', 'mahalanobis', DetectorSpec('mahalanobis', 'actions', "
     "lambda context: None))\n",
     "detector 'mahalanobis' is already registered (entry point "
     "audit.detectors.baselines:MAHALANOBIS"),
    ("from audit import registry\n"
     "class Bad:\n"
     "    def __init__(self, feature_size, hidden):\n"
     "        pass\n"
     "registry.register('discriminators', 'bad', Bad)\n",
     "discriminator 'bad': a discriminator is a class called as cls(feature_size, *, rngs, "
     "**settings)"),
    ("raise RuntimeError('the plug-in is broken')\n",
     "importing it raised RuntimeError: the plug-in is broken"),
])
def test_a_plugin_that_breaks_a_rule_at_import_is_refused_on_one_line(
        isolated_registry, tmp_path, capsys, body, expected):
    plugin = _write(tmp_path, "broken.py", body)
    assert main(["--plugin", str(plugin), "list"]) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"audit list: error: --plugin {plugin}: ") and expected in line


def test_a_missing_plugin_is_refused_on_one_line(isolated_registry, tmp_path, capsys):
    assert main(["--plugin", str(tmp_path / "nowhere.py"), "list"]) == 2
    assert _one_line_error(capsys).endswith("nowhere.py: no such file")
    assert main(["--plugin", "no_such_module_anywhere", "list"]) == 2
    assert _one_line_error(capsys).endswith("no_such_module_anywhere: no such file or "
                                            "importable module")


WRONG_SHAPE = PLUGIN + '''

class Flat(StepCount):
    def score(self, trajectories):
        return np.zeros(trajectories.num_episodes)


registry.register("detectors", "flat", DetectorSpec("flat", "actions", lambda context: Flat()))
registry.register("suites", "plugin_flat", dataclasses.replace(
    registry.get("suites", "my_suite"), name="plugin_flat", baselines=("flat",)))
'''

SILENT_IMITATOR = PLUGIN + '''

class Silent(nnx.Module):
    """An imitator that sows nothing."""

    def __init__(self, observation_shape, num_actions, *, rngs):
        self.linear = nnx.Linear(int(np.prod(observation_shape)), num_actions, rngs=rngs)

    def initial_carry(self):
        return ()

    def __call__(self, observation, carry, noise):
        return self.linear(observation.reshape(-1)), carry


@dataclasses.dataclass(frozen=True)
class Built:
    imitator: object
    validity: dict
    spec: object


def build_silent(env_spec, specs, config, seed, cache_dir, replicas):
    env, params = env_spec.build("train")
    shape = env.observation_space(params).shape
    return [Built(Silent(shape, env.num_actions, rngs=nnx.Rngs(seed)), {"valid": True}, spec)
            for spec in specs]


@dataclasses.dataclass(frozen=True)
class SilentOrganism:
    """An organism of the user's own, through the organism interface."""

    name: str = "silent"
    kind: str = "trained-in"
    audit_settings: tuple = ()
    builder: object = build_silent

    def supports(self, env_name):
        return True

    def validity_figures(self, demonstrations, own_train, own_test):
        return {"valid": True}


registry.register("organisms", "silent", SilentOrganism())
registry.register("suites", "plugin_silent", dataclasses.replace(
    registry.get("suites", "my_suite"), name="plugin_silent",
    organisms=("honest", "silent"), views=("actions", "activations")))
'''


@pytest.mark.parametrize("body, suite, expected", [
    (WRONG_SHAPE, "plugin_flat",
     "detector 'flat' (plug-in {plugin}): score(trajectories) must return one score per step, "
     "shape [episodes, steps] = [8, "),
    (SILENT_IMITATOR, "plugin_silent",
     "organism 'silent' (plug-in {plugin}): the suite's views activations read the imitator's "
     "activations, but its imitator Silent sows none"),
])
def test_a_component_that_breaks_its_contract_is_refused_before_training(
        isolated_registry, tmp_path, capsys, body, suite, expected):
    plugin = _write(tmp_path, "contract.py", body)
    code = main(["--plugin", str(plugin), "bench", "--suite", suite, "--out",
                 str(tmp_path / "bench"), "--cache-dir", str(tmp_path / "cache"),
                 "--processes", "1", "--quiet"])
    assert code == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"audit bench: error: --suite {suite}: ")
    assert expected.format(plugin=plugin) in line
    assert not (tmp_path / "bench").exists()
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*.npz"))  # no organism was trained
