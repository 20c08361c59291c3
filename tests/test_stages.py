"""The stage list and the operator contract: declared columns and reasons, the chain, the fingerprint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import BaseModel, create_model

from jobs.config import CONFIG_DIR, PHASE2_SECTIONS, RUN_SECTIONS, ConfigError, JobConfig, load_config
from jobs.stages import ACTOR_POOL, STAGES, chain_errors, describe, models_of, stage
from operators.base import (DROPPED, FAILED, KEPT, Columns, ContractError, DropReason, KeptRowsStage, Operator,
                            Scored)
from operators.sources import PLAN_REASONS

ROOT = Path(__file__).resolve().parent.parent


def _batch(status: list[str]) -> pa.Table:
    n = len(status)
    return pa.table({"sample_id": [f"s{i}" for i in range(n)], "status": status, "drop_stage": [None] * n,
                     "drop_reason": [None] * n, "error_message": [None] * n, "x": list(range(n))})


def _dryrun(overrides=()):
    return load_config(CONFIG_DIR / "dryrun.yaml", ["output.path=/tmp/x", *overrides])


# --- every reason the code can emit is declared -------------------------------------------
def _emitted_reasons() -> dict[str, str]:
    """Reason literals in the code, as templates (``{}`` for an f-string field): literal -> file."""
    patterns = [r"\((?:DROPPED|FAILED),\s*f?\"([^\"]+)\"", r"reason=f?\"([^\"]+)\"", r"return None, \"([a-z_]+)\"",
                r"why = .*?\"([a-z_]+)\"\)"]
    found = {}
    for path in list((ROOT / "operators").rglob("*.py")) + list((ROOT / "jobs").rglob("*.py")):
        text = path.read_text()
        for p in patterns:
            for m in re.finditer(p, text):
                found[re.sub(r"\{[^}]*\}", "{}", m.group(1))] = str(path.relative_to(ROOT))
    return found


def _declared() -> list[DropReason]:
    from operators.refresh import REFRESH_REASONS

    return list(PLAN_REASONS) + [r for s in STAGES for r in s.drop_reasons()] + list(REFRESH_REASONS)


def test_every_reason_the_code_can_emit_is_declared():
    emitted = _emitted_reasons()
    assert {"timeout", "too_small", "no_bytes", "http_{}", "missing_url"} <= set(emitted)  # the scan finds them
    declared = {re.sub(r"\{[^}]*\}", "{}", r.name) for r in _declared()}
    undeclared = {r: f for r, f in emitted.items() if r not in declared}
    assert not undeclared, f"reasons emitted but not declared by any stage: {undeclared}"


def test_each_stage_declares_its_reasons_and_statuses():
    for s in STAGES:
        for r in s.drop_reasons():
            assert r.status in (DROPPED, FAILED) and r.meaning, (s.section, r)
    assert {r.name for r in stage("download").drop_reasons()} >= {"http_{code}", "ssrf_blocked", "timeout"}


def test_templated_reasons_format_and_match():
    r = DropReason("clip_below_{min_score}", DROPPED, "m")
    assert r.format(min_score=0.28) == "clip_below_0.28" and r.matches("clip_below_0.28")
    assert not r.matches("clip_below_") and not r.matches("reward_below_0.3")
    assert DropReason("decode_error", FAILED, "m").matches("decode_error")


# --- the operator contract ----------------------------------------------------------------
class _Drops(Operator):
    name = "toy"
    reads = ("status",)
    writes = ("y",)
    reasons = (DropReason("odd", DROPPED, "odd rows"),)

    def __init__(self, mode: str):
        self.mode = mode

    def process(self, batch):
        from operators.base import mark, set_columns

        if self.mode == "lose_row":
            return batch.slice(1)
        if self.mode == "reorder":
            return set_columns(batch.take([1, 0, 2]), {"y": [1, 2, 3]})
        out = batch if self.mode == "no_write" else set_columns(batch, {"y": list(range(batch.num_rows))})
        reason = "odd" if self.mode == "ok" else "not_declared"
        return mark(out, self.name, [(DROPPED, reason, "") if i % 2 else None for i in range(batch.num_rows)])


@pytest.mark.parametrize("mode", ["lose_row", "reorder", "no_write", "undeclared"])
def test_operator_contract_is_checked_after_each_batch(mode):
    with pytest.raises(ContractError):
        _Drops(mode)(_batch([KEPT] * 3))


def test_operator_contract_holds_for_a_good_operator():
    out = _Drops("ok")(_batch([KEPT] * 3))
    assert out.column("drop_reason").to_pylist() == [None, "odd", None]
    with pytest.raises(KeyError, match="lacks"):
        _Drops("ok")(pa.table({"x": [1]}))


class _Doubler(KeptRowsStage):
    """Scores only the kept rows: y = 2x; drops x == 2; rewrites x in place."""

    name = "doubler"
    reasons = (DropReason("two", DROPPED, "x is 2"),)
    seen: list = []

    @classmethod
    def columns(cls, config=None):
        return Columns(("status", "x"), {"y": pa.int64(), "x": pa.int64()})

    def setup(self):
        self.setups = getattr(self, "setups", 0) + 1

    def score(self, rows):
        self.seen.append(rows.column("x").to_pylist())
        xs = rows.column("x").to_pylist()
        return Scored({"y": [2 * x for x in xs], "x": [x + 100 for x in xs]},
                      [(DROPPED, "two", "x == 2") if x == 2 else None for x in xs])


def test_kept_rows_stage_hands_over_only_kept_rows_and_scatters_back():
    op = _Doubler()
    _Doubler.seen = []
    b = _batch([KEPT, DROPPED, KEPT, KEPT])
    b = b.set_column(b.schema.get_field_index("drop_stage"), "drop_stage", pa.array([None, "download", None, None]))
    b = b.set_column(b.schema.get_field_index("drop_reason"), "drop_reason", pa.array([None, "timeout", None, None]))
    out = op(b)
    assert _Doubler.seen == [[0, 2, 3]]
    assert out.column("y").to_pylist() == [0, None, 4, 6]
    assert out.column("x").to_pylist() == [100, 1, 102, 103]  # not kept: its own value stays
    assert out.column("status").to_pylist() == [KEPT, DROPPED, DROPPED, KEPT]
    assert out.column("drop_stage").to_pylist() == [None, "download", "doubler", None]
    assert out.column("drop_reason").to_pylist() == [None, "timeout", "two", None]
    op(_batch([DROPPED]))  # nothing kept: no score, no setup, columns still written
    assert _Doubler.seen == [[0, 2, 3]] and op.setups == 1
    assert op(_batch([DROPPED])).column("y").type == pa.int64()


# --- the chain, checked before launch -------------------------------------------------------
def test_chain_of_the_bundled_configs_is_complete():
    for name in ("dryrun.yaml", "laion-style.yaml"):
        assert chain_errors(load_config(CONFIG_DIR / name)) == [], name


def test_a_stage_reading_a_column_nobody_writes_is_refused_before_launch():
    with pytest.raises(ConfigError, match="clip_score.*clip.enabled"):
        _dryrun(["clip.enabled=false", "safety.enabled=false", "reward.enabled=false", "selection.reward_top_fraction=null",
                 "selection.clip_top_fraction=0.3"])
    with pytest.raises(ConfigError, match="clip_image_embedding"):
        _dryrun(["clip.write_embeddings=false"])
    with pytest.raises(ConfigError, match="reward"):
        _dryrun(["reward.enabled=false"])  # the dry run's selection ranks by reward


def test_model_list_and_description_come_from_the_stage_list():
    cfg = _dryrun()
    models = models_of(cfg)
    assert {"clip", "recaption", "reward"} <= set(models) and any(k.startswith("safety.") for k in models)
    assert all(m["random_weights"] for m in models.values())
    text = describe(cfg)
    for s in STAGES:
        if s.enabled(cfg):
            assert re.search(rf"^{s.section}  \[", text, re.M), s.section
    assert "RANDOM WEIGHTS" in text and "clip_score" in text
    off = _dryrun(["recaption.enabled=false"])
    assert "recaption" not in models_of(off) and not re.search(r"^recaption  \[", describe(off), re.M)


def test_cli_validate_prints_the_chain():
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "validate", "configs/dryrun.yaml"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "the chain" in r.stdout and "reads:" in r.stdout and "RANDOM WEIGHTS" in r.stdout
    assert re.search(r"^reward  \[actor pool \(0.25 CPU", r.stdout, re.M)


# --- the fingerprint covers every phase-1 section but the run sections ----------------------
def test_every_phase1_section_is_fingerprinted_and_run_and_phase2_sections_are_not(tmp_path):
    a = _dryrun()
    assert {s.section for s in STAGES} <= set(JobConfig.model_fields) - RUN_SECTIONS
    assert {"selection", "dedup"} <= PHASE2_SECTIONS and not PHASE2_SECTIONS & {"clip", "images", "download"}
    for o in ["recaption.max_new_tokens=7", "safety.enabled=false", "images.image_size=97", "download.retries=5"]:
        assert _dryrun([o]).fingerprint() != a.fingerprint(), o
    # phase 2 reruns over the same phase-1 output with other settings
    for o in ["output.path=/tmp/elsewhere", "ray.num_cpus=9", "storage.region=eu", "name=other",
              "recaption.cache_path=/tmp/c", "clip.num_cpus=3", "reward.pool_max=4",
              "selection.reward_top_fraction=0.5", "dedup.exact=false"]:
        assert _dryrun([o]).fingerprint() == a.fingerprint(), o


def test_a_new_section_is_fingerprinted_without_listing_it():
    class OcrConfig(BaseModel):
        min_chars: int = 1

    Extended = create_model("Extended", __base__=JobConfig, ocr=(OcrConfig, OcrConfig()))
    data = _dryrun().model_dump(mode="json")
    a = Extended.model_validate(data)
    b = Extended.model_validate({**data, "ocr": {"min_chars": 2}})
    assert a.fingerprint() != b.fingerprint()


def test_model_stages_are_the_actor_pool_entries_in_order():
    from jobs.stages import model_stages

    names = [s.section for s, _, _ in model_stages(_dryrun())]
    assert names == [s.section for s in STAGES if s.runs_in == ACTOR_POOL and s.enabled(_dryrun())]
    assert names == ["clip", "safety", "recaption", "reward"]


def test_operators_never_import_jobs():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "operators").rglob("*.py")
                 if re.search(r"^\s*(from jobs[. ]|import jobs)", p.read_text(), re.M)]
    assert not offenders, offenders
