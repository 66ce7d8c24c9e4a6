"""Every Python example in README.md builds its tasks in a DAG and renders for scheduled and manual runs.

A manual run on Airflow 3 has no logical date, so ``{{ ds }}`` is undefined there: each example's
templates are rendered with Airflow's own template environment (undefined names are errors) for a
scheduled run and for a manual one.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk import DAG

from tests.conftest import REPO

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
# Names the README's snippets use for what the reader's own DAG would compute.
PLACEHOLDERS: dict[str, Any] = {
    "batches_of_100": [[{"patient_id": "12", "file_path": "s3://reports/a.pdf"}]],
}
PARAMS = {"patient_id": "1234567890", "month": "2026-11", "report_id": "R-7"}
RUN_AFTER = datetime(2026, 11, 21, 0, 30, tzinfo=timezone.utc)
LOGICAL_DATE = datetime(2026, 11, 20, 0, 0, tzinfo=timezone.utc)


class FakeTI:
    """What the examples pull from XCom: an attachment record."""

    def xcom_pull(self, *args: Any, **kwargs: Any) -> dict[str, str]:
        return {"id": "987654321"}


def run_context(*, scheduled: bool) -> dict[str, Any]:
    """The template context of a scheduled run (with ``ds``) or a manual one (no logical date)."""
    context: dict[str, Any] = {
        "dag_run": SimpleNamespace(logical_date=LOGICAL_DATE if scheduled else None, run_after=RUN_AFTER),
        "params": PARAMS,
        "ti": FakeTI(),
        "run_id": "scheduled__2026-11-20" if scheduled else "manual__2026-11-21",
    }
    if scheduled:
        context.update(ds="2026-11-20", logical_date=LOGICAL_DATE)
    return context


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("scheduled", [True, False], ids=["scheduled", "manual"])
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_example_builds_and_renders_for_scheduled_and_manual_runs(index: int, scheduled: bool) -> None:
    with DAG(f"readme_example_{index + 1}", schedule=None, params=PARAMS) as dag:
        exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), dict(PLACEHOLDERS))
    assert dag.tasks, "the example builds no task"
    for task in dag.tasks:
        if hasattr(task, "expand_input"):  # mapped: Airflow renders each mapped task's fields at run time
            continue
        task.render_template_fields(run_context(scheduled=scheduled), dag.get_template_env())
        rendered = {name: getattr(task, name) for name in task.template_fields}
        assert not any("{{" in str(value) for value in rendered.values()), rendered
        if "dag_run.logical_date or dag_run.run_after" in BLOCKS[index]:
            date = "2026-11-20" if scheduled else "2026-11-21"
            assert any(date in str(value) for value in rendered.values()), rendered


def test_ds_alone_fails_in_a_manual_run() -> None:
    """The check above can fail: ``{{ ds }}`` does not render for a manual run."""
    from jinja2 import UndefinedError

    from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator

    with DAG("readme_ds", schedule=None, params=PARAMS) as dag:
        task = ClinikoAttachmentUploadOperator(task_id="t", patient_id="1", file_path="/r/{{ ds }}.pdf")
    task.render_template_fields(run_context(scheduled=True), dag.get_template_env())
    assert task.file_path == "/r/2026-11-20.pdf"
    task.file_path = "/r/{{ ds }}.pdf"
    with pytest.raises(UndefinedError, match="ds"):
        task.render_template_fields(run_context(scheduled=False), dag.get_template_env())


def test_the_first_night_in_the_readme_is_what_the_end_to_end_test_runs() -> None:
    """tests/e2e/test_nightly_e2e.py runs the README's first night; the two must not drift apart."""
    start = (REPO / "README.md").read_text().index("## Your first night")
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text()[start:], re.S)
    assert block is not None
    commands = block.group(1)
    e2e = (REPO / "tests" / "e2e" / "test_nightly_e2e.py").read_text()
    assert (
        "cliniko-sandbox --port 8765 --seed-example-patients" in commands
        and '"--seed-example-patients"' in e2e
    )
    assert "sandbox-api-key-au1" in commands and "KEY = DEFAULT_API_KEY" in e2e
    for flag in ("--conn-type cliniko", "--conn-password", "--conn-host", "--conn-extra"):
        assert flag in commands and flag.split()[0] in e2e
    assert "airflow cliniko check" in commands and '"cliniko", "check"' in e2e
    assert "dags_examples/cliniko_*.py" in commands and '.glob("cliniko_*.py")' in e2e
    # A fresh AIRFLOW_HOME has no database, and a new DAG starts paused (its triggered run would stay
    # queued forever): the README says both, before the commands that need them.
    assert commands.index("airflow db migrate") < commands.index("airflow connections add")
    assert commands.index("airflow dags unpause cliniko_nightly_report_export") < commands.index(
        "airflow dags trigger cliniko_nightly_report_export"
    )
    assert (
        'stack.cli("dags", "unpause", DAG_ID)' in e2e
        and 'self.cli("db", "migrate")' in (REPO / "tests" / "e2e" / "stack.py").read_text()
    )
    assert "airflow standalone" in commands
    assert "airflow dags trigger cliniko_nightly_report_export\n" in commands
    assert 'stack.cli("dags", "trigger", DAG_ID, "--run-id", "first-night")' in e2e  # no conf: the defaults


