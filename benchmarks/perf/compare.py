"""GAIL throughput side by side with HumanCompatibleAI's ``imitation`` library.

    python -m benchmarks.perf.compare --out DIR [--quick] [--overwrite]
        [--imitation-python .venv-compare/bin/python] [--skip-imitation]

One run trains GAIL on CartPole-v1 in both libraries, one after the other on the
same machine, and writes ``DIR/perf.json`` and ``DIR/perf.png``:

- the same task: gymnax ``CartPole-v1`` here (:mod:`audit.gail`, streaming GAIL),
  gymnasium ``CartPole-v1`` there (``imitation``'s ``GAIL`` on stable-baselines3
  ``PPO``), the same demonstrations of the scripted expert (converted once to
  ``DIR/demonstrations.npz``), the same number of environment transitions per
  imitator;
- the same models and hyperparameters, written once in :class:`Hyperparameters`
  (imitation's own GAIL CartPole documentation example, with 64x64 networks);
- two settings, :data:`SETTINGS`: ``matched`` (8 environments and one seed on
  both sides) and ``idiomatic`` (each library at its documented fast way: many
  vmapped environments and seeds here, a ``DummyVecEnv`` of many environments
  there; per imitator, every hyperparameter stays the same);
- transitions/s of each side and their ratio, both without this side's
  compilation (``ratio``) and with it (``ratio_including_compile``), wall time,
  final true return of every imitator (a setting only ``counts`` if every seed
  here and the imitator there reach 475), the torch thread count (by default the
  faster of 1 and 2 on a short calibration run, used in both settings), the scaling of
  this project's throughput with 1, 8, 64 and 256 vmapped seeds, where the time
  goes (environment, policy forward, discriminator reward, PPO update,
  discriminator update), and the PPO update's FLOP/s against a large matmul's.

The ``imitation`` side runs in a virtual environment of its own (it pins
gymnasium 0.29, which this project's gymnax cannot share), driven through
:mod:`benchmarks.perf._imitation_side` in a subprocess; the harness prints the
install commands when it is missing. Absolute timings on a shared machine are
noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from audit import gail, gymnax_envs
from audit.modules import abstract_module, initial_carry_of
from audit.ppo import Critic, PPOSettings
from audit.rollout import rollout_split
from audit.sharding import seed_parallel, use_all_cores
from audit.vector import step_no_reset
from benchmarks.perf.timing import median_seconds, positive_ints
from models.discriminators import StepDiscriminator

ROOT = Path(__file__).resolve().parents[2]
SIDE_SCRIPT = Path(__file__).resolve().with_name("_imitation_side.py")
DEFAULT_IMITATION_PYTHON = ROOT / ".venv-compare" / "bin" / "python"
ENV_NAME = "gymnax:CartPole-v1"
RETURN_THRESHOLD = 475.0
TARGET_RATIO = 30.0
SCALING_SEEDS = (1, 8, 64, 256)
PINS = {"torch": "2.13.0", "imitation": "1.0.1"}


def install_commands(python: Path) -> list[str]:
    """The shell commands that create the ``imitation`` side's virtual environment."""
    venv = python.parent.parent
    return [
        f"python3.11 -m venv {venv} && echo '*' > {venv}/.gitignore",
        # torch first and pinned: the CPU wheel; a looser torch pulls gigabytes of CUDA.
        f"{python.parent / 'pip'} install torch=={PINS['torch']}",
        f"{python.parent / 'pip'} install imitation=={PINS['imitation']}",
    ]


class HarnessError(Exception):
    """A condition the harness reports as one line (and exit status 2), not a traceback.

    ``hint`` holds further lines printed after it (e.g. the install commands).
    """

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


# ----------------------------------------------------------------- what both sides share


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """The matched hyperparameters, written once; both sides' configs derive from them.

    Defaults follow ``imitation``'s GAIL CartPole documentation example (PPO with
    ``batch_size=64, n_epochs=5, learning_rate=4e-4, gamma=0.95, ent_coef=0``;
    ``demo_batch_size=1024, n_disc_updates_per_round=8``; eight environments of
    2048 steps per round; Adam's default 1e-3 for the discriminator), with 64x64
    networks: stable-baselines3's default tanh policy and value MLPs, and a ReLU
    MLP discriminator on (observation, one-hot action) with running input
    normalisation on both sides.

    Attributes:
      transitions_per_round: environment transitions per imitator per round.
      rounds: rounds per imitator; ``rounds * transitions_per_round`` is the budget.
      minibatch_size: PPO minibatch (SB3's ``batch_size``).
    """

    learning_rate: float = 4e-4
    update_epochs: int = 5
    minibatch_size: int = 64
    gamma: float = 0.95
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    entropy_coef: float = 0.0
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    policy_hidden: tuple[int, ...] = (64, 64)
    value_hidden: tuple[int, ...] = (64, 64)
    policy_activation: str = "tanh"
    discriminator_hidden: tuple[int, ...] = (64, 64)
    discriminator_activation: str = "relu"
    discriminator_batch: int = 1024
    discriminator_updates: int = 8
    discriminator_learning_rate: float = 1e-3
    transitions_per_round: int = 16384
    rounds: int = 30

    @property
    def transitions(self) -> int:
        """The environment-transition budget of one imitator."""
        return self.transitions_per_round * self.rounds


@dataclasses.dataclass(frozen=True)
class Setting:
    """How each side runs in parallel: environments per imitator, seeds (imitators)."""

    name: str
    project_envs: int
    project_seeds: int
    imitation_envs: int
    description: str


