"""Procedural 3-D toy scenes with exact labels: a vectorised numpy ray caster.

Each scene is a floor, optional walls (back and sides, of random height, with sky above), and a few
objects (spheres, boxes rotated about the vertical, upright cylinders), each with a semantic class and a
material (colour plus a solid, checker, stripe or noise texture). A random pinhole camera looks at the
scene; a directional light with cast shadows and an ambient term shade it. One primary ray per pixel
gives an image whose labels are **exact**: the class of the surface hit, its z-depth in metres and its
unit normal in the camera frame (OpenCV convention: x right, y down, z forward; normals face the camera).

Everything is deterministic from ``(seed, split, index)``. Appearance *domains* (palette, lighting,
sky) can be chosen per dataset, e.g. to train on ``day`` and test on ``evening``.

:func:`restyle_scene` keeps a scene's geometry (camera, walls, object shapes, poses and sizes) and
draws a new appearance (domain, light, sky, floor, wall and object materials): rendered, it has the
same seg, depth and normals as the original and a different image. :meth:`ToyScenes.oracle` makes
these re-renders for the gains study's ``real+oracle`` arm, what a perfect generator would give.

World frame: right-handed, y up, the floor is the plane y = 0, the camera looks roughly along +z.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.data.sample import DatasetInfo, Sample, SampleError

__all__ = [
    "CLASSES",
    "DOMAINS",
    "Camera",
    "Scene",
    "ToyScenes",
    "mirror_scene",
    "render_scene",
    "restyle_scene",
    "sample_scene",
]

CLASSES: tuple[str, ...] = ("sky", "floor", "wall", "sphere", "box", "cylinder")
SKY, FLOOR, WALL, SPHERE, BOX, CYLINDER = range(len(CLASSES))
_SHAPES = {"sphere": SPHERE, "box": BOX, "cylinder": CYLINDER}
_EPS = 1e-4

RGB = tuple[float, float, float]

# --------------------------------------------------------------------------------------------------
# Appearance domains
# --------------------------------------------------------------------------------------------------

_SATURATED: dict[str, RGB] = {
    "red": (0.75, 0.08, 0.06),
    "orange": (0.85, 0.38, 0.05),
    "yellow": (0.85, 0.72, 0.08),
    "green": (0.12, 0.55, 0.12),
    "teal": (0.05, 0.5, 0.5),
    "blue": (0.08, 0.2, 0.75),
    "purple": (0.42, 0.12, 0.6),
    "pink": (0.85, 0.35, 0.55),
    "white": (0.85, 0.85, 0.82),
    "black": (0.06, 0.06, 0.06),
}
_PASTEL: dict[str, RGB] = {
    "pale pink": (0.95, 0.72, 0.78),
    "mint": (0.65, 0.9, 0.75),
    "lavender": (0.75, 0.7, 0.92),
    "sky blue": (0.62, 0.8, 0.95),
    "cream": (0.95, 0.9, 0.7),
    "peach": (0.98, 0.76, 0.6),
}


@dataclass(frozen=True)
class Domain:
    """Appearance style: object palette, light, sky and the words the caption uses for the light."""

    palette: dict[str, RGB]
    elevation_deg: tuple[float, float]
    light_rgb: RGB
    strength: tuple[float, float]
    ambient: RGB
    sky_horizon: RGB
    sky_zenith: RGB
    light_words: tuple[str, ...]


DOMAINS: dict[str, Domain] = {
    "day": Domain(
        _SATURATED,
        (40, 75),
        (1.0, 0.98, 0.92),
        (1.0, 1.25),
        (0.32, 0.34, 0.38),
        (0.75, 0.85, 0.95),
        (0.3, 0.5, 0.85),
        ("bright daylight", "midday sun"),
    ),
    "evening": Domain(
        _SATURATED,
        (8, 22),
        (1.0, 0.62, 0.32),
        (0.9, 1.2),
        (0.18, 0.16, 0.24),
        (0.95, 0.6, 0.35),
        (0.3, 0.25, 0.5),
        ("low evening light", "warm sunset light"),
    ),
    "studio": Domain(
        _PASTEL,
        (50, 80),
        (1.0, 1.0, 1.0),
        (0.6, 0.8),
        (0.5, 0.5, 0.52),
        (0.9, 0.9, 0.9),
        (0.8, 0.8, 0.82),
        ("soft studio light", "even diffuse light"),
    ),
    "night": Domain(
        _SATURATED,
        (55, 85),
        (0.7, 0.8, 1.0),
        (0.45, 0.6),
        (0.06, 0.07, 0.12),
        (0.08, 0.1, 0.2),
        (0.01, 0.01, 0.05),
        ("dim night light", "cold moonlight"),
    ),
}

_FLOORS: dict[str, tuple[str, RGB, RGB]] = {  # name -> (texture, colour a, colour b)
    "wooden": ("wood", (0.45, 0.27, 0.12), (0.3, 0.16, 0.06)),
    "tiled": ("checker", (0.8, 0.8, 0.78), (0.25, 0.25, 0.28)),
    "concrete": ("noise", (0.5, 0.5, 0.48), (0.38, 0.38, 0.37)),
    "grassy": ("noise", (0.2, 0.45, 0.12), (0.12, 0.3, 0.08)),
    "sandy": ("noise", (0.76, 0.66, 0.45), (0.62, 0.52, 0.33)),
}
_WALLS: dict[str, tuple[str, RGB, RGB]] = {
    "white": ("solid", (0.85, 0.84, 0.8), (0.85, 0.84, 0.8)),
    "grey": ("solid", (0.5, 0.5, 0.52), (0.5, 0.5, 0.52)),
    "brick": ("brick", (0.6, 0.22, 0.15), (0.75, 0.7, 0.65)),
    "striped": ("stripes", (0.8, 0.75, 0.55), (0.55, 0.45, 0.3)),
    "blue": ("solid", (0.35, 0.45, 0.65), (0.35, 0.45, 0.65)),
}
_OBJECT_TEXTURES = {"solid": "", "checker": "checkered", "stripes": "striped", "noise": "speckled"}


# --------------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------------


@dataclass
class Material:
    texture: str  # solid | checker | stripes | noise | wood | brick
    color_a: RGB
    color_b: RGB
    scale: float = 0.3
    angle: float = 0.0
    phases: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    shininess: float = 0.0


@dataclass
class Obj:
    shape: str  # sphere | box | cylinder
    center: tuple[float, float, float]  # base centre for box/cylinder (y = 0), centre for sphere
    size: tuple[float, float, float]  # sphere: (r, r, r); box: half extents; cylinder: (r, height, r)
    yaw: float
    material: Material
    color_name: str

    @property
    def footprint(self) -> float:
        if self.shape == "box":
            return math.hypot(self.size[0], self.size[2])
        return self.size[0]


@dataclass
class Camera:
    position: tuple[float, float, float]
    yaw: float
    pitch: float  # radians, positive looks down
    fov_x_deg: float

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World-frame unit vectors of the camera's x (right), y (down) and z (forward) axes."""
        cy, sy, cp, sp = math.cos(self.yaw), math.sin(self.yaw), math.cos(self.pitch), math.sin(self.pitch)
        f = np.array([sy * cp, -sp, cy * cp])
        r = np.array([-cy, 0.0, sy])  # normalised cross(f, up)
        d = np.array([-sy * sp, -cp, -cy * sp])  # cross(f, r)
        return r, d, f

    def intrinsics(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) in pixels, square pixels, principal point at the centre."""
        fx = (width / 2) / math.tan(math.radians(self.fov_x_deg) / 2)
        return fx, fx, width / 2, height / 2


@dataclass
class Scene:
    camera: Camera
    light_dir: tuple[float, float, float]  # unit vector towards the light
    light_rgb: RGB
    ambient: RGB
    sky_horizon: RGB
    sky_zenith: RGB
    floor: Material
    floor_name: str
    walls: dict[str, float]  # "back": z, "left": x, "right": -x ; present walls only
    wall_height: float
    wall: Material
    wall_name: str
    objects: list[Obj] = field(default_factory=list)
    domain: str = "day"
    light_words: str = ""

    def caption(self) -> str:
        """A sentence such as 'a red sphere and a striped box on a wooden floor, low evening light'."""
        phrases = []
        for o in sorted(self.objects, key=lambda o: o.center[0]):
            tex = _OBJECT_TEXTURES.get(o.material.texture, "")
            words = " ".join(w for w in (tex, o.color_name, o.shape) if w)
            phrases.append(("an " if words[0] in "aeiou" else "a ") + words)
        if not phrases:
            things = "an empty scene"
        elif len(phrases) == 1:
            things = phrases[0]
        else:
            things = ", ".join(phrases[:-1]) + " and " + phrases[-1]
        text = f"{things} on a {self.floor_name} floor"
        if "back" in self.walls:
            text += f" in front of a {self.wall_name} wall"
        return f"{text}, {self.light_words}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _material(rng: np.random.Generator, texture: str, a: RGB, b: RGB, scale: tuple[float, float]) -> Material:
    return Material(
        texture=texture,
        color_a=a,
        color_b=b,
        scale=float(rng.uniform(*scale)),
        angle=float(rng.uniform(0, math.pi)),
        phases=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, 4)),
    )


def _shade_of(c: RGB, rng: np.random.Generator) -> RGB:
    k = float(rng.uniform(0.45, 0.7))
    return (c[0] * k, c[1] * k, c[2] * k)


def _apart(a: Obj, b: Obj) -> bool:
    """Whether two objects' footprints on the floor keep a 10 cm gap."""
    return math.hypot(a.center[0] - b.center[0], a.center[2] - b.center[2]) > a.footprint + b.footprint + 0.1


