#!/usr/bin/env python3
"""Decoded pixels of PIL (Pillow's bundled libjpeg-turbo, default settings), the reference for
bitdelta's JPEG decoding.

Usage: pil_pixels.py OUT.raw W H IMAGE... ; appends each image's 8-bit RGB pixels (row after
row, after the EXIF orientation) to OUT.raw and prints one JSON list of [width, height]. With
W and H not 0, a JPEG is first scaled while decoding by Image.draft("RGB", (W, H)): libjpeg's
1/2, 1/4 or 1/8, the largest that leaves it at least W x H.
"""
import json
import sys

from PIL import Image, ImageOps

out, w, h, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
sizes = []
with open(out, "wb") as f:
    for path in images:
        img = Image.open(path)
        if w and h:
            img.draft("RGB", (w, h))
        img = ImageOps.exif_transpose(img).convert("RGB")
        f.write(img.tobytes())
        sizes.append(list(img.size))
print(json.dumps(sizes))