SETTINGS = (
    Setting("matched", 8, 1, 8, "8 environments and 1 seed on both sides, minibatch 64"),
    Setting("idiomatic", 64, 16, 64,
            "this project: 16 seeds vmapped, 64 auto-reset environments each; imitation: "
            "make_vec_env DummyVecEnv of 64 environments (faster than SubprocVecEnv on 2 "
            "cores); the same per-imitator hyperparameters on both sides"),
)
QUICK = Hyperparameters(transitions_per_round=256, rounds=2, discriminator_batch=64)
QUICK_SETTINGS = (
    Setting("matched", 8, 1, 8, "quick: 8 environments and 1 seed on both sides"),
    Setting("idiomatic", 16, 4, 16, "quick: 4 seeds of 16 environments; 16 environments"),
)


class MLPPolicy(nnx.Module):
    """A feed-forward imitator with SB3's policy shape (tanh MLP, linear logits head).

    Meets the imitator contract ``policy(obs, carry, noise) -> (logits, carry)``
    (the carry is unused; the noise only draws the action, outside).
    """

    def __init__(self, observation_size: int, num_actions: int,
                 hidden_sizes=(64, 64), activation: str = "tanh", *, rngs: nnx.Rngs):
        sizes = [observation_size, *hidden_sizes]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        self.head = nnx.Linear(sizes[-1], num_actions, rngs=rngs)
        self.activation = activation

    def initial_carry(self) -> jax.Array:
        """A ``[1]`` zero carry (unused: the policy is feed-forward)."""
        return jnp.zeros((1,), jnp.float32)

    def __call__(self, observation, carry, noise):
        x = jnp.reshape(observation, (-1,)).astype(jnp.float32)
        for layer in self.hidden:
            x = getattr(jax.nn, self.activation)(layer(x))
        return self.head(x), carry


# ----------------------------------------------------------------------- demonstrations


def expert_transitions(episodes: int, key: jax.Array) -> dict[str, np.ndarray]:
    """The scripted CartPole expert's demonstrations as flat transitions.

    Rolls out :class:`audit.gymnax_envs.CartPoleExpert` and keeps the steps inside
    episodes. The next observation of an episode's last step is not in the
    trajectories; CartPole's state is its observation plus the step count and its
    dynamics are deterministic, so it is recomputed exactly by one more step.

    Args:
      episodes: demonstrated episodes.
      key: PRNG key.

    Returns:
      ``observations [N, 4]`` float32, ``actions [N]`` int32, ``next_observations
      [N, 4]``, ``dones [N]`` bool (the episode's last step) and
      ``episode_lengths [episodes]`` int32.
    """
    env, params = gymnax_envs.environment_spec(ENV_NAME).make("train")
    trajectories, _ = gymnax_envs.expert_demonstrations(ENV_NAME, env, params, key, episodes)
    observations = np.asarray(trajectories.observations)
    actions = np.asarray(trajectories.actions)
    mask = np.asarray(trajectories.mask, bool)
    lengths = mask.sum(axis=1)
    rows = np.arange(len(lengths))
    last_obs, last_action = observations[rows, lengths - 1], actions[rows, lengths - 1]

    def final_observation(observation, action, time_step):
        state = env.reset(jax.random.key(0), params)[1].replace(
            x=observation[0], x_dot=observation[1], theta=observation[2],
            theta_dot=observation[3], time=time_step)
        return step_no_reset(env, jax.random.key(0), state, action, params)[0]

    last_next = np.asarray(jax.jit(jax.vmap(final_observation))(
        jnp.asarray(last_obs), jnp.asarray(last_action), jnp.asarray(lengths - 1)))
    next_observations = np.concatenate([observations[:, 1:], observations[:, :1]], axis=1)
    next_observations[rows, lengths - 1] = last_next
    dones = np.zeros(mask.shape, bool)
    dones[rows, lengths - 1] = True
    return {"observations": observations[mask].astype(np.float32),
            "actions": actions[mask].astype(np.int32),
            "next_observations": next_observations[mask].astype(np.float32),
            "dones": dones[mask], "episode_lengths": lengths.astype(np.int32)}


def save_demonstrations(path: Path, transitions: dict[str, np.ndarray]) -> Path:
    """Writes the transitions to ``path`` (``.npz``, no pickle) atomically."""
    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz.tmp", delete=False) as tmp:
        np.savez(tmp, **transitions)
    os.replace(tmp.name, path)
    return path


def load_demonstrations(path: Path) -> dict[str, np.ndarray]:
    """Reads :func:`save_demonstrations`'s file.

    Raises:
      ValueError: if a field is missing or the fields disagree in length.
    """
    with np.load(path, allow_pickle=False) as data:
        transitions = {k: data[k] for k in data.files}
    fields = ("observations", "actions", "next_observations", "dones")
    missing = [k for k in fields + ("episode_lengths",) if k not in transitions]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    if len({len(transitions[k]) for k in fields}) != 1 or \
            transitions["episode_lengths"].sum() != len(transitions["actions"]):
        raise ValueError(f"{path}: fields disagree in length")
    return transitions


# ---------------------------------------------------------------------- this project


