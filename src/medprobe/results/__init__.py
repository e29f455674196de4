"""Results: SQLite store, tables, plots and reports."""
