"""Renderers for `Scene`s: a front camera (the VLM's input) and a bird's-eye view (for humans).

The camera is a pinhole at the ego's rear axle + (1.5 m forward, 1.6 m up), looking along +x, pitched down
slightly. Ground polygons are clipped against the near plane, projected and filled with PIL; agents are
projected cuboids painted far-to-near. Palettes give the day / night / fog visual domains.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from recogdrive_jax.sim import world
from recogdrive_jax.sim.world import Scene

PALETTES = {
    "day": dict(sky=(135, 185, 235), ground=(92, 128, 70), road=(88, 88, 92), mark=(235, 235, 235),
                car=(200, 40, 40), parked=(60, 90, 180), cone=(255, 140, 0), barrier=(230, 200, 40), fog=None),
    "night": dict(sky=(10, 12, 30), ground=(18, 26, 16), road=(35, 35, 40), mark=(150, 150, 120),
                  car=(120, 30, 30), parked=(30, 45, 90), cone=(160, 90, 10), barrier=(140, 120, 30), fog=None),
    "fog": dict(sky=(200, 200, 205), ground=(120, 135, 115), road=(120, 120, 124), mark=(210, 210, 210),
                car=(180, 70, 70), parked=(90, 110, 170), cone=(230, 150, 60), barrier=(210, 190, 90),
                fog=(205, 205, 210)),
}
CAM_X, CAM_H, NEAR = 1.5, 1.6, 0.5


def _palette(scene: Scene) -> dict:
    return PALETTES[world.DOMAINS[int(scene.domain)]]


def _project(pts: np.ndarray, f: float, cx: float, cy: float, pitch: float) -> np.ndarray:
    """Ego-frame 3-D points [N, 3] -> pixels [N, 2] (camera looks along +x; points must be in front)."""
    x = pts[:, 0] - CAM_X
    y = pts[:, 1]
    z = pts[:, 2] - CAM_H
    c, s = np.cos(pitch), np.sin(pitch)
    depth = x * c - z * s
    up = x * s + z * c
    return np.stack([cx - f * y / depth, cy - f * up / depth], -1), depth


def _clip_near(poly: np.ndarray, near: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a ground polygon [N, 2] to x - CAM_X >= near."""
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ina, inb = a[0] - CAM_X >= near, b[0] - CAM_X >= near
        if ina:
            out.append(a)
        if ina != inb:
            t = (CAM_X + near - a[0]) / (b[0] - a[0])
            out.append(a + t * (b - a))
    return np.array(out).reshape(-1, 2)


def _fog(color, depth, fog, dist=45.0):
    if fog is None:
        return tuple(int(c) for c in color)
    w = 1.0 - np.exp(-max(depth, 0.0) / dist)
    return tuple(int((1 - w) * c + w * fc) for c, fc in zip(color, fog))


def render_front(scene: Scene, height: int = 256, width: int = 448, fov_deg: float = 90.0) -> np.ndarray:
    """Front-camera image [height, width, 3] uint8 of the scene at t = 0."""
    pal = _palette(scene)
    f = (width / 2) / np.tan(np.deg2rad(fov_deg) / 2)
    cx, cy, pitch = width / 2, height * 0.42, np.deg2rad(-4.0)
    img = Image.new("RGB", (width, height), pal["sky"])
    draw = ImageDraw.Draw(img)
    horizon = cy - f * np.tan(-pitch)
    draw.rectangle([0, int(horizon), width, height], fill=_fog(pal["ground"], 60.0, pal["fog"]))

    def ground_poly(poly, color, depth_hint):
        clipped = _clip_near(poly, NEAR)
        if len(clipped) < 3:
            return
        pix, _ = _project(np.concatenate([clipped, np.zeros((len(clipped), 1))], 1), f, cx, cy, pitch)
        draw.polygon([tuple(p) for p in pix], fill=_fog(color, depth_hint, pal["fog"]))

    for poly, m in zip(scene.drivable, scene.drivable_mask):
        if m:
            ground_poly(np.asarray(poly, np.float64), pal["road"], 20.0)
    # Lane boundaries: the two long edges of every lane polygon, as thin dashed strips.
    half = world.POLY_VERTS // 2
    for poly, m in zip(scene.lanes, scene.lane_mask):
        if not m:
            continue
        poly = np.asarray(poly, np.float64)
        for edge in (poly[:half], poly[half:][::-1]):
            for i in range(0, len(edge) - 1, 2):
                a, b = edge[i], edge[i + 1]
                d = b - a
                nrm = np.array([-d[1], d[0]]) / max(np.hypot(*d), 1e-6) * 0.08
                ground_poly(np.stack([a + nrm, b + nrm, b - nrm, a - nrm]), pal["mark"], float(a[0]))
    # Objects far to near.
    order = np.argsort(-np.hypot(scene.obj_boxes[0, :, 0], scene.obj_boxes[0, :, 1]))
    for a in order:
        t = int(scene.obj_type[a])
        if t == 0 or not scene.obj_valid[0, a]:
            continue
        x, y, h, ln, wd = (float(v) for v in scene.obj_boxes[0, a])
        height3 = {world.OBJ_VEHICLE: 1.5, world.OBJ_PARKED: 1.5, world.OBJ_CONE: 0.7, world.OBJ_BARRIER: 1.0}[t]
        base = world._box_corners(x, y, h, ln, wd)
        pts = np.concatenate([np.concatenate([base, np.zeros((4, 1))], 1),
                              np.concatenate([base, np.full((4, 1), height3)], 1)], 0)
        if np.any(pts[:, 0] - CAM_X < NEAR):
            continue
        pix, depth = _project(pts, f, cx, cy, pitch)
        color = pal[{world.OBJ_VEHICLE: "car", world.OBJ_PARKED: "parked", world.OBJ_CONE: "cone",
                     world.OBJ_BARRIER: "barrier"}[t]]
        faces = [(0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7), (4, 5, 6, 7)]
        faces.sort(key=lambda fc: -depth[list(fc)].mean())
        for k, fc in enumerate(faces):
            shade = 0.7 + 0.3 * (k / len(faces))
            draw.polygon([tuple(pix[i]) for i in fc], fill=_fog(np.array(color) * shade, float(depth.min()),
                                                                 pal["fog"]))
    return np.asarray(img, np.uint8)


