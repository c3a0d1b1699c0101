"""The analyse stages: a similarity index over extracted features, search, near-duplicate groups."""