def gail_config(hp: Hyperparameters, num_envs: int, rounds: int | None = None) -> gail.GAILConfig:
    """This project's :class:`audit.gail.GAILConfig` for ``hp`` with ``num_envs``."""
    if hp.transitions_per_round % num_envs:
        raise HarnessError(f"transitions_per_round {hp.transitions_per_round} is not a "
                           f"multiple of {num_envs} environments")
    return gail.GAILConfig(
        num_envs=num_envs, num_steps=hp.transitions_per_round // num_envs,
        rounds=hp.rounds if rounds is None else rounds,
        ppo=PPOSettings(update_epochs=hp.update_epochs, gamma=hp.gamma,
                        gae_lambda=hp.gae_lambda, clip_eps=hp.clip_eps,
                        entropy_coef=hp.entropy_coef, value_coef=hp.value_coef,
                        max_grad_norm=hp.max_grad_norm, learning_rate=hp.learning_rate,
                        anneal_lr=False),
        minibatch_size=hp.minibatch_size,
        view="transitions", normalize_features=True, reward="gail",
        discriminator_updates=hp.discriminator_updates,
        discriminator_batch=hp.discriminator_batch,
        discriminator_learning_rate=hp.discriminator_learning_rate)


def _module_factories(hp: Hyperparameters, env, env_params):
    size = int(np.prod(env.observation_space(env_params).shape))

    def make_actor(key):
        return MLPPolicy(size, env.num_actions, hp.policy_hidden, hp.policy_activation,
                         rngs=nnx.Rngs(key))

    def make_critic(key):
        return Critic(size, hp.value_hidden, rngs=nnx.Rngs(key))

    def make_discriminator(key, feature_size):
        return StepDiscriminator(feature_size, hp.discriminator_hidden, rngs=nnx.Rngs(key))

    return make_actor, make_critic, make_discriminator


def _environment():
    return gymnax_envs.environment_spec(ENV_NAME).make("train")


def run_project(hp: Hyperparameters, num_envs: int, seeds: int, demos: dict, seed: int,
                eval_episodes: int, log=print) -> dict:
    """Trains ``seeds`` imitators vmapped, each on the full budget, and evaluates them.

    Returns:
      ``transitions`` (all seeds), ``wall_seconds`` (the compiled run, compilation
      excluded), ``compile_seconds``, ``transitions_per_second`` and the same
      including compilation, ``final_return`` (mean over seeds of each seed's mean
      true return over ``eval_episodes`` sampled episodes), ``final_return_min``
      (the worst seed), ``final_returns`` per seed and the return curve.
    """
    env, env_params = _environment()
    config = gail_config(hp, num_envs)
    make_actor, make_critic, make_discriminator = _module_factories(hp, env, env_params)
    train, modules = gail.make_train(config, env, env_params, make_actor, make_critic,
                                     make_discriminator, demos)
    keys = jax.random.split(jax.random.key(seed), seeds)
    started = time.perf_counter()
    compiled = seed_parallel(train).lower(keys).compile()
    compile_seconds = time.perf_counter() - started
    log(f"  project: {seeds} seed(s) x {num_envs} envs compiled in {compile_seconds:.1f} s; "
        f"training {seeds * config.transitions:,} transitions")
    started = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(keys))
    wall = time.perf_counter() - started

    carry0 = initial_carry_of(modules.actor, abstract_module(make_actor)[1])

    def evaluate(actor, key):
        return rollout_split(modules.actor, actor, carry0, env, env_params, key, eval_episodes,
                             int(env_params.max_steps_in_episode)).episode_returns().mean()

    eval_keys = jax.random.split(jax.random.key(seed + 1), seeds)
    returns = np.asarray(jax.jit(jax.vmap(evaluate))(state.actor, eval_keys))
    transitions = seeds * config.transitions
    curve = np.nanmean(np.asarray(metrics["episode_return"]), axis=0)
    return {"transitions": transitions, "wall_seconds": wall,
            "transitions_per_second": transitions / wall,
            "load_average_1min": os.getloadavg()[0],
            "compile_seconds": compile_seconds,
            "transitions_per_second_including_compile": transitions / (wall + compile_seconds),
            "final_return": float(returns.mean()), "final_return_min": float(returns.min()),
            "final_returns": [float(r) for r in returns], "eval_episodes": eval_episodes,
            "seeds": seeds, "num_envs": num_envs, "rounds": config.rounds,
            "training_return_by_round": [None if np.isnan(r) else float(r) for r in curve]}


def measure_scaling(hp: Hyperparameters, num_envs: int, seed_counts, demos: dict,
                    log=print) -> dict:
    """This project's transitions/s for each number of vmapped seeds (one timed round each).

    Returns:
      ``({str(seeds): transitions per second}, conditions)``; compilation is
      excluded; the conditions record the 1-minute load average after each.
    """
    env, env_params = _environment()
    config = gail_config(hp, num_envs, rounds=1)
    train, _ = gail.make_train(config, env, env_params,
                               *_module_factories(hp, env, env_params), demos)
    rates, loads = {}, {}
    for seeds in seed_counts:
        keys = jax.random.split(jax.random.key(seeds), seeds)
        compiled = seed_parallel(train).lower(keys).compile()
        # After one untimed call: a first call pays one-off costs a short run would show.
        seconds = median_seconds(lambda compiled=compiled, keys=keys: compiled(keys), 1)
        rates[str(seeds)] = seeds * config.transitions / seconds
        loads[str(seeds)] = os.getloadavg()[0]
        log(f"  scaling: {seeds:>4} seed(s): {rates[str(seeds)]:>12,.0f} transitions/s")
    return rates, {"num_envs": num_envs, "rounds": 1,
                   "transitions_per_seed": config.transitions,
                   "sharded_over_devices": {str(s): s % len(jax.devices()) == 0
                                            and len(jax.devices()) > 1 for s in seed_counts},
                   "load_average_1min": loads}


