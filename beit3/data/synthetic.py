"""A small generated world of colored shapes with captions, for tests and the embedded demo.

Images have one to three shapes (circle, square, triangle) of six colors and two sizes, in four
slots; the caption names every shape ("a big red circle on the left and a small blue square at
the top"). Everything is a function of the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 50, 50), "green": (60, 180, 75), "blue": (50, 90, 220), "yellow": (235, 210, 40),
          "purple": (150, 70, 190), "white": (235, 235, 235)}
KINDS = ("circle", "square", "triangle")
SLOTS = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25), "at the bottom": (0.5, 0.75)}
SIZES = {"small": 0.12, "big": 0.2}


def random_scene(rng: random.Random) -> list[dict]:
    """One to three shapes in distinct slots: [{"kind", "color", "size", "slot"}]."""
    slots = rng.sample(list(SLOTS), rng.randint(1, 3))
    return [{"kind": rng.choice(KINDS), "color": rng.choice(list(COLORS)), "size": rng.choice(list(SIZES)), "slot": slot} for slot in slots]


def draw_scene(scene: list[dict], size: int = 64, rng: random.Random | None = None) -> Image.Image:
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), rng.choice([(20, 22, 30), (35, 35, 45)]))
    draw = ImageDraw.Draw(image)
    for shape in scene:
        cx, cy = SLOTS[shape["slot"]]
        cx, cy = cx * size + rng.uniform(-2, 2), cy * size + rng.uniform(-2, 2)
        r = SIZES[shape["size"]] * size
        color = COLORS[shape["color"]]
        if shape["kind"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        elif shape["kind"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return image


def caption(scene: list[dict]) -> str:
    return "a " + " and a ".join(f"{s['size']} {s['color']} {s['kind']} {s['slot']}" for s in scene)


def write_shapes_world(folder: str | Path, num_images: int, seed: int = 0, size: int = 64) -> dict[str, Path]:
    """Writes ``images/*.png``, ``captions.txt`` (one caption per line) and ``pairs.jsonl``
    (``{"image": "images/N.png", "text": caption}``) into ``folder``; returns their paths."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, pairs = [], []
    for i in range(num_images):
        scene = random_scene(rng)
        draw_scene(scene, size, rng).save(folder / "images" / f"{i:05d}.png")
        captions.append(caption(scene))
        pairs.append(json.dumps({"image": f"images/{i:05d}.png", "text": captions[-1]}))
    (folder / "captions.txt").write_text("\n".join(captions) + "\n")
    (folder / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    return {"images": folder / "images", "texts": folder / "captions.txt", "pairs": folder / "pairs.jsonl"}
