"""Offline street views: a 2.5-D raycaster over the procedural city (spec/virl.md §4 "Rendering").

One ray per image column is cast against the building walls within `max_dist`; the wall spans
`H·f/(d·cosΔ)` rows (perspective-correct depth). Below the horizon every pixel is inverse-projected onto the
ground plane and classified as road / marking / crosswalk / sidewalk / lot; above it a sky gradient. Facades get
windows, a roof band and, for POIs, a signboard from a PIL-rendered texture atlas (name + category icon).
Style-specific haze, sun shading, brightness, colour grade and horizon tilt finish the image. numpy only; views
are cached by (pano, heading).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from recogdrive_jax.envs.city import ROAD_HALF_WIDTH, SIDEWALK, City

# Heading offsets of the four views in the 2×2 grid, row-major.
VIEW_OFFSETS = {
    "prompt": (0.0, 90.0, 180.0, 270.0),          # [front, right; back, left] as the prompt text says
    "reference": (-135.0, -45.0, 45.0, 135.0),    # what the official platform code actually renders
}
GRID_LINE = 5


def _icon(draw: ImageDraw.ImageDraw, category: str, box: tuple[int, int, int, int], fg) -> None:
    """Tiny pictogram per POI category (shape + colour), so the icon carries information beyond the text."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    k = sum(map(ord, category)) % 6
    if k == 0:
        draw.ellipse(box, fill=fg)
    elif k == 1:
        draw.rectangle((cx - r / 3, y0, cx + r / 3, y1), fill=fg)
        draw.rectangle((x0, cy - r / 3, x1, cy + r / 3), fill=fg)
    elif k == 2:
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fg)
    elif k == 3:
        draw.rectangle(box, outline=fg, width=max(1, int(r / 3)))
    elif k == 4:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fg)
    else:
        pts = []
        for i in range(10):
            a = math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r / 2.4
            pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
        draw.polygon(pts, fill=fg)


def sign_texture(name: str, category: str, bg, fg, size: tuple[int, int] = (200, 44)) -> np.ndarray:
    """[h, w, 3] uint8 signboard: icon on the left, the name as large as fits."""
    w, h = size
    img = Image.new("RGB", (w, h), tuple(bg))
    draw = ImageDraw.Draw(img)
    _icon(draw, category, (4, 6, h - 6 + 4 - 6, h - 6), tuple(fg))
    x_text = h + 2
    fs = h - 10
    while fs > 8:
        font = ImageFont.load_default(size=fs)
        bbox = draw.textbbox((0, 0), name, font=font)
        if bbox[2] - bbox[0] <= w - x_text - 4:
            break
        fs -= 2
    font = ImageFont.load_default(size=fs)
    bbox = draw.textbbox((0, 0), name, font=font)
    draw.text((x_text, (h - (bbox[3] - bbox[1])) / 2 - bbox[1]), name, font=font, fill=tuple(fg))
    draw.rectangle((0, 0, w - 1, h - 1), outline=tuple(fg), width=2)
    return np.asarray(img)


