"""Which variant compress keeps: the fastest at batch 64 within the budget, not the smallest file."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from oztune.compress import search


def row(name: str, score: float, tput: float, mb: float) -> dict:
    return {"name": name, "score": score, "throughput": tput, "file_mb": mb, "latency_p50_ms": 1000 / tput}


@pytest.mark.parametrize("int8_tput, kept", [(400, "int8"),  # fastest in budget, though not the smallest
                                             (300, "prune50-int8")])  # equally fast: then the smaller file
def test_the_fastest_variant_within_the_budget_is_kept(tmp_path, monkeypatch, int8_tput, kept):
    rows = [row("fp32", 90.0, 100, 90.0), row("int8", 89.5, int8_tput, 23.0), row("prune50-int8", 89.2, 300, 12.0),
            row("prune33-int8", 80.0, 900, 8.0)]  # the fastest and smallest, but 10 points down
    for r in rows[1:]:
        (tmp_path / "variants" / r["name"]).mkdir(parents=True)
        (tmp_path / "variants" / r["name"] / "model.safetensors").write_text(r["name"])
    reported = {}
    monkeypatch.setattr(search, "write_report", lambda out, rows, chosen, *rest: reported.update(chosen=chosen))
    monkeypatch.setattr(search, "compress_card", lambda *args: "card")  # (these rows hold only what the choice reads)
    a = search.CompressArgs(max_drop=1.0)
    search._finish(a, rows, tmp_path, SimpleNamespace(train=[], eval=[], text_pairs=None), 0.0)
    assert reported["chosen"] == kept
    assert (tmp_path / "model.safetensors").read_text() == kept  # its files are the output model's
