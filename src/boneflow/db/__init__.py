"""The SQL audit log: schema, append-only API, migrations."""