def test_the_readme_manifest_line_is_what_the_nightly_example_writes() -> None:
    """The audit section's sample line has a real manifest line's fields, as the nightly example's
    default ``verify="size"`` records a processed upload (verification ``processed``, not ``etag``)."""
    import dataclasses
    import json

    from cliniko_provider.utils.audit import AuditRecord

    readme = (REPO / "README.md").read_text()
    sample = re.search(r"```json\n(.*?)\n```", readme[readme.index("## The audit trail") :], re.S)
    assert sample is not None
    line = json.loads(sample.group(1))
    assert list(line) == [field.name for field in dataclasses.fields(AuditRecord)]
    assert AuditRecord.from_json(sample.group(1)).attachment_id == line["attachment_id"]
    assert (line["status"], line["verification"], line["verification_outcome"]) == (
        "processed",
        "processed",
        "passed",
    )
    nightly = (REPO / "dags_examples" / "cliniko_nightly_report_export.py").read_text()
    assert re.search(r'"verify": Param\(\s*"size"', nightly)


def test_the_readme_stays_short_and_its_longer_pages_are_in_the_docs() -> None:
    """The limits and cluster material lives in docs/ (linked from the README, built by ``make docs``)."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 500
    toctree = (REPO / "docs" / "index.rst").read_text()
    facts = {
        "limits": (
            "60.5 s",
            "**at most 5 x** ``max_rate_limit_wait``",
            "390,625",
            "Private local state",
            "64 KiB",
        ),
        "cluster": (
            "Skew it tolerates",
            "0.3 ms median",
            "**Kubernetes.**",
            "airflow pools set cliniko_api",
            "2 s",
        ),
    }
    for page, shown in facts.items():
        assert f"[docs/{page}.rst](docs/{page}.rst)" in readme
        assert f"\n   {page}\n" in toctree
        text = (REPO / "docs" / f"{page}.rst").read_text()
        assert all(fact in text for fact in shown), page
        assert "](" not in text and "\n## " not in text  # no Markdown left


def test_the_readme_names_every_option_of_the_command_line() -> None:
    from cliniko_provider.cli.commands import ARGUMENTS

    readme = (REPO / "README.md").read_text()
    start = readme.index("| `cliniko check")
    table = readme[start : readme.index("\n\n", start)]
    for command, arguments in ARGUMENTS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `cliniko {command} "))
        for flags, _ in arguments:
            flag = flags[0]
            assert flag in row or flag == "--conn-id" or flag == "patient_id", (command, flag)
    assert "each takes `--conn-id ID` (default `cliniko_default`)" in readme
