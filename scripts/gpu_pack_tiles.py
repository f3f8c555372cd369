"""Re-encode a tile folder so that it travels to a lent GPU machine with the working tree.

The device tool copies the checkout (tracked files plus carried, git-ignored paths) up to
64 MiB in all; the 4,529 tcga_crc_msi JPEGs take 140 MB. This writes the same tiles, same
size (224 px), as JPEG at a lower quality into an ignored folder of the checkout, with the
same labels.csv, and prints the size. Pretraining sees the tiles through random crops,
resizing and stain augmentation, so the JPEG artefacts cost little; the CPU evaluation uses the
original tiles.

    python scripts/gpu_pack_tiles.py "$JWTH_DATA_ROOT/tcga_crc_msi" .gpu_data/tcga_crc_msi   # ~45 MiB at quality 45
    echo /.gpu_data/ >> .git/info/exclude   # then carry .gpu_data in the device call
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="tile folder with labels.csv (path column)")
    ap.add_argument("dst", type=Path, help="output folder (inside the checkout, git-ignored)")
    ap.add_argument("--quality", type=int, default=45)
    ap.add_argument("--max-mib", type=float, default=46.0, help="fail when the output is larger (the checkout itself takes ~14 MiB of the 64)")
    a = ap.parse_args()
    df = pd.read_csv(a.src / "labels.csv", dtype=str, keep_default_na=False)
    a.dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for rel in df["path"]:
        out = a.dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(a.src / rel).convert("RGB").save(out.with_suffix(".jpg"), quality=a.quality)
        total += out.with_suffix(".jpg").stat().st_size
    df["path"] = [str(Path(p).with_suffix(".jpg")) for p in df["path"]]
    df.to_csv(a.dst / "labels.csv", index=False)
    if (a.src / "patients.csv").is_file():
        shutil.copy(a.src / "patients.csv", a.dst / "patients.csv")
    mib = total / 2**20
    print(f"{len(df)} tiles, {mib:.1f} MiB at JPEG quality {a.quality} in {a.dst}")
    if mib > a.max_mib:
        raise SystemExit(f"{mib:.1f} MiB is over --max-mib {a.max_mib}: lower --quality")


if __name__ == "__main__":
    main()
