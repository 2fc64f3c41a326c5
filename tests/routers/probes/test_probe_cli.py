"""``switchyard train probe``, ``eval`` and ``calibrate`` end to end through the real CLI."""

from __future__ import annotations

import json

import pytest

from extproc.cli import main
from tests.routers.test_probe_support import tiny_text_model, trigger_set, write_jsonl


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_text_model(root)
    train = write_jsonl(root / "train.jsonl", trigger_set(96, 1))
    val = write_jsonl(root / "val.jsonl", trigger_set(48, 2))
    return root, model, train, val


def test_train_eval_calibrate(workspace, capsys):
    root, model, train, val = workspace
    out = root / "ckpt"
    code = main([
        "train", "probe", "--method", "attention", "--backbone", str(model), "--data", str(train),
        "--val", str(val), "--small", "small", "--out", str(out), "--epochs", "4", "--lr", "3e-3",
        "--mlp-depth", "3", "--mlp-width", "32", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "attention" and config["backbone"]["layer"] == 2  # default: half of 4 layers
    assert config["training"]["small"] == "small" and len(config["training"]["train_data_hash"]) == 64
    assert "Saved attention probe" in capsys.readouterr().out

    report_path, plot = root / "report.json", root / "curve.png"
    code = main([
        "eval", "--checkpoint", str(out), "--data", str(val), "--small", "small", "--large", "large",
        "--plot", str(plot), "--out", str(report_path),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "ROC AUC" in printed and "CPT(80%)" in printed
    report = json.loads(report_path.read_text())
    assert report["roc_auc"] > 0.75 and report["small_accuracy"] == 0.5 and report["large_accuracy"] == 1.0
    assert len(report["curve"]["accuracy"]) == 101 and report["curve"]["accuracy"][-1] == 1.0
    assert 0.5 < report["apgr"] <= 1.0 and 0.0 <= report["cpt50"] <= report["cpt80"] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code = main(["calibrate", "--checkpoint", str(out), "--data", str(val), "--large-share", "0.25"])
    assert code == 0
    thresholds = json.loads((out / "config.json").read_text())["thresholds"]
    assert thresholds[0]["large_share"] == 0.25 and thresholds[0]["achieved_share"] == 0.25


def test_errors_exit_1_with_a_sentence(workspace, capsys):
    root, model, train, val = workspace
    code = main(["eval", "--checkpoint", str(root / "nope"), "--data", str(val), "--small", "small", "--large", "large"])
    assert code == 1 and "No checkpoint at" in capsys.readouterr().err
    code = main([
        "train", "probe", "--method", "relope", "--backbone", str(model), "--layer", "9", "--data", str(train),
        "--small", "small", "--out", str(root / "bad"),
    ])  # fmt: skip
    assert code == 1 and "1..4" in capsys.readouterr().err
    code = main([
        "train", "probe", "--method", "last_token", "--backbone", str(model), "--data", str(train),
        "--small", "medium", "--out", str(root / "bad"), "--epochs", "1", "--no-progress",
    ])  # fmt: skip
    assert code == 1 and "no outcome for backend 'medium'" in capsys.readouterr().err


def test_without_torch_the_commands_say_how_to_install_it():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if the ml extra were not installed\n"
        "from extproc.cli import main\n"
        "sys.exit(main(['train', 'probe', '--method', 'relope', '--data', 'x']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "needs torch, which is not installed" in out.stderr and "switchyard[ml]" in out.stderr