def profile_stages(hp: Hyperparameters, num_envs: int, seeds: int, demos: dict,
                   repeats: int = 3) -> tuple[dict, Any]:
    """Seconds per round of each compiled stage, vmapped over ``seeds``.

    Each stage is jitted on its own and timed after a compiling call (median of
    ``repeats``): ``environment`` (``num_steps`` auto-reset steps of every
    environment with random actions), ``policy_forward`` (``num_steps`` policy and
    value evaluations with action draws), ``discriminator_reward`` (scoring the
    round's transitions), ``ppo_update`` and ``discriminator_update``; ``round``
    is the whole fused round, for comparison with their sum.

    Returns:
      ``(profile, context)``: the figures, and what :func:`measure_flops` needs.
    """
    env, env_params = _environment()
    config = gail_config(hp, num_envs, rounds=1)
    stages, _ = gail.make_stages(config, env, env_params,
                                 *_module_factories(hp, env, env_params), demos)
    keys = jax.random.split(jax.random.key(7), seeds)
    state = seed_parallel(stages.init)(keys)
    collected, batch = seed_parallel(stages.collect)(state, keys)
    rewards = seed_parallel(stages.rewards)(collected, batch)

    def environment_only(state, key):
        def step(carry, key):
            env_states, _ = carry
            action_key, step_key = jax.random.split(key)
            actions = jax.random.randint(action_key, (config.num_envs,), 0, env.num_actions)
            obs, env_states, reward, *_ = stages.step_envs(
                jax.random.split(step_key, config.num_envs), env_states, actions, env_params)
            return (env_states, obs), reward
        return jax.lax.scan(step, (state.env_states, state.obs),
                            jax.random.split(key, config.num_steps))

    def policy_only(state, key):
        def step(obs, key):
            action, log_prob, value = stages.act(state.actor, state.critic, obs, key)
            # Feeding the action back keeps each step's input new (nothing to hoist).
            return obs + 1e-6 * action[:, None], (action, log_prob, value)
        return jax.lax.scan(step, state.obs, jax.random.split(key, config.num_steps))

    calls = {
        "environment": (environment_only, (state, keys)),
        "policy_forward": (policy_only, (state, keys)),
        "discriminator_reward": (stages.rewards, (collected, batch)),
        "ppo_update": (stages.ppo_update, (collected, batch, rewards, keys)),
        "discriminator_update": (stages.discriminator_update, (collected, batch, keys)),
        "round": (stages.round, (state, keys)),
    }
    seconds = {}
    for name, (fn, args) in calls.items():
        compiled = seed_parallel(fn).lower(*args).compile()
        seconds[name] = median_seconds(lambda compiled=compiled, args=args: compiled(*args),
                                       repeats)
    parts = {k: v for k, v in seconds.items() if k != "round"}
    total = sum(parts.values())
    profile = {
        "method": "each stage jitted and vmapped on its own, timed after compilation "
                  f"(median of {repeats}); seconds per round of all seeds",
        "seeds": seeds, "num_envs": num_envs, "transitions_per_round": seeds * config.transitions,
        "seconds": seconds,
        "shares": {k: v / total for k, v in parts.items()},
        "sum_of_stages_seconds": total,
        "round_seconds": seconds["round"],
        "load_average_1min": os.getloadavg()[0],
    }
    context = dict(stages=stages, config=config, state=collected, batch=batch,
                   rewards=rewards, seeds=seeds, ppo_seconds=seconds["ppo_update"])
    return profile, context


def _mlp_macs(sizes) -> int:
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))


def measure_flops(hp: Hyperparameters, context: dict, matmul_size: int = 2048,
                  repeats: int = 5) -> dict:
    """The PPO update's achieved FLOP/s against a large matmul's, in this process.

    XLA's cost analysis counts a loop body once, not once per iteration, so the
    PPO update (a scan over epochs and minibatches) is counted as the cost
    analysis of one vmapped minibatch step (loss, gradient, Adam) times the number
    of steps; GAE and the bootstrap value (a few FLOPs per transition) are left out.
    An analytic count (3x the forward MACs x 2) is given as a cross-check.
    """
    stages, config, seeds = context["stages"], context["config"], context["seeds"]
    # On one device: a program compiled for sharded inputs would report one shard's cost.
    one_device = jax.devices()[0]
    state, batch = jax.device_put((context["state"], context["batch"]), one_device)
    size = config.minibatch_size
    obs = batch["obs"]
    minibatch = {
        "obs": obs.reshape(seeds, -1, *obs.shape[3:])[:, :size],
        **{k: batch[k].reshape(seeds, -1)[:, :size] for k in ("action", "log_prob", "value")},
    }
    minibatch["advantage"] = minibatch["value"]
    minibatch["return"] = minibatch["value"]

    def minibatch_step(params, opt_state, minibatch):
        (loss, _), grads = jax.value_and_grad(stages.ppo_loss, has_aux=True)(params, minibatch)
        updates, opt_state = stages.policy_optimizer.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, loss

    lowered = jax.jit(jax.vmap(minibatch_step)).lower(
        (state.actor, state.critic), state.policy_opt, minibatch)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    steps = config.ppo.update_epochs * config.num_minibatches
    step_flops = float(cost["flops"]) if cost and "flops" in cost else None
    forward_macs = (_mlp_macs([4, *hp.policy_hidden, 2]) + _mlp_macs([4, *hp.value_hidden, 1]))
    analytic = 2 * 3 * forward_macs * config.minibatch_size * steps * seeds
    ppo_flops = step_flops * steps if step_flops is not None else analytic

    a = jax.device_put(jnp.ones((matmul_size, matmul_size), jnp.float32), one_device)
    matmul = jax.jit(jnp.matmul).lower(a, a).compile()
    matmul_cost = matmul.cost_analysis()
    matmul_cost = matmul_cost[0] if isinstance(matmul_cost, list) else matmul_cost
    matmul_flops = float(matmul_cost.get("flops", 2 * matmul_size ** 3)) if matmul_cost \
        else 2.0 * matmul_size ** 3
    matmul_seconds = median_seconds(lambda: matmul(a, a), repeats)
    ppo_rate = ppo_flops / context["ppo_seconds"]
    matmul_rate = matmul_flops / matmul_seconds
    return {
        "ppo_update_flops_per_round": ppo_flops,
        "ppo_update_flops_method": ("XLA cost_analysis of one vmapped minibatch step x "
                                    f"{steps} steps" if step_flops is not None
                                    else "analytic (cost_analysis unavailable)"),
        "ppo_update_flops_analytic": float(analytic),
        "ppo_update_seconds_per_round": context["ppo_seconds"],
        "ppo_update_flops_per_second": ppo_rate,
        "matmul_size": matmul_size,
        "matmul_flops": matmul_flops,
        "matmul_seconds": matmul_seconds,
        "matmul_flops_per_second": matmul_rate,
        "ppo_to_matmul_ratio": ppo_rate / matmul_rate,
        "seeds": seeds,
    }


