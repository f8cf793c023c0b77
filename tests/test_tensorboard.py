"""The gradient tags of a real run, read back by tensorboard itself: event reader and HTTP server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from capsexp.train import train
from conftest import make_cfg

STAGES = ["stem", "layer1", "layer2", "layer3", "layer4", "adapter", "head"]


@pytest.fixture(scope="module")
def capsule_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    train(make_cfg("head=capsule", "adapter=conv", "adapter.width=32", "backbone.freeze_depth=1",
                   "grads.histogram_every_n_steps=2"), run_dir=root / "capsule")
    return root


def test_gradient_tags_are_in_the_event_files(capsule_run: Path) -> None:
    acc = EventAccumulator(str(capsule_run / "capsule"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    trained = STAGES[1:]  # freeze_depth=1: the stem is frozen and writes nothing
    assert {f"grad_norm/{s}" for s in trained} | {"grad_norm/total"} <= scalars
    assert {f"grad_to_weight/{s}" for s in trained} <= scalars
    assert not any("stem" in t for t in scalars if t.startswith("grad"))
    layers = [t for t in scalars if t.startswith("grad_layer/")]
    assert "grad_layer/layer1.0.conv1" in layers and "grad_layer/head.routing.class_caps" in layers
    # a "grad_norm" filter finds the stage tags only: the per-layer tags are named apart
    assert not any(t.startswith("grad_norm_layer/") for t in scalars)
    assert "grad_rel_head/layer1" in scalars and "grad_rel_head/head" not in scalars  # no flat line at 1
    assert [e.step for e in acc.Scalars("grad_norm/layer1")] == [1, 2, 3, 4]
    assert "grad_flow" in tags["images"]
    assert {f"grad_hist/{s}" for s in trained} <= set(tags["histograms"])
    assert {"capsule/coupling_entropy/iter1", "capsule/true_class_length"} <= scalars


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_tensorboard_server_serves_the_gradient_tags(capsule_run: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(capsule_run), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
        deadline, tags = time.time() + 120, {}
        while time.time() < deadline and not tags.get("capsule"):
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    tags = json.load(response)
            except OSError:
                pass
            time.sleep(0.5)
        assert list(tags) == ["capsule"], tags  # the run folder is the run's name
        assert "grad_norm/layer1" in tags["capsule"] and "grad_norm/head" in tags["capsule"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_mean_abs_gradients_are_measured_only_for_the_next_flow_figure() -> None:
    from capsexp.diagnostics.monitor import FLOW_LINES, GradientMonitor
    from capsexp.diagnostics.tensorboard import RunLogger
    from capsexp.models.classifier import build_model

    cfg = make_cfg("backbone=resnet18", "grads.log_every_n_steps=10", "grads.figure_every_n_steps=100",
                   "grads.histogram_every_n_steps=0", "trainer.log_every_n_steps=10")
    model = build_model(cfg, num_classes=8)  # no gradients yet: they count as zero
    monitor = GradientMonitor(cfg.grads, RunLogger(None), model, 200, torch.empty(0))
    measured, drawn = [], {}
    for step in range(10, 210, 10):
        monitor.after_backward(step, {}, None, {}, {})
        if monitor.flow and monitor.flow[-1][0] == step:  # this step's mean |grad| was measured
            measured.append(step)
        if step % 100 == 0:
            drawn[step] = [s for s, _ in monitor.flow]
    # the figure at step 100 draws the FLOW_LINES logging steps 30..100, the one at 200 draws 130..200;
    # no other step pays for the extra pass over the gradients
    assert FLOW_LINES == 8
    assert drawn == {100: list(range(30, 101, 10)), 200: list(range(130, 201, 10))}
    assert measured == [*range(30, 101, 10), *range(130, 201, 10)]


def test_figures_and_gradient_scalars_are_written_off_the_training_thread(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawing the grad_flow figure takes about a quarter of a second: never inside a training step."""
    import threading

    from torch.utils.tensorboard import SummaryWriter

    from capsexp.diagnostics import figures

    figure_threads: list[int] = []
    scalar_threads: list[int] = []
    real_figure, real_scalar = figures.gradient_flow_figure, SummaryWriter.add_scalar

    def recording(*args: object, **kwargs: object) -> object:
        figure_threads.append(threading.get_ident())
        return real_figure(*args, **kwargs)

    def recording_scalar(writer: SummaryWriter, tag: str, *args: object, **kwargs: object) -> object:
        if tag.startswith("grad_norm/"):
            scalar_threads.append(threading.get_ident())
        return real_scalar(writer, tag, *args, **kwargs)

    monkeypatch.setattr(figures, "gradient_flow_figure", recording)
    monkeypatch.setattr(SummaryWriter, "add_scalar", recording_scalar)
    training_thread = threading.get_ident()  # train() runs its steps on the caller's thread
    train(make_cfg("trainer.max_steps=4", "grads.figure_every_n_steps=2"), run_dir=tmp_path)
    assert len(figure_threads) == 2 and training_thread not in figure_threads
    assert scalar_threads and training_thread not in scalar_threads
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    # train() returned only after the logger's thread had written everything
    assert [e.step for e in acc.Images("grad_flow")] == [2, 4]
    assert [e.step for e in acc.Scalars("grad_norm/layer1")] == [1, 2, 3, 4]


