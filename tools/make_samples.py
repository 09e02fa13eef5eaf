"""Write the project's own small sample files (synthetic rows in the openmath and squad schemas)."""

import argparse
import json
from pathlib import Path

from qlora.data.formats import SAMPLES_DIR
from qlora.data.synthetic import SAMPLE_GENERATORS, generate_rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=str(SAMPLES_DIR), help="directory for <name>_sample.jsonl files")
    parser.add_argument("--rows", type=int, default=400, help="rows per file")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same files)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_GENERATORS:
        path = out_dir / f"{name}_sample.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in generate_rows(name, args.rows, args.seed)))
        print(f"wrote {path} ({args.rows} rows)")


if __name__ == "__main__":
    main()
