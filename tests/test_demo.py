"""The README's main command: the demo trains, writes its pictures, and learns the known attention pattern."""

import importlib.util
import pathlib

import numpy as np
from PIL import Image

DEMO = pathlib.Path(__file__).parent.parent / "examples" / "demo.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("kerascool_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_learns_the_anti_diagonal_and_writes_pictures(tmp_path):
    demo = _load_demo()
    result = demo.main(["--out", str(tmp_path)])
    assert result["val_accuracy"] > 0.95 and result["val_ema_accuracy"] > 0.95
    # Reversal: query i must read key L-1-i. Uniform attention puts 1/L = 0.125 there.
    last = sorted((tmp_path / "captures").glob("epoch_*.npz"))[-1]
    with np.load(last) as arrays:
        key = next(k for k in arrays.files if k.endswith("attention_scores"))
        scores = arrays[key]
    assert scores.shape[-2:] == (demo.LENGTH, demo.LENGTH)
    np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-5)
    mass = demo.anti_diagonal_mass(scores)
    assert mass == result["anti_diagonal_mass"]
    assert mass > 0.35, f"anti-diagonal mass {mass:.2f}: the pattern was not learned"
    # every query's strongest key, over heads and probe samples, is its mirror position or itself
    mean = scores.mean(axis=(0, 1))
    for i, row in enumerate(mean):
        assert row.argmax() in (demo.LENGTH - 1 - i, i)
    pictures = sorted((tmp_path / "captures").glob(f"{last.stem}/**/*.png"))
    assert pictures and Image.open(pictures[0]).size[0] > 100
