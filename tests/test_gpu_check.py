"""benchmarks/gpu_check.py --dry-run: the GPU check's own code paths, on CPU at 32 px."""
import importlib.util
import json

from conftest import ROOT


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_the_report_and_a_tolerance_failure_still_reaches_the_timing(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = load_gpu_check().main(["--dry-run", "--work", str(tmp_path / "work"), "--out", str(out), "--ddp", "off",
                                  "--patients", "12", "--epochs", "1", "--batch-sizes", "4", "--timing-images", "8",
                                  "--loader-workers", "1", "--tol-autocast", "1e-9"])  # bf16 never matches this
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 1 and "GPU CHECK FAILED: cpu_vs_device_autocast" in printed
    assert set(report) >= {"env", "checks", "sections", "timing", "ok", "seconds"} and report["ok"] is False
    assert {k for k, v in report["checks"].items() if not v["ok"]} == {"cpu_vs_device_autocast"}
    assert {"data", "train_eager", "cpu_vs_device_fp32", "submission", "loader_uint8_pinned"} <= set(report["checks"])
    assert report["checks"]["cpu_vs_device_autocast"]["max_abs"] > 0
    [row] = report["timing"]
    assert row["batch"] == 4 and row["bare_images_per_s"] > 0 and row["loop_images_per_s"] > 0
    assert abs(row["ratio"] - row["loop_images_per_s"] / row["bare_images_per_s"]) < 0.01
    assert (tmp_path / "work" / "submission.csv").is_file()
