"""A parametric chest radiograph phantom: 256 x 256 grayscale images whose findings are known exactly.

``render(params)`` draws one frontal (PA or AP) or lateral chest radiograph as ``uint8`` (bright = dense), fully
vectorised over pixels with numpy, deterministic given ``params.noise_seed``.

## How an image is made

1. **Anatomy in body coordinates.** Every structure is a function of body coordinates ``(u, v)``; the pixel grid is
   mapped to them by the pose (rotation, shift) and, for AP films, a magnification, so the whole patient moves as
   one. The thorax is ``2 x half_width`` wide with its lung apices at ``LUNG_TOP``; the lung height is
   ``2 x half_width x lung_aspect x inspiration`` (a deeper breath lowers the diaphragm and shows more ribs).
2. **Lung fields.** A lung mask: a real one (a bounding-box-normalised mask from ``lung_masks()``, when
   torchxrayvision's data files are installed) stretched over the thorax box, or two parametric lungs (an ellipse
   per side cut by its diaphragm dome, the right dome higher). Soft tissue fills the body outline; the lungs
   remove most of it (air); vessel markings are smoothed noise, densest at the hila.
3. **Mediastinum and bones.** Heart (an ellipse two-thirds to the patient's left; its width is
   ``ctr x thorax width``, the cardiothoracic ratio, magnified by ``AP_MAGNIFICATION`` on AP films), mediastinum and
   aortic knob, the air-filled trachea and main bronchi, spine, posterior ribs (arched bands whose spacing follows
   the lung height), clavicles (higher on lordotic AP films) and a gastric bubble under the left dome.
4. **Findings**, each a severity in ``[0, 1]`` (0 absent): *pleural effusion* per side (fluid from the
   costophrenic angle up, a meniscus rising laterally, plus a veil over the hemithorax on supine AP films);
   *pulmonary oedema* (bilateral perihilar "bat-wing" haze with interstitial texture); *consolidation* (a dense
   patch in one of five lung zones); *pneumothorax* (the lung retracted towards its hilum, a thin visceral pleural
   line, no markings beyond it); *support devices* drawn as lines: endotracheal tube (tip above the carina), chest
   tube (lateral base to apex), central venous / pulmonary artery catheter (right neck to the pulmonary artery),
   and ECG leads (discs with wires; not a finding, as in CheXpert).
5. **Exposure.** Attenuation becomes brightness through ``1 - exp(-gain x attenuation)``, with exposure and gamma
   jitter, quantum noise and a slight blur, so the image is not cartoon-flat.

The lateral view uses the same findings on a simpler lateral anatomy (one lung field, heart anterior, spine
posterior, effusion in the posterior sulcus). Nothing here is meant to be diagnostic: it is a test object whose
findings a model should be able to see change.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

SIZE = 256
VIEWS = ("PA", "AP", "LATERAL")
SIDES = ("right", "left")  # the patient's sides: right is on the image's left
ZONES = ("right upper", "right middle", "right lower", "left upper", "left lower")
LUNG_TOP = 40.0  # lung apices, in body-coordinate pixels
AP_MAGNIFICATION = 1.12  # the heart is nearer the source than the detector on an AP film
MASK_SIZE = 96  # side of the bounding-box-normalised real lung masks
# Real masks come from every MASK_STRIDE-th file of the zip (sorted by name): about 130 decodes (about a second)
# give a hundred usable shapes; reading all 517 would take five times as long for no visible gain.
MASK_STRIDE = 4
TORCHXRAYVISION_MASKS = "semantic_masks_v7labs_lungs.zip"


@dataclass(frozen=True)
class PhantomParams:
    """Everything an image depends on. Severities are in ``[0, 1]``; sides are the patient's."""

    view: str = "PA"
    lung_mask: int | None = None  # index into lung_masks(); None draws parametric lungs
    half_width: float = 88.0  # half the thorax width, pixels
    lung_aspect: float = 0.85  # lung height / thorax width at inspiration 1
    ctr: float = 0.45  # cardiothoracic ratio (cardiomegaly above 0.5)
    inspiration: float = 1.0
    rotation_deg: float = 0.0
    shift_u: float = 0.0
    shift_v: float = 0.0
    exposure: float = 1.0
    gamma: float = 1.0
    effusion_right: float = 0.0
    effusion_left: float = 0.0
    edema: float = 0.0
    consolidation: float = 0.0
    consolidation_zone: str = "right lower"
    pneumothorax: float = 0.0
    pneumothorax_side: str = "right"
    endotracheal_tube: bool = False
    chest_tube: str | None = None  # side of a chest tube, or None
    central_line: bool = False
    ecg_leads: bool = False
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {self.view!r}")
        for name in ("effusion_right", "effusion_left", "edema", "consolidation", "pneumothorax"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a severity in [0, 1], got {getattr(self, name)!r}")
        if not 0.3 <= self.ctr <= 0.8:
            raise ValueError(f"ctr must be a cardiothoracic ratio in [0.3, 0.8], got {self.ctr!r}")
        if not 60.0 <= self.half_width <= 110.0:
            raise ValueError(f"half_width must be in [60, 110] pixels, got {self.half_width!r}")
        if self.consolidation_zone not in ZONES:
            raise ValueError(f"consolidation_zone must be one of {', '.join(ZONES)}, got {self.consolidation_zone!r}")
        for name in ("pneumothorax_side", "chest_tube"):
            value = getattr(self, name)
            if value is not None and value not in SIDES:
                raise ValueError(f"{name} must be 'right' or 'left', got {value!r}")
        if self.lung_mask is not None and self.lung_mask < 0:
            raise ValueError(f"lung_mask must be a non-negative index, got {self.lung_mask!r}")


def torchxrayvision_data() -> Path | None:
    """The ``data`` folder of an installed torchxrayvision, found without importing it (its import needs
    torchvision); None when it is not installed."""
    spec = find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder if folder.is_dir() else None


def _normalised_mask(raw: bytes) -> np.ndarray | None:
    """A lung mask cropped to its bounding box and resized to ``MASK_SIZE``; None when it does not look like a
    pair of lungs (empty, one-sided, lopsided, or a sliver)."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        image.draft("L", (2 * SIZE, 2 * SIZE))  # JPEGs decode at a reduced scale: much faster
        image = image.convert("L")
        image.thumbnail((2 * SIZE, 2 * SIZE))
        mask = np.asarray(image) >= 127
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) < 20 or len(columns) < 20:
        return None
    mask = mask[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    height, width = mask.shape
    half = width // 2
    right, left = mask[:, :half].sum(), mask[:, half:].sum()
    middle = mask[:, int(width * 0.45):int(width * 0.55)].mean()
    if not (0.55 < right / max(left, 1) < 1.8 and 0.25 < mask.mean() < 0.75 and 0.6 < height / width < 1.3
            and middle < 0.25):
        return None
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((MASK_SIZE, MASK_SIZE), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


@lru_cache(maxsize=1)
def lung_masks() -> np.ndarray:
    """Real lung shapes from torchxrayvision's ``semantic_masks_v7labs_lungs.zip`` as ``(n, MASK_SIZE, MASK_SIZE)``
    float32 in [0, 1], each cropped to its bounding box; empty ``(0, ...)`` when the file is not installed."""
    folder = torchxrayvision_data()
    path = folder / TORCHXRAYVISION_MASKS if folder is not None else None
    if path is None or not path.is_file():
        logger.info("torchxrayvision data files not installed: parametric lung shapes only")
        return np.zeros((0, MASK_SIZE, MASK_SIZE), dtype=np.float32)
    masks = []
    with zipfile.ZipFile(path) as archive:
        names = sorted(name for name in archive.namelist() if not name.endswith("/"))
        for name in names[::MASK_STRIDE]:
            mask = _normalised_mask(archive.read(name))
            if mask is not None:
                masks.append(mask)
    logger.info("%s: %d real lung masks usable out of %d read", path, len(masks), len(names[::MASK_STRIDE]))
    return np.stack(masks) if masks else np.zeros((0, MASK_SIZE, MASK_SIZE), dtype=np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


def _segments(frame: _Frame, points: list[tuple[float, float]], margin: float = 12.0) -> np.ndarray:
    """Distance from every pixel to a polyline in body coordinates, computed only in the pixel box around it (a
    loop over its few segments, not over pixels); far pixels get a large distance."""
    distance = np.full(frame.u.shape, 1e3, dtype=np.float32)
    columns, rows = frame.to_pixels(np.array(points, dtype=np.float64))
    r0, r1 = (int(np.clip(np.floor(rows.min() - margin), 0, SIZE)), int(np.clip(np.ceil(rows.max() + margin), 0, SIZE)))
    c0, c1 = (int(np.clip(np.floor(columns.min() - margin), 0, SIZE)),
              int(np.clip(np.ceil(columns.max() + margin), 0, SIZE)))
    if r0 >= r1 or c0 >= c1:
        return distance
    u, v = frame.u[r0:r1, c0:c1], frame.v[r0:r1, c0:c1]
    crop = distance[r0:r1, c0:c1]
    for (u0, v0), (u1, v1) in zip(points[:-1], points[1:]):
        du, dv = u1 - u0, v1 - v0
        t = np.clip(((u - u0) * du + (v - v0) * dv) / max(du * du + dv * dv, 1e-6), 0.0, 1.0)
        np.minimum(crop, np.hypot(u - u0 - t * du, v - v0 - t * dv), out=crop)
    return distance


def _tube(frame: _Frame, points: list[tuple[float, float]], width: float) -> np.ndarray:
    """A radiopaque tube along a polyline: a bright wall with a slightly darker lumen."""
    distance = _segments(frame, points)
    return _sigmoid((width - distance) * 2.0) - 0.35 * _sigmoid((0.4 * width - distance) * 3.0)


@lru_cache(maxsize=1)
def _grid() -> tuple[np.ndarray, np.ndarray]:
    grid = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return grid[0], grid[1]


@dataclass(frozen=True)
class _Frame:
    """Body coordinates ``u`` (across) and ``v`` (down) of every pixel, and the way back to pixels."""

    u: np.ndarray
    v: np.ndarray
    cos: float
    sin: float
    scale: float
    shift_u: float
    shift_v: float

    def to_pixels(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(column, row) of body points ``(n, 2)``: the inverse of ``_body_coordinates``."""
        du, dv = (points[:, 0] - SIZE / 2) / self.scale, (points[:, 1] - SIZE / 2) / self.scale
        return (SIZE / 2 + self.shift_u + self.cos * du - self.sin * dv,
                SIZE / 2 + self.shift_v + self.sin * du + self.cos * dv)


def _body_coordinates(params: PhantomParams) -> _Frame:
    """Pixel grid -> body coordinates: rotation about the centre, shift, and AP magnification of the frame."""
    v, u = _grid()
    angle = np.deg2rad(params.rotation_deg)
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    centre = SIZE / 2
    du, dv = u - centre - params.shift_u, v - centre - params.shift_v
    scale = 1.0 / (1.04 if params.view == "AP" else 1.0)
    return _Frame(centre + scale * (cos * du + sin * dv), centre + scale * (-sin * du + cos * dv), cos, sin, scale,
                  params.shift_u, params.shift_v)


def _lungs(params: PhantomParams, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Right and left lung fields in [0, 1] at body coordinates, and the lung height."""
    w = params.half_width
    masks = lung_masks() if params.lung_mask is not None else None
    if masks is not None and len(masks):
        mask = masks[params.lung_mask % len(masks)]
        height = 2 * w * params.lung_aspect * params.inspiration
        rows = (v - LUNG_TOP) / height * (MASK_SIZE - 1)
        columns = (u - (SIZE / 2 - w)) / (2 * w) * (MASK_SIZE - 1)
        field = ndimage.map_coordinates(mask, [rows, columns], order=1, cval=0.0).astype(np.float32)
        right = u < SIZE / 2
        return field * right, field * ~right, height
    height = 2 * w * params.lung_aspect * params.inspiration
    fields = []
    for sign, dome_drop in ((-1, 0.0), (1, 0.04)):  # the right dome sits higher
        centre_u = SIZE / 2 + sign * 0.52 * w
        across = (u - centre_u) / (0.46 * w)
        down = (v - LUNG_TOP - 0.55 * height) / (0.62 * height)
        inside = 1.0 - (across ** 2 + np.maximum(-down, 0) ** 2 * 1.0 + np.maximum(down, 0) ** 4)
        base = LUNG_TOP + height * (0.98 + dome_drop) - 0.2 * height * np.clip(1.0 - across ** 2, 0, 1)
        medial = sign * (u - SIZE / 2) > 0.08 * w
        fields.append(_sigmoid(inside * 12.0) * _sigmoid((base - v) * 0.8) * medial)
    return fields[0].astype(np.float32), fields[1].astype(np.float32), height


def _smooth_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Unit-variance smoothed Gaussian noise: lung markings, interstitial texture, irregular edges."""
    noise = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE), dtype=np.float32), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _expose(attenuation: np.ndarray, params: PhantomParams, rng: np.random.Generator) -> np.ndarray:
    """Attenuation -> uint8 brightness with exposure and gamma jitter, quantum noise and a slight blur."""
    image = 1.0 - np.exp(-1.6 * params.exposure * attenuation)
    image = np.clip(image / (1.0 - np.exp(-1.6 * params.exposure * 1.3)), 0.0, 1.0) ** params.gamma
    image = ndimage.gaussian_filter(image + 0.025 * rng.standard_normal(image.shape, dtype=np.float32), 0.7)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _render_frontal(params: PhantomParams, rng: np.random.Generator) -> np.ndarray:
    frame = _body_coordinates(params)
    u, v = frame.u, frame.v
    w, centre = params.half_width, SIZE / 2
    right, left, height = _lungs(params, u, v)
    base = LUNG_TOP + height  # level of the costophrenic angles
    ap = params.view == "AP"

    # body outline: a soft-tissue ellipse with shoulders; air outside
    body = _sigmoid((1.0 - ((u - centre) / (1.32 * w)) ** 2 - ((v - base + 10) / (1.45 * height)) ** 4) * 8.0)
    attenuation = 0.7 * body

    # heart, mediastinum, aortic knob; the heart hides the lung in front of it
    heart_width = params.ctr * 2 * w * (AP_MAGNIFICATION if ap else 1.0)
    heart_u, heart_v = centre + 0.14 * heart_width, base - 0.17 * height - 0.22 * heart_width
    heart = _sigmoid((1.0 - ((u - heart_u) / (0.5 * heart_width)) ** 2
                      - ((v - heart_v) / (0.44 * heart_width)) ** 2) * 6.0)
    mediastinum = _sigmoid((0.14 * w + 0.06 * (v - LUNG_TOP) - np.abs(u - centre - 2)) * 0.5) * _sigmoid(
        (heart_v - v) * 0.2)
    knob = _sigmoid((1.0 - ((u - centre - 0.17 * w) / (0.11 * w)) ** 2
                     - ((v - LUNG_TOP - 0.27 * height) / (0.07 * height)) ** 2) * 4.0)
    solid = np.maximum(np.maximum(heart, mediastinum), knob)
    lungs = (right + left) * (1.0 - solid)

    # pneumothorax: the lung of that side retracted towards its hilum; beyond it only air
    collapsed = np.zeros_like(u)
    pleural_line = np.zeros_like(u)
    if params.pneumothorax > 0:
        sign = -1.0 if params.pneumothorax_side == "right" else 1.0
        hilum_u, hilum_v = centre + sign * 0.35 * w, LUNG_TOP + 0.45 * height
        k = 1.0 - 0.4 * params.pneumothorax
        shrunk = _lungs(params, hilum_u + (u - hilum_u) / k, hilum_v + (v - hilum_v) / k)[0 if sign < 0 else 1]
        side = right if sign < 0 else left
        collapsed = np.clip(side - shrunk, 0, 1) * (1.0 - solid)
        soft = ndimage.gaussian_filter(shrunk, 0.8)
        pleural_line = 4.0 * soft * (1.0 - soft) * side * (1.0 - solid)

    # lung markings: smoothed noise, densest near the hila, absent where the lung has collapsed away
    hilar = np.exp(-np.minimum(np.abs(u - centre + 0.35 * w), np.abs(u - centre - 0.35 * w)) / (0.5 * w)
                   - np.abs(v - LUNG_TOP - 0.45 * height) / (0.6 * height))
    markings = (0.04 + 0.08 * hilar) * (1.0 + 0.45 * _smooth_noise(rng, 1.6)) * (1.0 - collapsed)
    attenuation = attenuation - 0.52 * lungs + lungs * markings - 0.05 * collapsed + 0.12 * pleural_line
    attenuation += 0.12 * solid * body

    # trachea and main bronchi: air columns
    carina_v = LUNG_TOP + 0.33 * height
    airway = _segments(frame, [(centre + 1, 0.0), (centre + 1, carina_v)])
    for side, drop in ((-0.3, 0.15), (0.3, 0.18)):  # the right main bronchus is steeper and shorter
        airway = np.minimum(airway, _segments(frame, [(centre + 1, carina_v),
                                                      (centre + side * w, carina_v + drop * height)]))
    attenuation -= 0.1 * _sigmoid((5.0 - airway) * 1.2)

    # spine, ribs, clavicles
    spine = _sigmoid((11.0 - np.abs(u - centre)) * 1.0)
    attenuation += spine * (0.06 + 0.04 * np.cos(2 * np.pi * (v - LUNG_TOP) / (0.085 * height)) ** 2)
    lateral = np.abs(u - centre) / w
    arch = v - LUNG_TOP + 8 + 0.12 * height * np.sin(np.pi * np.clip(lateral, 0, 1)) - 0.12 * height * lateral ** 2
    spacing = 0.095 * height
    phase = arch / spacing
    ribs = np.exp(-(((phase - np.round(phase)) * spacing) / 2.6) ** 2) * (phase > -0.5) * (phase < 10.5)
    attenuation += 0.07 * ribs * _sigmoid((1.08 - lateral) * 20.0) * _sigmoid((lateral - 0.1) * 30.0) * body
    lift = 10.0 if ap else 0.0
    for sign in (-1, 1):
        clavicle = [(centre + sign * 12, LUNG_TOP - 2 - lift), (centre + sign * 0.55 * w, LUNG_TOP - 10 - lift),
                    (centre + sign * 1.05 * w, LUNG_TOP - 18 - lift)]
        attenuation += 0.1 * _sigmoid((4.0 - _segments(frame, clavicle)) * 1.2)

    # gastric bubble below the left dome
    attenuation -= 0.12 * _sigmoid((1.0 - ((u - centre - 0.45 * w) / 16) ** 2 - ((v - base - 6) / 9) ** 2) * 6.0)

    # findings
    for severity, field, sign in ((params.effusion_right, right, -1), (params.effusion_left, left, 1)):
        if severity > 0:
            lateral_side = np.clip(sign * (u - centre) / w, 0, 1)
            fluid_top = base - (0.1 + 0.42 * severity) * height - 0.12 * height * lateral_side ** 2
            fluid = _sigmoid((v - fluid_top) * 0.35) * field
            veil = 0.12 * severity * field if ap else 0.0
            attenuation += 0.45 * fluid * (1.0 - solid) + veil
    if params.edema > 0:
        batwing = np.exp(-((np.abs(u - centre) - 0.3 * w) / (0.45 * w)) ** 2
                         - ((v - LUNG_TOP - 0.5 * height) / (0.38 * height)) ** 2)
        texture = 1.0 + 0.3 * _smooth_noise(rng, 2.5)
        attenuation += params.edema * (0.26 * batwing + 0.06) * texture * (right + left)
    if params.consolidation > 0:
        zone_side, zone_level = params.consolidation_zone.split()
        sign = -1 if zone_side == "right" else 1
        level = {"upper": 0.25, "middle": 0.55, "lower": 0.78}[zone_level]
        size = 0.55 + 0.45 * params.consolidation
        patch = (1.0 - ((u - centre - sign * 0.5 * w) / (0.38 * w * size)) ** 2
                 - ((v - LUNG_TOP - level * height) / (0.17 * height * size)) ** 2)
        field = right if sign < 0 else left
        patch = _sigmoid((patch + 0.25 * _smooth_noise(rng, 4.0)) * 6.0) * field
        attenuation += (0.15 + 0.2 * params.consolidation) * patch

    # support devices and monitoring leads
    devices = np.zeros_like(u)
    if params.endotracheal_tube:
        devices = np.maximum(devices, _tube(frame, [(centre - 3, -5.0), (centre, LUNG_TOP - 12),
                                                   (centre + 1, carina_v - 0.12 * height)], 2.2))
    if params.chest_tube is not None:
        sign = -1 if params.chest_tube == "right" else 1
        devices = np.maximum(devices, _tube(frame, [(centre + sign * 1.35 * w, base - 0.05 * height),
                                                   (centre + sign * 0.95 * w, base - 0.3 * height),
                                                   (centre + sign * 0.7 * w, LUNG_TOP + 0.25 * height),
                                                   (centre + sign * 0.45 * w, LUNG_TOP + 0.06 * height)], 2.4))
    if params.central_line:
        devices = np.maximum(devices, _tube(frame, [(centre - 0.45 * w, -5.0), (centre - 0.2 * w, LUNG_TOP),
                                                   (centre - 0.1 * w, carina_v + 0.1 * height),
                                                   (heart_u - 0.1 * heart_width, heart_v),
                                                   (centre + 0.12 * w, carina_v + 0.12 * height),
                                                   (centre + 0.3 * w, carina_v + 0.08 * height)], 1.3))
    if params.ecg_leads:
        for _ in range(3):
            pad_u, pad_v = centre + rng.uniform(-1.1, 1.1) * w, LUNG_TOP + rng.uniform(-0.1, 1.0) * height
            pad = np.hypot(u - pad_u, v - pad_v)
            devices = np.maximum(devices, 0.8 * _sigmoid((5.0 - pad) * 2) - 0.4 * _sigmoid((2.5 - pad) * 2))
            devices = np.maximum(devices, 0.6 * _sigmoid((1.0 - _segments(
                frame, [(pad_u, pad_v), (pad_u + rng.uniform(-60, 60), SIZE + 10)])) * 2.0))
    attenuation += 0.6 * devices
    return _expose(np.maximum(attenuation, 0.0), params, rng)


