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
missing or wrong install from a failing run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Run as a script, this file's folder heads sys.path, and its sibling
# ``benchmarks/perf/imitation.py`` would shadow the ``imitation`` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


TWO_THREADS_MARGIN = 1.25


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


def build_trainer(config: dict, demos_path: str, num_steps: int | None = None):
    """``(trainer, learner, venv, arguments)``: imitation's GAIL as its documentation builds it.

    Args:
      config: see :func:`train_and_evaluate`.
      demos_path: the demonstrations ``.npz``.
      num_steps: steps per environment per round (default: the config's).
    """
    import numpy as np
    import torch
    from imitation.algorithms.adversarial.gail import GAIL
    from imitation.rewards.reward_nets import BasicRewardNet
    from imitation.util import logger
    from imitation.util.networks import RunningNorm
    from imitation.util.util import make_vec_env
    from stable_baselines3 import PPO

    hp = config["hyperparameters"]
    seed = int(config["seed"])
    torch.manual_seed(seed)
    activations = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}
    venv = make_vec_env("CartPole-v1", rng=np.random.default_rng(seed),
                        n_envs=int(config["num_envs"]),
                        parallel=bool(config.get("parallel", False)))
    ppo_kwargs = dict(
        learning_rate=hp["learning_rate"], n_steps=int(num_steps or config["num_steps"]),
        batch_size=int(hp["minibatch_size"]), n_epochs=hp["update_epochs"],
        gamma=hp["gamma"], gae_lambda=hp["gae_lambda"], clip_range=hp["clip_eps"],
        clip_range_vf=hp["clip_eps"], ent_coef=hp["entropy_coef"],
        vf_coef=hp["value_coef"], max_grad_norm=hp["max_grad_norm"])
    policy_kwargs = dict(net_arch=dict(pi=list(hp["policy_hidden"]),
                                       vf=list(hp["value_hidden"])),
                         activation_fn=activations[hp["policy_activation"]])
    learner = PPO("MlpPolicy", venv, policy_kwargs=policy_kwargs, seed=seed, device="cpu",
                  verbose=0, **ppo_kwargs)
    reward_net = BasicRewardNet(venv.observation_space, venv.action_space,
                                hid_sizes=tuple(hp["discriminator_hidden"]),
                                activation=activations[hp["discriminator_activation"]],
                                normalize_input_layer=RunningNorm)
    gail_kwargs = dict(demo_batch_size=int(hp["discriminator_batch"]),
                       n_disc_updates_per_round=int(hp["discriminator_updates"]),
                       disc_opt_kwargs={"lr": hp["discriminator_learning_rate"]},
                       allow_variable_horizon=True)
    # No log output formats: printing and CSV writing every discriminator step
    # would count against the library's throughput.
    quiet = logger.configure(folder=config.get("log_dir"), format_strs=[])
    trainer = GAIL(demonstrations=load_transitions(demos_path), venv=venv, gen_algo=learner,
                   reward_net=reward_net, custom_logger=quiet, **gail_kwargs)
    arguments = {"make_vec_env": {"n_envs": int(config["num_envs"]),
                                  "vec_env": type(venv).__name__},
                 "PPO": ppo_kwargs,
                 "policy_kwargs": {"net_arch": policy_kwargs["net_arch"],
                                   "activation_fn": hp["policy_activation"]},
                 "BasicRewardNet": {"hid_sizes": hp["discriminator_hidden"],
                                    "activation": hp["discriminator_activation"],
                                    "normalize_input_layer": "RunningNorm"},
                 "GAIL": gail_kwargs}
    return trainer, learner, venv, arguments


def choose_threads(config: dict, demos_path: str) -> tuple[int, dict]:
    """The torch intra-op thread count (1 or 2) for these small networks, measured.

    On a short GAIL run, two threads are taken only if they are at least
    :data:`TWO_THREADS_MARGIN` times faster than one: when the cores are shared,
    OpenMP threads spin while they wait for each other and two threads have run
    up to 30x slower than one, so a near tie is settled for the robust choice.

    Returns:
      ``(threads, {threads: transitions per second})``.
    """
    import torch

    num_steps = max(16, 1024 // int(config["num_envs"]))
    rates = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        trainer, learner, _, _ = build_trainer(config, demos_path, num_steps=num_steps)
        trainer.train(trainer.gen_train_timesteps)  # warm-up round
        started = time.perf_counter()
        trainer.train(2 * trainer.gen_train_timesteps)
        rates[threads] = 2 * trainer.gen_train_timesteps / (time.perf_counter() - started)
    threads = 2 if rates[2] >= TWO_THREADS_MARGIN * rates[1] else 1
    print(f"torch threads: {threads} (measured transitions/s: {rates})", flush=True)
    return threads, rates


def train_and_evaluate(config: dict, demos_path: str) -> dict:
    """Trains GAIL with ``config`` and evaluates the imitator on the true reward.

    Args:
      config: the harness's settings: ``hyperparameters`` (the matched values,
        including ``minibatch_size``), ``num_envs``, ``num_steps`` (per environment
        per round), ``transitions`` (the budget), ``seed``, ``eval_episodes``,
        ``torch_threads`` (an int, or ``"auto"`` to measure 1 against 2),
        ``parallel`` (SubprocVecEnv instead of DummyVecEnv) and ``log_dir``.
      demos_path: the demonstrations ``.npz``.

    Returns:
      The figures for ``perf.json``: ``transitions`` (the generator's own step
      count), ``wall_seconds`` (the ``train`` call only), ``transitions_per_second``,
      ``final_return`` (mean over ``eval_episodes``), its standard deviation,
      ``generator_seconds`` and ``discriminator_seconds`` (time inside imitation's
      ``train_gen``, i.e. environment, policy, reward and PPO, and ``train_disc``),
      and the exact library arguments used.
    """
    import numpy as np
    import torch
    from imitation.util.util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    threads, thread_rates = config.get("torch_threads", 1), None
    if threads == "auto":
        threads, thread_rates = choose_threads(config, demos_path)
    torch.set_num_threads(int(threads))
    trainer, learner, venv, arguments = build_trainer(config, demos_path)
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
    budget = int(config["transitions"])

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
        "final_return": float(np.mean(returns)),
        "final_return_std": float(np.std(returns)),
        "eval_episodes": len(returns),
        "rounds": budget // trainer.gen_train_timesteps,
        **stage_seconds,
        "torch_threads": int(threads),
        "load_average_1min": os.getloadavg()[0],
        "thread_calibration": None if thread_rates is None else {
            str(k): v for k, v in thread_rates.items()},
        "library_arguments": arguments,
        "versions": versions(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the versions and exit")
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
    result = train_and_evaluate(config, args.demos)
    partial = args.out + ".partial"
    with open(partial, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(partial, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
