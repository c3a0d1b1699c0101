"""The fine-tune's parts without Ray: config errors (exit 2, the key named), the split, streaming batches through
extract's decode (archives, broken images), and which layers phase 2 trains."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import InputConfig, ModelConfig, SplitConfig
from pipeline.errors import ConfigError
from pipeline.config import FinetuneOptions
from pipeline.finetune.data import Stream, split_images
from tests.helpers import write_labelled_images
from tests.images import photo_bytes


def write_config(path, **sections) -> str:
    config = {"input": {"uri": "images", "labels": "from_dirs"}, "output": {"uri": "out"}}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(("sections", "named"), [
    ({"finetune": {"epoch": 3}}, "finetune: unknown key(s) epoch"),
    ({"finetune": {"augment": {"rotation": 90}}}, "finetune.augment.rotation"),
    ({"finetune": {"augment": {"flips": "diagonal"}}}, "finetune.augment.flips"),
    ({"finetune": {"learning_rate": 0}}, "finetune.learning_rate"),
    ({"input": {"labels": "none"}}, "input.labels"),
    ({"split": {"column": "fold"}}, "split.column"),
    ({"output": {"uri": ""}}, "output.uri is required"),
    ({"run": {"workers": 0}}, "run.workers"),
    ({"finetune": {"sync_every": 0}}, "finetune.sync_every"),
    ({"runs": {"workers": 1}}, "config: unknown key(s) runs"),
])
def test_config_errors_exit_2_naming_the_key(tmp_path, capsys, sections, named):
    assert main(["finetune", "--config", write_config(tmp_path / "c.json", **sections)]) == 2
    assert named in capsys.readouterr().err


def test_too_few_images_for_the_test_split_is_a_config_error(tmp_path, capsys):
    write_labelled_images(tmp_path / "images", num_classes=4, per_class=2)
    config = write_config(tmp_path / "c.json", input={"uri": str(tmp_path / "images")},
                          output={"uri": str(tmp_path / "out")})
    assert main(["finetune", "--config", config, "--set", "split.test_fraction=0.1"]) == 2
    assert "split.test_fraction" in capsys.readouterr().err


def test_split_is_stratified_disjoint_and_the_same_on_a_rerun(tmp_path):
    write_labelled_images(tmp_path / "images", num_classes=3, per_class=10)
    input_config = InputConfig(uri=(str(tmp_path / "images"),), labels="from_dirs")
    splits = split_images(input_config, SplitConfig(test_fraction=0.3), 0.2)
    parts = (splits.train, splits.validation, splits.test)
    assert sum(len(part) for part in parts) == 30 and len(set().union(*(part.uris for part in parts))) == 30
    assert np.bincount(splits.test.targets).tolist() == [3, 3, 3]
    again = split_images(input_config, SplitConfig(test_fraction=0.3), 0.2)
    assert again.test.uris == splits.test.uris and again.listing_sha256 == splits.listing_sha256


def test_batches_stream_tar_members_and_leave_out_broken_images_with_the_reason(tmp_path):
    archive = tmp_path / "shard.tar"
    members = {f"sample{index}.jpg": photo_bytes(seed=index) for index in range(5)}
    members["sample5.jpg"] = b"not an image"
    labels = {f"sample{index}.cls": str(index % 2).encode() for index in range(6)}
    with tarfile.open(archive, "w") as tar:
        for name, data in sorted({**members, **labels}.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    splits = split_images(InputConfig(uri=(str(archive),), labels="member:cls"), SplitConfig(test_fraction=0.34), 0.2)
    stream = Stream({}, ModelConfig(), (32, 24), decode_threads=2)
    everything = [splits.train, splits.validation, splits.test]
    batches = [batch for part in everything for batch in stream.batches(part, batch_size=2, seed=1)]
    assert sum(len(targets) for _, targets in batches) == 5
    assert all(pixels.shape[1:] == (32, 24, 3) and pixels.dtype == np.float32 for pixels, _ in batches)
    (broken, reason), = stream.left_out.items()
    assert broken.startswith("tar://sample5.jpg::") and reason
    members = {uri.split("::")[0] for part in everything for uri in part.uris}
    assert members == {f"tar://sample{index}.jpg" for index in range(6)}


def test_unfreezing_the_last_blocks_or_from_a_named_layer():
    import keras

    from pipeline.finetune import network

    classifier = network.build_classifier(
        network.load_base(ModelConfig(weights="none", input_size=96), None), 3, ModelConfig(), FinetuneOptions())
    layers = network.base_layers(classifier)
    assert layers[network.first_trained_layer(layers, FinetuneOptions(unfreeze_blocks=2))].name == "block_15_expand"
    assert layers[network.first_trained_layer(layers, FinetuneOptions(unfreeze_from="Conv_1"))].name == "Conv_1"
    with pytest.raises(ConfigError, match="finetune.unfreeze_from"):
        network.first_trained_layer(layers, FinetuneOptions(unfreeze_from="no_such_layer"))
    network.set_phase(classifier, "head", FinetuneOptions())
    assert [weight.path for weight in classifier.trainable_weights] == ["classifier/kernel", "classifier/bias"]
    network.set_phase(classifier, "network", FinetuneOptions(unfreeze_blocks=1))
    trained = {layer.name for layer in layers if layer.trainable_weights}
    assert "block_16_project" in trained and "block_15_project" not in trained
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers if layer.trainable)
    keras.backend.clear_session()


def test_worker_resources_follow_the_cluster_and_refuse_what_it_can_never_give():
    from pipeline.config import FinetuneRunConfig
    from pipeline.finetune.workers import worker_resources

    assert worker_resources(FinetuneRunConfig(), {"CPU": 16.0, "GPU": 2.0}) == (16, 1.0)  # a GPU when there is one
    assert worker_resources(FinetuneRunConfig(), {"CPU": 2.0}) == (2, 0.0)  # else the CPUs, as extract
    assert worker_resources(FinetuneRunConfig(gpus_per_worker=0, cpus_per_worker=4), {"CPU": 8.0, "GPU": 1.0}) == (4, 0)
    with pytest.raises(ConfigError, match="run.gpus_per_worker"):
        worker_resources(FinetuneRunConfig(gpus_per_worker=2), {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="run.cpus_per_worker"):
        worker_resources(FinetuneRunConfig(cpus_per_worker=32), {"CPU": 8.0})
    # data-parallel: each worker a GPU, or the CPUs divided; more workers than CPUs names run.workers
    assert worker_resources(FinetuneRunConfig(workers=2), {"CPU": 16.0, "GPU": 2.0}) == (8, 1.0)
    assert worker_resources(FinetuneRunConfig(workers=2), {"CPU": 2.0}) == (1, 0.0)
    with pytest.raises(ConfigError, match="run.workers: 3 worker"):
        worker_resources(FinetuneRunConfig(workers=3), {"CPU": 2.0})


def test_averaging_identical_states_returns_them_and_two_states_give_their_mean():
    from pipeline.finetune.parallel import average

    generator = np.random.default_rng(0)
    state = [generator.normal(size=(3, 4)).astype(np.float32), generator.normal(size=7).astype(np.float32),
             np.asarray(12, np.int64)]
    for copies in (2, 3, 5):
        averaged = average([[array.copy() for array in state] for _ in range(copies)])
        assert all(np.array_equal(got, want) and got.dtype == want.dtype for got, want in zip(averaged, state))
    other = [array * 3 + 1 for array in state[:2]] + [np.asarray(14, np.int64)]
    averaged = average([state, other])
    for got, first, second in zip(averaged[:2], state, other):
        expected = (first.astype(np.float64) + second.astype(np.float64)) / 2  # numpy's mean, the other way round
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert got.dtype == np.float32
    assert averaged[2] == 13 and averaged[2].dtype == np.int64


def test_each_worker_trains_a_disjoint_slice_and_together_the_whole_split():
    from pipeline.finetune.data import Part
    from pipeline.finetune.parallel import epoch_rounds

    part = Part([f"file:///images/{index}.png" for index in range(103)], np.arange(103) % 4)
    rounds = epoch_rounds(part, batch_size=8, seed=5, workers=3, sync_every=2)
    seen = [[uri for shares in rounds for uri in shares[rank].uris] for rank in range(3)]
    assert sum(len(uris) for uris in seen) == 103 and set().union(*map(set, seen)) == set(part.uris)
    assert all(len(shares[rank]) <= 2 * (8 // 3) for shares in rounds for rank in range(3))
    targets = {uri: target for uri, target in zip(part.uris, part.targets)}
    assert all(targets[uri] == target for shares in rounds for share in shares
               for uri, target in zip(share.uris, share.targets))
