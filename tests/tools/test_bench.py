"""The benchmark's measuring pieces (not timings: those are figures, never assertions)."""

import numpy as np
import pytest

from pipeline.tools.bench import CpuMonitor, cpu_ceiling, read_cpu_counters
from pipeline.tools.plan_memory import plan_memory


@pytest.mark.slow
def test_planning_a_million_entry_manifest_stays_within_one_gib():
    memory = plan_memory(1_000_000)
    assert memory["entries"] == 1_000_000
    assert memory["peak_rss_bytes"] < 2**30, f"peak RSS {memory['peak_rss_bytes'] / 2**20:.0f} MiB"


@pytest.mark.slow
@pytest.mark.ray
def test_bench_runs_end_to_end_and_writes_what_it_prints(tmp_path, ray_local):
    """The harness itself, on a tiny setting: every figure present and consistent (values are not asserted)."""
    import io
    import json

    from rich.console import Console

    from pipeline.tools.bench import BenchSettings, run_bench

    settings = BenchSettings(backbone="mobilenetv2", input_size=32, batch_size=4, num_images=16, bare_images=8,
                             loop_images=2, source_size=(64, 48), camera_images=0, manifest_entries=0,
                             hash_pairs=2)
    printed = io.StringIO()
    result = run_bench(settings, tmp_path, Console(file=printed, width=120))

    assert result["runtime"] == result["pipeline"]["runtime"] == "litert"  # auto on a CPU: the same runtime
    assert result["pipeline"]["rows"] == {"total": 16, "ok": 16, "error": 0}
    assert len(result["bare_model_passes"]) == 4
    assert result["bare_model_images_per_second"] == max(result["bare_model_passes"])
    assert result["pipeline_over_bare"] == pytest.approx(
        result["pipeline"]["images_per_second"] / result["bare_model_images_per_second"])
    assert result["pipeline_over_keras_loop"] == pytest.approx(
        result["pipeline"]["images_per_second"] / result["keras_loop_images_per_second"])
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "(runtime litert)" in printed.getvalue() and "b / c" in printed.getvalue()
    bare, cores = result["bare_model_images_per_second"], result["cpu_count"]
    hashed_decode = result["decode_with_content_hashes_images_per_second_per_core"]  # (b) hashes: its decode rate
    assert result["cpu_ceiling_over_bare"] == pytest.approx(cpu_ceiling(bare, hashed_decode, cores))
    assert result["pipeline_over_cpu_ceiling"] == pytest.approx(
        result["pipeline"]["images_per_second"] / (bare * result["cpu_ceiling_over_bare"]))
    assert result["pipeline_over_cpu_ceiling_without_hashes"] == pytest.approx(result["pipeline_over_bare"] / cpu_ceiling(
        bare, result["decode_images_per_second_per_core"], cores))
    assert "pipeline / ceiling" in printed.getvalue()
    cpu = result["pipeline"]["cpu"]
    assert 0 < cpu["busy_cores"] <= result["cpu_count"] + 0.1 and 0 <= cpu["steal_share"] < 1
    assert "cores busy during (b)" in printed.getvalue() and "ceiling" in printed.getvalue()
    hashes = result["content_hashes"]  # the worker with and without them, two pairs, as ratios
    assert hashes["images"] == 16 and len(hashes["cpu_ratios"]) == len(hashes["wall_ratios"]) == 2
    assert hashes["median_cpu_ratio"] == pytest.approx(float(np.median(hashes["cpu_ratios"])))
    assert "worker with / without content hashes" in printed.getvalue()


def test_cpu_ceiling_is_the_pipeline_rate_when_decode_and_model_share_the_cores():
    # 2 cores, bare model 100 images/s (0.02 core-seconds an image), decode 50 images/s a core (0.02):
    # 2 cores / 0.04 core-seconds = 50 images/s, half the bare model.
    assert cpu_ceiling(bare=100.0, decode_rate=50.0, cores=2) == pytest.approx(0.5)
    assert cpu_ceiling(bare=100.0, decode_rate=1e12, cores=2) == pytest.approx(1.0)


@pytest.mark.skipif(read_cpu_counters() is None, reason="/proc/stat is Linux only")
def test_cpu_monitor_sees_a_busy_core():
    import time

    with CpuMonitor(interval_seconds=0.05) as monitor:
        started = time.time()
        while time.time() - started < 1.0:  # one thread spinning: about one core busy
            pass
        stopped = time.time()
        time.sleep(0.1)
    cpu = monitor.between(started, stopped)
    assert 0.5 <= cpu["busy_cores"] and cpu["seconds"] == pytest.approx(1.0, abs=0.2)
    assert 0 <= cpu["steal_share"] < 1
    assert CpuMonitor().between(0, 1) is None  # never started: nothing to say


class CountingS3Server:
    """moto's S3 server on loopback, counting the requests it answers by method (GET on an object vs a listing)."""

    def __init__(self):
        import collections
        import logging
        import threading

        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line a request otherwise
        self.counts = collections.Counter()
        application = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            on_bucket = environ.get("PATH_INFO", "/").strip("/").count("/") == 0  # /bucket?list-type=2: a listing
            self.counts[environ["REQUEST_METHOD"] + (" bucket" if on_bucket else "")] += 1
            return application(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counting, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_scale_bench_archives_read_tars_in_a_few_gets_where_loose_files_take_one_each(tmp_path, ray_local):
    """(e) of `featurize bench --scale` on a tiny setting, the S3 store injected: every image a row on every
    store, and the tars' object GETs a handful where loose files cost one each."""
    import boto3

    from pipeline.tools.bench_scale import S3Target, ScaleSettings, archive_figures, small_model

    settings = ScaleSettings(archive_images=24, images_per_tar=8, image_size=(64, 48))
    with CountingS3Server() as server:
        options = {"endpoint_url": server.endpoint, "key": "bench", "secret": "bench"}
        boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket="bench")
        figures = archive_figures(settings, tmp_path, small_model(tmp_path / "small.keras"),
                                  S3Target("s3://bench/scale", options, server.counts))
    for name in ("local loose", "local tar", "S3 loose", "S3 tar"):
        assert figures[name]["rows"] == {"total": 24, "ok": 24, "error": 0}, name
    assert figures["S3 loose"]["object_gets"] >= 24
    assert figures["S3 tar"]["object_gets"] <= 2 * figures["num_tars"]
