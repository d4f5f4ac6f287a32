"""``make demo`` runs end to end and shows what it promises."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_the_demo_loses_no_order_when_an_instance_is_killed() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--calls", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "killing pay-1 (kill -9)" in out
    assert "all 20 orders went through" in out
    assert "a business rejection is not retried: FailedPrecondition" in out
    assert "payment report:" in out
    assert "workflow order_fulfillment for order w1: SUCCEEDED" in out
    assert "workflow checkout for order w2: SUCCEEDED" in out
    [saga] = [line for line in out.splitlines() if "order w3" in line]
    assert saga.startswith("workflow checkout for order w3: COMPENSATED"), saga
    assert "(process_payment: High-value orders need approval)" in saga
    assert saga.endswith("reserve_inventory COMPENSATED, process_payment FAILED")
