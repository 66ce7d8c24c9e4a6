"""The patients the example DAGs report on, for ``cliniko-sandbox --seed-example-patients``."""

from __future__ import annotations

from cliniko_provider.sandbox.store import Account, Patient, Store

# As in dags_examples/cliniko_nightly_report_export.py (SAMPLE_PATIENTS), less the row it skips on
# purpose (WH-9999: "no Cliniko patient"). A test keeps the two lists in step.
EXAMPLE_PATIENTS: tuple[dict[str, str], ...] = (
    {
        "first_name": "Ada",
        "last_name": "Lovelace",
        "email": "ada.lovelace@example.com",
        "reference": "WH-1001",
    },
    {"first_name": "Alan", "last_name": "Turing", "email": "alan.turing@example.com", "reference": "WH-1002"},
    {
        "first_name": "Grace",
        "last_name": "Hopper",
        "email": "grace.hopper@example.com",
        "reference": "WH-1003",
    },
    {
        "first_name": "Edsger",
        "last_name": "Dijkstra",
        "email": "edsger.dijkstra@example.com",
        "reference": "WH-1004",
    },
)


def seed_example_patients(store: Store, account: Account) -> list[Patient]:
    """Create the example patients the account lacks (by ``old_reference_id``); return those created.

    Idempotent: a restart on the same ``--data-dir`` creates none again.

    :param store: the sandbox's store.
    :param account: the account to seed.
    """
    created = []
    with store.transaction():
        for row in EXAMPLE_PATIENTS:
            exists = store.db.execute(
                "SELECT 1 FROM patients WHERE account_id = ? AND old_reference_id = ?"
                " AND archived_at IS NULL",
                (account.id, row["reference"]),
            ).fetchone()
            if exists is None:
                fields = {
                    "first_name": row["first_name"],
                    "last_name": row["last_name"],
                    "email": row["email"],
                    "date_of_birth": None,
                    "old_reference_id": row["reference"],
                }
                created.append(store.add_patient(account, fields, {}))
    return created