def _draw_object(rng: np.random.Generator, dom: Domain, camera: Camera, names: list[str]) -> Obj:
    """One random object in front of the camera (shape, size, place, colour from the domain's palette)."""
    shape = str(rng.choice(list(_SHAPES)))
    if shape == "sphere":
        r = float(rng.uniform(0.3, 0.7))
        size = (r, r, r)
    elif shape == "box":
        size = (float(rng.uniform(0.25, 0.6)), float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.6)))
    else:
        size = (float(rng.uniform(0.2, 0.5)), float(rng.uniform(0.5, 1.8)), 0.0)
        size = (size[0], size[1], size[0])
    z = float(rng.uniform(2.6, 7.0))
    x = camera.position[0] + z * math.tan(camera.yaw) + float(rng.uniform(-0.42, 0.42)) * z
    y = size[0] if shape == "sphere" else 0.0
    name = names[int(rng.integers(len(names)))]
    color = dom.palette[name]
    texture = str(rng.choice(list(_OBJECT_TEXTURES), p=[0.5, 0.15, 0.2, 0.15]))
    mat = _material(rng, texture, color, _shade_of(color, rng), (0.08, 0.2))
    mat.shininess = float(rng.choice([0.0, 0.0, 0.35]))
    return Obj(shape, (x, y, z), size, float(rng.uniform(0, math.pi)), mat, name)


