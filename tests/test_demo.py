import json
import re

from sralign.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for phase in ("generate", "score", "train dp2o", "train dpo", "train gdpo", "train dgpo", "eval + report"):
        assert phase in summary["timing_s"]
    ev = json.loads((out / "eval.json").read_text())
    assert {"dp2o", "dpo", "gdpo", "dgpo", "reference (ode)", "reference (onestep)"} <= set(ev["reward"])
    html = (out / "report.html").read_text()
    for name in ("dp2o", "dpo", "gdpo", "dgpo", "held-out"):
        assert name in html
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(refs) >= 3 and all(r.startswith("data:image/png;base64,") or (out / r).exists() for r in refs)
    for r in ("dp2o", "dpo", "gdpo", "dgpo"):
        assert (out / "runs" / r / "policy" / "model.safetensors").is_file()
