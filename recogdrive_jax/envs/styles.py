"""City styles: appearance palette + landmark-name vocabulary (spec/virl.md §4, visual OOD).

The graph generator, POI mix, sign placement, camera and templates are shared by every style; a style only
changes how the city *looks* and what its places are *called*. Train style `nyc` (style A) uses a vocabulary
disjoint from all OOD styles, so a policy cannot pass visual OOD by memorising names.
"""
from __future__ import annotations

import dataclasses

Color = tuple[int, int, int]

POI_CATEGORIES: tuple[str, ...] = (
    "Cafe", "Bank", "Pharmacy", "Hotel", "Church", "Park", "Bakery", "Bookstore", "Museum", "Library",
    "Restaurant", "Gym", "Theater", "Market", "Florist", "Diner",
)


@dataclasses.dataclass(frozen=True)
class CityStyle:
    """Everything that differs between the visual domains."""
    name: str
    origin: tuple[float, float]              # (lat, lng) of the map centre, only used for geocodes
    name_words: tuple[str, ...]              # first words of POI names (disjoint train vs OOD)
    facade_colors: tuple[Color, ...]
    window_color: Color
    window_period: tuple[float, float]       # (horizontal, vertical) window spacing in metres
    height_range: tuple[float, float]        # building heights in metres
    roof_color: Color
    sky_top: Color
    sky_bottom: Color
    road_color: Color
    sidewalk_color: Color
    lot_color: Color                         # ground between sidewalk and buildings (grass / concrete)
    marking_color: Color
    sign_bg: tuple[Color, ...]
    sign_fg: Color
    haze_color: Color
    haze_distance: float                     # metres; larger = clearer air
    sun_azimuth: float                       # degrees, for facade shading
    brightness: float                        # global light level (dusk < 1)
    tilt_deg: float = 0.0                    # horizon tilt (camera roll)
    grading: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel colour grade


def _s(name, origin, words, **kw) -> CityStyle:
    return CityStyle(name=name, origin=origin, name_words=tuple(words), **kw)


# Style A's appearance: the train style `nyc` and the OOD `nyc_new_map` (same look, new map and names) share it.
_NYC_LOOK = dict(
    facade_colors=((150, 80, 60), (170, 160, 150), (120, 110, 105), (185, 150, 110), (95, 90, 95), (200, 195, 185)),
    window_color=(60, 75, 95), window_period=(3.5, 3.5), height_range=(12.0, 60.0), roof_color=(70, 65, 60),
    sky_top=(90, 140, 210), sky_bottom=(190, 215, 240), road_color=(70, 70, 75),
    sidewalk_color=(160, 158, 150), lot_color=(140, 135, 125), marking_color=(230, 200, 60),
    sign_bg=((20, 40, 120), (150, 20, 30), (20, 100, 50), (30, 30, 30)), sign_fg=(250, 250, 250),
    haze_color=(200, 210, 225), haze_distance=600.0, sun_azimuth=135.0, brightness=1.0)