def sample_scene(
    rng: np.random.Generator, domain: str = "day", min_objects: int = 2, max_objects: int = 5
) -> Scene:
    """Draw a random scene description in the given appearance domain."""
    if domain not in DOMAINS:
        raise KeyError(f"unknown toy-scene domain {domain!r}; valid: {', '.join(DOMAINS)}")
    dom = DOMAINS[domain]
    camera = Camera(
        position=(float(rng.uniform(-0.5, 0.5)), float(rng.uniform(1.0, 2.0)), 0.0),
        yaw=float(rng.uniform(-0.25, 0.25)),
        pitch=math.radians(float(rng.uniform(12, 28))),
        fov_x_deg=float(rng.uniform(55, 70)),
    )
    elev = math.radians(float(rng.uniform(*dom.elevation_deg)))
    azim = float(rng.uniform(-math.pi, math.pi))
    light_dir = (math.cos(elev) * math.sin(azim), math.sin(elev), math.cos(elev) * math.cos(azim))
    strength = float(rng.uniform(*dom.strength))

    floor_name = str(rng.choice(list(_FLOORS)))
    ftex, fa, fb = _FLOORS[floor_name]
    wall_name = str(rng.choice(list(_WALLS)))
    wtex, wa, wb = _WALLS[wall_name]
    walls: dict[str, float] = {}
    if rng.random() < 0.8:
        walls["back"] = float(rng.uniform(8.0, 11.0))
    for side in ("left", "right"):
        if rng.random() < 0.45:
            walls[side] = float(rng.uniform(3.5, 5.0))

    objects: list[Obj] = []
    names = list(dom.palette)
    n_obj = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(n_obj):
        for _attempt in range(30):
            cand = _draw_object(rng, dom, camera, names)
            if all(_apart(cand, o) for o in objects):
                objects.append(cand)
                break

    return Scene(
        camera=camera,
        light_dir=light_dir,
        light_rgb=(dom.light_rgb[0] * strength, dom.light_rgb[1] * strength, dom.light_rgb[2] * strength),
        ambient=dom.ambient,
        sky_horizon=dom.sky_horizon,
        sky_zenith=dom.sky_zenith,
        floor=_material(rng, ftex, fa, fb, (0.35, 0.8)),
        floor_name=floor_name,
        walls=walls,
        wall_height=float(rng.uniform(2.2, 4.5)),
        wall=_material(rng, wtex, wa, wb, (0.2, 0.45)),
        wall_name=wall_name,
        objects=objects,
        domain=domain,
        light_words=str(rng.choice(list(dom.light_words))),
    )