# ----------------------------------------------------------------------- imitation side


def check_imitation(python: Path) -> dict:
    """The ``imitation`` side's versions, or :class:`HarnessError` saying how to install it."""
    how = "\n".join([
        "Install the `imitation` side (the [compare] extra's pins) in a venv of its own:",
        *(f"  {c}" for c in install_commands(python)),
        f"or point --imitation-python at a Python with torch {PINS['torch']} and imitation "
        f"{PINS['imitation']}, or pass --skip-imitation to run this project's side only."])
    if not python.exists():
        raise HarnessError(f"no Python for the `imitation` side at {python}", how)
    result = subprocess.run([str(python), str(SIDE_SCRIPT), "--check"], capture_output=True,
                            text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise HarnessError(f"the `imitation` side at {python} cannot import its packages "
                           f"({last})", how)
    found = json.loads(result.stdout)
    wrong = [f"{name} {found.get(name)} (want {pin})" for name, pin in PINS.items()
             if not str(found.get(name, "")).startswith(pin)]
    if wrong:
        raise HarnessError(f"the `imitation` side at {python} has {', '.join(wrong)}", how)
    return found


def imitation_config(hp: Hyperparameters, num_envs: int, seed: int, eval_episodes: int,
                     threads, log_dir: Path) -> dict:
    """The JSON handed to :mod:`benchmarks.perf._imitation_side`."""
    if hp.transitions_per_round % num_envs:
        raise HarnessError(f"transitions_per_round {hp.transitions_per_round} is not a "
                           f"multiple of {num_envs} environments")
    return {"hyperparameters": dataclasses.asdict(hp), "num_envs": num_envs,
            "num_steps": hp.transitions_per_round // num_envs, "transitions": hp.transitions,
            "seed": seed, "eval_episodes": eval_episodes, "torch_threads": threads,
            "parallel": False, "log_dir": str(log_dir)}


def run_imitation(python: Path, config: dict, demos_path: Path, out_dir: Path, name: str,
                  log=print, calibrate: bool = False) -> dict:
    """Runs the ``imitation`` side in the other venv; its result dict.

    Args:
      python: the other venv's interpreter.
      config: :func:`imitation_config`'s dict.
      demos_path: the demonstrations ``.npz``.
      out_dir: where the config, result and log files go (``imitation_{name}.*``).
      name: the setting's name (or ``threads`` for the calibration).
      log: progress printer.
      calibrate: only choose the torch thread count (the side's ``--calibrate``).

    Returns:
      The side's ``train_and_evaluate`` result, or with ``calibrate`` its
      ``{"threads", "calibration"}``.
    """
    out_dir, demos_path = Path(out_dir).resolve(), Path(demos_path).resolve()
    config_path = out_dir / f"imitation_{name}_config.json"
    result_path = out_dir / f"imitation_{name}.json"
    log_path = out_dir / f"imitation_{name}.log"
    config_path.write_text(json.dumps(config, indent=2))
    if calibrate:
        log(f"  imitation: timing 1 against 2 torch threads ({config['num_envs']} envs)")
    else:
        log(f"  imitation: {config['num_envs']} envs, training {config['transitions']:,} "
            "transitions")
    with open(log_path, "w") as log_file:
        status = subprocess.run(
            [str(python), str(SIDE_SCRIPT), "--demos", str(demos_path), "--config",
             str(config_path), "--out", str(result_path), *(["--calibrate"] * calibrate)],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=str(out_dir)).returncode
    if status != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise HarnessError(f"the `imitation` side failed (exit {status}): {tail[0]} "
                           f"(full log: {log_path})")
    return json.loads(result_path.read_text())


# ------------------------------------------------------------------------------ output


def compare_setting(project: dict, imitation: dict | None, require_return: bool) -> dict:
    """One setting's figures: both sides, both throughput ratios, whether it counts.

    The bar is per imitator: every seed of this side (its worst, ``final_return_min``)
    and the ``imitation`` side's one imitator must reach a mean true return of
    :data:`RETURN_THRESHOLD`.

    Args:
      project: :func:`run_project`'s result.
      imitation: the ``imitation`` side's result, or ``None`` when it was skipped.
      require_return: ``False`` for a quick run, which never counts.

    Returns:
      ``project``, ``imitation``, ``ratio`` (this side's rate without compilation
      over ``imitation``'s), ``ratio_including_compile`` (this side's rate with its
      compilation in the wall time), ``counts``, ``counts_reason``, and
      ``return_reached`` per side with the rule it applied.
    """
    if imitation is None:
        return {"project": project, "imitation": None, "ratio": None,
                "ratio_including_compile": None, "counts": False,
                "counts_reason": "imitation side skipped"}
    rate = imitation["transitions_per_second"]
    ratio = project["transitions_per_second"] / rate
    ratio_including_compile = project["transitions_per_second_including_compile"] / rate
    reached = {"project": project["final_return_min"] >= RETURN_THRESHOLD,
               "imitation": imitation["final_return"] >= RETURN_THRESHOLD,
               "rule": f"every seed here (final_return_min) and the imitator there reach a "
                       f"mean true return >= {RETURN_THRESHOLD:g}"}
    if not require_return:
        reason, counts = "quick run: no return requirement, so it never counts", False
    elif reached["project"] and reached["imitation"]:
        reason, counts = f"every imitator reached final return >= {RETURN_THRESHOLD:g}", True
    else:
        short = []
        if not reached["project"]:
            short.append(f"project's worst seed {project['final_return_min']:.1f} (mean "
                         f"{project['final_return']:.1f})")
        if not reached["imitation"]:
            short.append(f"imitation {imitation['final_return']:.1f}")
        reason = f"{' and '.join(short)} below {RETURN_THRESHOLD:g} final return"
        counts = False
    return {"project": project, "imitation": imitation, "ratio": ratio,
            "ratio_including_compile": ratio_including_compile, "counts": counts,
            "counts_reason": reason, "return_reached": reached}


def target_status(entry: dict, setting: str = "idiomatic") -> dict:
    """Whether a setting meets :data:`TARGET_RATIO`, without and with compilation.

    Args:
      entry: :func:`compare_setting`'s result for ``setting``.
      setting: the setting's name, recorded.

    Returns:
      ``setting``, ``ratio_required``, ``ratio``, ``ratio_including_compile``,
      ``counts``, ``met`` (counts and ``ratio`` reaches the target) and
      ``met_including_compile`` (counts and ``ratio_including_compile`` reaches it).
    """
    def met(ratio):
        return bool(entry["counts"] and ratio is not None and ratio >= TARGET_RATIO)

    return {"setting": setting, "ratio_required": TARGET_RATIO, "ratio": entry["ratio"],
            "ratio_including_compile": entry["ratio_including_compile"],
            "counts": bool(entry["counts"]), "met": met(entry["ratio"]),
            "met_including_compile": met(entry["ratio_including_compile"])}


def target_summary(target: dict) -> str:
    """One line saying whether the target is met, without and with compilation."""
    def part(met, ratio, how):
        shown = "n/a" if ratio is None else f"{ratio:.1f}x"
        return f"{'met' if met else 'not met'} {how} ({shown})"

    without = part(target["met"], target["ratio"], "without compilation")
    including = part(target["met_including_compile"], target["ratio_including_compile"],
                     "including compilation")
    line = f"target {target['ratio_required']:g}x in {target['setting']}: {without}, {including}"
    return line if target["counts"] else line + "; the setting does not count"


def machine_info() -> dict:
    """The machine timed on: platform, CPU, core counts, JAX devices and the load average."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "processor": cpu_model or platform.processor(),
            "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None,
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "load_average_at_start": list(os.getloadavg()),
            "note": "timings taken on a machine shared with other jobs; compare the ratios "
                    "of one run, not absolute figures across runs"}


def project_versions() -> dict:
    """Versions of Python and this side's packages (None for one not installed)."""
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "jax": jax.__version__,
            **{name: version(name) for name in ("jaxlib", "flax", "optax", "gymnax", "numpy",
                                                "imitation-audit")}}


