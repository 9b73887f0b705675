"""The diagnosis sentence: each kind from the numbers it states."""
from __future__ import annotations

from dowsing.diagnosis import KINDS, diagnose

NAMES = ["Garbled", "Codes", "Known", "Gap", "Clash"]
LOSS = [6.0, 3.0, 1.0, 5.0, 4.0]
DROP = [0.01, 0.40, 0.02, 0.30, -0.05]


def test_each_kind_follows_from_loss_and_pilot_drop_and_states_its_numbers():
    out = {d.domain: d for d in diagnose(NAMES, LOSS, DROP)}
    assert out["Garbled"].kind == "hard to learn"
    assert "6.00 nats" in out["Garbled"].sentence and "0.010 nats" in out["Garbled"].sentence
    assert "the highest of 5" in out["Garbled"].sentence
    assert out["Codes"].kind == "overlapping" and "0.400 nats" in out["Codes"].sentence
    assert out["Known"].kind == "known"
    assert out["Gap"].kind == "learnable gap"
    assert out["Clash"].kind == "contradictory" and "raised" in out["Clash"].sentence
    assert out["Codes"].drop_pct_of_loss == 0.40 / 3.0 * 100
    assert out["Codes"].loss_rank == 4 and out["Codes"].drop_rank == 1
    assert set(d.kind for d in out.values()) <= set(KINDS)


def test_a_domain_without_a_pilot_rests_on_its_loss():
    out = diagnose(["A", "B", "C"], [2.0, 1.0, 3.0], [0.1, None, float("nan")])
    assert out[1].pilot_drop is None and "loss alone" in out[1].sentence
    assert out[2].pilot_drop is None and out[2].kind == "learnable gap"
