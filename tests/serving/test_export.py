"""finqa_exp/serving/export.py: an adapter export carries a bundled base in ``base/``, named
relatively so the folder still loads once uploaded. No model is loaded to write it."""

from __future__ import annotations

import json

from finqa_exp.config import validate
from finqa_exp.serving import export, spec
from finqa_exp.serving.card import CardFacts
from tests.conftest import compose_cfg


def test_adapter_export_with_a_bundled_base(tmp_path):
    conf = validate(compose_cfg([f"paths.root_dir={tmp_path}"], tmp_path / "out"))
    adapter, base = tmp_path / "adapter", tmp_path / "tiny"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/x"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"base weights")
    settings = spec.settings_for(conf, None, "run1")
    target = tmp_path / "export"
    facts = CardFacts(conf=conf, run_id="run1", metrics={}, run_tags={})
    export.export(spec.artifacts_for(adapter, base, settings), settings, facts, target)

    assert (target / "base" / "model.safetensors").read_bytes() == b"base weights"
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"
    card = (target / export.CARD).read_text()
    assert 'from_pretrained("PATH_OR_REPO", subfolder="base")' in card
    assert "base_model:" not in card  # the hub's metadata names hub models only
    info = json.loads((target / export.EXPORT_INFO).read_text())
    assert info == {**info, "run_id": "run1", "merged": False, "base_model": "bundled (base/)"}
