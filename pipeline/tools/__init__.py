"""Product commands built on the stages: compare, bench, demo, inspect reports."""
