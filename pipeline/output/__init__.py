"""The output ledger: layout, plan file, commit records, orphans, _SUCCESS, the lease."""
