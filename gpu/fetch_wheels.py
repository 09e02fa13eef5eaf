"""Fetch, on a machine with PyPI, the wheels a GPU machine without network needs for gpu/*.sh: the project's
pinned stack into .whl/ and unsloth's own versions into .whl/unsloth/ (the device tool carries .whl, 64 MiB
with the repository). Packages the GPU machine's image already has (torch, triton, accelerate, numpy, ...)
are not fetched. Two wheels are trimmed to fit: bitsandbytes keeps its CPU library and those for the CUDA
versions named by --cuda (it loads the one matching torch.version.cuda), and unsloth drops its web UI
("studio/"), which training never imports.

    python gpu/fetch_wheels.py            # then, in the device call: carry [".whl"]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The project's pins (requirements.txt) that the GPU image lacks or has at another version, and what
# datasets needs beside them. tokenizers: the image's 0.23.2 satisfies transformers 5.24 (>=0.23.1,<0.24).
PROJECT = ("transformers", "peft", "bitsandbytes", "datasets", "trl", "dill==0.4.1", "multiprocess==0.70.19",
           "liger-kernel==0.8.5")
# unsloth 2026.10.9 requires transformers <= 5.17.0, trl <= 1.15.0 and datasets < 5 (so: its own directory);
# torch < 2.15 (the image's 2.11 and the pinned 2.13 both fit). xformers is left out: optional (unsloth falls
# back to PyTorch attention) and built for one torch version only. What its training path imports beyond the
# image: msgspec, nest_asyncio, pydantic, tyro, cut_cross_entropy, torchao (fp8 paths only).
UNSLOTH = ("unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "transformers==5.17.0", "trl==1.15.0", "datasets==4.8.5",
           "fsspec==2026.2.0", "msgspec", "nest_asyncio", "pydantic", "pydantic-core", "annotated-types",
           "typing-inspection", "tyro", "docstring-parser", "shtab", "typeguard", "cut_cross_entropy", "torchao")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT_BYTES = 64 * 1024**2  # what the device tool carries: the working tree and .whl together


def pinned(name: str, requirements: Path = ROOT / "requirements.txt") -> str:
    """`name==version` as requirements.txt pins it (the name alone when it is not pinned there)."""
    for line in requirements.read_text().splitlines():
        match = re.match(rf"{re.escape(name)}==(\S+)", line.strip())
        if match:
            return f"{name}=={match.group(1)}"
    return name


def download(specs: list[str], dest: Path, python_version: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(dest), *specs]
    subprocess.run(cmd, check=True)


def trim_wheel(wheel: Path, drop) -> int:
    """Rewrite `wheel` without the members for which `drop(name)` is true (and without their RECORD lines);
    returns the bytes saved."""
    before = wheel.stat().st_size
    trimmed = wheel.with_suffix(".trimming")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if drop(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not drop(line.split(",", 1)[0])).encode()
            out.writestr(info, data)
    trimmed.replace(wheel)
    return before - wheel.stat().st_size


def bitsandbytes_drop(cuda_versions: list[str]):
    keep = {f"libbitsandbytes_cuda{v}.so" for v in cuda_versions} | {"libbitsandbytes_cpu.so"}
    return lambda name: bool(re.search(r"libbitsandbytes_\w+\.so$", name)) and Path(name).name not in keep


def unsloth_drop(name: str) -> bool:
    return name.startswith("studio/")


def tree_bytes(root: Path) -> int:
    """Bytes of what git would send: tracked files and untracked files it does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size for name in listed if name and (root / name.decode()).is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=str(ROOT / ".whl"), help="where the wheels go (unsloth's in DEST/unsloth)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (its image: 3.12)")
    parser.add_argument("--cuda", default="130,132",
                        help="CUDA versions whose bitsandbytes library to keep, comma-separated (the image's torch: 13.0)")
    parser.add_argument("--no-unsloth", action="store_true", help="skip unsloth's wheels")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    download([pinned(name) if "==" not in name else name for name in PROJECT], dest, args.python_version)
    if not args.no_unsloth:
        download(list(UNSLOTH), dest / "unsloth", args.python_version)
    for wheel in dest.glob("bitsandbytes-*.whl"):
        print(f"{wheel.name}: {trim_wheel(wheel, bitsandbytes_drop(args.cuda.split(','))) / 1024**2:.1f} MiB trimmed")
    for wheel in (dest / "unsloth").glob("unsloth-*.whl"):
        print(f"{wheel.name}: {trim_wheel(wheel, unsloth_drop) / 1024**2:.1f} MiB trimmed")
    wheels = sum(p.stat().st_size for p in dest.rglob("*.whl"))
    tree = tree_bytes(ROOT)
    print(f"wheels {wheels / 1024**2:.1f} MiB + working tree {tree / 1024**2:.1f} MiB "
          f"= {(wheels + tree) / 1024**2:.1f} MiB of the {LIMIT_BYTES / 1024**2:.0f} MiB the device tool carries")
    if wheels + tree > LIMIT_BYTES:
        print("too large to carry: fetch with --no-unsloth, or trim more", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
