"""Build diffplug-emoji's shipped data from the npm package ``emoji-datasource-google``.

    npm pack emoji-datasource-google@16.0.0
    uv run python scripts/prepare_emoji.py emoji-datasource-google-16.0.0.tgz
    uv run python scripts/prepare_emoji.py --preview docs/img/emoji-dataset.png

The first form reads the tarball directly (nothing is unpacked, nothing is downloaded):
``package/emoji.json`` (names, short names, categories, skin-tone variations) and every
``package/img/google/64/*.png`` (Noto Emoji, 64x64 RGBA). Each image is composited on white
(PIL's ``alpha_composite``: exact "over" with rounding) and laid, in a fixed order, into one
lossless PNG atlas per split (64 images a row); ``emoji.json`` beside them describes every
image (code points, name, short names, category, subcategory, skin tone, captions) in atlas
order. Written into ``plugins/emoji/src/diffplug_emoji/data/``.

The split: a base emoji is held out when the first 8 hex digits of the SHA-256 of its code
point sequence (``unified``, e.g. ``1F44D``), as an integer, are 0 mod 10; its skin-tone
variations go wherever it goes, so a held-out thumbs-up is not memorised from its tones.

``--preview PNG`` draws a contact sheet of 64 random shipped emoji with their first caption
(from the shipped files, through the plugin's own loader).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "plugins" / "emoji" / "src" / "diffplug_emoji" / "data"
SIZE = 64
COLUMNS = 64
HELD_OUT_MOD = 10
IMAGES = "package/img/google/64/"
LICENSE = "package/LICENSE"  # emoji-datasource's MIT license (the metadata's)
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
FLAG_SUBCATEGORIES = {"country-flag", "subdivision-flag"}


def held_out(unified: str) -> bool:
    """Whether the base emoji ``unified`` is in the held-out split (a fixed hash rule)."""
    digest = hashlib.sha256(unified.upper().encode("ascii")).hexdigest()
    return int(digest[:8], 16) % HELD_OUT_MOD == 0


def readable_name(name: str) -> str:
    """emoji.json's name as a phrase: SHOUTY UPPERCASE lower-cased ("RED APPLE" -> "red
    apple"); mixed case (the country flags, "Japan Flag") kept; curly apostrophes straight."""
    name = name.replace("\u2019", "'")
    return name.lower() if name == name.upper() else name


#: words that end a name's head noun phrase ("man lifting weights": the head is "man")
HEAD_ENDS = {"with", "of", "on", "in", "and", "for", "from", "at", "over", "under",
             "without", "behind", "into", "between", "to"}  # fmt: skip


def article(phrase: str) -> str:
    """'a ' or 'an ' before ``phrase``, or '' where its head noun reads as a plural
    ("pinched fingers", "people holding hands")."""
    words = re.split(r"[,:]", phrase.lower())[0].split()
    head = words[:1]
    for word in words[1:]:
        if word in HEAD_ENDS or word.endswith("ing"):
            break
        head.append(word)
    first, last = head[0], head[-1]
    plural = first in {"two", "people", "men", "women"} or (
        last.endswith("s") and not last.endswith(("ss", "us", "is", "os", "mas", "wards"))
    )
    if plural:
        return ""
    if first.startswith(("uni", "use", "eu", "one", "ufo")):
        return "a "
    if first.startswith(("hour", "honest")) or first[:1] in "aeiou":
        return "an "
    return "a "


def captions(name: str, subcategory: str, short_name: str, tone: str | None) -> list[str]:
    """A few phrasings of one image; every one holds all the words of its name (and tone)."""
    if subcategory in FLAG_SUBCATEGORIES:
        place = re.sub(r"\s*flag$", "", name, flags=re.I)
        phrase = f"the flag of {place}"
        with_article = phrase
    else:
        phrase = f"{name}, {tone}" if tone else name
        with_article = article(name) + phrase
    sub = subcategory.replace("&", "and")
    return [
        f"an emoji of {with_article}",
        phrase,
        f"{article(sub) or 'a '}{sub} emoji: {phrase}",
        f"the :{short_name}: emoji, {phrase}",
    ]


def tone_of(key: str) -> str:
    """A skin_variations key ("1F3FD" or "1F3FB-1F3FC") as words."""
    tones = [SKIN_TONES[part] for part in key.upper().split("-")]
    return ", ".join(dict.fromkeys(tones))  # both people light: "light skin tone" once


def as_text(unified: str) -> str:
    return "".join(chr(int(cp, 16)) for cp in unified.split("-"))


def records(emoji: list[dict]) -> list[dict]:
    """Every image, base first then its variations, in emoji.json's sort order."""
    out = []
    for base in sorted(emoji, key=lambda e: e["sort_order"]):
        if not base.get("has_img_google"):
            continue
        name = readable_name(base["name"])
        common = {
            "base": base["unified"],
            "name": name,
            "short_names": list(base["short_names"]),
            "category": base["category"],
            "subcategory": base["subcategory"],
            "heldout": held_out(base["unified"]),
        }
        variants = [(base["unified"], base["image"], None)]
        for key, var in (base.get("skin_variations") or {}).items():
            if var.get("has_img_google"):
                variants.append((var["unified"], var["image"], tone_of(key)))
        for unified, image, tone in variants:
            out.append(
                {
                    "unified": unified,
                    "emoji": as_text(unified),
                    **common,
                    "skin_tone": tone,
                    "image": image,
                    "captions": captions(name, base["subcategory"], base["short_names"][0], tone),
                }
            )
    return out


