import os
from pathlib import Path

import pytest

# CI clones the repo next to a copy of shared/; the fixtures are never copied into the project.
FIXTURE_ROOT = Path(os.environ.get(
    "CKPTMAP_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "megatron-r0.6.0"))
FIXTURE_NAMES = ["legacy_tp1pp1dp1", "legacy_tp2pp2dp2", "legacy_tp1pp3vpp2dp1", "mcore_tp2pp1dp2_buckets"]


def fixture_dir(name: str) -> Path:
    path = FIXTURE_ROOT / name
    if not path.is_dir():  # fail, never skip: a missing fixture must not turn the suite green
        pytest.fail(f"fixture {path} is missing; set CKPTMAP_FIXTURES to shared/fixtures/megatron-r0.6.0")
    return path
