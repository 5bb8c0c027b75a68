"""benchmarks/guide_overhead.py runs end to end (tiny sizes, a 1-block ViT) and writes the rows the issue asks for.

The figures themselves come from the real run (docs/performance.md); this only keeps the script from rotting."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "guide_overhead.py"


class TestGuideOverheadScript(unittest.TestCase):
    def test_tiny_run_writes_rows(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            args = "--device cpu --size tiny --vit_depth 1 --nets unet2d segresnet3d --repeats 1 --warmup 0 --json"
            cmd = [sys.executable, str(SCRIPT), *args.split(), str(out)]
            # minutes on a loaded 2-core machine
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
            rows = json.loads(out.read_text())
        self.assertIn("| case | backbone | variant | plain ms | guided ms | ratio |", proc.stdout)
        got = {(r["case"], r["variant"]) for r in rows}
        for case in ("unet2d_train", "segresnet3d_train"):
            self.assertIn((case, "guided"), got)
            self.assertIn((case, "guided_per_step"), got)
        for case in ("unet2d_sliding_window", "segresnet3d_sliding_window"):
            for variant in ("guided", "guided_vit_bf16", "guided_per_window"):
                self.assertIn((case, variant), got)
        for r in rows:
            self.assertGreater(r["plain_ms"], 0)
            self.assertGreater(r["guided_ms"], 0)
            self.assertAlmostEqual(r["ratio"], r["guided_ms"] / r["plain_ms"], delta=2e-3)
            self.assertGreater(r["plain_peak_mb"], 0)  # CPU peak from the profiler's allocation events
            self.assertGreater(r["guided_peak_mb"], 0)
            self.assertAlmostEqual(
                r["mem_ratio"], r["guided_peak_mb"] / r["plain_peak_mb"], delta=0.05 * r["mem_ratio"]
            )


if __name__ == "__main__":
    unittest.main()
