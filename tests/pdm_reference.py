"""Plain per-trajectory PDM scorer (numpy float64 + shapely + scipy), written from spec/pdm.md.

It mirrors NAVSIM's loop structure (per-time-step shapely queries, ignore sets, nuPlan LQR with `np.linalg.pinv`)
rather than the vectorised formulation of `recogdrive_jax.sim.pdm`, so the two are independent checks.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.signal import savgol_filter
from shapely.geometry import LineString, Point, Polygon

DT = 0.1
N = 41
L = 3.089
HALF_LEN, HALF_W, R2C, FRONT = 2.588, 1.1485, 1.461, 4.049


def wrap(a):
    return (a + np.pi) % (2 * np.pi) - np.pi


def interpolate(traj: np.ndarray, interval: float = 0.5) -> np.ndarray:
    full = np.concatenate([np.zeros((1, 3)), np.asarray(traj, np.float64)], 0)
    t_src = np.arange(len(full)) * interval
    t_dst = np.arange(N) * DT
    h = np.unwrap(full[:, 2])
    out = np.stack([np.interp(t_dst, t_src, full[:, 0]), np.interp(t_dst, t_src, full[:, 1]),
                    wrap(np.interp(t_dst, t_src, h))], -1)
    return out


def fit(poses, regulariser="navsim"):
    n = len(poses) - 1
    dxy = np.diff(poses[:, :2], axis=0)
    hv = np.stack([np.cos(poses[:-1, 2]), np.sin(poses[:-1, 2])], -1)
    A = np.zeros((2 * n, n))
    for i in range(n):
        A[2 * i:2 * i + 2, 0] = hv[i] * DT
        if i > 0:
            A[2 * i:2 * i + 2, 1:1 + i] = (hv[i] * DT ** 2).reshape(2, 1)
    band = np.zeros((n - 2, n - 1))
    for i in range(n - 2):
        band[i, i], band[i, i + 1] = -1, 1
    if regulariser == "navsim":  # NAVSIM's batch_lqr_utils.py: banded[:, :-1] = -eye overwrites the +1 band
        band[:, :-1] = -np.eye(n - 2)
    R = np.block([np.zeros((n - 2, 1)), band])
    x = np.linalg.pinv(A.T @ A + 1e-4 * R.T @ R) @ A.T @ dxy.flatten()
    v = np.concatenate([[x[0]], x[0] + np.cumsum(x[1:] * DT)])
    dh = wrap(np.diff(poses[:, 2]))
    Ak = np.tri(n)
    Ak[:, 1:] *= DT
    Ak = v.reshape(-1, 1) * DT * Ak
    Q = 1e-2 * np.eye(n)
    Q[0, 0] = 1e-10
    xk = np.linalg.pinv(Ak.T @ Ak + Q) @ Ak.T @ dh
    kappa = np.concatenate([[xk[0]], xk[0] + np.cumsum(xk[1:] * DT)])
    return v, kappa


def simulate(ref, vx, vy, ax, ay, regulariser="navsim"):
    v_prof, k_prof = fit(ref, regulariser)
    x = y = th = d = om = 0.0
    v, a = vx, ax
    states = [dict(x=0.0, y=0.0, h=0.0, vx=vx, vy=vy, ax=ax, ay=ay, om=0.0, omd=0.0)]
    Q = np.diag([1.0, 10.0, 0.0])
    for t in range(N - 1):
        r = min(t + 10, N - 2)
        vr = v_prof[r]
        if vr <= 0.2 and v <= 0.2:
            a_cmd, sr = -0.5 * (v - vr), 0.0
        else:
            a_cmd = -(1.0 * 10.0 / (1.0 * 10.0 * 1.0 + 1.0)) * (v - vr)
            xr, yr, hr = ref[t]
            e_lat = -(x - xr) * math.sin(hr) + (y - yr) * math.cos(hr)
            e_h = wrap(th - hr)
            ks = list(k_prof[t:r])
            ks += [k_prof[r]] * (10 - len(ks))
            Am, Bm, g = np.eye(3), np.zeros(3), np.zeros(3)
            for k in range(10):
                vk = v + k * DT * a_cmd
                Ak = np.eye(3)
                Ak[0, 1] = vk * DT
                Ak[1, 2] = vk * DT / L
                Am = Ak @ Am
                Bm = Ak @ Bm + np.array([0, 0, DT])
                g = Ak @ g + np.array([0, -vk * ks[k] * DT, 0])
            z = Am @ np.array([e_lat, e_h, d]) + g
            z[1], z[2] = wrap(z[1]), wrap(z[2])
            sr = -(Bm @ Q @ z) / (Bm @ Q @ Bm + 1.0)
        a_n = a + DT / (DT + 0.2) * (a_cmd - a)
        d_i = d + DT * sr
        d_n = d + DT / (DT + 0.05) * (d_i - d)
        d_rate = (d_n - d) / DT
        x, y, th_new = x + DT * v * math.cos(th), y + DT * v * math.sin(th), wrap(th + DT * v * math.tan(d) / L)
        th = th_new
        v = v + DT * a_n
        d = float(np.clip(d + DT * d_rate, -np.pi / 3, np.pi / 3))
        om_n = v * math.tan(d) / L
        omd = (om_n - om) / DT
        om, a = om_n, a_n
        states.append(dict(x=x, y=y, h=th, vx=v, vy=0.0, ax=a, ay=0.0, om=om, omd=omd))
    return states


def ego_poly(x, y, h):
    c, s = math.cos(h), math.sin(h)
    cx, cy = x + R2C * c, y + R2C * s
    pts = []
    for lo, la in ((1, 1), (-1, 1), (-1, -1), (1, -1)):  # FL, RL, RR, FR
        pts.append((cx + lo * HALF_LEN * c - la * HALF_W * s, cy + lo * HALF_LEN * s + la * HALF_W * c))
    return Polygon(pts), pts, (cx, cy)


def box_poly(b):
    x, y, h, l, w = [float(v) for v in b]
    c, s = math.cos(h), math.sin(h)
    return Polygon([(x + lo * l / 2 * c - la * w / 2 * s, y + lo * l / 2 * s + la * w / 2 * c)
                    for lo, la in ((1, 1), (-1, 1), (-1, -1), (1, -1))])


def _polys(arr, mask):
    out = []
    for p, m in zip(np.asarray(arr, np.float64), np.asarray(mask)):
        if m:
            # padded vertices repeat vertex 0: drop the trailing repeats
            k = len(p)
            while k > 3 and np.allclose(p[k - 1], p[0]):
                k -= 1
            out.append(Polygon(p[:k]))
    return out


def _angle(rear, heading, pt):
    v = np.array([pt[0] - rear[0], pt[1] - rear[1]])
    nv = np.linalg.norm(v)
    if nv == 0:
        return float("nan")
    cosang = (math.cos(heading) * v[0] + math.sin(heading) * v[1]) / nv
    return math.degrees(math.acos(max(-1.0, min(1.0, cosang))))


def _sg(x, w, p, d):
    return np.round(savgol_filter(x, min(w, len(x)), p, deriv=d, delta=DT, mode="interp"), 8)


def comfort(ax, ay, h, acc_w=41, jerk_w=41, ax_lon=None):
    ax_lon = ax if ax_lon is None else ax_lon
    lon = _sg(ax_lon, acc_w, 2, 0)
    ok = bool(np.all((lon > -4.05) & (lon < 2.40)))
    ok &= bool(np.all(np.abs(_sg(ay, acc_w, 2, 0)) < 4.89))
    ok &= bool(np.all(np.abs(_sg(_sg(np.hypot(ax, ay), 8, 2, 0), jerk_w, 2, 1)) < 8.37))
    ok &= bool(np.all(np.abs(_sg(_sg(ax_lon, 8, 2, 0), jerk_w, 2, 1)) < 4.13))
    hu = np.unwrap(h)
    ok &= bool(np.all(np.abs(_sg(hu, 5, 2, 1)) < 0.95))
    ok &= bool(np.all(np.abs(_sg(hu, 5, 3, 2)) < 1.93))
    return float(ok)


class _Geo:
    def __init__(self, scene):
        self.drivable = _polys(scene.drivable, scene.drivable_mask)
        self.lanes = _polys(scene.lanes, scene.lane_mask)
        self.on_route = [bool(r) for r, m in zip(scene.lane_on_route, scene.lane_mask) if m]
        self.inter = _polys(scene.intersections, scene.intersection_mask)
        cl = np.asarray(scene.centerline, np.float64)[np.asarray(scene.centerline_mask)]
        self.centerline = LineString(cl[:, :2])
        ob = np.asarray(scene.obj_boxes, np.float64)
        self.frames = []
        for f in range(ob.shape[0]):
            self.frames.append({a: box_poly(ob[f, a]) for a in range(ob.shape[1])
                                if scene.obj_valid[f, a] and scene.obj_type[a] > 0})
        self.is_agent = [int(t) in (1, 2) for t in scene.obj_type]
        self.stopped = [(not self.is_agent[a]) or float(scene.obj_speed[a]) <= 0.05 for a in range(len(scene.obj_type))]


def _score_states(geo, states, scene):
    T = len(states)
    polys, corners, centres = [], [], []
    for s in states:
        p, c, ctr = ego_poly(s["x"], s["y"], s["h"])
        polys.append(p)
        corners.append(c)
        centres.append(ctr)
    nondrv, multi, oncoming, rear_int, ctr_int = [], [], [], [], []
    for t in range(T):
        cps = [Point(c) for c in corners[t]]
        nondrv.append(any(not any(pg.contains(cp) for pg in geo.drivable) for cp in cps))
        touched = [any(pg.contains(cp) for cp in cps) for pg in geo.lanes]
        full = [all(pg.contains(cp) for cp in cps) for pg in geo.lanes]
        multi.append(sum(touched) > 1 and not any(full))
        cpt = Point(centres[t])
        oncoming.append(not any(pg.contains(cpt) for pg, r in zip(geo.lanes, geo.on_route) if r))
        rear_int.append(any(pg.contains(Point(states[t]["x"], states[t]["y"])) for pg in geo.inter))
        ctr_int.append(any(pg.contains(cpt) for pg in geo.inter))
    # NC
    nc = 1.0
    ignored = set()
    for t in range(T):
        s = states[t]
        speed = math.hypot(s["vx"], s["vy"])
        for a, op in geo.frames[t].items():
            if a in ignored or not polys[t].intersects(op):
                continue
            ignored.add(a)
            if speed <= 0.05:
                continue
            cen = (op.centroid.x, op.centroid.y)
            if geo.stopped[a]:
                fault = True
            elif _angle((s["x"], s["y"]), s["h"], cen) > 150:
                fault = False
            elif LineString([corners[t][0], corners[t][3]]).intersects(op):
                fault = True
            else:
                fault = multi[t] or nondrv[t]
            if fault:
                nc = min(nc, 0.0 if geo.is_agent[a] else 0.5)
    dac = 0.0 if any(nondrv) else 1.0

    def ttc_fn(t_max):
        ign = set()
        for t in range(t_max):
            s = states[t]
            speed = math.hypot(s["vx"], s["vy"])
            if speed < 5e-3:
                continue
            for k in (0, 3, 6, 9):
                dx, dy = speed * math.cos(s["h"]) * k * DT, speed * math.sin(s["h"]) * k * DT
                p, _, _ = ego_poly(s["x"] + dx, s["y"] + dy, s["h"])
                for a, op in geo.frames[t + k].items():
                    if a in ign or not p.intersects(op):
                        continue
                    ang = _angle((s["x"], s["y"]), s["h"], (op.centroid.x, op.centroid.y))
                    ahead = ang < 30
                    not_behind = not (ang > 150)
                    if ahead or ((multi[t] or nondrv[t] or rear_int[t]) and not_behind):
                        return 0.0
                    ign.add(a)
        return 1.0

    ttc, ttc_v2 = ttc_fn(T), ttc_fn(32)

    def ddc_fn(v2):
        d = [0.0]
        for t in range(1, T):
            step = math.dist(centres[t], centres[t - 1])
            d.append(step if oncoming[t] and not (v2 and ctr_int[t]) else 0.0)
        S = max(sum(d[max(0, t - 10):t + 1]) for t in range(T))
        return 1.0 if S < 2 else 0.5 if S < 6 else 0.0

    ddc, ddc_v2 = ddc_fn(False), ddc_fn(True)
    prog = geo.centerline.project(Point(centres[-1])) - geo.centerline.project(Point(centres[0]))
    raw = max(0.0, prog)
    c = comfort(np.array([s["ax"] for s in states]), np.array([s["ay"] for s in states]),
                np.array([s["h"] for s in states]))
    cnt, lk = 0, 1.0
    for t in range(T):
        if ctr_int[t]:
            continue
        cnt = cnt + 1 if geo.centerline.distance(Point(centres[t])) > 0.5 else 0
        if cnt >= 20:
            lk = 0.0
    hist = np.asarray(scene.hist10, np.float64)
    h_ax = np.r_[hist[:, 1], [s["ax"] for s in states]]
    h_ay = np.r_[hist[:, 2], [s["ay"] for s in states]]
    h_h = np.r_[hist[:, 0], [s["h"] for s in states]]
    h_om = np.r_[hist[:, 3], [s["om"] for s in states]]
    h_omd = np.r_[hist[:, 4], [s["omd"] for s in states]]
    hc = comfort(h_ax, h_ay, h_h, acc_w=8, jerk_w=15, ax_lon=h_ax + R2C * (h_om ** 2 + h_omd))
    return dict(nc=nc, dac=dac, ddc=ddc, ddc_v2=ddc_v2, ttc=ttc, ttc_v2=ttc_v2, c=c, lk=lk, hc=hc, tlc=1.0,
                progress=raw)


def score(scene, trajectory, **kw):
    """Scores one [T, 3] trajectory in one (unbatched) Scene; returns the same keys as `pdm_score`."""
    return score_many(scene, [trajectory], **kw)[0]


def score_many(scene, trajectories, **kw):
    """Scores several trajectories of one scene (the reference plan is simulated once)."""
    geo = _Geo(scene)
    st = np.asarray(scene.status, np.float64)
    reg = kw.pop("lqr_regulariser", "navsim")
    r = _score_states(geo, simulate(np.asarray(scene.ref_poses, np.float64), *st[4:8], reg), scene)
    out = []
    for traj in trajectories:
        m = _score_states(geo, simulate(interpolate(traj, kw.get("interval", 0.5)), *st[4:8], reg), scene)
        out.append(_combine(r, m, **kw))
    return out


def _combine(r, m, ep_weight=5.0, ttc_weight=5.0, comfort_weight=2.0, interval=0.5, human_filter=True):
    mult_r, mult_a = r["nc"] * r["dac"], m["nc"] * m["dac"]
    best = max(r["progress"] * mult_r, m["progress"] * mult_a)
    ep = m["progress"] * mult_a / best if best > 5.0 else (0.0 if mult_a == 0 else 1.0)
    pdms = mult_a * (ep_weight * ep + ttc_weight * m["ttc"] + comfort_weight * m["c"]) / (
        ep_weight + ttc_weight + comfort_weight)
    sub = {k: m[k] for k in ("nc", "dac", "ddc_v2", "tlc", "ttc_v2", "lk")}
    if human_filter:
        sub = {k: (1.0 if r[k] == 0.0 else v) for k, v in sub.items()}
    mult2_a = sub["nc"] * sub["dac"] * sub["ddc_v2"] * sub["tlc"]
    mult2_r = r["nc"] * r["dac"] * r["ddc_v2"] * r["tlc"]
    if human_filter:  # the reference's own multipliers after the filter (its zeros become ones)
        mult2_r = np.prod([1.0 if r[k] == 0.0 else r[k] for k in ("nc", "dac", "ddc_v2", "tlc")])
    best2 = max(r["progress"] * mult2_r, m["progress"] * mult2_a)
    ep2 = min(max(m["progress"] / best2, 0.0), 1.0) if best2 > 5.0 else 1.0
    epdms = mult2_a * (5 * ep2 + 5 * sub["ttc_v2"] + 2 * sub["lk"] + 2 * m["hc"]) / 14.0
    return dict(nc=m["nc"], dac=m["dac"], ddc=m["ddc"], ttc=m["ttc"], ep=ep, c=m["c"], pdms=pdms, tlc=1.0,
                lk=m["lk"], hc=m["hc"], ec=float("nan"), ddc_v2=m["ddc_v2"], ttc_v2=m["ttc_v2"], ep_v2=ep2,
                epdms=epdms, progress=m["progress"], ref_progress=r["progress"])
