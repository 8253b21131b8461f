"""Rounds under secure aggregation (SecAgg+): the server learns only the sum of the sites'
masked, quantized updates, never one site's weights.

Flower 1.42 offers SecAgg+ only through its legacy-compatible workflow (``LegacyContext`` +
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``), whose messages carry unnamed
parameter lists (``fitins.*``/``evaluateins.*``); the ClientApp speaks both forms (see
``client_app.legacy_reply``). Round 0 (every site measuring the start) uses the message API.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp.strategy import FedAvg

from federation.config import FedRunConfig
from federation.recording import RecordingGrid

log = logging.getLogger(__name__)


def run_secagg(grid: RecordingGrid, context: Context, cfg: FedRunConfig,
               initial: ArrayRecord, round_config: dict[str, Any]) -> ArrayRecord | None:
    """Round 0 and ``cfg.rounds`` SecAgg+ rounds; the final weights (names as ``initial``)."""
    names = list(initial.keys())
    probe = FedAvg(min_evaluate_nodes=cfg.min_nodes, min_available_nodes=cfg.min_nodes)
    grid.send_and_receive(
        probe.configure_evaluate(0, initial, ConfigRecord(round_config), grid),
        timeout=cfg.round_timeout_s)

    def config(server_round: int) -> dict[str, Any]:
        return {**round_config, "server-round": server_round}

    strategy = LegacyFedAvg(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=cfg.min_nodes,
        min_evaluate_clients=cfg.min_nodes, min_available_clients=cfg.min_nodes,
        initial_parameters=ndarrays_to_parameters([initial[n].numpy() for n in names]),
        on_fit_config_fn=config, on_evaluate_config_fn=config,
        # Metrics are recorded per site by the grid; the legacy aggregate is not used.
        fit_metrics_aggregation_fn=lambda _: {}, evaluate_metrics_aggregation_fn=lambda _: {})
    legacy = LegacyContext(context=context, config=ServerConfig(
        num_rounds=cfg.rounds, round_timeout=cfg.round_timeout_s), strategy=strategy)
    # Sites weigh the same under SecAgg+ (they report one example each): the weight scales
    # the vector before quantization, and token counts over max_weight would cost precision.
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=cfg.secagg_shares, reconstruction_threshold=cfg.secagg_threshold,
        max_weight=1.0, timeout=cfg.round_timeout_s))
    workflow(grid, legacy)
    record = legacy.state.array_records.get(MAIN_PARAMS_RECORD)
    if record is None:
        return None
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters

    arrays = parameters_to_ndarrays(arrayrecord_to_parameters(record, keep_input=True))
    return ArrayRecord({n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)})