def _render_lateral(params: PhantomParams, rng: np.random.Generator) -> np.ndarray:
    """A lateral film (patient facing the image's left): one lung field, heart anterior, spine posterior."""
    frame = _body_coordinates(params)
    u, v = frame.u, frame.v
    height = 2 * params.half_width * params.lung_aspect * params.inspiration
    base = LUNG_TOP + height
    depth = 0.95 * params.half_width  # half the antero-posterior depth
    centre = SIZE / 2
    body = _sigmoid((1.0 - ((u - centre) / (1.25 * depth)) ** 2 - ((v - base + 5) / (1.4 * height)) ** 4) * 8.0)
    across = (u - centre) / depth
    down = (v - LUNG_TOP - 0.5 * height) / (0.55 * height)
    dome = base - 0.15 * height * np.clip(1 - across ** 2, 0, 1)
    lung = _sigmoid((1.0 - across ** 2 - np.maximum(-down, 0) ** 2) * 10.0) * _sigmoid((dome - v) * 0.8)
    heart_size = params.ctr / 0.45 * 0.3 * height
    heart = _sigmoid((1.0 - ((u - centre + 0.35 * depth) / heart_size) ** 2
                      - ((v - base + 0.35 * heart_size) / (0.9 * heart_size)) ** 2) * 8.0)
    spine = _sigmoid((14.0 - np.abs(u - centre - 0.95 * depth)) * 0.8)
    discs = 0.5 + 0.5 * np.cos(2 * np.pi * (v - LUNG_TOP) / (0.09 * height)) ** 2
    lungs = lung * (1.0 - heart)
    attenuation = (0.6 * body - 0.4 * lungs + lungs * 0.08 * (1 + 0.6 * _smooth_noise(rng, 1.3))
                   + 0.15 * heart * body + 0.12 * spine * discs * body)
    trachea = _segments(frame, [(centre - 0.1 * depth, 0.0), (centre + 0.05 * depth, LUNG_TOP + 0.35 * height)])
    attenuation -= 0.1 * _sigmoid((7.0 - trachea) * 1.2)
    effusion = max(params.effusion_right, params.effusion_left)
    if effusion > 0:
        posterior = np.clip(across, 0, 1)
        fluid_top = base - (0.08 + 0.35 * effusion) * height - 0.15 * height * posterior ** 2
        attenuation += 0.45 * _sigmoid((v - fluid_top) * 0.35) * lung * _sigmoid(across * 4)
    if params.edema > 0:
        attenuation += params.edema * 0.2 * np.exp(-down ** 2 - across ** 2) * lung
    if params.consolidation > 0:
        level = {"upper": 0.25, "middle": 0.5, "lower": 0.75}[params.consolidation_zone.split()[1]]
        patch = 1.0 - ((u - centre) / (0.5 * depth)) ** 2 - ((v - LUNG_TOP - level * height) / (0.15 * height)) ** 2
        attenuation += (0.15 + 0.2 * params.consolidation) * _sigmoid((patch + 0.25 * _smooth_noise(rng, 4)) * 6) * lung
    devices = np.zeros_like(u)
    if params.endotracheal_tube:
        devices = np.maximum(devices, _tube(frame, [(centre - 0.3 * depth, -5.0), (centre - 0.1 * depth, LUNG_TOP),
                                                   (centre, LUNG_TOP + 0.22 * height)], 2.2))
    if params.chest_tube is not None:
        devices = np.maximum(devices, _tube(frame, [(centre + 0.6 * depth, base), (centre + 0.3 * depth,
                                                                                  LUNG_TOP + 0.2 * height)], 2.4))
    if params.central_line:
        devices = np.maximum(devices, _tube(frame, [(centre - 0.2 * depth, -5.0), (centre - 0.25 * depth,
                                                                                  LUNG_TOP + 0.5 * height)], 1.3))
    attenuation += 0.6 * devices
    return _expose(np.maximum(attenuation, 0.0), params, rng)


def render(params: PhantomParams) -> np.ndarray:
    """The radiograph of ``params`` as a ``(256, 256)`` uint8 array; the same params give the same pixels."""
    rng = np.random.default_rng(params.noise_seed)
    if params.view == "LATERAL":
        return _render_lateral(params, rng)
    return _render_frontal(params, rng)
