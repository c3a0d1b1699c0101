"""The train stage: features and labels, classifiers, fitting, metrics, predict."""
