"""benchmarks/gpu_check.py --dry-run: the GPU check's own code paths, every section, on CPU at 32 px
(about 100 s on a shared 2-core machine). It leans on train.py's internals (train_step,
train_until, prepare_epoch, end_validation, state.build_state, jobs.prepare_job,
runtime.amp_dtype_for), so a change there that breaks it fails here, not on the next lent GPU."""
import importlib.util
import json
import re
import sys

import pytest

from conftest import ROOT


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_interrupts_and_resumes_and_a_failed_check_still_reaches_the_later_sections(tmp_path, capsys):
    gpu_check = load_gpu_check()
    out, work = tmp_path / "report.json", tmp_path / "work"
    code = gpu_check.main(["--dry-run", "--work", str(work), "--out", str(out),
                           "--tol-autocast", "1e-9"])  # bf16 never matches this: a failure mid-run
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 1 and "GPU CHECK FAILED: cpu_vs_gpu/autocast" in printed
    assert report["failed"] == ["cpu_vs_gpu/autocast"] and report["ok"] is False
    assert list(report["sections"]) == gpu_check.SECTIONS  # in order, each with its time
    assert all(s["seconds"] is not None for s in report["sections"].values())
    assert report["env"]["torch"] and "compute capability" in printed.splitlines()[0]

    resume = report["sections"]["resume"]["checks"]
    assert all(resume[k]["ok"] for k in ("interrupted", "resumed", "resume_matches_uninterrupted",
                                         "resume_finished_run"))
    # stopped after the second batch of epoch 2: 2 x 8 samples into it
    assert resume["interrupted"]["exit_code"] == 130 and resume["interrupted"]["last_epoch"] == 1
    assert resume["interrupted"]["last_pos"] == 16
    same = resume["resume_matches_uninterrupted"]  # bit-identical on CPU, history.csv rebuilt from last.pt
    assert same["val_loss_diff"] == same["output_diff"] == same["samples_diff"] == same["lr_diff"] == 0
    precision = report["sections"]["precision"]["checks"]
    assert set(precision) == {"bf16_to_fp16", "fp16_to_bf16"} and all(c["ok"] for c in precision.values())
    assert precision["bf16_to_fp16"]["scaler_afresh"] and not precision["fp16_to_bf16"]["scaler_afresh"]
    assert precision["bf16_to_fp16"]["step_dtypes"] == [["torch.bfloat16"], ["torch.float16"]]
    assert all(c["epochs_run"] == 2 and c["fp16_scale"] > 0 for c in precision.values())
    assert report["sections"]["grid"]["checks"]["grid_rerun_trains_nothing"]["ok"]
    assert report["sections"]["train_eager"]["checks"]["batches_and_layout"]["dtype"] == "torch.uint8"
    variants = report["sections"]["variants"]["checks"]
    assert set(variants) == {"multi_head", "three_class", "ema_accum", "multi_head_outputs"}
    assert variants["multi_head"]["outputs"] == 9 and variants["three_class"]["score_min"] >= -1
    assert "skipped" in report["sections"]["compiled"]  # off without --with-compile
    assert all(c["ok"] for c in report["sections"]["ddp"]["checks"].values())
    assert set(report["sections"]["ddp"]["checks"]) == {"torchrun", "ddp_run"}
    assert report["sections"]["submission"]["checks"]["submission"]["checkpoints"] == 4  # eager and 3 variants

    [row] = report["sections"]["timing"]["rows"]
    assert row["batch"] == 8 and min(row["bare_images_per_s"], row["step_images_per_s"], row["loop_images_per_s"]) > 0
    assert abs(row["ratio"] - row["loop_images_per_s"] / row["bare_images_per_s"]) < 0.01
    assert [r["arch"] for r in report["sections"]["timing"]["timm"]] == ["timm/convnext_atto"]
    memory = report["sections"]["memory"]["rows"]
    assert len(memory) == 4 and {r["grad_checkpointing"] for r in memory} == {False, True}
    assert all(r["peak_gib"] == "n/a on CPU" and r["step_ms"] > 0 for r in memory)
    assert (work / "submission.csv").is_file()
    assert re.search(r"^precision +ok +\d+\.\d *$", printed, re.M) and re.search(r"^whole run +\d+", printed, re.M)

    # --only reruns one section on the same --work (the eager run is reused) and replaces it in the report
    assert gpu_check.main(["--dry-run", "--work", str(work), "--out", str(out), "--only", "cpu_vs_gpu"]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["failed"] == [] and list(report["sections"]) == gpu_check.SECTIONS
    assert "== [2/2] cpu_vs_gpu" in capsys.readouterr().out