STYLES: dict[str, CityStyle] = {s.name: s for s in [
    _s("nyc", (40.7500, -73.9850),
       ["Hudson", "Bleecker", "Astor", "Bowery", "Chelsea", "Gramercy", "Lenox", "Madison", "Mercer", "Nassau",
        "Orchard", "Pearl", "Riverside", "Stuyvesant", "Tribeca", "Varick", "Waverly", "Amsterdam", "Battery",
        "Clinton", "Delancey", "Elm", "Fulton", "Greene", "Houston", "Irving", "Jane", "Kenmare", "Lafayette",
        "Mott", "Norfolk", "Prince", "Rivington", "Spring", "Thompson", "Union", "Vesey", "Warren", "York",
        "Bedford", "Carmine", "Downing", "Essex", "Ludlow", "Pell", "Bayard", "Crosby", "Doyers"],
       **_NYC_LOOK),
    _s("milan", (45.4640, 9.1900),
       ["Brera", "Navigli", "Sforza", "Duomo", "Ticinese", "Magenta", "Garibaldi", "Isola", "Castello",
        "Vittoria", "Monforte", "Solari", "Tortona", "Lambro", "Verdi", "Manzoni"],
       facade_colors=((215, 170, 110), (225, 200, 160), (190, 120, 80), (235, 220, 190)),
       window_color=(90, 70, 50), window_period=(3.0, 3.8), height_range=(14.0, 24.0), roof_color=(150, 70, 50),
       sky_top=(110, 150, 200), sky_bottom=(220, 225, 230), road_color=(95, 90, 85),
       sidewalk_color=(175, 165, 150), lot_color=(165, 150, 130), marking_color=(240, 240, 240),
       sign_bg=((120, 30, 40), (40, 40, 40), (200, 160, 40)), sign_fg=(255, 255, 240),
       haze_color=(215, 215, 215), haze_distance=350.0, sun_azimuth=200.0, brightness=0.95),
    _s("new_delhi", (28.6139, 77.2090),
       ["Chandni", "Lodhi", "Karol", "Hauz", "Paharganj", "Janpath", "Saket", "Dwarka", "Rajpath", "Okhla",
        "Nehru", "Malviya", "Lajpat", "Defence", "Greater", "Vasant"],
       facade_colors=((230, 200, 150), (210, 140, 90), (240, 230, 210), (180, 160, 120)),
       window_color=(70, 60, 50), window_period=(4.0, 3.2), height_range=(8.0, 20.0), roof_color=(120, 100, 80),
       sky_top=(180, 180, 170), sky_bottom=(230, 220, 200), road_color=(110, 105, 100),
       sidewalk_color=(190, 175, 150), lot_color=(185, 165, 130), marking_color=(250, 250, 250),
       sign_bg=((230, 120, 20), (20, 90, 160), (200, 30, 80)), sign_fg=(255, 255, 255),
       haze_color=(220, 210, 190), haze_distance=180.0, sun_azimuth=170.0, brightness=1.05),
    _s("buenos_aires", (-34.6037, -58.3816),
       ["Palermo", "Recoleta", "Belgrano", "Boedo", "Caballito", "Almagro", "Retiro", "Florida", "Corrientes",
        "Libertador", "Defensa", "Tacuari", "Callao", "Pueyrredon", "Bolivar", "Lavalle"],
       facade_colors=((200, 190, 170), (160, 170, 160), (220, 210, 200), (140, 120, 100)),
       window_color=(50, 55, 60), window_period=(3.2, 3.6), height_range=(12.0, 35.0), roof_color=(90, 90, 90),
       sky_top=(70, 120, 200), sky_bottom=(200, 220, 240), road_color=(60, 62, 68),
       sidewalk_color=(150, 150, 145), lot_color=(90, 130, 70), marking_color=(245, 245, 245),
       sign_bg=((60, 100, 180), (30, 30, 30), (180, 40, 40)), sign_fg=(255, 255, 255),
       haze_color=(200, 215, 230), haze_distance=500.0, sun_azimuth=30.0, brightness=1.0),
    _s("london", (51.5072, -0.1276),
       ["Camden", "Soho", "Mayfair", "Holborn", "Islington", "Hackney", "Belgravia", "Shoreditch", "Lambeth",
        "Marylebone", "Pimlico", "Southwark", "Fitzrovia", "Bloomsbury", "Clerkenwell", "Chelsham"],
       facade_colors=((140, 70, 55), (190, 185, 175), (110, 60, 50), (215, 210, 200)),
       window_color=(220, 220, 215), window_period=(3.0, 3.4), height_range=(10.0, 22.0), roof_color=(60, 60, 70),
       sky_top=(150, 155, 165), sky_bottom=(200, 202, 205), road_color=(55, 55, 58),
       sidewalk_color=(130, 130, 128), lot_color=(80, 110, 70), marking_color=(245, 245, 245),
       sign_bg=((20, 60, 40), (120, 20, 30), (20, 20, 60)), sign_fg=(240, 220, 150),
       haze_color=(190, 192, 195), haze_distance=250.0, sun_azimuth=180.0, brightness=0.8),
    _s("hong_kong", (22.3193, 114.1694),
       ["Kowloon", "Mongkok", "Wanchai", "Causeway", "Sheung", "Tsim", "Jordan", "Yau", "Aberdeen", "Stanley",
        "Sai", "Happy", "Quarry", "Tai", "Kwun", "Lantau"],
       facade_colors=((200, 200, 195), (150, 170, 180), (230, 225, 215), (120, 130, 140)),
       window_color=(40, 60, 80), window_period=(2.6, 2.9), height_range=(40.0, 120.0), roof_color=(100, 100, 100),
       sky_top=(120, 160, 200), sky_bottom=(210, 220, 230), road_color=(65, 65, 70),
       sidewalk_color=(170, 170, 165), lot_color=(160, 160, 155), marking_color=(240, 200, 40),
       sign_bg=((200, 20, 30), (250, 200, 0), (20, 120, 200)), sign_fg=(20, 20, 20),
       haze_color=(210, 215, 220), haze_distance=220.0, sun_azimuth=250.0, brightness=0.95),
    # Style A's look on a new map, but with OOD names (spec: "one of them A on a new map").
    _s("nyc_new_map", (40.7300, -73.9950),
       ["Greenpoint", "Flatbush", "Bushwick", "Dumbo", "Harlem", "Inwood", "Astoria", "Gowanus", "Redhook",
        "Kips", "Murray", "Yorkville", "Corona", "Flushing", "Ridgewood", "Canarsie"],
       **_NYC_LOOK),
    _s("melbourne", (-37.8136, 144.9631),
       ["Fitzroy", "Carlton", "Collingwood", "Richmond", "Brunswick", "Prahran", "Southbank", "Docklands",
        "Flinders", "Swanston", "Elizabeth", "Lonsdale", "Bourke", "Exhibition", "Spencer", "Toorak"],
       facade_colors=((180, 140, 100), (220, 215, 200), (100, 110, 120), (160, 90, 60)),
       window_color=(80, 90, 100), window_period=(3.6, 3.6), height_range=(10.0, 45.0), roof_color=(80, 80, 85),
       sky_top=(200, 120, 90), sky_bottom=(250, 190, 140), road_color=(60, 58, 60),
       sidewalk_color=(150, 140, 130), lot_color=(100, 130, 80), marking_color=(250, 250, 250),
       sign_bg=((40, 40, 40), (0, 110, 120), (140, 60, 20)), sign_fg=(255, 240, 200),
       haze_color=(240, 180, 140), haze_distance=300.0, sun_azimuth=290.0, brightness=0.75, tilt_deg=2.0),
    _s("lagos", (6.5244, 3.3792),
       ["Ikeja", "Yaba", "Surulere", "Lekki", "Ikoyi", "Apapa", "Marina", "Obalende", "Ajah", "Oshodi", "Mushin",
        "Festac", "Gbagada", "Ogba", "Isale", "Agege"],
       facade_colors=((230, 220, 120), (120, 180, 160), (230, 150, 120), (210, 210, 200)),
       window_color=(50, 50, 50), window_period=(4.2, 3.4), height_range=(6.0, 18.0), roof_color=(140, 60, 40),
       sky_top=(100, 160, 220), sky_bottom=(230, 235, 240), road_color=(90, 85, 80),
       sidewalk_color=(180, 150, 110), lot_color=(170, 120, 80), marking_color=(255, 255, 255),
       sign_bg=((0, 130, 60), (220, 40, 40), (250, 200, 20)), sign_fg=(10, 10, 10),
       haze_color=(235, 225, 200), haze_distance=260.0, sun_azimuth=90.0, brightness=1.1, grading=(1.05, 1.0, 0.9)),
    _s("sf", (37.7749, -122.4194),
       ["Mission", "Haight", "Castro", "Nob", "Marina", "Presidio", "Sunset", "Richmondo", "Embarcadero",
        "Dolores", "Potrero", "Noe", "Telegraph", "Russian", "Bernal", "Divisadero"],
       facade_colors=((240, 200, 210), (200, 230, 220), (250, 240, 190), (190, 210, 240), (240, 240, 235)),
       window_color=(70, 80, 90), window_period=(2.8, 3.2), height_range=(8.0, 16.0), roof_color=(110, 110, 115),
       sky_top=(140, 170, 200), sky_bottom=(225, 230, 235), road_color=(75, 75, 80),
       sidewalk_color=(185, 180, 175), lot_color=(110, 150, 90), marking_color=(250, 250, 250),
       sign_bg=((200, 60, 40), (40, 80, 140), (60, 60, 60)), sign_fg=(255, 255, 255),
       haze_color=(220, 225, 230), haze_distance=200.0, sun_azimuth=220.0, brightness=0.9, tilt_deg=-3.0,
       grading=(0.95, 1.0, 1.05)),
]}

TRAIN_STYLE = "nyc"
# VLN-mini replica order (spec §3: Milan, New Delhi, Buenos Aires, London, Hong Kong, NYC (new map), Melbourne,
# Lagos, SF); fixed so the evaluation is a frozen list.
VISUAL_OOD_STYLES: tuple[str, ...] = ("milan", "new_delhi", "buenos_aires", "london", "hong_kong", "nyc_new_map",
                                      "melbourne", "lagos", "sf")


def get_style(name: str) -> CityStyle:
    if name not in STYLES:
        raise KeyError(f"unknown city style {name!r}; expected one of {sorted(STYLES)}")
    return STYLES[name]
