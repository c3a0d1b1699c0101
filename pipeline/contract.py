"""The features contract: the vocabularies of the extract settings, and which settings change what an output holds.

One low module, below everything that reads or writes features (config, models, extract, train, analyse) and
importing none of them. Every rule about "do these features agree?" is derived from `KEY_EFFECTS` here: the plan's
fingerprint (keys that change the rows), the provenance checks of train, predict, index and search (keys that
change the features), and the query model search rebuilds from an index's provenance.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------ vocabularies

RESIZE_MODES = ("stretch", "center_crop", "pad")  # how an image meets the model's square input (extract/pixels.py)
DEFAULT_DRAFT_MARGIN = 4  # JPEG draft decoding keeps >= 4x the target size; 0 turns it off
PREPROCESS_MODES = ("caffe", "torch", "tf", "none")
# caffe: RGB->BGR, minus ImageNet channel means (VGG, ResNet v1)
# torch: /255, minus mean, over std (DenseNet)
# tf:    x/127.5 - 1 (Inception, Xception, MobileNet v1/v2, ResNet v2, NASNet)
# none:  raw 0..255 pixels; the network normalises inside its own graph
#        (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3)

# Prefixes of input.labels that read a label from an archive: a sibling member (`member:cls`, its text) or a field
# of the sample's .json member (`json:class`, `json:meta.class` for a nested one).
MEMBER_LABELS, JSON_LABELS = "member:", "json:"

SAVED_MODEL_SUFFIXES = (".keras", ".h5")  # a whole saved Keras model; `.weights.h5` is weights only
WEIGHTS_SUFFIX = ".weights.h5"
WEIGHTS_KEYWORDS = ("imagenet", "none")  # the values of model.weights that are not a file

# The Keras applications zoo, in the order of the Keras applications docs table (MobileNetV3 after MobileNetV2):
# keras_name, native input size, preprocess mode, pooled feature dim, parameters (millions), size (MiB), depth,
# top-1, top-5, smallest input side. models/zoo.py builds its registry from these rows; config checks names here.
ZOO_TABLE = (
    ("Xception", 299, "tf", 2048, 22.9, 88, 81, 0.790, 0.945, 71),
    ("VGG16", 224, "caffe", 512, 138.4, 528, 16, 0.713, 0.901, 32),
    ("VGG19", 224, "caffe", 512, 143.7, 549, 19, 0.713, 0.900, 32),
    ("ResNet50", 224, "caffe", 2048, 25.6, 98, 107, 0.749, 0.921, 32),
    ("ResNet50V2", 224, "tf", 2048, 25.6, 98, 103, 0.760, 0.930, 32),
    ("ResNet101", 224, "caffe", 2048, 44.7, 171, 209, 0.764, 0.928, 32),
    ("ResNet101V2", 224, "tf", 2048, 44.7, 171, 205, 0.772, 0.938, 32),
    ("ResNet152", 224, "caffe", 2048, 60.4, 232, 311, 0.766, 0.931, 32),
    ("ResNet152V2", 224, "tf", 2048, 60.4, 232, 307, 0.780, 0.942, 32),
    ("InceptionV3", 299, "tf", 2048, 23.9, 92, 189, 0.779, 0.937, 75),
    ("InceptionResNetV2", 299, "tf", 1536, 55.9, 215, 449, 0.803, 0.953, 75),
    ("MobileNet", 224, "tf", 1024, 4.3, 16, 55, 0.704, 0.895, 32),
    ("MobileNetV2", 224, "tf", 1280, 3.5, 14, 105, 0.713, 0.901, 32),
    ("MobileNetV3Small", 224, "none", 576, 2.9, 10, None, 0.681, None, 32),
    ("MobileNetV3Large", 224, "none", 960, 5.4, 21, None, 0.756, None, 32),
    ("DenseNet121", 224, "torch", 1024, 8.1, 33, 242, 0.750, 0.923, 32),
    ("DenseNet169", 224, "torch", 1664, 14.3, 57, 338, 0.762, 0.932, 32),
    ("DenseNet201", 224, "torch", 1920, 20.2, 80, 402, 0.773, 0.936, 32),
    ("NASNetMobile", 224, "tf", 1056, 5.3, 23, 389, 0.744, 0.919, 32),
    ("NASNetLarge", 331, "tf", 4032, 88.9, 343, 533, 0.825, 0.960, 32),
    ("EfficientNetB0", 224, "none", 1280, 5.3, 29, 132, 0.771, 0.933, 32),
    ("EfficientNetB1", 240, "none", 1280, 7.9, 31, 186, 0.791, 0.944, 32),
    ("EfficientNetB2", 260, "none", 1408, 9.2, 36, 186, 0.801, 0.949, 32),
    ("EfficientNetB3", 300, "none", 1536, 12.3, 48, 210, 0.816, 0.957, 32),
    ("EfficientNetB4", 380, "none", 1792, 19.5, 75, 258, 0.829, 0.964, 32),
    ("EfficientNetB5", 456, "none", 2048, 30.6, 118, 312, 0.836, 0.967, 32),
    ("EfficientNetB6", 528, "none", 2304, 43.3, 166, 360, 0.840, 0.968, 32),
    ("EfficientNetB7", 600, "none", 2560, 66.7, 256, 438, 0.843, 0.970, 32),
    ("EfficientNetV2B0", 224, "none", 1280, 7.2, 29, None, 0.787, 0.943, 32),
    ("EfficientNetV2B1", 240, "none", 1280, 8.2, 34, None, 0.798, 0.950, 32),
    ("EfficientNetV2B2", 260, "none", 1408, 10.2, 42, None, 0.805, 0.951, 32),
    ("EfficientNetV2B3", 300, "none", 1536, 14.5, 59, None, 0.820, 0.958, 32),
    ("EfficientNetV2S", 384, "none", 1280, 21.6, 88, None, 0.839, 0.967, 32),
    ("EfficientNetV2M", 480, "none", 1280, 54.4, 220, None, 0.853, 0.974, 32),
    ("EfficientNetV2L", 480, "none", 1280, 119.0, 479, None, 0.857, 0.975, 32),
    ("ConvNeXtTiny", 224, "none", 768, 28.6, 109.42, None, 0.813, None, 32),
    ("ConvNeXtSmall", 224, "none", 768, 50.2, 192.29, None, 0.823, None, 32),
    ("ConvNeXtBase", 224, "none", 1024, 88.5, 338.58, None, 0.853, None, 32),
    ("ConvNeXtLarge", 224, "none", 1536, 197.7, 755.07, None, 0.863, None, 32),
    ("ConvNeXtXLarge", 224, "none", 2048, 350.1, 1310, None, 0.867, None, 32),
)
ZOO_NAMES = tuple(row[0].lower() for row in ZOO_TABLE)  # registry keys: lowercase keras names


def zoo_key(name: str) -> str:
    return str(name).strip().lower()


def unknown_backbone(name: str) -> str | None:
    """The message for a name not in the zoo (listing the known ones), None for a known name."""
    if zoo_key(name) in ZOO_NAMES:
        return None
    return (f"unknown backbone {name!r}; known backbones: {', '.join(ZOO_NAMES)} "
            "(or give the path/URI of a saved .keras/.h5 model)")


# ------------------------------------------------------------------------------------------ what each key changes

FEATURES = "changes the features"  # fingerprinted; features combine or compare only where these agree
ROWS = "changes the rows, not the features"  # fingerprinted only
SCHEDULING = "scheduling only: where and how fast rows are computed, not their values"

# Every key of an extract config, classified once; anything not FEATURES or ROWS says why it changes nothing
# (tests/test_config.py fails until a new key is classified here).
KEY_EFFECTS = {
    "input.uri": ROWS, "input.labels": ROWS, "input.extensions": ROWS,
    "input.uri_column": "where a manifest keeps its URIs; input.uri is fingerprinted and the listing frozen",
    "input.storage_options": "how the input is reached (endpoint, credentials), not what it holds",
    "input.reader": "how image bytes are fetched (a reader of your own), not what they are",
    "input.reader_options": "the reader's own options",
    "model.backbone": FEATURES, "model.weights": FEATURES, "model.layer": FEATURES, "model.pooling": FEATURES,
    "model.input_size": FEATURES, "model.preprocess": FEATURES, "model.resize": FEATURES,
    "model.draft_margin": FEATURES,
    "model.mixed_precision": FEATURES,  # float16 compute: values differ beyond float32 rounding
    "model.top_k": ROWS, "model.class_names": ROWS,
    "model.weights_sha256": "a guard on the weights file, whose actual checksum is fingerprinted instead",
    "model.trust": "permission to load Lambda layers; the model files themselves are fingerprinted",
    "model.xla": "compiles the same computation",
    "model.runtime": "keras and litert compute the same features (float32, within tolerance)",
    "run.shard_size": ROWS,  # shard i means the same images on every resume
    "run.address": SCHEDULING, "run.actors": SCHEDULING, "run.gpus_per_actor": SCHEDULING,
    "run.min_actors": SCHEDULING, "run.max_actors": SCHEDULING, "run.start_timeout": SCHEDULING,
    "run.cpus_per_actor": SCHEDULING, "run.batch_size": SCHEDULING, "run.shards_in_flight_per_actor": SCHEDULING,
    "run.decode_threads": SCHEDULING, "run.fetch_threads": SCHEDULING, "run.max_attempts": "retries only",
    "run.max_error_rate": "when the job fails, not what it writes",
    "output.feature_dtype": ROWS,
    "output.content_hashes": ROWS,  # sha256 and phash, or nulls; an output planned before the key is not resumed
    "output.uri": "where the rows go, not what they are", "output.mode": "what happens to an existing output",
    "output.row_group_size": "Parquet layout, not values",
    "output.storage_options": "how the output is reached (endpoint, credentials)",
    "models": "each model's output is fingerprinted on its own, its entry's keys as model.*",
}
FINGERPRINT_EXCLUDED = {key: effect for key, effect in KEY_EFFECTS.items() if effect not in (FEATURES, ROWS)}
FINGERPRINT_NAMES = {"input.uri": "input_uri"}  # a key's name in `_plan.json` where it is not its last part

# model.* keys that change the features, by their config name
FEATURE_MODEL_KEYS = tuple(key.split(".", 1)[1] for key, effect in KEY_EFFECTS.items()
                           if effect == FEATURES and key.startswith("model."))
PROVENANCE_NAMES = {"mixed_precision": "compute_dtype"}  # a feature key's name in the Parquet provenance
# What must agree between features that are combined or compared (train, predict, index, search): every feature
# key as the provenance records it, plus the checksum of the weights actually read.
PROVENANCE_KEYS = tuple(PROVENANCE_NAMES.get(key, key) for key in FEATURE_MODEL_KEYS) + ("weights_sha256",)


def _input_size(recorded: str) -> int | None:
    sides = str(recorded).split("x")
    return int(sides[0]) if sides[0].isdigit() and len(set(sides)) == 1 else None


# How a provenance value reads back as its model.* key (identity where missing); None: the key takes its default.
_FROM_PROVENANCE = {
    "weights": lambda value: "none" if value == "embedded" else value,  # a saved model's own weights
    "layer": lambda value: None if value == "default" else value,
    "pooling": lambda value: value if value in ("avg", "max") else None,  # "none": the cut was pooled already
    "input_size": _input_size,
    "draft_margin": int,
    "mixed_precision": lambda value: value == "mixed_float16",
}


def feature_settings(provenance: dict) -> dict:
    """The model.* keys that change the features, as an output's provenance records them (keys it lacks are left
    out, so that they take their defaults)."""
    settings = {}
    for key in FEATURE_MODEL_KEYS:
        recorded = provenance.get(PROVENANCE_NAMES.get(key, key))
        if recorded is None:
            continue
        value = _FROM_PROVENANCE.get(key, lambda given: given)(recorded)
        if value is not None or key == "layer":
            settings[key] = value
    return settings


def normalise_provenance_value(value):
    """Provenance may come as JSON values or as Parquet metadata strings; compare both as text."""
    return None if value in (None, "None", "null") else str(value)


def provenance_differences(expected: dict, actual: dict, expected_name: str, actual_name: str) -> list[str]:
    """One line per contract key on which two provenances disagree, with both values."""
    return [f"{key}: {expected.get(key)!r} ({expected_name}) vs {actual.get(key)!r} ({actual_name})"
            for key in PROVENANCE_KEYS
            if normalise_provenance_value(expected.get(key)) != normalise_provenance_value(actual.get(key))]