def restyle_scene(scene: Scene, rng: np.random.Generator, domain: str) -> Scene:
    """The same geometry with a new appearance drawn in ``domain``.

    Kept: the camera, the walls (which, where, how high), every object's shape, position, size and yaw.
    Drawn anew: the light (direction, colour, strength), ambient and sky of ``domain``, the floor and
    wall materials, and each object's colour (from the domain's palette), texture and gloss. The
    rendered labels (seg, depth, normals) are therefore identical to the original's.
    """
    if domain not in DOMAINS:
        raise KeyError(f"unknown toy-scene domain {domain!r}; valid: {', '.join(DOMAINS)}")
    dom = DOMAINS[domain]
    elev = math.radians(float(rng.uniform(*dom.elevation_deg)))
    azim = float(rng.uniform(-math.pi, math.pi))
    strength = float(rng.uniform(*dom.strength))
    floor_name = str(rng.choice(list(_FLOORS)))
    ftex, fa, fb = _FLOORS[floor_name]
    wall_name = str(rng.choice(list(_WALLS)))
    wtex, wa, wb = _WALLS[wall_name]
    names = list(dom.palette)
    objects = []
    for o in scene.objects:
        name = names[int(rng.integers(len(names)))]
        color = dom.palette[name]
        texture = str(rng.choice(list(_OBJECT_TEXTURES), p=[0.5, 0.15, 0.2, 0.15]))
        mat = _material(rng, texture, color, _shade_of(color, rng), (0.08, 0.2))
        mat.shininess = float(rng.choice([0.0, 0.0, 0.35]))
        objects.append(Obj(o.shape, o.center, o.size, o.yaw, mat, name))
    return Scene(
        camera=scene.camera,
        light_dir=(math.cos(elev) * math.sin(azim), math.sin(elev), math.cos(elev) * math.cos(azim)),
        light_rgb=(dom.light_rgb[0] * strength, dom.light_rgb[1] * strength, dom.light_rgb[2] * strength),
        ambient=dom.ambient,
        sky_horizon=dom.sky_horizon,
        sky_zenith=dom.sky_zenith,
        floor=_material(rng, ftex, fa, fb, (0.35, 0.8)),
        floor_name=floor_name,
        walls=dict(scene.walls),
        wall_height=scene.wall_height,
        wall=_material(rng, wtex, wa, wb, (0.2, 0.45)),
        wall_name=wall_name,
        objects=objects,
        domain=domain,
        light_words=str(rng.choice(list(dom.light_words))),
    )


# --------------------------------------------------------------------------------------------------
# Ray casting
# --------------------------------------------------------------------------------------------------


