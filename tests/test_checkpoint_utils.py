"""Which checkpoint a run resumes from, what counts as complete, the config guard and the disk check."""

import pytest

from qlora.train.checkpoints import MARKER, checkpoint_problem, config_differences, find_resume_point, write_marker
from qlora.core.files import check_free_disk
from qlora.planner.disk import disk_needed
from qlora.core.errors import ConfigError

CFG = {"MODEL_NAME": "m", "learning_rate": 2e-4, "max_steps": 100, "RESUME": "auto", "save_steps": 50}


def make_checkpoint(root, step, cfg=CFG, complete=True):
    directory = root / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    (directory / "optimizer.pt").write_bytes(b"o" * 2000)
    if complete:
        write_marker(directory, step, cfg)
    return directory


def test_complete_checkpoint_and_each_way_to_break_it(tmp_path):
    directory = make_checkpoint(tmp_path, 10)
    assert checkpoint_problem(directory) is None
    (directory / "optimizer.pt").write_bytes(b"o" * 1500)
    assert checkpoint_problem(directory) == "optimizer.pt has 1500 bytes, 2000 were written"
    (directory / "optimizer.pt").unlink()
    assert checkpoint_problem(directory) == "optimizer.pt is missing"
    (directory / MARKER).write_text('{"step": 1, "fi')
    assert checkpoint_problem(directory) == f"unreadable {MARKER}"
    assert checkpoint_problem(make_checkpoint(tmp_path, 20, complete=False)) == f"no {MARKER} (the save did not finish)"


def test_auto_resumes_from_the_newest_complete_checkpoint_and_reports_the_skipped(tmp_path):
    make_checkpoint(tmp_path, 50)
    make_checkpoint(tmp_path, 100)
    broken = make_checkpoint(tmp_path, 150)
    (broken / "adapter_model.safetensors").write_bytes(b"")
    unfinished = make_checkpoint(tmp_path, 200, complete=False)
    plan = find_resume_point("auto", tmp_path, CFG)
    assert plan.checkpoint == tmp_path / "checkpoint-100" and not plan.start_over
    assert [path for path, _ in plan.skipped] == [unfinished, broken]


def test_auto_without_checkpoints_starts_over_and_never_always_does(tmp_path):
    assert find_resume_point("auto", tmp_path / "missing", CFG).checkpoint is None
    make_checkpoint(tmp_path, 10, complete=False)
    plan = find_resume_point("auto", tmp_path, CFG)
    assert plan.checkpoint is None and plan.start_over and len(plan.skipped) == 1
    make_checkpoint(tmp_path, 20)
    assert find_resume_point("never", tmp_path, CFG).checkpoint is None


def test_explicit_path_must_be_complete(tmp_path):
    good, bad = make_checkpoint(tmp_path, 10), make_checkpoint(tmp_path, 20, complete=False)
    assert find_resume_point(str(good), tmp_path / "elsewhere", CFG).checkpoint == good
    with pytest.raises(ConfigError, match=f"RESUME='{bad}' is not a complete checkpoint: no {MARKER}"):
        find_resume_point(str(bad), tmp_path, CFG)


def test_a_changed_result_affecting_constant_is_refused_a_neutral_one_is_not(tmp_path):
    make_checkpoint(tmp_path, 10)
    assert find_resume_point("auto", tmp_path, {**CFG, "save_steps": 5, "RESUME": "auto"}).checkpoint is not None
    with pytest.raises(ConfigError, match=r"the config differs \(max_steps=100 -> 200\); rerun with the same values"):
        find_resume_point("auto", tmp_path, {**CFG, "max_steps": 200})
    assert config_differences({"a": 1}, {"a": 1, "b": 2}) == ["b=None -> 2"]


def test_disk_estimate_and_check():
    need = disk_needed(trainable_bytes=4_000, trainable_params=1_000, optim="paged_adamw_32bit", keep_checkpoints=2,
                       merged_params=10_000)
    assert need["checkpoint"] == 4_000 + 8_000 + 1_000_000 and need["merged"] == 20_000
    assert need["total"] == 3 * need["checkpoint"] + 4_000 + 20_000
    assert disk_needed(4_000, 1_000, "paged_adamw_8bit", 2, 0)["checkpoint"] == 4_000 + 2_000 + 1_000_000
    full = disk_needed(4_000, 1_000, "paged_adamw_32bit", 2, 10_000, adapter=False)  # full fine-tuning: no adapter
    assert full["adapter"] == 0 and full["total"] == need["total"] - 4_000


def test_free_disk_check_says_what_and_how_much(tmp_path):
    check_free_disk(tmp_path / "not" / "yet", 1, "the outputs")  # an existing parent is probed
    with pytest.raises(ConfigError, match=r"not enough free disk under .* for the merged model: need ~[0-9.]+ GiB, [0-9.]+ (GiB|MiB) free"):
        check_free_disk(tmp_path, 10**18, "the merged model")
