"""README's reference tables are generated from the code and must be current."""

from __future__ import annotations

from jobs.docs import README, config_rows, render, tables
from jobs.config import JobConfig


def test_readme_tables_are_current():
    text = README.read_text()
    assert render(text) == text, "README.md is not current: run python -m jobs.docs"


def test_config_reference_lists_every_key_with_a_meaning():
    rows = config_rows(JobConfig)
    keys = [k for k, *_ in rows]
    assert len(keys) == len(set(keys))
    for must in ("safety.nsfw.max_punsafe", "download.retry_timeouts", "recaption.vllm.concurrency",
                 "selection.reward_top_fraction", "output.write_num_cpus"):
        assert must in keys, must
    missing = [k for k, _, _, meaning in rows if not meaning.strip()]
    assert not missing, f"config keys without a description (pydantic Field description): {missing}"


def test_drop_reason_table_has_a_row_per_declared_reason():
    table = tables()["drop-reasons"]
    for stage in ("plan", "download", "image", "clip", "safety", "recaption", "reward", "selection"):
        assert f"| {stage} |" in table, stage
