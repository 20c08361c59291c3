"""Building job configs for pipeline tests on the local sample server."""

from __future__ import annotations

import yaml

from jobs.config import CONFIG_DIR, JobConfig, load_config


def job_config(urls: str | list[str], out: str, overrides: list[str] | None = None, **sections) -> JobConfig:
    """configs/dryrun.yaml with the given input and output (and section overrides)."""
    data = yaml.safe_load((CONFIG_DIR / "dryrun.yaml").read_text())
    data["input"]["paths"] = [urls] if isinstance(urls, str) else list(urls)
    data["output"]["path"] = out
    # The dry run's coreset needs the target folder the dry run makes, and its semantic dedup the
    # embeddings of a CLIP stage that some tests turn off: both are tested on their own
    # (tests/test_coreset.py, tests/test_dedup_semantic.py) and switched on here by a test that wants them.
    data["coreset"]["enabled"] = False
    data["dedup"]["semantic"]["enabled"] = False
    for key, values in sections.items():
        data.setdefault(key, {}).update(values)
    return load_config(data=data, overrides=overrides)
