"""The driving prompt the VLM sees for a trajectory sample (ReCogDrive's backbone input, DESIGN §5, seed 000/004).

Upstream feeds InternVL, with the `internvl2_5` template, a driving system message, the front-camera image, the
last 4 ego poses as text and the navigation command; the planner is conditioned on the last hidden states of that
prompt. The `cache` stage builds exactly this prompt for every synthetic-world scene, and the synthetic QA data
can use the same question so that SFT teaches the model the prompt it is later cached on.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from recogdrive_jax.data.template import chat_prompt

DRIVING_SYSTEM = (
    "You are a vehicle trajectory prediction model for autonomous driving. Your task is to predict the ego "
    "vehicle's 4-second trajectory based on the following inputs: the front camera image, the ego vehicle's "
    "recent poses and a discrete navigation command. The input provides a 1.5-second history, and your output "
    "must be a safe, comfortable trajectory for the next 4 seconds that stays on the drivable area, keeps its "
    "lane and avoids collisions.")

# world.COMMANDS order: left, straight, right, unknown (NAVSIM's 4-dim one-hot).
COMMAND_TEXT = ("TURN LEFT", "GO STRAIGHT", "TURN RIGHT", "UNKNOWN")


def history_text(history: np.ndarray) -> str:
    """history [4, 3] (x, y, heading) at -1.5, -1.0, -0.5, 0 s in the ego frame → one line per pose."""
    history = np.asarray(history, np.float64)
    if history.ndim != 2 or history.shape[1] != 3:
        raise ValueError(f"history: expected [T, 3] (x, y, heading), got shape {history.shape}")
    n = len(history)
    return "\n".join(f"   - t-{n - 1 - k}: ({x:.2f}, {y:.2f}, {h:.2f})" for k, (x, y, h) in enumerate(history))


def command_text(command: int) -> str:
    if not 0 <= int(command) < len(COMMAND_TEXT):
        raise ValueError(f"navigation command {command!r}: expected an index in [0, {len(COMMAND_TEXT)})")
    return COMMAND_TEXT[int(command)]


def signed(n: float) -> str:
    """A number as upstream's feature builder prints it: sign and 2 decimals, '0.0' when it rounds to zero."""
    return f"{n:+.2f}" if abs(round(float(n), 2)) > 1e-2 else "0.0"


def ego_status_text(status: np.ndarray) -> str:
    """status [8] (command one-hot 4, velocity 2, acceleration 2; ego frame) → the ego-status line."""
    status = np.asarray(status, np.float64)
    if status.shape != (8,):
        raise ValueError(f"status: expected [8] (command one-hot, velocity, acceleration), got shape {status.shape}")
    vx, vy, ax, ay = status[4:8]
    return (f"velocity ({signed(vx)}, {signed(vy)}) m/s, acceleration ({signed(ax)}, {signed(ay)}) m/s^2 "
            "(ego frame, x forward, y left)")


def driving_question(history: np.ndarray, command: int, status: np.ndarray | None = None) -> str:
    """The user turn (with its `<image>` placeholder) for one sample; `status` [8] adds the ego-status line (the
    NAVSIM cache prompt: front camera + history + ego status + command)."""
    items = ["Visual perception from the front camera view",
             f"Historical motion context (last {len(np.asarray(history))} timesteps, x, y, heading):\n"
             f"{history_text(history)}"]
    if status is not None:
        items.append(f"Current ego status: {ego_status_text(status)}")
    items.append(f"Active navigation command: [{command_text(command)}]")
    return ("<image>\nAs an autonomous driving system, predict the vehicle's trajectory based on:\n"
            + "".join(f"{i + 1}. {t}\n" for i, t in enumerate(items)) +
            "Output requirements:\n- Predict 8 future trajectory points at 0.5 s intervals\n"
            "- Each point format: (x:float, y:float, heading:float)\n"
            "- Use [PT, ...] to encapsulate the trajectory")


def trajectory_answer(future: np.ndarray) -> str:
    """The assistant turn for a future [8, 3]: '[PT, (x, y, h), ...]' with 2 decimals."""
    future = np.asarray(future, np.float64)
    return "[PT, " + ", ".join(f"({x:.2f}, {y:.2f}, {h:.2f})" for x, y, h in future) + "]"


class TrajectoryParseError(ValueError):
    """A text that is not a `trajectory_answer`: the message says what was expected and what was found."""


_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_POINT = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_ANSWER = re.compile(rf"\[PT,\s*(\(.*?\)(?:\s*,\s*\(.*?\))*)\s*\]")


def parse_trajectory(text: str, num_poses: int = 8) -> np.ndarray:
    """The inverse of `trajectory_answer`: '[PT, (x, y, h), ...]' (the whole text, surrounding whitespace aside)
    → poses [num_poses, 3] float64. Strict: anything else (extra text, a malformed point, another number of points,
    a non-finite number) raises TrajectoryParseError saying what is wrong."""
    if not isinstance(text, str):
        raise TrajectoryParseError(f"expected a string, got {type(text).__name__}")
    body = text.strip()
    shown = body if len(body) <= 60 else body[:57] + "..."
    m = _ANSWER.fullmatch(body)
    if m is None:
        raise TrajectoryParseError(f"expected '[PT, (x, y, h), ...]', got {shown!r}")
    points = re.split(r"\)\s*,\s*\(", m.group(1).strip()[1:-1])
    poses = []
    for k, p in enumerate(points):
        pm = _POINT.fullmatch(f"({p.strip()})")
        if pm is None:
            raise TrajectoryParseError(f"point {k}: expected '(x, y, h)' with three numbers, got ({p.strip()})")
        poses.append([float(v) for v in pm.groups()])
    if len(poses) != num_poses:
        raise TrajectoryParseError(f"expected {num_poses} points, got {len(poses)} in {shown!r}")
    out = np.asarray(poses, np.float64)
    if not np.isfinite(out).all():
        raise TrajectoryParseError(f"non-finite number in {shown!r}")
    return out


def scene_command(scene) -> int:
    """Command index of one (unbatched) `world.Scene`."""
    return int(np.asarray(scene.command))


def driving_prompt(history: np.ndarray, command: int, num_tiles: Sequence[int], num_image_token: int,
                   system_message: str | None = DRIVING_SYSTEM, status: np.ndarray | None = None) -> str:
    """The full inference prompt (system + user + assistant prefix), image placeholders expanded."""
    return chat_prompt(driving_question(history, command, status), list(num_tiles), num_image_token=num_image_token,
                       system_message=system_message)