def write_json_atomic(path: Path, data: dict) -> None:
    """Writes ``data`` as JSON to a temporary file beside ``path``, then renames it."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(data, tmp, indent=2, allow_nan=False)
    os.replace(tmp.name, path)


def plot(perf: dict, path: Path) -> None:
    """Throughput bars of both settings (log scale) and the seed-scaling curve, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [s for s in ("matched", "idiomatic") if s in perf]
    width = 0.38
    for offset, side, color in ((-width / 2, "project", "tab:blue"),
                                (width / 2, "imitation", "tab:orange")):
        values = [perf[s][side]["transitions_per_second"] if perf[s][side] else 0.0
                  for s in names]
        label = "imitation-audit (JAX)" if side == "project" else "imitation (PyTorch + SB3)"
        rects = bars.bar(np.arange(len(names)) + offset, values, width, label=label,
                         color=color)
        bars.bar_label(rects, labels=[f"{v:,.0f}" if v else "n/a" for v in values],
                       fontsize=8)
    labels = []
    for name in names:
        ratio = perf[name]["ratio"]
        note = "" if ratio is None else (
            f"\n{ratio:.1f}x ({perf[name]['ratio_including_compile']:.1f}x with compile)"
            + ("" if perf[name]["counts"] else "\n(does not count)"))
        labels.append(name + note)
    bars.set_xticks(np.arange(len(names)), labels)
    bars.set_yscale("log")
    tallest = max((perf[s][side]["transitions_per_second"] for s in names
                   for side in ("project", "imitation") if perf[s][side]), default=1.0)
    bars.set_ylim(top=tallest * 6)  # room for the legend above the bars
    bars.set_ylabel("environment transitions / s")
    bars.set_title("GAIL on CartPole-v1")
    bars.legend(fontsize=8, loc="upper left")
    seeds = sorted(int(s) for s in perf["scaling"])
    rates = [perf["scaling"][str(s)] for s in seeds]
    curve.plot(seeds, rates, "o-", color="tab:blue", label="imitation-audit, vmapped seeds")
    imitation = perf.get("idiomatic", {}).get("imitation")
    if imitation:
        curve.axhline(imitation["transitions_per_second"], color="tab:orange", ls="--",
                      label="imitation (idiomatic)")
    curve.set_xscale("log", base=2)
    curve.set_yscale("log")
    curve.set_xlabel("seeds (vmapped)")
    curve.set_ylabel("environment transitions / s")
    curve.set_title("this project's throughput by seeds")
    curve.legend(fontsize=8)
    figure.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png.tmp", delete=False) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    os.replace(tmp.name, path)