def render_frames(scene: Scene, num_history: int, height: int = 256, width: int = 448) -> np.ndarray:
    """Front-camera frames [num_history + 1, height, width, 3] uint8: the last `num_history` past poses (oldest
    first, from `world.past_scene`) then t = 0 — the history + current frames of the OpenTrackVLA recipe."""
    if not 0 <= num_history < world.NUM_HISTORY:
        raise ValueError(f"render_frames: num_history={num_history}; the world keeps {world.NUM_HISTORY - 1} past poses")
    ks = range(world.NUM_HISTORY - 1 - num_history, world.NUM_HISTORY - 1)
    past = [render_front(world.past_scene(scene, k), height, width) for k in ks]
    return np.stack(past + [render_front(scene, height, width)])


def render_bev(scene: Scene, trajectories: dict[str, np.ndarray] | None = None, size: int = 400,
               extent: float = 60.0, path: str | None = None) -> np.ndarray:
    """Bird's-eye view [size, size, 3] uint8 (matplotlib): road, lanes, route, agents with their futures, the
    ego, the expert and any extra `trajectories` ({name: [T, 3] poses}). Writes a PNG to `path` if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon as MplPolygon

    fig = plt.figure(figsize=(size / 100, size / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_facecolor((0.85, 0.9, 0.82))
    for poly, m in zip(scene.drivable, scene.drivable_mask):
        if m:
            ax.add_patch(MplPolygon(poly, closed=True, fc=(0.55, 0.55, 0.58), ec="none"))
    for poly, m, r in zip(scene.lanes, scene.lane_mask, scene.lane_on_route):
        if m:
            ax.add_patch(MplPolygon(poly, closed=True, fc="none", ec=(0.9, 0.9, 0.9) if not r else (0.95, 0.85, 0.5),
                                    lw=0.5))
    cl = scene.centerline[scene.centerline_mask]
    ax.plot(cl[:, 0], cl[:, 1], "--", color=(0.3, 0.5, 0.9), lw=0.8)
    colors = {world.OBJ_VEHICLE: "tab:red", world.OBJ_PARKED: "tab:blue", world.OBJ_CONE: "orange",
              world.OBJ_BARRIER: "gold"}
    for a in range(world.MAX_OBJECTS):
        t = int(scene.obj_type[a])
        if t == 0:
            continue
        b = scene.obj_boxes[0, a]
        ax.add_patch(MplPolygon(world._box_corners(*b), closed=True, fc=colors[t], ec="k", lw=0.4))
        fut = scene.obj_boxes[:41, a][scene.obj_valid[:41, a]]
        if t == world.OBJ_VEHICLE and len(fut):
            ax.plot(fut[:, 0], fut[:, 1], color=colors[t], lw=0.6, alpha=0.6)
    ego = world._box_corners(world.EGO_REAR_AXLE_TO_CENTER, 0.0, 0.0, world.EGO_LENGTH, world.EGO_WIDTH)
    ax.add_patch(MplPolygon(ego, closed=True, fc="limegreen", ec="k", lw=0.6))
    ax.plot(scene.history[:, 0], scene.history[:, 1], "o-", color="gray", ms=2, lw=0.8)
    ax.plot(np.r_[0, scene.expert[:, 0]], np.r_[0, scene.expert[:, 1]], "o-", color="green", ms=2, lw=1.0,
            label="expert")
    for i, (name, tr) in enumerate((trajectories or {}).items()):
        tr = np.asarray(tr)
        ax.plot(np.r_[0, tr[:, 0]], np.r_[0, tr[:, 1]], "o-", ms=2, lw=1.0, color=f"C{(i + 4) % 10}", label=name)
    ax.legend(loc="upper left", fontsize=6)
    ax.set_xlim(-extent / 4, extent * 0.75 + extent / 4)
    ax.set_ylim(-extent / 2, extent / 2)
    ax.set_aspect("equal")
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    img = np.asarray(Image.open(buf).convert("RGB"), np.uint8)
    if path is not None:
        Image.fromarray(img).save(path)
    return img


def save_png(image: np.ndarray, path: str) -> None:
    Image.fromarray(np.asarray(image, np.uint8)).save(path)