def mirror_scene(scene: Scene) -> Scene:
    """The scene mirrored in the world's x: rendered, it is the original's render flipped left-right
    (seg and depth exactly; normals with x negated). The oracle of the ``hflip`` layout edit."""
    swap = {"left": "right", "right": "left"}
    cam = scene.camera
    objects = [
        Obj(o.shape, (-o.center[0], o.center[1], o.center[2]), o.size, -o.yaw, o.material, o.color_name)
        for o in scene.objects
    ]
    lx, ly, lz = scene.light_dir
    return Scene(
        **{
            **{f: getattr(scene, f) for f in scene.__dataclass_fields__},
            "camera": Camera(
                (-cam.position[0], cam.position[1], cam.position[2]), -cam.yaw, cam.pitch, cam.fov_x_deg
            ),
            "light_dir": (-lx, ly, lz),
            "walls": {swap.get(k, k): v for k, v in scene.walls.items()},
            "objects": objects,
        }
    )


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _hit_plane(o: np.ndarray, d: np.ndarray, axis: int, value: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (value - o[:, axis]) / d[:, axis]
    return np.where(t > _EPS, t, np.inf)


def _hit_sphere(o: np.ndarray, d: np.ndarray, obj: Obj) -> np.ndarray:
    oc = o - np.asarray(obj.center)
    a = np.einsum("ij,ij->i", d, d)
    b = 2.0 * np.einsum("ij,ij->i", d, oc)
    c = np.einsum("ij,ij->i", oc, oc) - obj.size[0] ** 2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _to_box(o: np.ndarray, d: np.ndarray, obj: Obj) -> tuple[np.ndarray, np.ndarray]:
    rot = _yaw_matrix(obj.yaw)  # local -> world
    centre = np.array([obj.center[0], obj.size[1], obj.center[2]])
    return (o - centre) @ rot, d @ rot


def _hit_box(o: np.ndarray, d: np.ndarray, obj: Obj) -> np.ndarray:
    ol, dl = _to_box(o, d, obj)
    h = np.asarray(obj.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-h - ol) / dl
        t2 = (h - ol) / dl
    tmin = np.nanmax(np.minimum(t1, t2), axis=1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=1)
    return np.where((tmax >= tmin) & (tmin > _EPS), tmin, np.inf)


def _hit_cylinder(o: np.ndarray, d: np.ndarray, obj: Obj) -> np.ndarray:
    r, height = obj.size[0], obj.size[1]
    ox, oz = o[:, 0] - obj.center[0], o[:, 2] - obj.center[2]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = 2 * (d[:, 0] * ox + d[:, 2] * oz)
    c = ox**2 + oz**2 - r * r
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        ts = (-b - np.sqrt(disc)) / (2 * a)
        ys = o[:, 1] + ts * d[:, 1]
        side = np.where((disc >= 0) & (ts > _EPS) & (ys >= 0) & (ys <= height), ts, np.inf)
        tc = (height - o[:, 1]) / d[:, 1]
    px, pz = ox + tc * d[:, 0], oz + tc * d[:, 2]
    cap = np.where((tc > _EPS) & (px**2 + pz**2 <= r * r), tc, np.inf)
    return np.minimum(side, cap)


_GAMMA_LUT = (np.linspace(0, 1, 4096) ** (1 / 1.6) * 255 + 0.5).astype(np.uint8)

_HIT = {"sphere": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder}


def _bounding_sphere(obj: Obj) -> tuple[np.ndarray, float]:
    """World centre and radius of a sphere enclosing ``obj``."""
    if obj.shape == "sphere":
        return np.asarray(obj.center, dtype=np.float64), obj.size[0]
    centre = np.array([obj.center[0], obj.size[1] if obj.shape == "box" else obj.size[1] / 2, obj.center[2]])
    if obj.shape == "box":
        return centre, float(np.linalg.norm(obj.size))
    return centre, math.hypot(obj.size[0], obj.size[1] / 2)


def _screen_rect(
    obj: Obj, cam: Camera, axes: tuple[np.ndarray, np.ndarray, np.ndarray], height: int, width: int
) -> tuple[slice, slice]:
    """Conservative pixel rectangle (rows, cols) outside which no primary ray can hit ``obj``."""
    centre, radius = _bounding_sphere(obj)
    r, dn, f = axes
    rel = centre - np.asarray(cam.position)
    x, y, z = rel @ r, rel @ dn, rel @ f
    full = (slice(0, height), slice(0, width))
    if z - radius <= 0.05:
        return full
    fx, fy, cx, cy = cam.intrinsics(height, width)

    def span(c: float, focal: float, centre_px: float, size: int) -> slice:
        lo = min((c - radius) / (z - radius), (c - radius) / (z + radius))
        hi = max((c + radius) / (z - radius), (c + radius) / (z + radius))
        a = max(0, math.floor(centre_px + focal * lo - 0.5) - 1)
        b = min(size, math.ceil(centre_px + focal * hi - 0.5) + 2)
        return slice(a, max(a, b))

    return span(y, fy, cy, height), span(x, fx, cx, width)


def _object_normal(p: np.ndarray, obj: Obj) -> tuple[np.ndarray, np.ndarray]:
    """World normals and 2-D texture coordinates (metres) for hit points ``p`` (M, 3) on ``obj``."""
    if obj.shape == "sphere":
        n = (p - np.asarray(obj.center)) / obj.size[0]
        uv = np.stack(
            [np.arctan2(n[:, 0], n[:, 2]) * obj.size[0], np.arcsin(np.clip(n[:, 1], -1, 1)) * obj.size[0]], 1
        )
        return n, uv
    if obj.shape == "box":
        rot = _yaw_matrix(obj.yaw)
        centre = np.array([obj.center[0], obj.size[1], obj.center[2]])
        pl = (p - centre) @ rot
        h = np.asarray(obj.size)
        rel = np.abs(pl) / h
        axis = np.argmax(rel, axis=1)
        nl = np.zeros_like(pl)
        nl[np.arange(len(p)), axis] = np.sign(pl[np.arange(len(p)), axis])
        # texture coords: the two in-face local coordinates
        u = np.where(axis == 0, pl[:, 2], pl[:, 0])
        v = np.where(axis == 1, pl[:, 2], pl[:, 1])
        return nl @ rot.T, np.stack([u, v], 1)
    # cylinder
    r, height = obj.size[0], obj.size[1]
    dx, dz = p[:, 0] - obj.center[0], p[:, 2] - obj.center[2]
    on_cap = np.abs(p[:, 1] - height) < 2e-4  # float32 hit points: tolerance well above rounding
    n = np.stack([dx / r, np.zeros_like(dx), dz / r], 1)
    n[on_cap] = (0.0, 1.0, 0.0)
    uv = np.stack([np.arctan2(dx, dz) * r, p[:, 1]], 1)
    uv[on_cap] = np.stack([dx[on_cap], dz[on_cap]], 1)
    return n, uv


def _texture(mat: Material, uv: np.ndarray) -> np.ndarray:
    """Albedo (M, 3) of a material at texture coordinates ``uv`` (M, 2), in metres."""
    ca, cb = np.asarray(mat.color_a, np.float32), np.asarray(mat.color_b, np.float32)
    uv = uv.astype(np.float32)
    if mat.texture == "solid":
        return np.broadcast_to(ca, (len(uv), 3)).copy()
    s, ang, ph = mat.scale, mat.angle, mat.phases
    u, v = uv[:, 0], uv[:, 1]
    if mat.texture == "checker":
        m = (np.floor(u / s) + np.floor(v / s)) % 2
    elif mat.texture == "stripes":
        m = np.floor((u * math.cos(ang) + v * math.sin(ang)) / s) % 2
    elif mat.texture == "brick":
        row = np.floor(v / (s * 0.5))
        uu = u / s + 0.5 * (row % 2)
        mortar = ((v / (s * 0.5)) % 1 < 0.12) | (uu % 1 < 0.06)
        m = mortar.astype(np.float64)
    elif mat.texture == "wood":
        warp = 0.15 * np.sin(u * 1.3 + ph[0]) + 0.05 * np.sin(u * 4.1 + ph[1])
        grain = np.sin((v + warp) * (2 * math.pi / (s * 0.35)) + ph[2])
        plank = np.floor(u / s) % 2
        m = np.clip(0.5 + 0.35 * grain + 0.15 * (plank - 0.5), 0, 1)
    elif mat.texture == "noise":
        k = 2 * math.pi / s
        m = (
            np.sin(k * u + ph[0]) * np.sin(k * 0.8 * v + ph[1])
            + 0.6 * np.sin(k * 2.3 * (u * 0.6 + v * 0.8) + ph[2])
            + 0.4 * np.sin(k * 3.7 * (v * 0.6 - u * 0.8) + ph[3])
        )
        m = np.clip(0.5 + 0.3 * m, 0, 1)
    else:
        raise ValueError(f"unknown texture {mat.texture!r}")
    return ca + (cb - ca) * m[:, None].astype(np.float32)


_WALL_AXES = {"back": (2, 1.0), "left": (0, 1.0), "right": (0, -1.0)}
"""Wall name -> (world axis of its normal, sign of its plane offset)."""


def render_scene(scene: Scene, height: int, width: int) -> dict[str, np.ndarray]:
    """Ray-cast a scene: returns ``image`` (H,W,3) uint8, ``seg`` (H,W) uint8, ``depth`` (H,W) float32
    z-depth in metres (0 = sky), ``normal`` (H,W,3) float32 camera-frame unit normals (0 = sky) and
    ``instance`` (H,W) int16 (-1 sky, 0 floor, 1.. walls, then objects)."""
    cam = scene.camera
    r, dn, f = cam.axes()
    fx, fy, cx, cy = cam.intrinsics(height, width)
    xc = (np.tile(np.arange(width), height) + 0.5 - cx) / fx
    yc = (np.repeat(np.arange(height), width) + 0.5 - cy) / fy
    # Ray directions with unit camera-z component: the ray parameter t *is* the z-depth.
    d = (xc[:, None] * r + yc[:, None] * dn + f).astype(np.float32)
    o = np.broadcast_to(np.asarray(cam.position, dtype=np.float32), d.shape)
    prim, depth, classes = _intersect(scene, o, d, (r, dn, f), height, width)
    sky = prim == -1
    points = o + depth[:, None] * d
    normal_w, albedo, shininess, seg = _surfaces(scene, prim, points, classes)
    color = _shade(scene, d, points, depth, sky, normal_w, albedo, shininess)
    image = _GAMMA_LUT[(np.clip(color, 0, 1) * (len(_GAMMA_LUT) - 1) + 0.5).astype(np.intp)]
    normal_c = np.stack([normal_w @ r, normal_w @ dn, normal_w @ f], axis=1)
    norm = np.linalg.norm(normal_c, axis=1, keepdims=True)
    normal_c = np.divide(normal_c, norm, out=np.zeros_like(normal_c), where=norm > 0)
    return {
        "image": image.reshape(height, width, 3),
        "seg": seg.reshape(height, width),
        "depth": depth.reshape(height, width).astype(np.float32),
        "normal": normal_c.reshape(height, width, 3).astype(np.float32),
        "instance": prim.reshape(height, width).astype(np.int16),
    }


def _intersect(
    scene: Scene,
    o: np.ndarray,
    d: np.ndarray,
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
    height: int,
    width: int,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The nearest primitive of every ray (floor, walls below their height, objects): its index (-1 for
    sky), its depth (0 for sky) and the class of each primitive."""
    n_pix = d.shape[0]
    hits: list[np.ndarray] = [_hit_plane(o, d, 1, 0.0)]
    classes: list[int] = [FLOOR]
    for name, dist in scene.walls.items():
        axis, sign = _WALL_AXES[name]
        t = _hit_plane(o, d, axis, sign * dist)
        y = o[:, 1] + np.where(np.isfinite(t), t, 0) * d[:, 1]
        hits.append(np.where(y <= scene.wall_height, t, np.inf))
        classes.append(WALL)
    for obj in scene.objects:
        t_obj = np.full(n_pix, np.inf)
        rows, cols = _screen_rect(obj, scene.camera, axes, height, width)
        if rows.start < rows.stop and cols.start < cols.stop:
            idx = (np.arange(height)[rows, None] * width + np.arange(width)[None, cols]).ravel()
            t_obj[idx] = _HIT[obj.shape](o[idx], d[idx], obj)
        hits.append(t_obj)
        classes.append(_SHAPES[obj.shape])
    t_all = np.stack(hits)  # (P, N)
    prim = np.argmin(t_all, axis=0)
    depth = t_all[prim, np.arange(n_pix)]
    sky = ~np.isfinite(depth)
    prim[sky] = -1
    return prim, np.where(sky, 0.0, depth), classes


def _surfaces(
    scene: Scene, prim: np.ndarray, points: np.ndarray, classes: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """World normals, albedo, shininess and class of every pixel from the primitive it hit."""
    n_pix = len(prim)
    normal_w, albedo = np.zeros((n_pix, 3)), np.zeros((n_pix, 3))
    shininess = np.zeros(n_pix)
    seg = np.full(n_pix, SKY, dtype=np.uint8)
    wall_names = list(scene.walls)
    for p_idx, cls in enumerate(classes):
        m = prim == p_idx
        if not m.any():
            continue
        seg[m] = cls
        pts = points[m]
        if p_idx == 0:  # floor
            normal_w[m] = (0.0, 1.0, 0.0)
            albedo[m] = _texture(scene.floor, pts[:, [0, 2]])
        elif p_idx <= len(wall_names):
            axis, sign = _WALL_AXES[wall_names[p_idx - 1]]
            nrm = np.zeros(3)
            nrm[axis] = -sign
            normal_w[m] = nrm
            uv = pts[:, [0, 1]] if axis == 2 else pts[:, [2, 1]]
            albedo[m] = _texture(scene.wall, uv)
        else:
            obj = scene.objects[p_idx - 1 - len(wall_names)]
            nrm, uv = _object_normal(pts, obj)
            normal_w[m] = nrm
            albedo[m] = _texture(obj.material, uv)
            shininess[m] = obj.material.shininess
    return normal_w, albedo, shininess, seg


def _shade(
    scene: Scene,
    d: np.ndarray,
    points: np.ndarray,
    depth: np.ndarray,
    sky: np.ndarray,
    normal_w: np.ndarray,
    albedo: np.ndarray,
    shininess: np.ndarray,
) -> np.ndarray:
    """Linear colour: ambient + directional light with cast shadows from objects, a touch of specular,
    a sky gradient and a distance haze."""
    light = np.asarray(scene.light_dir)
    lambert = np.clip(normal_w @ light, 0.0, None)
    lit = (~sky) & (lambert > 0)
    if scene.objects and lit.any():
        lit_idx = np.flatnonzero(lit)
        lambert[lit_idx[_in_shadow(scene, points[lit_idx] + normal_w[lit_idx] * 1e-3, light)]] = 0.0
    color = albedo * (np.asarray(scene.ambient) + lambert[:, None] * np.asarray(scene.light_rgb))
    shiny = np.flatnonzero((shininess > 0) & (lambert > 0))
    if shiny.size:  # Blinn-Phong highlight on glossy objects
        half = light - d[shiny] / np.linalg.norm(d[shiny], axis=1, keepdims=True)
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        cos_h = np.clip(np.einsum("ij,ij->i", normal_w[shiny], half), 0, None)
        color[shiny] += (shininess[shiny] * cos_h**40)[:, None]
    if sky.any():  # vertical gradient from horizon to zenith
        elev = np.clip(d[sky, 1] / np.linalg.norm(d[sky], axis=1), 0, 1) ** 0.6
        color[sky] = (
            np.asarray(scene.sky_horizon) * (1 - elev[:, None]) + np.asarray(scene.sky_zenith) * elev[:, None]
        )
    # Gentle distance haze towards the horizon colour keeps far surfaces readable.
    haze = (1 - np.exp(-depth / 40.0))[:, None]
    color += (np.asarray(scene.sky_horizon) - color) * haze  # sky pixels have depth 0: no haze
    return color


def _in_shadow(scene: Scene, so: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Whether a ray from each surface point ``so`` towards the light hits an object."""
    in_shadow = np.zeros(len(so), dtype=bool)
    for ob in scene.objects:
        centre, radius = _bounding_sphere(ob)
        v = centre - so
        proj = v @ light
        cand = np.flatnonzero((proj > -radius) & (np.einsum("ij,ij->i", v, v) - proj**2 < radius**2))
        if cand.size:
            t = _HIT[ob.shape](so[cand], np.broadcast_to(light, (cand.size, 3)), ob)
            in_shadow[cand] |= np.isfinite(t)
    return in_shadow


# --------------------------------------------------------------------------------------------------
# Dataset adapter
# --------------------------------------------------------------------------------------------------

_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


class ToyScenes:
    """Procedural toy-scene dataset: ``num_images`` scenes, deterministic from ``(seed, split, index)``.

    Args:
        num_images: number of samples.
        image_size: (height, width) to render at.
        seed: dataset seed; the ``train``, ``val`` and ``test`` splits draw from disjoint random streams.
        split: ``train``, ``val`` or ``test``.
        domains: appearance domains, one chosen per image (see :data:`DOMAINS`).
        min_objects, max_objects: range of the number of objects per scene.
    """

    def __init__(
        self,
        num_images: int = 256,
        image_size: tuple[int, int] = (128, 128),
        seed: int = 0,
        split: str = "train",
        domains: Sequence[str] = ("day", "evening", "studio"),
        min_objects: int = 2,
        max_objects: int = 5,
    ) -> None:
        unknown = [d for d in domains if d not in DOMAINS]
        if unknown or not domains:
            raise ValueError(f"unknown toy-scene domains {unknown or domains}; valid: {', '.join(DOMAINS)}")
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be one of {list(_SPLIT_STREAM)}, got {split!r}")
        self.num_images = int(num_images)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)
        self.split = split
        self.domains = list(domains)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.info = DatasetInfo(
            name="toyscenes",
            classes=CLASSES,
            ignore_index=None,
            labels=("seg", "depth", "normal"),
            depth_units="m",
        )

    def __len__(self) -> int:
        return self.num_images

    def keys(self) -> list[str]:
        return [f"toy-{self.split}-{i:06d}" for i in range(self.num_images)]

    def _index(self, key: str) -> int:
        prefix = f"toy-{self.split}-"
        if not key.startswith(prefix) or not key[len(prefix) :].isdigit():
            raise KeyError(f"{key!r} is not a key of this toy-scene dataset (expected {prefix}NNNNNN)")
        index = int(key[len(prefix) :])
        if index >= self.num_images:
            raise KeyError(f"{key!r}: index {index} >= num_images {self.num_images}")
        return index

    def scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], index])
        domain = self.domains[int(rng.integers(len(self.domains)))]
        return sample_scene(rng, domain, self.min_objects, self.max_objects)

    def load(self, key: str) -> Sample:
        index = self._index(key)
        return self._render(key, self.scene(index), index)

    def objects(self, key: str, size: tuple[int, int] | None = None) -> tuple[np.ndarray, list[int]]:
        """The objects of scene ``key``: an (H, W) int16 map with ``k`` on object ``k``'s visible pixels
        and -1 elsewhere (floor, walls, sky), and each object's class id. ``size`` renders at another
        (height, width) than the dataset's."""
        index = self._index(key)
        scene = self.scene(index)
        h, w = size or self.image_size
        prim = render_scene(scene, h, w)["instance"]
        first = 1 + len(scene.walls)  # primitives: floor, walls, then the objects in order
        inst = np.where(prim >= first, prim - first, -1).astype(np.int16)
        return inst, [_SHAPES[o.shape] for o in scene.objects]

    def oracle(self, key: str, variant: int, domains: Sequence[str] | None = None) -> Sample:
        """Scene ``key`` re-rendered with a new appearance (:func:`restyle_scene`): same seg, depth and
        normals, a different image. Deterministic from ``(seed, split, index, variant)``.

        Args:
            key: a key of this dataset.
            variant: the re-render's number (0, 1, ...).
            domains: the appearance domains to draw from (default: this dataset's ``domains``).

        Returns:
            A sample keyed ``<key>-o<NN>`` whose ``meta["source_key"]`` is ``key``.
        """
        domains = list(domains or self.domains)
        unknown = [d for d in domains if d not in DOMAINS]
        if unknown or not domains:
            raise ValueError(f"unknown toy-scene domains {unknown or domains}; valid: {', '.join(DOMAINS)}")
        index = self._index(key)
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], index, 1, int(variant)])
        domain = domains[int(rng.integers(len(domains)))]
        scene = restyle_scene(self.scene(index), rng, domain)
        sample = self._render(f"{key}-o{int(variant):02d}", scene, index)
        sample.meta.update(source_key=key, oracle_variant=int(variant))
        return sample

    def _render(self, key: str, scene: Scene, index: int) -> Sample:
        h, w = self.image_size
        try:
            out = render_scene(scene, h, w)
        except (FloatingPointError, ValueError) as err:  # pragma: no cover - renderer bug guard
            raise SampleError("render_failed", str(err)) from err
        fx, fy, cx, cy = scene.camera.intrinsics(h, w)
        return Sample(
            key=key,
            image=out["image"],
            seg=out["seg"],
            depth=out["depth"],
            normal=out["normal"],
            caption=scene.caption(),
            meta={
                "source": "toyscenes",
                "seed": self.seed,
                "split": self.split,
                "index": index,
                "domain": scene.domain,
                "intrinsics": [fx, fy, cx, cy],
                "objects": [o.shape for o in scene.objects],
            },
        )

    def __iter__(self) -> Iterator[Sample]:
        for key in self.keys():
            yield self.load(key)
