"""Offline procedural city: road graph, panoramas, POIs and routes in the original `route_infos` format.

spec/virl.md §4. Coordinates are ENU metres (x east, y north); heading = atan2(dx, dy) mod 360 (0 = north,
90 = east). Geocodes `[lat, lng]` exist only so route records keep the original schema; they are a local
equirectangular projection around the style's origin and map back to ENU exactly (up to float rounding).

A city is a pure function of `(seed, style, size_m)`, so route files only need to name those three numbers
(`city_meta.json` next to `route_infos.json`) and never store geometry.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import json
import math
import os
from typing import Any

import numpy as np

from recogdrive_jax.envs.styles import POI_CATEGORIES, CityStyle, get_style

COMPASS_WORDS: tuple[str, ...] = ("north", "northeast", "east", "southeast", "south", "southwest", "west",
                                  "northwest")
SPATIAL_WORDS: tuple[str, ...] = ("front", "right front", "right", "right behind", "behind", "left behind", "left",
                                  "left front")
ROAD_HALF_WIDTH = {"avenue": 10.0, "street": 7.0, "diagonal": 9.0}
SIDEWALK = 4.0
M_PER_DEG_LAT = 111320.0


def heading_of(dx: float, dy: float) -> float:
    """Compass heading in degrees of the vector (dx east, dy north)."""
    return math.degrees(math.atan2(dx, dy)) % 360.0


def compass_word(heading: float) -> str:
    """Nearest 45° compass bin."""
    return COMPASS_WORDS[int(math.floor(((heading % 360.0) + 22.5) / 45.0)) % 8]


def spatial_word(agent_heading: float, bearing: float) -> str:
    """Landmark bearing relative to the agent heading, snapped to 45° bins (geocode_utils semantics)."""
    diff = (bearing - agent_heading) % 360.0
    cands = np.arange(8) * 45.0
    d = np.abs(cands - diff)
    d = np.where(d > 180, 360 - d, d)
    return SPATIAL_WORDS[int(np.argmin(d))]


@dataclasses.dataclass
class Poi:
    name: str
    category: str
    xy: np.ndarray          # [2] sign centre on the facade (the place's geocode)
    edge: int               # road edge the lot fronts
    along: float            # position of the lot centre along the edge (metres from edge start)
    side: int               # +1 = left of edge direction, -1 = right
    building: int           # index into City.buildings
    sign_width: float
    sign_bottom: float
    sign_height: float


@dataclasses.dataclass
class City:
    """A generated city. Arrays are numpy; everything is deterministic in (seed, style, size_m)."""
    seed: int
    style: CityStyle
    size_m: float
    nodes: np.ndarray                 # [N, 2]
    edges: np.ndarray                 # [E, 2] node indices
    edge_kind: list[str]              # avenue / street / diagonal
    panos: np.ndarray                 # [P, 2]
    pano_edge: np.ndarray             # [P] edge index, -1 for node panos
    pano_node: np.ndarray             # [P] node index, -1 for edge panos
    buildings: np.ndarray             # [B, 4, 2] footprint corners (counter-clockwise), first edge faces road
    building_height: np.ndarray       # [B]
    building_color: np.ndarray        # [B, 3] uint8
    building_poi: np.ndarray          # [B] poi index or -1
    pois: list[Poi]
    adjacency: list[list[int]]        # node -> incident edge ids

    # ---- geocodes ---------------------------------------------------------------------------------------------
    def to_geocode(self, xy) -> list[float]:
        lat0, lng0 = self.style.origin
        x, y = float(xy[0]), float(xy[1])
        lat = lat0 + y / M_PER_DEG_LAT
        lng = lng0 + x / (M_PER_DEG_LAT * math.cos(math.radians(lat0)))
        return [round(lat, 8), round(lng, 8)]

    def to_xy(self, geocode) -> np.ndarray:
        lat0, lng0 = self.style.origin
        y = (float(geocode[0]) - lat0) * M_PER_DEG_LAT
        x = (float(geocode[1]) - lng0) * M_PER_DEG_LAT * math.cos(math.radians(lat0))
        return np.array([x, y])

    def distance(self, geo_a, geo_b) -> float:
        """Metres between two geocodes (flat-earth, exact for this projection)."""
        return float(np.linalg.norm(self.to_xy(geo_a) - self.to_xy(geo_b)))

    def heading_between(self, geo_a, geo_b) -> float:
        d = self.to_xy(geo_b) - self.to_xy(geo_a)
        return heading_of(d[0], d[1])

    # ---- panoramas --------------------------------------------------------------------------------------------
    def gps_to_pano(self, geocode, radius: float = 20.0) -> int | None:
        """Nearest panorama within `radius` metres (the original's offline `MAPPING_RADIUS` = 20), else None."""
        xy = self.to_xy(geocode)
        d = np.linalg.norm(self.panos - xy, axis=1)
        i = int(np.argmin(d))
        return i if d[i] <= radius else None

    def pano_geocode(self, pano: int) -> list[float]:
        return self.to_geocode(self.panos[pano])

    def edge_heading(self, e: int, from_node: int) -> float:
        a, b = self.edges[e]
        if from_node == b:
            a, b = b, a
        d = self.nodes[b] - self.nodes[a]
        return heading_of(d[0], d[1])

    def other_end(self, e: int, n: int) -> int:
        a, b = self.edges[e]
        return int(b if n == a else a)

    def edge_length(self, e: int) -> float:
        a, b = self.edges[e]
        return float(np.linalg.norm(self.nodes[b] - self.nodes[a]))


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------
def _connected(n_nodes: int, edges: list[tuple[int, int]]) -> bool:
    adj = [[] for _ in range(n_nodes)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    seen, stack = {0}, [0]
    while stack:
        u = stack.pop()
        for v in adj[u]:
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return len(seen) == n_nodes


def _poi_names(style: CityStyle, rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """Unique (name, category) pairs: '<word> <Category>'; a roman suffix only if the vocabulary runs out."""
    combos = [(w, c) for w in style.name_words for c in POI_CATEGORIES]
    order = rng.permutation(len(combos))
    out = []
    for k in range(count):
        w, c = combos[order[k % len(combos)]]
        rep = k // len(combos)
        suffix = ("", " II", " III", " IV", " V", " VI", " VII", " VIII")[rep] if rep < 8 else f" {rep + 1}"
        out.append((f"{w} {c}{suffix}", c))
    return out


def generate_city(seed: int, style: str | CityStyle = "nyc", size_m: float = 2000.0) -> City:
    """Anisotropic rotated grid with jitter, removed edges, 1–2 diagonal avenues, lots and named POIs."""
    style = get_style(style) if isinstance(style, str) else style
    rng = np.random.default_rng(seed)
    xs = [0.0]
    while xs[-1] < size_m:
        xs.append(xs[-1] + rng.uniform(200.0, 280.0))   # avenues (run north-south before rotation)
    ys = [0.0]
    while ys[-1] < size_m:
        ys.append(ys[-1] + rng.uniform(60.0, 90.0))     # streets
    xs, ys = np.array(xs) - xs[-1] / 2, np.array(ys) - ys[-1] / 2
    ni, nj = len(xs), len(ys)
    theta = math.radians(rng.uniform(-35.0, 35.0))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)      # [ni*nj, 2], index i*nj + j
    nodes = grid @ rot.T + rng.uniform(-5.0, 5.0, size=grid.shape)

    def nid(i, j):
        return i * nj + j

    grid_edges, kinds = [], []
    for i in range(ni):
        for j in range(nj):
            if i + 1 < ni:
                grid_edges.append((nid(i, j), nid(i + 1, j)))
                kinds.append("street")
            if j + 1 < nj:
                grid_edges.append((nid(i, j), nid(i, j + 1)))
                kinds.append("avenue")
    # 1–2 diagonal avenues through cell diagonals: 6-way junctions and intercardinal headings.
    diag_edges = []
    for _ in range(int(rng.integers(1, 3))):
        i, j = 0, int(rng.integers(0, max(1, nj - ni)))
        dj = 1 if rng.random() < 0.5 else -1
        if dj < 0:
            j = nj - 1 - j
        while 0 <= i + 1 < ni and 0 <= j + dj < nj:
            e = (nid(i, j), nid(i + 1, j + dj))
            if e not in diag_edges:
                diag_edges.append(e)
            i, j = i + 1, j + dj
    # Remove 5–10 % of grid edges, keeping the graph connected.
    keep = list(range(len(grid_edges)))
    n_remove = int(round(rng.uniform(0.05, 0.10) * len(grid_edges)))
    removed = 0
    for k in rng.permutation(len(grid_edges)):
        if removed >= n_remove:
            break
        trial = [grid_edges[m] for m in keep if m != k] + diag_edges
        if _connected(len(nodes), trial):
            keep.remove(int(k))
            removed += 1
    edges = [grid_edges[m] for m in keep] + diag_edges
    edge_kind = [kinds[m] for m in keep] + ["diagonal"] * len(diag_edges)
    edges_arr = np.array(edges, dtype=np.int64)
    adjacency = [[] for _ in range(len(nodes))]
    for e, (a, b) in enumerate(edges):
        adjacency[a].append(e)
        adjacency[b].append(e)

    # Lots along both sides of every edge; ~20 % become named POIs.
    buildings, heights, colors, lot_info = [], [], [], []
    diag_ids = [e for e, k in enumerate(edge_kind) if k == "diagonal"]
    for e, (a, b) in enumerate(edges):
        pa, pb = nodes[a], nodes[b]
        L = float(np.linalg.norm(pb - pa))
        u = (pb - pa) / L
        nrm = np.array([-u[1], u[0]])                       # left normal
        hw = ROAD_HALF_WIDTH[edge_kind[e]]
        clear_a = max(ROAD_HALF_WIDTH[edge_kind[f]] for f in adjacency[a]) + SIDEWALK + 1.0
        clear_b = max(ROAD_HALF_WIDTH[edge_kind[f]] for f in adjacency[b]) + SIDEWALK + 1.0
        for side in (1, -1):
            t = clear_a + rng.uniform(0.0, 2.0)
            while True:
                w = rng.uniform(8.0, 30.0)
                if t + w > L - clear_b:
                    break
                depth = rng.uniform(10.0, 18.0)
                off0 = hw + SIDEWALK
                c0 = pa + u * t + nrm * side * off0
                c1 = pa + u * (t + w) + nrm * side * off0
                c2 = c1 + nrm * side * depth
                c3 = c0 + nrm * side * depth
                quad = np.stack([c0, c1, c2, c3]) if side == -1 else np.stack([c1, c0, c3, c2])
                buildings.append(quad)
                heights.append(rng.uniform(*style.height_range))
                colors.append(style.facade_colors[int(rng.integers(len(style.facade_colors)))])
                lot_info.append((e, t + w / 2, side, w))
                t += w + rng.uniform(0.0, 1.5)
    buildings = np.array(buildings, dtype=np.float64).reshape(-1, 4, 2)
    # Drop lots that a diagonal avenue cuts through (the grid lots never overlap grid roads by construction).
    ok = np.ones(len(buildings), bool)
    if diag_ids and len(buildings):
        pts = np.concatenate([buildings, buildings.mean(1, keepdims=True)], 1)     # [B, 5, 2]
        for e in diag_ids:
            a, b = edges[e]
            d = _point_segment_distance(pts.reshape(-1, 2), nodes[a], nodes[b]).reshape(-1, 5)
            ok &= d.min(1) > ROAD_HALF_WIDTH["diagonal"] + SIDEWALK
    buildings = buildings[ok]
    heights = np.array(heights)[ok]
    colors = np.array(colors, dtype=np.uint8).reshape(-1, 3)[ok]
    lot_info = [li for li, k in zip(lot_info, ok) if k]

    is_poi = rng.random(len(buildings)) < 0.2
    poi_idx = np.flatnonzero(is_poi)
    names = _poi_names(style, rng, len(poi_idx))
    pois: list[Poi] = []
    building_poi = -np.ones(len(buildings), np.int64)
    for k, bi in enumerate(poi_idx):
        e, along, side, w = lot_info[bi]
        a, b = edges[e]
        u = (nodes[b] - nodes[a]) / np.linalg.norm(nodes[b] - nodes[a])
        nrm = np.array([-u[1], u[0]])
        hw = ROAD_HALF_WIDTH[edge_kind[e]]
        xy = nodes[a] + u * along + nrm * side * (hw + SIDEWALK)
        pois.append(Poi(name=names[k][0], category=names[k][1], xy=xy, edge=e, along=along, side=side,
                        building=int(bi), sign_width=min(0.85 * w, 12.0), sign_bottom=3.0, sign_height=2.6))
        building_poi[bi] = k

    # Panoramas: every node, every ~10 m along edges, plus one right in front of every POI (so the destination
    # pano faces its sign squarely).
    panos, pedge, pnode = [nodes[n] for n in range(len(nodes))], [-1] * len(nodes), list(range(len(nodes)))
    for e, (a, b) in enumerate(edges):
        L = float(np.linalg.norm(nodes[b] - nodes[a]))
        m = max(1, int(round(L / 10.0)))
        for k in range(1, m):
            panos.append(nodes[a] + (nodes[b] - nodes[a]) * (k / m))
            pedge.append(e)
            pnode.append(-1)
    for p in pois:
        a, b = edges[p.edge]
        u = (nodes[b] - nodes[a]) / np.linalg.norm(nodes[b] - nodes[a])
        panos.append(nodes[a] + u * p.along)
        pedge.append(p.edge)
        pnode.append(-1)
    return City(seed=seed, style=style, size_m=size_m, nodes=nodes, edges=edges_arr, edge_kind=edge_kind,
                panos=np.array(panos), pano_edge=np.array(pedge), pano_node=np.array(pnode), buildings=buildings,
                building_height=heights, building_color=colors, building_poi=building_poi, pois=pois,
                adjacency=adjacency)


@functools.lru_cache(maxsize=16)
def cached_city(seed: int, style: str, size_m: float) -> City:
    """Cities are deterministic; share one instance per (seed, style, size) inside a process."""
    return generate_city(seed, style, size_m)


def _point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[M, 2] points → [M] distances to segment ab."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------------------
def _turn_angle(h_in: float, h_out: float) -> float:
    return abs((h_out - h_in + 180.0) % 360.0 - 180.0)


def _shortest_path(city: City, start_edge: int, start_t: float, goal_edge: int, goal_t: float,
                   turn_penalty: float) -> list[int] | None:
    """Turn-penalised shortest path from a point on one edge to a point on another; returns the node sequence.

    State = (node, edge it was reached by). A heading change > 20° at a node costs `turn_penalty` metres;
    U-turns are forbidden.
    """
    a, b = (int(x) for x in city.edges[start_edge])
    L0 = city.edge_length(start_edge)
    heap = []
    # Leaving the start point towards a or b.
    heapq.heappush(heap, (start_t, a, start_edge, (a,)))
    heapq.heappush(heap, (L0 - start_t, b, start_edge, (b,)))
    best: dict[tuple[int, int], float] = {}
    ga, gb = (int(x) for x in city.edges[goal_edge])
    Lg = city.edge_length(goal_edge)
    result, result_cost = None, math.inf
    while heap:
        cost, n, e_in, path = heapq.heappop(heap)
        if cost >= result_cost:
            break
        if best.get((n, e_in), math.inf) <= cost:
            continue
        best[(n, e_in)] = cost
        prev = city.other_end(e_in, n)
        h_in = city.edge_heading(e_in, prev)
        for e in city.adjacency[n]:
            if e == e_in:
                continue
            h_out = city.edge_heading(e, n)
            turn = _turn_angle(h_in, h_out)
            if turn > 170.0:
                continue
            c = cost + (turn_penalty if turn > 20.0 else 0.0)
            if e == goal_edge:
                fin = c + (goal_t if n == ga else Lg - goal_t)
                if fin < result_cost:
                    result, result_cost = list(path), fin
                continue
            m = city.other_end(e, n)
            heapq.heappush(heap, (c + city.edge_length(e), m, e, path + (m,)))
    return result


def _milestones(points: list[np.ndarray], min_turn: float = 20.0) -> list[int]:
    """Indices of polyline vertices where the heading changes by more than `min_turn`."""
    keep = []
    for k in range(1, len(points) - 1):
        h0 = heading_of(*(points[k] - points[k - 1]))
        h1 = heading_of(*(points[k + 1] - points[k]))
        if _turn_angle(h0, h1) > min_turn:
            keep.append(k)
    return keep


def _nearest_poi(city: City, xy: np.ndarray, radius: float, exclude: int | None = None) -> int | None:
    if not city.pois:
        return None
    d = np.linalg.norm(np.stack([p.xy for p in city.pois]) - xy, axis=1)
    if exclude is not None:
        d[exclude] = np.inf
    i = int(np.argmin(d))
    return i if d[i] <= radius else None


def _block(key: str, value: str) -> str:
    return f'"{key}": "{value}"'


def make_route(city: City, rng: np.random.Generator, route_id: int, *, min_turns: int = 2, max_turns: int = 6,
               min_dist: float = 300.0, max_dist: float = 1500.0, landmark_p: float = 0.7,
               landmark_radius: float = 30.0, turn_penalty: float = 120.0, max_tries: int = 200) -> dict:
    """One route record in the original `route_infos` schema (spec §1.1).

    `landmark_radius` is 30 m rather than 20 m: in this city a sign hangs on a facade at least
    road-half-width + sidewalk (11–14 m) off the centreline and lots start ~15 m from the junction, so corner
    signs sit 19–30 m from the node.
    """
    edge_panos = np.flatnonzero(city.pano_edge >= 0)
    for _ in range(max_tries):
        sp = int(edge_panos[rng.integers(len(edge_panos))])
        se = int(city.pano_edge[sp])
        a, b = city.edges[se]
        st = float(np.linalg.norm(city.panos[sp] - city.nodes[a]))
        if min(st, city.edge_length(se) - st) < 20.0:          # mid-block start
            continue
        dists = np.array([np.linalg.norm(p.xy - city.panos[sp]) for p in city.pois])
        cand = np.flatnonzero((dists >= min_dist) & (dists <= max_dist))
        if len(cand) == 0:
            continue
        pi = int(cand[rng.integers(len(cand))])
        poi = city.pois[pi]
        if min(poi.along, city.edge_length(poi.edge) - poi.along) < 20.0:
            continue
        dest_xy = city.nodes[city.edges[poi.edge][0]] + (
            city.nodes[city.edges[poi.edge][1]] - city.nodes[city.edges[poi.edge][0]]) / city.edge_length(
            poi.edge) * poi.along
        path = _shortest_path(city, se, st, poi.edge, poi.along, turn_penalty)
        if path is None:
            continue
        points = [city.panos[sp]] + [city.nodes[n] for n in path] + [dest_xy]
        ms = _milestones(points)
        n_turns = len(ms)
        if not (min_turns <= n_turns <= max_turns):
            continue
        way = [points[0]] + [points[k] for k in ms] + [points[-1]]          # start, turn_1..turn_{n-1}, dest
        headings = [heading_of(*(way[k + 1] - way[k])) for k in range(len(way) - 1)]
        blocks, landmark_list = [], []
        for k, h in enumerate(headings):
            h_int = int(round(h)) % 360
            lines = [_block("to_next_intersection_heading", f"{h_int} ({compass_word(h)})")]
            if k == len(headings) - 1:
                bearing = heading_of(*(poi.xy - way[-1]))
                lines.append(_block("landmarks", f"The destination {poi.name} is on your "
                                                 f"{spatial_word(h_int, bearing)}"))
            else:
                node_xy = way[k + 1]
                li = _nearest_poi(city, node_xy, landmark_radius, exclude=pi) if rng.random() < landmark_p else None
                if li is not None:
                    lp = city.pois[li]
                    bearing = heading_of(*(lp.xy - node_xy))
                    lines.append(_block("landmarks", f"{lp.name} is on your {spatial_word(h_int, bearing)}"))
                    landmark_list.append({"name": lp.name, "geocode": city.to_geocode(lp.xy)})
            blocks.append("{\n    " + ",\n    ".join(lines) + "\n}")
        start_geo = city.pano_geocode(sp)
        return {
            "route_id": route_id,
            "start_place": {"name": f"Start point {route_id}", "geocode": start_geo, "relocated_geocode": start_geo},
            "dest_place": {"name": poi.name, "geocode": city.to_geocode(poi.xy)},
            "init_heading": 0,
            "milestone_info": "\n".join(blocks),
            "route_results": {"geocode_list": [city.to_geocode(p) for p in way[1:]],
                              "landmark_list": landmark_list},
        }
    raise RuntimeError(f"could not draw a route with {min_turns}-{max_turns} turns after {max_tries} tries "
                       f"(city seed {city.seed}, style {city.style.name}, size {city.size_m} m)")


def make_routes(city: City, n: int, seed: int, **kw) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [make_route(city, rng, i, **kw) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# route_infos.json I/O (spec §1.1: the file is `[routes, n]`)
# ---------------------------------------------------------------------------------------------------------------
_REQUIRED = {"start_place": ("name", "geocode", "relocated_geocode"), "dest_place": ("name", "geocode"),
             "milestone_info": None, "route_results": ("geocode_list", "landmark_list")}


def validate_route(route: Any, where: str) -> None:
    if not isinstance(route, dict):
        raise ValueError(f"{where}: expected a route dict, got {type(route).__name__}")
    for key, sub in _REQUIRED.items():
        if key not in route:
            raise ValueError(f"{where}: missing key {key!r}")
        if sub is not None:
            for s in sub:
                if s not in route[key]:
                    raise ValueError(f"{where}: missing key {key}.{s}")
    if not isinstance(route["milestone_info"], str):
        raise ValueError(f"{where}: milestone_info must be a string of dict blocks")
    if not route["route_results"]["geocode_list"]:
        raise ValueError(f"{where}: route_results.geocode_list is empty")


def save_route_infos(path: str, routes: list[dict], city: City | None = None) -> None:
    """Write `[routes, n]`; with `city`, also `city_meta.json` (seed/style/size) so the map can be rebuilt."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump([routes, len(routes)], f, indent=1)
    if city is not None:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "city_meta.json"), "w") as f:
            json.dump({"seed": city.seed, "style": city.style.name, "size_m": city.size_m}, f)


def load_route_infos(path: str) -> list[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read route_infos JSON ({err})") from err
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], list) and isinstance(data[1], int)):
        raise ValueError(f"{path}: expected [routes, n] (a list of route dicts and their count)")
    routes, n = data
    if n != len(routes):
        raise ValueError(f"{path}: header says {n} routes but the file holds {len(routes)}")
    for i, r in enumerate(routes):
        validate_route(r, f"{path}: route {i}")
    return routes


def load_city_meta(route_info_path: str) -> City:
    meta_path = os.path.join(os.path.dirname(os.path.abspath(route_info_path)), "city_meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        return cached_city(int(meta["seed"]), str(meta["style"]), float(meta["size_m"]))
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: expected {{'seed', 'style', 'size_m'}} describing the city ({err})") from err