def prepare_out(out: Path, overwrite: bool) -> None:
    """Creates ``out``; refuses an existing non-empty one unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise HarnessError(f"--out {out} already exists and is not empty; pass --overwrite "
                               "to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------ main


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _seed_counts(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers."""
    try:
        return positive_ints(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated positive integers, got {text!r}") from None


def _thread_count(text: str) -> int | str:
    """argparse type: ``auto`` or a positive integer."""
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be auto or a positive integer, got {text!r}") \
            from None


def parse_args(argv=None) -> argparse.Namespace:
    """The command line's options, checked: a bad value exits with one ``error:`` line.

    Args:
      argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
      The namespace; ``scaling_seeds`` is a tuple of ints, ``imitation_threads``
      ``"auto"`` or an int, ``eval_episodes`` filled in.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists")
    parser.add_argument("--quick", action="store_true",
                        help="tiny budgets for a smoke test: no return requirement, so no "
                             "setting counts")
    parser.add_argument("--imitation-python", type=Path, default=DEFAULT_IMITATION_PYTHON,
                        help="the Python of the venv with torch and imitation "
                             f"(default: {DEFAULT_IMITATION_PYTHON.relative_to(ROOT)})")
    parser.add_argument("--skip-imitation", action="store_true",
                        help="run this project's side only (nothing then counts)")
    parser.add_argument("--imitation-threads", type=_thread_count, default="auto",
                        help="torch threads for the imitation side in both settings: auto "
                             "(default: the faster of 1 and 2 on a short calibration run of "
                             "the idiomatic setting, no margin) or a number to force")
    parser.add_argument("--seeds", type=_positive_int, default=None,
                        help="seeds of this project's idiomatic run (default: 16; quick: 4)")
    parser.add_argument("--rounds", type=_positive_int, default=None,
                        help="rounds per imitator (default: 30 of 16384 transitions)")
    parser.add_argument("--scaling-seeds", type=_seed_counts,
                        default=",".join(map(str, SCALING_SEEDS)),
                        help="comma-separated seed counts for the scaling figure")
    parser.add_argument("--eval-episodes", type=_positive_int, default=None,
                        help="true-reward evaluation episodes per imitator (default 64, "
                             "quick 8; at least 32 unless quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.eval_episodes is None:
        args.eval_episodes = 8 if args.quick else 64
    if args.eval_episodes < 32 and not args.quick:
        parser.error("--eval-episodes must be >= 32 (fewer only with --quick)")
    return args


def run(args: argparse.Namespace, log=print) -> dict:
    """The whole comparison; returns what it wrote to ``perf.json``."""
    started = time.perf_counter()
    hp = QUICK if args.quick else Hyperparameters()
    if args.rounds is not None:
        hp = dataclasses.replace(hp, rounds=args.rounds)
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    if args.seeds is not None:
        settings = tuple(dataclasses.replace(s, project_seeds=args.seeds)
                         if s.name == "idiomatic" else s for s in settings)
    devices = use_all_cores()
    imitation_versions = None
    if not args.skip_imitation:
        imitation_versions = check_imitation(args.imitation_python)  # before any long work
    out = args.out.resolve()  # the imitation side runs with its own working directory
    prepare_out(out, args.overwrite)
    machine = machine_info()

    log(f"jax {jax.__version__} on {jax.default_backend()} ({devices} device(s)), "
        f"{os.cpu_count()} CPU(s); "
        f"{hp.transitions:,} transitions per imitator ({hp.rounds} rounds of "
        f"{hp.transitions_per_round:,})")
    demos_path = out / "demonstrations.npz"
    demos = expert_transitions(64 if not args.quick else 8, jax.random.key(args.seed))
    save_demonstrations(demos_path, demos)
    demos = load_demonstrations(demos_path)  # both sides read the same file
    log(f"demonstrations: {len(demos['actions']):,} expert transitions in "
        f"{len(demos['episode_lengths'])} episodes -> {demos_path}")

    perf: dict[str, Any] = {}
    idiomatic = next(s for s in settings if s.name == "idiomatic")
    threads = args.imitation_threads
    if not args.skip_imitation:
        perf["imitation_threads"] = {"requested": threads, "chosen": threads,
                                     "calibration": None,
                                     "applies_to": [s.name for s in settings]}
        if threads == "auto":
            # Calibrated once, on the idiomatic setting; both settings use the choice
            # (their PPO minibatches, where the threads work, are the same).
            calibrated = run_imitation(
                args.imitation_python,
                imitation_config(hp, idiomatic.imitation_envs, args.seed, args.eval_episodes,
                                 "auto", out / "imitation-logs"),
                demos_path, out, "threads", log=log, calibrate=True)
            threads = int(calibrated["threads"])
            perf["imitation_threads"].update(chosen=threads,
                                             calibration=calibrated["calibration"])
            rates = calibrated["calibration"]["transitions_per_second"]
            log("torch threads for imitation: " + str(threads) + " (calibration: " + ", ".join(
                f"{k} thread(s) {v:,.0f} transitions/s" for k, v in rates.items()) + ")")
    for setting in settings:
        log(f"[{setting.name}] {setting.description}")
        project = run_project(hp, setting.project_envs, setting.project_seeds, demos,
                              args.seed, args.eval_episodes, log=log)
        log(f"  project: {project['transitions_per_second']:,.0f} transitions/s "
            f"({project['transitions_per_second_including_compile']:,.0f} including "
            f"compilation), final return {project['final_return']:.1f} (worst seed "
            f"{project['final_return_min']:.1f})")
        imitation = None
        if not args.skip_imitation:
            config = imitation_config(hp, setting.imitation_envs, args.seed,
                                      args.eval_episodes, threads, out / "imitation-logs")
            imitation = run_imitation(args.imitation_python, config, demos_path, out,
                                      setting.name, log=log)
            log(f"  imitation: {imitation['transitions_per_second']:,.0f} transitions/s, "
                f"final return {imitation['final_return']:.1f} "
                f"(torch threads {imitation['torch_threads']})")
        perf[setting.name] = compare_setting(project, imitation, require_return=not args.quick)
        perf[setting.name]["setting"] = dataclasses.asdict(setting)
        entry = perf[setting.name]
        if entry["ratio"] is not None:
            log(f"  ratio {entry['ratio']:.1f}x ({entry['ratio_including_compile']:.1f}x "
                f"including compilation); counts: {entry['counts']} "
                f"({entry['counts_reason']})")

    perf["scaling"], perf["scaling_conditions"] = measure_scaling(
        hp, idiomatic.project_envs, args.scaling_seeds, demos, log=log)
    profile, context = profile_stages(hp, idiomatic.project_envs, idiomatic.project_seeds,
                                      demos)
    perf["profile"] = profile
    log("profile (seconds per round, " + f"{idiomatic.project_seeds} seeds): " + ", ".join(
        f"{k} {v:.3f} ({profile['shares'].get(k, 0):.0%})" if k != "round" else
        f"whole round {v:.3f}" for k, v in profile["seconds"].items()))
    perf["flops"] = measure_flops(hp, context)
    log(f"flops: PPO update {perf['flops']['ppo_update_flops_per_second'] / 1e9:.1f} GFLOP/s, "
        f"matmul {perf['flops']['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s "
        f"({perf['flops']['ppo_to_matmul_ratio']:.0%})")

    perf["target"] = target_status(perf["idiomatic"])
    perf["config"] = {
        "hyperparameters": dataclasses.asdict(hp),
        "transitions_per_imitator": hp.transitions,
        "return_threshold": RETURN_THRESHOLD,
        "return_rule": "every seed of this project (final_return_min) and the imitation "
                       "imitator reach the threshold",
        "eval_episodes": args.eval_episodes,
        "evaluation": "mean true return of sampled (not greedy) actions",
        "settings": [dataclasses.asdict(s) for s in settings],
        "project_gail_config": {s.name: dataclasses.asdict(gail_config(hp, s.project_envs))
                                for s in settings},
        "imitation_arguments": {s: perf[s]["imitation"]["library_arguments"]
                                for s in ("matched", "idiomatic") if perf[s]["imitation"]},
        "tasks": {"project": "gymnax CartPole-v1", "imitation": "gymnasium CartPole-v1"},
        "demonstrations": {"path": str(demos_path), "transitions": int(len(demos["actions"])),
                           "episodes": int(len(demos["episode_lengths"])),
                           "expert": "audit.gymnax_envs.CartPoleExpert (scripted)"},
        "quick": bool(args.quick), "seed": args.seed,
    }
    perf["versions"] = {"project": project_versions(), "imitation": imitation_versions}
    machine["load_average_at_end"] = list(os.getloadavg())
    machine["harness_seconds"] = time.perf_counter() - started
    perf["machine"] = machine
    perf["command"] = getattr(args, "command", None)
    write_json_atomic(out / "perf.json", perf)
    plot(perf, out / "perf.png")
    log(f"wrote {out / 'perf.json'} and {out / 'perf.png'} in "
        f"{machine['harness_seconds']:.0f} s")
    return perf


def format_summary(perf: dict) -> str:
    """The table printed at the end of a run: both settings, both ratios, the target.

    Args:
      perf: :func:`run`'s result.

    Returns:
      The lines, joined: one per setting (rates, ratio, ratio including this side's
      compilation, final returns as worst seed / mean here / there, counts), then
      :func:`target_summary`'s.
    """
    nan = float("nan")
    summary = [f"{'setting':<10} {'project t/s':>12} {'imitation t/s':>14} {'ratio':>7} "
               f"{'w/ compile':>10} {'returns (min/mean/there)':>25} counts"]
    for name in ("matched", "idiomatic"):
        entry = perf[name]
        imitation = entry["imitation"]
        ratio, including = entry["ratio"], entry["ratio_including_compile"]
        returns = (f"{entry['project']['final_return_min']:.1f}/"
                   f"{entry['project']['final_return']:.1f}/"
                   f"{imitation['final_return'] if imitation else nan:.1f}")
        summary.append(
            f"{name:<10} {entry['project']['transitions_per_second']:>12,.0f} "
            f"{imitation['transitions_per_second'] if imitation else nan:>14,.0f} "
            f"{ratio if ratio is not None else nan:>6.1f}x "
            f"{including if including is not None else nan:>9.1f}x "
            f"{returns:>25} {entry['counts']}")
    return "\n".join([*summary, target_summary(perf["target"])])


def main(argv=None) -> int:
    """Runs the comparison from the command line; returns the exit status (2 on a harness error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = " ".join(["python -m benchmarks.perf.compare", *argv])
    try:
        perf = run(args)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        if error.hint:
            print(error.hint, file=sys.stderr)
        return 2
    print(format_summary(perf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
