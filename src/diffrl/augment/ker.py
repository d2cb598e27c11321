"""KER: kaleidoscope experience replay (ITER, Lin et al.), reflections of whole Fetch episodes through vertical planes.

Shapes: ``N`` episodes, ``T`` steps, ``Do`` obs (25, or 10 for Reach), ``Dg = 3`` goal, ``Da = 4`` action dims::

    obs (N, T+1, Do)   ag (N, T+1, 3)   g (N, T, 3)   act (N, T, 4)

A reflection is a 3x3 matrix ``M`` (orthogonal, det -1) and a pivot ``p``. A vertical plane through ``p`` that
contains the direction ``(cos theta, sin theta, 0)`` has ``M = [[cos 2t, sin 2t, 0], [sin 2t, -cos 2t, 0], [0, 0, 1]]``
(``theta = 0`` is the plane ``y = p_y``). Under it:

- positions ``x' = M (x - p) + p``; displacements and velocities ``v' = M v``;
- rotation matrices ``R' = M R M`` (a proper rotation again; Euler angles go through mat -> Euler);
- angular velocities are pseudovectors: ``w' = det(M) M w = -M w``;
- the two finger joints swap (``gripper_state``, ``gripper_vel``): the right finger sits on the gripper's +y side
  and the left on its -y side with mirrored joint axes (``robot.xml``), and the gripper's y axis is world y, so a
  mirror exchanges them (``gripper_state = (q_r, q_l)``). ITER keeps them in place; in the simulator, swapping cut
  the y-mirrored Push episodes' finger-velocity error from up to 16.8 to 1.1 mm per step and the gripper's from
  0.79 to 0.22 mm (``tests/unit/test_ker_ger.py``). Under rotated planes the env's gripper cannot turn with the
  mirror, so there (as for its contacts) the swap is approximate.

Fetch v4 observation layouts, read from gymnasium_robotics 1.4 ``envs/fetch/fetch_env.py``
(``MujocoFetchEnv.generate_mujoco_observations`` and ``BaseFetchEnv._get_obs``): with an object (Push, Slide,
PickAndPlace) ``grip_pos[0:3] object_pos[3:6] object_rel_pos[6:9] gripper_state[9:11] object_rot[11:14]
object_velp[14:17] object_velr[17:20] grip_velp[20:23] gripper_vel[23:25]``, where ``object_rel_pos = object -
grip``, ``object_rot = rotations.mat2euler(site_xmat)`` (MuJoCo's xyz Euler convention), ``object_velp`` is the
object's velocity minus the gripper's, and every velocity is multiplied by ``dt = 0.04``. Without an object (Reach)
the object parts are empty: ``grip_pos[0:3] gripper_state[3:5] grip_velp[5:8] gripper_vel[8:10]``. The achieved goal
is ``object_pos`` (or ``grip_pos`` for Reach); actions are mocap displacements ``(dx, dy, dz)`` in world axes plus a
gripper command (``_set_action``).

Geometry check (v4)
-------------------
Read from gymnasium_robotics 1.4.2 (``envs/assets/fetch/{push,slide,reach,pick_and_place,robot}.xml`` and the env
constructors) and measured in the simulator (``make_env(id, seed=0)``, 300 seeded resets each):

- Robot base (``robot0:base_link``: body at (0.2869, 0.2641) plus the ``slide0/slide1`` initial qpos): Push and
  PickAndPlace (0.6919, 0.7441), Reach (0.6918, 0.7441), Slide (0.3369, 0.7441). ITER's pivots (0.695, 0.75) and
  (0.34, 0.75) are these bases to within 3 mm in x and 6 mm in y.
- Gripper after reset (``robot0:grip``, the same after every reset): Push (1.3630, 0.74910, 0.4160), PickAndPlace
  and Reach (1.3419, 0.74910, 0.5347), Slide (1.0131, 0.74915, 0.4155): 0.9 mm from the mirror plane y = 0.75.
- Tables: Push, PickAndPlace and Reach centre (1.30, 0.75), half sizes (0.25, 0.35), top at z = 0.40, so
  x in [1.05, 1.55], y in [0.40, 1.10]. Slide centre (1.3244, 0.7502), half sizes (0.625, 0.45): x in
  [0.6994, 1.9494], y in [0.3002, 1.2002]. Both are centred on y = 0.75 (Slide's within 0.2 mm).
- Sampling (``_reset_sim`` / ``_sample_goal``): object xy = gripper xy + U(-obj_range, obj_range), at least 0.1 from
  the gripper; goal = gripper + target_offset + U(-target_range, target_range). Push/PickAndPlace: obj_range =
  target_range = 0.15, so x in [1.213, 1.513], y in [0.599, 0.899] (goal z = 0.4249, table height; PickAndPlace
  lifts half of the goals by U(0, 0.45)). Slide: obj_range 0.1 (x in [0.913, 1.113], y in [0.649, 0.849]),
  target_offset (0.4, 0, 0), target_range 0.3 (goal x in [1.113, 1.713], y in [0.449, 1.049]). Reach: goal =
  gripper + U(-0.15, 0.15)^3.
- The y = 0.75 mirror: every sampling region is centred on y = 0.7491, so mirrored starts and goals lie in the
  region shifted by 1.8 mm and always on the table.
- Rotated planes: they move starts and goals sideways (the gripper start goes to y = 0.847 for theta = 0.072 and
  0.941 for theta = 0.1443 on Push; 0.798 / 0.844 for Slide's 0.035 / 0.0697), so 38 % of reflected Push object
  starts leave the env's sampling square. With theta ~ U(0, max) as here, 0.13 % of reflected Push object starts
  and 0.08 % of goals land beyond the table edge (2.4 % / 1.6 % at theta = 0.1443; the first grid angle with any
  is 0.13 rad). On Slide no object start and 0.11 % of goals (1.5 % at 0.0697) land beyond the edge (first at
  0.06 rad). These rare episodes are kept, as in ITER.
- Reach: not in ITER's code. It shares Push's robot base, gripper start x (with PickAndPlace) and target range,
  and its goals float in the air (no table edge to respect), so it uses Push's pivot and max angle.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from diffrl.data.episodes import EPISODE_KEYS
from diffrl.envs.make import import_robotics
from diffrl.errors import ConfigError, DatasetError

SUPPORTED_IDS = ("FetchReach", "FetchPush", "FetchSlide", "FetchPickAndPlace")
"""Fetch tasks KER and GER know, each also as ``<name>Dense``, at version v4 or later (e.g. ``FetchPush-v4``)."""
_FETCH_ID = re.compile(r"^Fetch(Reach|Push|Slide|PickAndPlace)(Dense)?-v(\d+)$")

MIRROR_Y = 0.75
"""the fixed mirror plane y = 0.75 (ITER's ``SYM_PLANE_Y = 1.5`` is twice it): the tables' centre line"""

# (start, stop, kind) per observation size; layouts from fetch_env.py (module docstring).
_OBS_LAYOUTS: dict[int, tuple[tuple[int, int, str], ...]] = {
    25: ((0, 3, "pos"), (3, 6, "pos"), (6, 9, "vec"), (9, 11, "swap"), (11, 14, "euler"), (14, 17, "vec"),
         (17, 20, "axial"), (20, 23, "vec"), (23, 25, "swap")),
    10: ((0, 3, "pos"), (3, 5, "swap"), (5, 8, "vec"), (8, 10, "swap")),
}


@dataclasses.dataclass(frozen=True)
class KerGeometry:
    """The task geometry KER uses (log it with ``dataclasses.asdict``)."""

    env_id: str
    task: str
    """Reach, Push, Slide or PickAndPlace"""
    pivot: tuple[float, float]
    """(x, y) of the vertical axis the rotated planes turn about: ITER's robot base position"""
    max_z_theta: float
    """rotated planes use theta ~ U(0, max_z_theta) (rad)"""
    mirror_y: float = MIRROR_Y
    """every episode is finally mirrored through the plane y = mirror_y"""
    obs_dim: int = 25
    """observation size of the task (10 for Reach)"""


# ITER's ker_learning_method.py values (v1 geometry; checked against v4 in the module docstring).
_GEOMETRY = {
    "Push": ((0.695, 0.75), 0.1443),
    "PickAndPlace": ((0.695, 0.75), 0.1443),
    "Slide": ((0.34, 0.75), 0.0697),
    "Reach": ((0.695, 0.75), 0.1443),  # ours: ITER has no Reach; same robot base and target range as Push
}


def fetch_task(env_id: str) -> str:
    """The Fetch task name (``Reach``, ``Push``, ``Slide`` or ``PickAndPlace``) of a KER/GER-supported env id.

    Raises:
        ConfigError (a ValueError): for any other id; ITER silently did nothing (GER) or crashed (KER) there.
    """
    m = _FETCH_ID.match(env_id)
    if m is None or int(m.group(3)) < 4:
        raise ConfigError(f"KER/GER support only the Gymnasium-Robotics Fetch tasks {', '.join(SUPPORTED_IDS)} "
                          f"(also *Dense), version v4 or later (e.g. FetchPush-v4); got {env_id!r}.")
    return m.group(1)


def ker_geometry(env_id: str) -> KerGeometry:
    """Pivot, maximum plane angle and mirror plane that KER uses for ``env_id``."""
    task = fetch_task(env_id)
    pivot, max_theta = _GEOMETRY[task]
    return KerGeometry(env_id=env_id, task=task, pivot=pivot, max_z_theta=max_theta,
                       obs_dim=10 if task == "Reach" else 25)


def plane_reflection(theta: float | np.ndarray) -> np.ndarray:
    """Reflection matrices ``(..., 3, 3)`` through vertical planes containing the direction ``(cos, sin, 0)(theta)``.

    ``theta = 0`` is the plane ``y = const``: ``diag(1, -1, 1)``.
    """
    c, s = np.cos(2 * np.asarray(theta, dtype=np.float64)), np.sin(2 * np.asarray(theta, dtype=np.float64))
    M = np.zeros(c.shape + (3, 3))
    M[..., 0, 0], M[..., 0, 1], M[..., 1, 0], M[..., 1, 1], M[..., 2, 2] = c, s, s, -c, 1.0
    return M


def reflect_episodes(episodes: Mapping[str, np.ndarray], M: np.ndarray, p: np.ndarray | tuple[float, ...],
                     task: str | None = None) -> dict[str, np.ndarray]:
    """Reflect Fetch episodes: ``x' = M (x - p) + p`` for positions, the rules of the module docstring for the rest.

    Args:
        episodes: ``obs, ag, g, act`` (layout in the module docstring); other keys are not returned (the rewards of
            a reflected episode equal the original's, as reflections keep distances).
        M: a reflection ``(3, 3)`` shared by all episodes, or one per episode ``(N, 3, 3)``.
        p: the pivot, ``(x, y)`` or ``(x, y, z)`` (z is irrelevant for vertical planes), shared or ``(N, 2|3)``.
        task: if given (``Push``, ``Reach``, ...), the observation size is checked against it.
    Returns:
        A new dict with the same keys and dtypes as the four inputs.
    """
    obs = np.asarray(episodes["obs"])
    n, do = obs.shape[0], obs.shape[-1]
    if do not in _OBS_LAYOUTS:
        raise DatasetError(f"KER knows Fetch observations of size 25 (Push, Slide, PickAndPlace) and 10 (Reach); "
                           f"got obs of shape {obs.shape}.")
    if task is not None and do != (10 if task == "Reach" else 25):
        raise DatasetError(f"Fetch{task} observations have size {10 if task == 'Reach' else 25}, these have {do}.")
    M = np.broadcast_to(np.asarray(M, dtype=np.float64), (n, 3, 3))
    if not (np.allclose(M @ M.transpose(0, 2, 1), np.eye(3), atol=1e-6) and np.allclose(np.linalg.det(M), -1.0)):
        raise ValueError("M must be a reflection (orthogonal, det -1), e.g. plane_reflection(theta).")
    p = np.asarray(p, dtype=np.float64)
    if p.shape[-1] == 2:
        p = np.concatenate([p, np.zeros(p.shape[:-1] + (1,))], axis=-1)
    p = np.broadcast_to(p, (n, 3))[:, None, :]  # (N, 1, 3)

    def vec(v: np.ndarray) -> np.ndarray:  # (N, L, 3) -> (N, L, 3)
        return np.einsum("nij,nlj->nli", M, v)

    def pos(x: np.ndarray) -> np.ndarray:
        return vec(x - p) + p

    def euler(e: np.ndarray) -> np.ndarray:  # R' = M R M, through matrices (ITER negated Euler x, z for theta = 0)
        rotations = import_robotics("KER").utils.rotations
        R = rotations.euler2mat(e)  # (N, L, 3, 3)
        return rotations.mat2euler(np.einsum("nij,nljk,nkm->nlim", M, R, M))

    rules = {"pos": pos, "vec": vec, "euler": euler, "axial": lambda w: -vec(w), "swap": lambda f: f[..., ::-1]}
    out_obs = obs.astype(np.float64)  # a copy
    for start, stop, kind in _OBS_LAYOUTS[do]:
        # Relative parts (object_rel_pos, object_velp) are differences, so M v equals ITER's absolute/relative
        # round trip exactly. object_velr is a pseudovector: w' = det(M) M w = -M w exactly; ITER treated it like
        # Euler angles under rotated planes (an approximation, exact only for theta = 0).
        out_obs[..., start:stop] = rules[kind](out_obs[..., start:stop])
    act = np.asarray(episodes["act"])
    out_act = act.astype(np.float64)
    # A reflected (dx, dy, dz) keeps its norm but can leave the [-1, 1] box under a rotated plane: clip it, as the
    # env would (the gripper command, index 3, is unchanged).
    out_act[..., :3] = np.clip(vec(out_act[..., :3]), -1.0, 1.0)
    ag, g = np.asarray(episodes["ag"]), np.asarray(episodes["g"])
    return {"obs": out_obs.astype(obs.dtype), "ag": pos(ag.astype(np.float64)).astype(ag.dtype),
            "g": pos(g.astype(np.float64)).astype(g.dtype), "act": out_act.astype(act.dtype)}


def ker_augment(episodes: Mapping[str, np.ndarray], n_ker: int, rng: np.random.Generator,
                env_id: str) -> dict[str, np.ndarray]:
    """KER: each episode, its reflections through ``n_ker - 1`` rotated planes, and the y-mirrors of all of those.

    For each episode, ``n_ker - 1`` angles ``theta ~ U(0, max_z_theta)`` are drawn; the episode is reflected through
    the vertical plane through the pivot at each angle, then the original and these ``n_ker - 1`` reflections are
    all mirrored through ``y = 0.75`` (:func:`ker_geometry` gives the numbers).

    Args:
        episodes: ``N`` episodes (``obs, ag, g, act``; other keys are dropped).
        n_ker: ITER's ``n_KER``; 0 returns the episodes unchanged, 1 adds only the y-mirror.
        rng: source of the angles.
        env_id: a Fetch v4 id (``FetchPush-v4``, ...); others raise ``ConfigError`` (a ValueError).
    Returns:
        ``2 * n_ker * N`` episodes (``N`` if ``n_ker = 0``) in blocks of ``N``: block 0 is the input unchanged,
        blocks ``1 .. n_ker-1`` the rotated reflections, block ``n_ker + k`` the y-mirror of block ``k``.
    """
    geo = ker_geometry(env_id)
    if n_ker < 0:
        raise ConfigError(f"n_ker must be >= 0 (0 disables KER), got {n_ker}.")
    missing = [k for k in EPISODE_KEYS if k not in episodes]
    if missing:
        raise DatasetError(f"KER needs episodes with keys {', '.join(EPISODE_KEYS)}; missing {', '.join(missing)}.")
    orig = {k: np.array(episodes[k]) for k in EPISODE_KEYS}  # copies
    if n_ker == 0:
        return orig
    n = orig["obs"].shape[0]
    thetas = rng.uniform(0.0, geo.max_z_theta, size=(n_ker - 1, n))  # one angle per episode and plane (ITER)
    blocks = [orig] + [reflect_episodes(orig, plane_reflection(th), geo.pivot, geo.task) for th in thetas]
    blocks += [reflect_episodes(b, plane_reflection(0.0), (0.0, geo.mirror_y), geo.task) for b in blocks]
    return {k: np.concatenate([b[k] for b in blocks], axis=0) for k in EPISODE_KEYS}
