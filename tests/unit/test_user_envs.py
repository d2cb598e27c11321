"""Users' own Gymnasium envs: ``module:EnvId`` ids and registered ids through make_env, VecEnv and env_signature,
and one sentence for each way such an id can be wrong. The envs live in ``tests/envs_for_tests.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from diffrl.envs import VecEnv, env_signature, make_env
from diffrl.errors import EnvError

TOY = "envs_for_tests:ToyReach-v0"
TESTS_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture
def isolated_imports(monkeypatch):
    """The test's own modules (``diffrl_user_*``), the ids they register and any sys.path change are undone."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    registered = set(gym.registry)
    yield
    for name in [m for m in sys.modules if m.startswith("diffrl_user_")]:
        del sys.modules[name]
    for env_id in set(gym.registry) - registered:
        del gym.registry[env_id]


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(source)


def test_module_id_imports_the_module_and_rescales_its_box_actions_to_unit_bounds():
    # ToyReachEnv.__init__ takes no render_mode, as many users' envs: make_env must not pass render_mode=None
    env = make_env(TOY, seed=0)
    np.testing.assert_array_equal(env.action_space.low, -1.0)
    np.testing.assert_array_equal(env.action_space.high, 1.0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,)
    next_obs, *_ = env.step(np.array([1.0, -1.0], dtype=np.float32))  # +1 is the env's maximum step, 0.2
    expected = np.clip(obs[:2] + np.float32([0.2, -0.2]), -1, 1)
    np.testing.assert_allclose(next_obs[:2], expected, atol=1e-6)


def test_module_id_keeps_the_registered_time_limit_as_truncation():
    env = make_env(TOY, seed=0)
    env.reset(seed=0)
    flags = [env.step(np.zeros(2, dtype=np.float32))[2:4] for _ in range(50)]  # standing still never arrives
    assert flags[-1] == (False, True)  # (terminated, truncated) at step 50
    assert not any(te or tr for te, tr in flags[:-1])


def test_registered_id_without_module_prefix_works_once_the_module_is_imported():
    import envs_for_tests  # noqa: F401  (registers ToyReach-v0)

    env = make_env("ToyReach-v0", seed=0)
    assert env.observation_space.shape == (4,) and env.action_space.shape == (2,)


def test_vec_env_and_env_signature_take_module_ids_and_record_the_full_string():
    venv = VecEnv(TOY, 2, seed=0)
    obs = venv.reset()
    assert obs.shape == (2, 4)
    step = venv.step(np.zeros((2, 2), dtype=np.float32))
    assert step.next_obs.shape == (2, 4)
    signature = env_signature(TOY, venv.envs[0])
    assert signature["env_id"] == TOY  # what eval re-creates the env from
    assert signature["action_space"] == {"type": "Box", "shape": [2], "dtype": "float32"}


def test_discrete_action_user_env_is_refused_with_the_box_actions_sentence():
    with pytest.raises(EnvError) as err:
        make_env("envs_for_tests:ToyDiscrete-v0")
    assert str(err.value) == ("envs_for_tests:ToyDiscrete-v0 has a Discrete action space; diffrl's agents need "
                              "continuous (Box) actions.")


def test_unimportable_module_is_one_sentence_naming_the_module_and_leaves_sys_path_alone(isolated_imports):
    before = list(sys.path)
    with pytest.raises(EnvError) as err:
        make_env("diffrl_user_missing:ToyReach-v0")
    msg = str(err.value)
    assert "there is no module 'diffrl_user_missing'" in msg and msg.endswith(".") and "\n" not in msg
    assert sys.path == before


def test_module_that_registers_nothing_under_the_id_lists_what_it_registers():
    with pytest.raises(EnvError) as err:
        make_env("envs_for_tests:ToyReech-v0")
    msg = str(err.value)
    assert "module 'envs_for_tests' was imported but registers no environment 'ToyReech-v0'" in msg
    assert "it registers ToyReach-v0, ToyDiscrete-v0" in msg


def test_module_that_registers_no_env_at_all_says_so(tmp_path, monkeypatch, isolated_imports):
    write_module(tmp_path, "diffrl_user_empty", "X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EnvError, match="it registers no Gymnasium env at all"):
        make_env("diffrl_user_empty:Nothing-v0")


def test_module_with_a_missing_dependency_names_the_dependency_not_the_module(tmp_path, monkeypatch,
                                                                              isolated_imports):
    write_module(tmp_path, "diffrl_user_needs_dep", "import diffrl_not_installed_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EnvError) as err:
        make_env("diffrl_user_needs_dep:Env-v0")
    assert "needs 'diffrl_not_installed_dep', which is not installed" in str(err.value)


def test_module_raising_at_import_gives_one_sentence_with_the_error(tmp_path, monkeypatch, isolated_imports):
    write_module(tmp_path, "diffrl_user_broken", "raise RuntimeError('bad config line 3')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EnvError) as err:
        make_env("diffrl_user_broken:Env-v0")
    msg = str(err.value)
    assert "raised RuntimeError: bad config line 3" in msg and "\n" not in msg


@pytest.mark.parametrize("env_id", ["envs_for_tests:ToyReach-v0:x", ":ToyReach-v0", "envs_for_tests:"])
def test_malformed_module_id_is_one_sentence(env_id):
    with pytest.raises(EnvError, match="malformed environment id"):
        make_env(env_id)


def test_module_in_the_working_directory_is_found_like_the_console_script_needs(tmp_path, monkeypatch,
                                                                                isolated_imports):
    # the diffrl console script puts .venv/bin first on sys.path, not the working directory
    write_module(tmp_path, "diffrl_user_cwd_env", "import gymnasium as gym\n"
                 "gym.register(id='CwdPendulum-v0', entry_point='gymnasium.envs.classic_control:PendulumEnv',"
                 " max_episode_steps=20)\n")
    monkeypatch.chdir(tmp_path)
    sys.path[:] = [p for p in sys.path if p not in ("", str(tmp_path))]
    env = make_env("diffrl_user_cwd_env:CwdPendulum-v0")
    assert env.action_space.shape == (1,) and sys.path[-1] == str(tmp_path)  # appended: shadows nothing


def test_unknown_plain_id_sentence_now_mentions_the_module_syntax():
    with pytest.raises(EnvError) as err:
        make_env("ToyReachNotRegistered-v0")
    assert "as module:EnvId (e.g. my_envs:MyReach-v0" in str(err.value)


def test_module_id_works_in_a_fresh_process_as_eval_of_a_saved_run_needs():
    script = ("from diffrl.envs import make_env; env = make_env('envs_for_tests:ToyReach-v0', seed=0); "
              "print(env.action_space.shape)")
    done = subprocess.run([sys.executable, "-c", script], cwd=TESTS_DIR, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2,)"
