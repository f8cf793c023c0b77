"""The HParams dashboard entry of a run: the keys runs are compared by, first, and its summary metrics.

TensorBoard lists hyperparameters marked ``differs`` first and keeps the metrics an experiment
names; a run writes both itself (``SummaryWriter.add_hparams`` would open a sub-run and record
every key of the config in alphabetical order).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from capsexp.runkeys import keys_where

# what a user compares capsexp runs by, in the order the question reads
COMPARED = ("head.name", "adapter.name", "loss.name", "head.routing.iterations", "head.routing.detach",
            "backbone.freeze_depth", "optim.name", "optim.lr", "data.image_size", "backbone.name",
            "backbone.weights", "seed")
# marked as differing, so TensorBoard lists them first and shows them without a click (its table
# shows the first few hyperparameters only); a sweep's own keys are marked too
MARKED = keys_where("compared_first")  # capsexp.runkeys: the one table
LEFT_OUT = keys_where("in_hparams", False)


def compared_hparams(flat: Mapping[str, Any], swept: Iterable[str]) -> dict[str, Any]:
    """The compared keys this config has, then whatever else a sweep varied (internal keys left out)."""
    keys = [k for k in COMPARED if k in flat] + sorted(k for k in swept if k in flat and k not in COMPARED)
    return {k: flat[k] for k in keys if not k.startswith(LEFT_OUT)}


def _value(proto: Any, value: Any) -> str:
    """Set a google.protobuf Value; return the HParams data type name."""
    if isinstance(value, bool):
        proto.bool_value = value
        return "DATA_TYPE_BOOL"
    if isinstance(value, (int, float)):
        proto.number_value = float(value)
        return "DATA_TYPE_FLOAT64"
    proto.string_value = "null" if value is None else str(value)
    return "DATA_TYPE_STRING"


def hparams_summaries(hparams: Mapping[str, Any], metrics: Iterable[str], differing: Iterable[str]) -> list[Any]:
    """The experiment, session-start and session-end summaries, ready for a run's own event file.

    ``differing``: keys marked as differing (the compared keys and the swept ones), so TensorBoard
    lists them first; ``metrics``: the scalar tags its table shows.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo()
    infos = []
    differing = set(differing)
    for key, value in hparams.items():
        kind = _value(start.hparams[key], value)
        infos.append(api_pb2.HParamInfo(name=key, type=api_pb2.DataType.Value(kind), differs=key in differing))
    experiment = api_pb2.Experiment(
        hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metrics])
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value("STATUS_SUCCESS"))
    out = []
    for tag, field, message in ((metadata.EXPERIMENT_TAG, "experiment", experiment),
                                (metadata.SESSION_START_INFO_TAG, "session_start_info", start),
                                (metadata.SESSION_END_INFO_TAG, "session_end_info", end)):
        content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **{field: message})
        smd = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString()))
        out.append(Summary(value=[Summary.Value(tag=tag, metadata=smd)]))
    return out
