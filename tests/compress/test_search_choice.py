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


def _variant_dirs(tmp_path, rows) -> None:
    """The work folder _finish finds: fp32/ and variants/NAME/, each model file holding its name."""
    (tmp_path / "fp32").mkdir()
    (tmp_path / "fp32" / "model.safetensors").write_text("fp32")
    for r in rows[1:]:
        (tmp_path / "variants" / r["name"]).mkdir(parents=True)
        (tmp_path / "variants" / r["name"] / "model.safetensors").write_text(r["name"])


def _finish(tmp_path, monkeypatch, rows, **kw) -> str:
    """Run _finish (the report and the card stubbed) and return the name of the variant it kept."""
    reported = {}
    monkeypatch.setattr(search, "write_report", lambda out, rows, chosen, *rest: reported.update(chosen=chosen))
    monkeypatch.setattr(search, "compress_card", lambda *args: "card")
    search._finish(search.CompressArgs(max_drop=1.0, **kw), rows, tmp_path,
                   SimpleNamespace(train=[], eval=[], text_pairs=None), 0.0)
    return reported["chosen"]


def test_batch_64_throughput_decides_not_batch_1_latency(tmp_path, monkeypatch):
    """The kept model is the fastest at batch 64 (README), though another answers one text sooner (the rows
    above derive latency from throughput, so the two orders always agreed there)."""
    rows = [{**row("fp32", 90.0, 100, 90.0), "latency_p50_ms": 10.0},
            {**row("int8", 90.0, 400, 23.0), "latency_p50_ms": 9.0},
            {**row("prune50", 90.0, 300, 30.0), "latency_p50_ms": 2.0}]
    _variant_dirs(tmp_path, rows)
    assert _finish(tmp_path, monkeypatch, rows) == "int8"


def test_no_keep_variants_leaves_the_kept_model_alone(tmp_path, monkeypatch):
    """--no-keep-variants: no variants/ folder, and no full-size fp32/ copy, beside the kept model."""
    rows = [row("fp32", 90.0, 100, 90.0), row("int8", 90.0, 400, 23.0)]
    _variant_dirs(tmp_path, rows)
    assert _finish(tmp_path, monkeypatch, rows, keep_variants=False) == "int8"
    assert not (tmp_path / "variants").exists() and not (tmp_path / "fp32").exists()
    assert (tmp_path / "model.safetensors").read_text() == "int8"