class Renderer:
    """Renders single views and the 2×2 grid for a city. `view_size` R is the VLM's native size."""

    def __init__(self, city: City, view_size: int = 224, fov: float = 90.0, cam_height: float = 2.5,
                 max_dist: float = 150.0, layout: str = "prompt", cache_size: int = 4096):
        if layout not in VIEW_OFFSETS:
            raise ValueError(f"view layout {layout!r}; expected one of {sorted(VIEW_OFFSETS)}")
        self.city, self.R, self.fov, self.cam_h, self.max_dist = city, int(view_size), fov, cam_height, max_dist
        self.layout = layout
        self.f = (self.R / 2) / math.tan(math.radians(fov) / 2)
        self._cache: dict = {}
        self._cache_size = cache_size
        self._atlas: dict[int, np.ndarray] = {}
        st = city.style
        b = city.buildings                                          # [B, 4, 2]
        p0 = b.reshape(-1, 2)
        p1 = np.roll(b, -1, axis=1).reshape(-1, 2)
        self.seg_p0, self.seg_e = p0, p1 - p0                       # [S, 2]
        self.seg_len = np.linalg.norm(self.seg_e, axis=1)
        self.seg_b = np.repeat(np.arange(len(b)), 4)
        self.seg_face = np.tile(np.arange(4), len(b))
        self.seg_mid = p0 + self.seg_e / 2
        nrm = np.stack([-self.seg_e[:, 1], self.seg_e[:, 0]], 1) / np.maximum(self.seg_len[:, None], 1e-9)
        sun = np.array([math.sin(math.radians(st.sun_azimuth)), math.cos(math.radians(st.sun_azimuth))])
        self.seg_shade = 0.62 + 0.38 * np.abs(nrm @ sun)
        # Sign placement on face 0 of POI buildings, and whether the texture must be mirrored so it reads
        # left-to-right for a viewer on the road.
        self.seg_sign = -np.ones(len(p0), np.int64)
        self.sign_flip = np.zeros(len(p0), bool)
        for k, poi in enumerate(city.pois):
            s = poi.building * 4
            self.seg_sign[s] = k
            a, bb = city.edges[poi.edge]
            u = city.nodes[bb] - city.nodes[a]
            u = u / np.linalg.norm(u)
            road_dir = -np.array([-u[1], u[0]]) * poi.side         # facade → road
            facing = -road_dir                                      # viewer on the road looks at the facade
            right = np.array([facing[1], -facing[0]])
            self.sign_flip[s] = float(self.seg_e[s] @ right) < 0
        e = city.edges
        self.road_a, self.road_b = city.nodes[e[:, 0]], city.nodes[e[:, 1]]
        self.road_hw = np.array([ROAD_HALF_WIDTH[k] for k in city.edge_kind])
        clear = [max(ROAD_HALF_WIDTH[city.edge_kind[f]] for f in adj) for adj in city.adjacency]
        self.road_clear_a = np.array([clear[a] for a in e[:, 0]])
        self.road_clear_b = np.array([clear[b] for b in e[:, 1]])

    # ---- public -----------------------------------------------------------------------------------------------
    def grid(self, pano: int, heading: float) -> np.ndarray:
        """[2R+5, 2R+5, 3] uint8: four views row-major on a black canvas with 5-px gaps (spec §1.3)."""
        R = self.R
        canvas = np.zeros((2 * R + GRID_LINE, 2 * R + GRID_LINE, 3), np.uint8)
        for i, off in enumerate(VIEW_OFFSETS[self.layout]):
            x, y = (i % 2) * (R + GRID_LINE), (i // 2) * (R + GRID_LINE)
            canvas[y:y + R, x:x + R] = self.view(pano, heading + off)
        return canvas

    def view(self, pano: int, heading: float) -> np.ndarray:
        key = (int(pano), round(float(heading) % 360.0, 3))
        img = self._cache.get(key)
        if img is None:
            img = self._render(self.city.panos[pano], float(heading))
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = img
        return img

    # ---- internals --------------------------------------------------------------------------------------------
    def _sign(self, k: int) -> np.ndarray:
        if k not in self._atlas:
            poi = self.city.pois[k]
            bgs = self.city.style.sign_bg
            bg = bgs[sum(map(ord, poi.name)) % len(bgs)]
            self._atlas[k] = sign_texture(poi.name, poi.category, bg, self.city.style.sign_fg)
        return self._atlas[k]

    def _render(self, o: np.ndarray, heading: float) -> np.ndarray:
        st, R, f = self.city.style, self.R, self.f
        cols = np.arange(R) + 0.5 - R / 2
        alpha = np.arctan(cols / f)                                   # [W]
        th = np.radians(heading) + alpha
        d = np.stack([np.sin(th), np.cos(th)], 1)                    # [W, 2]
        cos_a = np.cos(alpha)
        y = R / 2 - (np.arange(R) + 0.5)                              # [H] rows, + above the horizon

        # --- walls
        near = np.flatnonzero(np.linalg.norm(self.seg_mid - o, axis=1) < self.max_dist + 0.5 * self.seg_len + 1)
        t_hit = np.full(R, np.inf)
        s_hit = np.zeros(R)
        seg_hit = np.full(R, -1)
        if len(near) and len(self.seg_b):
            p0, e = self.seg_p0[near], self.seg_e[near]                # [S, 2]
            w = p0 - o
            den = d[:, None, 0] * e[None, :, 1] - d[:, None, 1] * e[None, :, 0]      # [W, S]
            safe = np.where(np.abs(den) < 1e-9, 1e-9, den)
            t = (w[None, :, 0] * e[None, :, 1] - w[None, :, 1] * e[None, :, 0]) / safe
            s = (w[None, :, 0] * d[:, None, 1] - w[None, :, 1] * d[:, None, 0]) / safe
            ok = (np.abs(den) >= 1e-9) & (t > 0.3) & (t < self.max_dist) & (s >= 0) & (s <= 1)
            t = np.where(ok, t, np.inf)
            j = np.argmin(t, axis=1)
            t_hit = t[np.arange(R), j]
            s_hit = s[np.arange(R), j]
            seg_hit = np.where(np.isfinite(t_hit), near[j], -1)
        depth = t_hit * cos_a                                         # [W]
        z = self.cam_h + y[:, None] * np.where(np.isfinite(depth), depth, 0.0)[None, :] / f     # [H, W]
        has_b = len(self.seg_b) > 0
        bidx = np.where(seg_hit >= 0, self.seg_b[np.maximum(seg_hit, 0)], 0) if has_b else np.zeros(R, np.int64)
        height = np.where(seg_hit >= 0, self.city.building_height[bidx], -1.0) if has_b else np.full(R, -1.0)
        wall = (seg_hit >= 0)[None, :] & (z >= 0) & (z <= height[None, :])

        img = np.zeros((R, R, 3), np.float64)
        # sky
        sky_t = np.clip(y / (R / 2), 0, 1)[:, None, None]
        sky = (1 - sky_t) * np.array(st.sky_bottom) + sky_t * np.array(st.sky_top)
        img[:] = sky
        # facades
        if wall.any():
            segc = np.maximum(seg_hit, 0)
            u_m = s_hit * self.seg_len[segc]                          # [W] metres along the wall
            base = self.city.building_color[bidx].astype(np.float64) * self.seg_shade[segc][:, None]   # [W, 3]
            col = np.broadcast_to(base[None], (R, R, 3)).copy()
            px, py = st.window_period
            wu = np.mod(u_m, px)[None, :] / px
            wv = np.mod(z, py) / py
            win = (wu > 0.25) & (wu < 0.75) & (wv > 0.3) & (wv < 0.8) & (z > 3.5) & (z < height[None, :] - 1.2)
            shop = (z > 0.4) & (z < 2.6) & (wu > 0.1) & (wu < 0.9) & (self.seg_face[segc] == 0)[None, :]
            col[win | shop] = np.array(st.window_color)
            roof = z > height[None, :] - 0.8
            col[roof] = np.array(st.roof_color)
            # signs
            sign_k = np.where(seg_hit >= 0, self.seg_sign[segc], -1)
            for k in np.unique(sign_k[sign_k >= 0]):
                poi = self.city.pois[int(k)]
                cs = np.flatnonzero(sign_k == k)
                L = self.seg_len[segc[cs]]
                su = (u_m[cs] - (L / 2 - poi.sign_width / 2)) / poi.sign_width               # [c]
                sv = (z[:, cs] - poi.sign_bottom) / poi.sign_height                          # [H, c]
                inside = (su >= 0)[None] & (su < 1)[None] & (sv >= 0) & (sv < 1)
                if not inside.any():
                    continue
                tex = self._sign(int(k))
                th_, tw_ = tex.shape[:2]
                su_t = np.where(self.sign_flip[segc[cs]], 1 - su, su)
                tx = np.clip((su_t * tw_).astype(int), 0, tw_ - 1)
                ty = np.clip(((1 - sv) * th_).astype(int), 0, th_ - 1)
                rows, cc = np.nonzero(inside)
                col[rows, cs[cc]] = tex[ty[rows, cc], tx[cc]]
            hz = 1 - np.exp(-t_hit / st.haze_distance)
            col = col * (1 - hz[None, :, None]) + np.array(st.haze_color) * hz[None, :, None]
            img[wall] = col[wall]

        # --- ground
        rows_g = np.flatnonzero(y < 0)
        gz = self.cam_h * f / (-y[rows_g])                             # [Hg] depth along the optical axis
        tg = gz[:, None] / cos_a[None, :]                               # [Hg, W] distance along each ray
        gmask = ~wall[rows_g]
        pts = o + tg[..., None] * d[None]                               # [Hg, W, 2]
        gcol = np.broadcast_to(np.array(st.lot_color, np.float64), pts.shape[:2] + (3,)).copy()
        rd = np.linalg.norm((self.road_a + self.road_b) / 2 - o, axis=1)
        rlen = np.linalg.norm(self.road_b - self.road_a, axis=1)
        rn = np.flatnonzero(rd < 2 * self.max_dist + rlen / 2)
        if len(rn):
            P = pts.reshape(-1, 2)
            a, b = self.road_a[rn], self.road_b[rn]
            ab = b - a
            Lr = np.linalg.norm(ab, axis=1)
            ud = ab / Lr[:, None]
            rel = P[:, None, :] - a[None]                               # [M, E, 2]
            along = rel[..., 0] * ud[None, :, 0] + rel[..., 1] * ud[None, :, 1]
            lat = rel[..., 0] * -ud[None, :, 1] + rel[..., 1] * ud[None, :, 0]
            ac = np.clip(along, 0, Lr[None])
            dist = np.sqrt((along - ac) ** 2 + lat ** 2)
            excess = dist - self.road_hw[rn][None]
            j = np.argmin(excess, axis=1)
            ar = np.arange(len(P))
            ex, al, la = excess[ar, j], along[ar, j], lat[ar, j]
            ca, cb = self.road_clear_a[rn][j], self.road_clear_b[rn][j]
            Lj = Lr[j]
            on_road = ex < 0
            side = (ex >= 0) & (ex < SIDEWALK)
            c = gcol.reshape(-1, 3)
            c[side] = np.array(st.sidewalk_color)
            c[on_road] = np.array(st.road_color)
            mid = (al > ca + 4) & (al < Lj - cb - 4)
            dash = on_road & mid & (np.abs(la) < 0.18) & (np.mod(al, 6.0) < 3.0)
            c[dash] = np.array(st.marking_color)
            cross = on_road & (((al > ca + 0.5) & (al < ca + 3.5)) | ((al > Lj - cb - 3.5) & (al < Lj - cb - 0.5)))
            cross &= np.mod(la, 1.2) < 0.6
            c[cross] = np.array((235, 235, 235))
            gcol = c.reshape(gcol.shape)
        hz = (1 - np.exp(-tg / st.haze_distance))[..., None]
        gcol = gcol * (1 - hz) + np.array(st.haze_color) * hz
        sub = img[rows_g]
        sub[gmask] = gcol[gmask]
        img[rows_g] = sub

        img = img * st.brightness * np.array(st.grading)
        out = np.clip(img, 0, 255).astype(np.uint8)
        if st.tilt_deg:
            pil = Image.fromarray(out)
            zoom = int(math.ceil(R * (1 + 2 * abs(math.sin(math.radians(st.tilt_deg))))))
            pil = pil.resize((zoom, zoom), Image.BILINEAR).rotate(st.tilt_deg, resample=Image.BILINEAR)
            m = (zoom - R) // 2
            out = np.asarray(pil.crop((m, m, m + R, m + R)))
        return out
