"""The `imitation` library's side of ``benchmarks.perf.compare`` (runs in its own venv).

    <imitation venv>/bin/python benchmarks/perf/_imitation_side.py \
        --demos DEMOS.npz --config CONFIG.json --out RESULT.json

This file imports nothing from this project (the other venv has neither JAX nor
the project installed) and only numpy, torch, gymnasium, stable-baselines3 and
imitation. It trains GAIL on gymnasium ``CartPole-v1`` as imitation's own
documentation does it (``make_vec_env`` + ``stable_baselines3.PPO`` as the
generator + ``BasicRewardNet`` with a ``RunningNorm`` input layer as the
discriminator + ``GAIL(...).train(total_timesteps)``), with the hyperparameters
the harness hands it in ``CONFIG.json``, times the training call alone, then
evaluates the trained policy on the true reward and writes ``RESULT.json``.

``--check`` only prints the versions as JSON (the harness uses it to tell a
missing or wrong install from a failing run); ``--calibrate`` only measures one
against two torch threads (:func:`choose_threads`) and writes the choice to ``--out``.

The keyword arguments handed to the libraries come from :func:`library_arguments`,
a pure function of ``CONFIG.json`` that imports nothing, so the project's tests
check them against the project's own configuration without torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__":
    # Run as a script, this file's folder heads sys.path, and its sibling
    # ``benchmarks/perf/imitation.py`` would shadow the ``imitation`` package.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


ACTIVATIONS = ("tanh", "relu")
CALIBRATION_TRANSITIONS = 1024  # per round of a thread-calibration run
CALIBRATION_REPEATS = 3
_HYPERPARAMETERS = ("learning_rate", "update_epochs", "minibatch_size", "gamma", "gae_lambda",
                    "clip_eps", "entropy_coef", "value_coef", "max_grad_norm", "policy_hidden",
                    "value_hidden", "policy_activation", "discriminator_hidden",
                    "discriminator_activation", "discriminator_batch",
                    "discriminator_updates", "discriminator_learning_rate")


def versions() -> dict:
    """Versions of the packages this side runs on (imports them, so it fails when missing)."""
    import gymnasium
    import imitation
    import numpy
    import stable_baselines3
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "imitation": imitation.__version__,
            "stable_baselines3": stable_baselines3.__version__,
            "gymnasium": gymnasium.__version__, "numpy": numpy.__version__}


def load_transitions(path: str):
    """The demonstrations ``.npz`` the harness wrote, as ``imitation.data.types.Transitions``.

    Args:
      path: an ``.npz`` with ``observations [N, 4]``, ``actions [N]``,
        ``next_observations [N, 4]`` and ``dones [N]`` (no pickled objects).

    Returns:
      ``Transitions`` over the ``N`` demonstrated steps.
    """
    import numpy as np
    from imitation.data import types

    with np.load(path, allow_pickle=False) as data:
        obs = data["observations"].astype(np.float32)
        return types.Transitions(
            obs=obs, acts=data["actions"].astype(np.int64),
            infos=np.array([{}] * len(obs)),
            next_obs=data["next_observations"].astype(np.float32),
            dones=data["dones"].astype(bool))


def library_arguments(config: dict, num_steps: int | None = None) -> dict:
    """The keyword arguments imitation's GAIL example gets, from the harness config (pure).

    Imports nothing: activations and the input normalisation are named, and
    :func:`build_trainer` maps the names to torch classes. ``PPO`` gets one
    round's ``n_steps`` per environment, so ``n_steps * n_envs`` is the round's
    transitions; ``train.total_timesteps`` is the budget handed to ``GAIL.train``.

    Args:
      config: the harness's config (see :func:`train_and_evaluate`); reads
        ``hyperparameters``, ``num_envs``, ``num_steps``, ``transitions`` and
        ``parallel``.
      num_steps: steps per environment per round (default: the config's).

    Returns:
      ``{"make_vec_env", "PPO", "policy_kwargs", "BasicRewardNet", "GAIL", "train"}``:
      one dict of keyword arguments each.

    Raises:
      ValueError: if the config lacks a field or names an unknown activation.
    """
    missing = [k for k in ("hyperparameters", "num_envs", "num_steps", "transitions")
               if k not in config]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)}")
    hp = config["hyperparameters"]
    missing = [k for k in _HYPERPARAMETERS if k not in hp]
    if missing:
        raise ValueError(f"config['hyperparameters'] lacks {', '.join(missing)}")
    for name in ("policy_activation", "discriminator_activation"):
        if hp[name] not in ACTIVATIONS:
            raise ValueError(f"config['hyperparameters']['{name}'] must be one of "
                             f"{', '.join(ACTIVATIONS)}, got {hp[name]!r}")
    return {
        "make_vec_env": {"env_name": "CartPole-v1", "n_envs": int(config["num_envs"]),
                         "parallel": bool(config.get("parallel", False))},
        "PPO": {"learning_rate": hp["learning_rate"],
                "n_steps": int(num_steps or config["num_steps"]),
                "batch_size": int(hp["minibatch_size"]), "n_epochs": int(hp["update_epochs"]),
                "gamma": hp["gamma"], "gae_lambda": hp["gae_lambda"],
                "clip_range": hp["clip_eps"], "clip_range_vf": hp["clip_eps"],
                "ent_coef": hp["entropy_coef"], "vf_coef": hp["value_coef"],
                "max_grad_norm": hp["max_grad_norm"]},
        "policy_kwargs": {"net_arch": {"pi": [int(n) for n in hp["policy_hidden"]],
                                       "vf": [int(n) for n in hp["value_hidden"]]},
                          "activation_fn": hp["policy_activation"]},
        "BasicRewardNet": {"hid_sizes": tuple(int(n) for n in hp["discriminator_hidden"]),
                           "activation": hp["discriminator_activation"],
                           "normalize_input_layer": "RunningNorm"},
        "GAIL": {"demo_batch_size": int(hp["discriminator_batch"]),
                 "n_disc_updates_per_round": int(hp["discriminator_updates"]),
                 "disc_opt_kwargs": {"lr": hp["discriminator_learning_rate"]},
                 "allow_variable_horizon": True},
        "train": {"total_timesteps": int(config["transitions"])},
    }


def build_trainer(config: dict, demos_path: str, num_steps: int | None = None):
    """``(trainer, learner, venv, arguments)``: imitation's GAIL as its documentation builds it.

    Args:
      config: see :func:`train_and_evaluate`.
      demos_path: the demonstrations ``.npz``.
      num_steps: steps per environment per round (default: the config's).

    Returns:
      The ``GAIL`` trainer, its SB3 ``PPO`` learner, the vectorised environment and
      :func:`library_arguments`'s dict (with the ``VecEnv`` class's name added).
    """
    import numpy as np
    import torch
    from imitation.algorithms.adversarial.gail import GAIL
    from imitation.rewards.reward_nets import BasicRewardNet
    from imitation.util import logger
    from imitation.util.networks import RunningNorm
    from imitation.util.util import make_vec_env
    from stable_baselines3 import PPO

    arguments = library_arguments(config, num_steps)
    seed = int(config["seed"])
    torch.manual_seed(seed)
    activations = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}
    venv = make_vec_env(rng=np.random.default_rng(seed), **arguments["make_vec_env"])
    arguments["make_vec_env"]["vec_env"] = type(venv).__name__
    policy = arguments["policy_kwargs"]
    learner = PPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0,
                  policy_kwargs={"net_arch": policy["net_arch"],
                                 "activation_fn": activations[policy["activation_fn"]]},
                  **arguments["PPO"])
    reward = arguments["BasicRewardNet"]
    reward_net = BasicRewardNet(venv.observation_space, venv.action_space,
                                hid_sizes=reward["hid_sizes"],
                                activation=activations[reward["activation"]],
                                normalize_input_layer=RunningNorm)
    # No log output formats: printing and CSV writing every discriminator step
    # would count against the library's throughput.
    quiet = logger.configure(folder=config.get("log_dir"), format_strs=[])
    trainer = GAIL(demonstrations=load_transitions(demos_path), venv=venv, gen_algo=learner,
                   reward_net=reward_net, custom_logger=quiet, **arguments["GAIL"])
    return trainer, learner, venv, arguments


def faster_thread_count(rates: dict) -> int:
    """The thread count with the highest measured rate; a tie goes to fewer threads.

    Args:
      rates: ``{threads: transitions per second}``.

    Returns:
      The key of the largest rate (no margin).

    Raises:
      ValueError: if ``rates`` is empty.
    """
    if not rates:
        raise ValueError("rates is empty")
    return min(rates, key=lambda threads: (-rates[threads], threads))


def choose_threads(config: dict, demos_path: str,
                   repeats: int = CALIBRATION_REPEATS) -> tuple[int, dict]:
    """The faster torch intra-op thread count, 1 or 2, measured on short GAIL runs.

    One trainer per count (rounds of about :data:`CALIBRATION_TRANSITIONS`
    transitions, otherwise ``config``'s), each warmed up by one round; then
    ``repeats`` timed runs of two rounds each, the counts interleaved (in
    alternating order) so that a change of load hits both. The count with the
    higher median rate wins, with no margin (:func:`faster_thread_count`).

    Args:
      config: see :func:`train_and_evaluate`.
      demos_path: the demonstrations ``.npz``.
      repeats: timed runs per count.

    Returns:
      ``(threads, calibration)``: ``calibration`` holds ``seconds`` (each count's
      timed runs), ``transitions_per_second`` (from their medians),
      ``transitions_per_run``, ``num_envs``, ``num_steps``, ``chosen`` and ``method``.
    """
    import statistics

    import torch

    num_envs = int(config["num_envs"])
    num_steps = max(16, CALIBRATION_TRANSITIONS // num_envs)
    trainers = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        trainer = build_trainer(config, demos_path, num_steps=num_steps)[0]
        trainer.train(trainer.gen_train_timesteps)  # warm-up round
        trainers[threads] = trainer
    per_run = 2 * num_envs * num_steps
    seconds = {threads: [] for threads in trainers}
    for repeat in range(repeats):
        for threads in ((1, 2) if repeat % 2 == 0 else (2, 1)):
            torch.set_num_threads(threads)
            started = time.perf_counter()
            trainers[threads].train(per_run)
            seconds[threads].append(time.perf_counter() - started)
    rates = {threads: per_run / statistics.median(s) for threads, s in seconds.items()}
    threads = faster_thread_count(rates)
    print(f"torch threads: {threads} (median transitions/s: {rates})", flush=True)
    return threads, {
        "method": f"median of {repeats} interleaved runs of 2 rounds per count after a "
                  "warm-up round; the faster count wins, no margin",
        "num_envs": num_envs, "num_steps": num_steps, "transitions_per_run": per_run,
        "seconds": {str(k): v for k, v in seconds.items()},
        "transitions_per_second": {str(k): v for k, v in rates.items()},
        "chosen": threads}


def train_and_evaluate(config: dict, demos_path: str) -> dict:
    """Trains GAIL with ``config`` and evaluates the imitator on the true reward.

    Args:
      config: the harness's settings: ``hyperparameters`` (the matched values,
        including ``minibatch_size``), ``num_envs``, ``num_steps`` (per environment
        per round), ``transitions`` (the budget), ``seed``, ``eval_episodes``,
        ``torch_threads`` (an int, or ``"auto"`` for :func:`choose_threads`),
        ``parallel`` (SubprocVecEnv instead of DummyVecEnv) and ``log_dir``.
      demos_path: the demonstrations ``.npz``.

    Returns:
      The figures for ``perf.json``: ``transitions`` (the generator's own step
      count), ``wall_seconds`` (the ``train`` call only), ``transitions_per_second``,
      ``setup_seconds`` (building the trainer, not in the rate; there is nothing to
      compile), ``final_return`` (mean over ``eval_episodes``), its standard deviation,
      ``generator_seconds`` and ``discriminator_seconds`` (time inside imitation's
      ``train_gen``, i.e. environment, policy, reward and PPO, and ``train_disc``),
      ``torch_threads``, ``thread_calibration`` (:func:`choose_threads`'s record when
      ``"auto"``, else ``None``) and the exact library arguments used.
    """
    import numpy as np
    import torch
    from imitation.util.util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    threads, calibration = config.get("torch_threads", 1), None
    if threads == "auto":
        threads, calibration = choose_threads(config, demos_path)
    torch.set_num_threads(int(threads))
    started = time.perf_counter()
    trainer, learner, venv, arguments = build_trainer(config, demos_path)
    setup = time.perf_counter() - started
    stage_seconds = {"generator_seconds": 0.0, "discriminator_seconds": 0.0}

    def timed(method, name):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                stage_seconds[name] += time.perf_counter() - started
        return wrapper

    # Instance attributes shadow the methods: timers around the library's own stages.
    trainer.train_gen = timed(trainer.train_gen, "generator_seconds")
    trainer.train_disc = timed(trainer.train_disc, "discriminator_seconds")
    budget = arguments["train"]["total_timesteps"]

    started = time.perf_counter()
    trainer.train(budget)
    wall = time.perf_counter() - started
    transitions = int(learner.num_timesteps)  # counted by SB3, one per environment step

    eval_env = make_vec_env("CartPole-v1", rng=np.random.default_rng(int(config["seed"]) + 1),
                            n_envs=8)
    returns, _ = evaluate_policy(learner.policy, eval_env, n_eval_episodes=int(
        config["eval_episodes"]), deterministic=False, return_episode_rewards=True)
    return {
        "transitions": transitions,
        "wall_seconds": wall,
        "transitions_per_second": transitions / wall,
        "setup_seconds": setup,
        "final_return": float(np.mean(returns)),
        "final_return_std": float(np.std(returns)),
        "eval_episodes": len(returns),
        "rounds": budget // trainer.gen_train_timesteps,
        **stage_seconds,
        "torch_threads": int(threads),
        "load_average_1min": os.getloadavg()[0],
        "thread_calibration": calibration,
        "library_arguments": arguments,
        "versions": versions(),
    }


def main(argv=None) -> int:
    """Runs the command line (see the module docstring); returns the exit status, 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the versions and exit")
    parser.add_argument("--calibrate", action="store_true",
                        help="only choose the torch thread count (choose_threads) and write "
                             "{threads, calibration} to --out")
    parser.add_argument("--demos")
    parser.add_argument("--config")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.check:
        print(json.dumps(versions()))
        return 0
    if not (args.demos and args.config and args.out):
        parser.error("--demos, --config and --out are required (or --check)")
    with open(args.config) as f:
        config = json.load(f)
    if args.calibrate:
        threads, calibration = choose_threads(config, args.demos)
        result = {"threads": threads, "calibration": calibration}
    else:
        result = train_and_evaluate(config, args.demos)
    partial = args.out + ".partial"
    with open(partial, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(partial, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
