"""The report family: every family's metrics in one page, and the CLI summary."""
