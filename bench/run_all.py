"""Run every benchmark in bench/ and print one table.

    KERAS_BACKEND=jax python bench/run_all.py [--quick]
    KERAS_BACKEND=tensorflow python bench/run_all.py [--quick]

Each bench_*.py exposes `main(quick) -> rows`; ratios are feature / stock,
medians of interleaved repeats in one process (see bench/common.py).
"""

import importlib
import os
import pathlib
import sys
import traceback

here = pathlib.Path(__file__).parent
sys.path.insert(0, str(here))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(quick: bool = False) -> int:
    rows, failed = [], []
    for path in sorted(here.glob("bench_*.py")):
        try:
            rows += importlib.import_module(path.stem).main(quick=quick)
        except Exception:  # one broken bench must not hide the others
            traceback.print_exc()
            failed.append(path.stem)
    print("\n| bench | backend | ratio (feature / stock) | details |")
    print("|---|---|---|---|")
    for row in rows:
        details = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row.items() if k not in ("bench", "backend", "ratio")
        )
        print(f"| {row['bench']} | {row['backend']} | {row['ratio']:.3f} | {details} |")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv))