def composite(png: bytes) -> Image.Image:
    """A 64x64 RGBA PNG over white, as RGB."""
    with Image.open(io.BytesIO(png)) as im:
        rgba = im.convert("RGBA")
    if rgba.size != (SIZE, SIZE):
        raise SystemExit(f"an image is {rgba.size}, not {SIZE}x{SIZE}")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def atlas(images: list[Image.Image]) -> Image.Image:
    rows = -(-len(images) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * SIZE, rows * SIZE), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % COLUMNS) * SIZE, (i // COLUMNS) * SIZE))
    return sheet


def prepare(tgz: Path, out: Path) -> None:
    # one pass in archive order: seeking back in a gzip stream re-reads it from the start
    files: dict[str, bytes] = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            wanted = member.name in ("package/package.json", "package/emoji.json", LICENSE) or (
                member.name.startswith(IMAGES) and member.name.endswith(".png")
            )
            if member.isfile() and wanted:
                files[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    package = json.loads(files.pop("package/package.json"))
    mit = files.pop(LICENSE)
    emoji = json.loads(files.pop("package/emoji.json"))
    pngs = {name.removeprefix(IMAGES): data for name, data in files.items()}
    rows = records(emoji)
    missing = [r["image"] for r in rows if r["image"] not in pngs]
    if missing:
        raise SystemExit(f"{len(missing)} images named in emoji.json are missing: {missing[:5]}")
    if len(rows) != len(pngs):
        raise SystemExit(f"{len(pngs)} images in the package, {len(rows)} in emoji.json")
    images = {r["unified"]: composite(pngs[r["image"]]) for r in rows}
    out.mkdir(parents=True, exist_ok=True)
    meta: dict = {
        "source": {
            "package": package["name"],
            "version": package["version"],
            "images": "Noto Emoji (Google), Apache License 2.0",
            "metadata": "emoji-datasource (Cal Henderson), MIT License",
        },
        "resolution": SIZE,
        "channels": 3,
        "columns": COLUMNS,
        "background": "white",
        "split": f"a base emoji is held out when int(sha256(unified)[:8], 16) % {HELD_OUT_MOD} "
        "== 0; its skin-tone variations follow it",
        "splits": {},
    }
    for split in ("train", "heldout"):
        chosen = [r for r in rows if r["heldout"] == (split == "heldout")]
        path = out / f"{split}.png"
        atlas([images[r["unified"]] for r in chosen]).save(path, optimize=True)
        chosen = [{k: v for k, v in r.items() if k not in ("heldout", "image")} for r in chosen]
        meta["splits"][split] = {
            "atlas": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "count": len(chosen),
            "emoji": chosen,
        }
    (out / "LICENSE-emoji-datasource.txt").write_bytes(mit)
    text = json.dumps(meta, ensure_ascii=False, indent=None, separators=(",", ":"))
    # one image a line: readable diffs, still compact
    text = text.replace(',{"unified"', ',\n{"unified"').replace('[{"unified"', '[\n{"unified"')
    (out / "emoji.json").write_text(text + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    counts = {s: meta["splits"][s]["count"] for s in meta["splits"]}
    print(f"wrote {len(rows)} images {counts} to {out} ({total / 1e6:.2f} MB)")


def preview(path: Path, seed: int = 0, count: int = 64) -> None:
    """A contact sheet of ``count`` random emoji (both splits), each with its first caption."""
    import random
    import textwrap

    from PIL import ImageDraw, ImageFont

    from diffplug_emoji.dataset import Emoji

    data = Emoji()
    pool = [(s, i) for s in ("train", "heldout") for i in range(len(data.records(s)))]
    chosen = random.Random(seed).sample(pool, count)
    sheets = {s: data.images(s) for s in ("train", "heldout")}
    cols, cell_w, cell_h = 8, 168, 136
    sheet = Image.new("RGB", (cols * cell_w, -(-count // cols) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for k, (split, i) in enumerate(chosen):
        x, y = (k % cols) * cell_w, (k // cols) * cell_h
        pixels = sheets[split][i].permute(1, 2, 0).contiguous().numpy()
        sheet.paste(Image.fromarray(pixels), (x + (cell_w - SIZE) // 2, y + 4))
        caption = data.records(split)[i]["captions"][0]
        lines = textwrap.wrap(caption, 26)[:4]
        for j, line in enumerate(lines):
            width = draw.textlength(line, font=font)
            draw.text((x + (cell_w - width) / 2, y + SIZE + 8 + 14 * j), line, fill=(40, 40, 40),
                      font=font)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tgz", nargs="?", type=Path, help="emoji-datasource-google-*.tgz")
    parser.add_argument("--out", type=Path, default=DATA, help=f"default: {DATA}")
    parser.add_argument("--preview", type=Path, help="write a contact sheet PNG instead")
    parser.add_argument("--seed", type=int, default=0, help="which emoji --preview shows")
    args = parser.parse_args(argv)
    if args.preview:
        preview(args.preview, args.seed)
    elif args.tgz:
        prepare(args.tgz, args.out)
    else:
        parser.error("give the npm tarball, or --preview PNG")


if __name__ == "__main__":
    sys.exit(main())
