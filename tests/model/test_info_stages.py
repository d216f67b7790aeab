import json

import pytest

from lmforge.cli import main
from lmforge.model.flops import memory_plan
from lmforge.model.presets import get_preset


def test_info_reports_kv_cache_and_activations_per_context_stage(capsys):
    assert main(["info", "llama3-8b", "--json", "--stages", "2048,8192,32768"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [s["context"] for s in stages] == [2048, 8192, 32768]
    # Llama 3 8B: 32 layers x 8 kv heads x 128 dims x (key + value) x 2 bytes = 128 KiB per token
    assert [s["kv_cache_gib"] for s in stages] == pytest.approx([0.25, 1.0, 4.0])
    cfg = get_preset("llama3-8b")
    for s in stages:
        assert s["activations_gib"] == pytest.approx(memory_plan(cfg, 1, s["context"]).activations / 2**30)
    assert stages[2]["activations_gib"] > 4 * stages[1]["activations_gib"] * 0.99
    with pytest.raises(SystemExit):
        main(["info", "llama3-8b", "--stages", "2k"])
    assert "--stages" in capsys.readouterr().err