def test_a_failing_background_write_is_one_warning_not_a_crash(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from capsexp.diagnostics.tensorboard import RunLogger

    logger = RunLogger(tmp_path)

    def broken() -> None:
        raise ValueError("no pixels")

    logger.submit(broken, "the grad_flow figure at step 7")
    logger.scalars({"x": 1.0}, 1)
    logger.close()
    assert "capsexp: WARNING could not write the grad_flow figure at step 7 to TensorBoard: no pixels" in \
        capsys.readouterr().err


def _hparams_plugin_data(run: Path) -> dict[str, object]:
    """The HParams plugin's own records of a run, parsed the way TensorBoard parses them."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    out: dict[str, object] = {}
    for tag in acc.PluginTagToContent("hparams"):
        data = plugin_data_pb2.HParamsPluginData.FromString(acc.SummaryMetadata(tag).plugin_data.content)
        out[tag] = getattr(data, data.WhichOneof("data"))
    return out


def test_hparams_session_info_names_the_compared_keys_in_order_and_the_metrics(capsule_run: Path) -> None:
    data = _hparams_plugin_data(capsule_run / "capsule")
    experiment, start = data["_hparams_/experiment"], data["_hparams_/session_start_info"]
    names = [info.name for info in experiment.hparam_infos]
    assert names[:7] == ["head.name", "adapter.name", "loss.name", "head.routing.iterations",
                         "head.routing.detach", "backbone.freeze_depth", "optim.name"]
    assert not any(n.startswith(("bench", "hydra", "trainer.resume")) for n in names)
    assert {info.name for info in experiment.hparam_infos if info.differs} >= {"head.name", "adapter.name",
                                                                                "head.routing.iterations"}
    assert start.hparams["head.name"].string_value == "capsule" and start.hparams["adapter.name"].string_value == "conv"
    assert start.hparams["backbone.freeze_depth"].number_value == 1
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"summary/val/acc", "summary/early/head", "summary/grad_norm/adapter"} <= metrics
    assert any(m.startswith("summary/update_to_weight/") for m in metrics)


def test_a_run_shorter_than_the_figure_interval_still_gets_its_final_figures(tmp_path: Path) -> None:
    # 4 steps, figures every 100: only the final ones, at the last step
    train(make_cfg("grads.figure_every_n_steps=100", "grads.drift.probe_images=0"), run_dir=tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("grad_flow")] == [4]
    assert [e.step for e in acc.Images("stage_profile")] == [4]
