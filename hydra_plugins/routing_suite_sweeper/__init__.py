"""Hydra's basic sweeper, checked: every job is composed and its folder known before any job starts."""
