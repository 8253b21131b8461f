"""The ClientApp: runs on each site's SuperNode and fine-tunes the edge model on the site's own
data (its documents plus the prompts it escalated, with the cloud's answers), which never leave
the site; only weights (or adapters) and metrics go back.

The site's data directory comes from the SuperNode's node config (``data-path``). Messages come
in Flower's message form (``arrays`` + ``config``) or, under secure aggregation, its legacy form
(``fitins.*``/``evaluateins.*``, unnamed parameter lists): both end in the same training and
evaluation. Every message runs in a fresh process, so this module imports only what a round
needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import (
    evaluateres_to_recorddict,
    fitres_to_recorddict,
    recorddict_to_evaluateins,
    recorddict_to_fitins,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from federation.configvalues import config_float, config_int
from federation.sitedata import SiteData, read_site
from federation.task import (
    Exchange,
    LocalTraining,
    SiteTokens,
    build_model,
    cached_package,
    exchanged_names,
    exchanged_state,
    heldout_loss,
    prompt_loss_quantile,
    tokenize_site,
    train_locally,
    unpack,
)
from model.tokenizer import Tokenizer
from model.transformer import Transformer

app = ClientApp()


def clip_when_asked(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """Flower's client-side clipping, for the runs whose server asks for it (DP runs send a
    clipping norm; the plain mod fails a message without one)."""
    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def secagg_when_asked(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """Flower's SecAgg+ client protocol, for the rounds that run it (the plain mod fails any
    other training message)."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _site_path(context: Context) -> Path:
    path = context.node_config.get("data-path")
    if not path:
        raise ValueError("this SuperNode has no data-path in its node config; start it with "
                         "--node-config 'data-path=\"/site/data\"' (the edge agent does)")
    return Path(str(path))


@dataclass(frozen=True)
class RoundInputs:
    """What one message asks of this site, unpacked."""

    site: SiteData
    exchange: Exchange
    model: Transformer  # the round's global model, ready to train or evaluate
    tokens: SiteTokens
    tokenizer: Tokenizer
    config: dict[str, object]
    legacy: bool  # the message came in Flower's legacy form (secure aggregation)


def _prepare(msg: Message, context: Context) -> RoundInputs:
    """The site's data, the round's model, tokens and config from a message (either form)."""
    content = msg.content
    legacy = "fitins.config" in content or "evaluateins.config" in content
    if legacy:
        ins = (recorddict_to_fitins if "fitins.config" in content
               else recorddict_to_evaluateins)(content, keep_input=True)
        config: dict[str, object] = dict(ins.config)
    else:
        config = dict(content.config_records["config"].items())
    site_path = _site_path(context)
    entries = {k: v for k, v in config.items() if str(k).startswith("package/")}
    package = (unpack(entries, site_path) if entries
               else cached_package(str(config["base-version"]), site_path))
    exchange = Exchange(str(config["exchange"]), config_int(config, "lora-rank"),
                        config_float(config, "lora-alpha"), config_int(config, "seed"))
    if legacy:
        from flwr.common import parameters_to_ndarrays

        names = exchanged_names(package)
        weights = {n: torch.from_numpy(a.copy()) for n, a in
                   zip(names, parameters_to_ndarrays(ins.parameters), strict=True)}
    else:
        weights = content.array_records["arrays"].to_torch_state_dict()
    model = build_model(package, exchange, weights)
    site = read_site(site_path)
    tokenizer = Tokenizer.from_dir(package)
    tokens = tokenize_site(site, tokenizer, config_int(config, "escalation-repeat"))
    return RoundInputs(site, exchange, model, tokens, tokenizer, config, legacy)


@app.train(mods=[secagg_when_asked, clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    """A few local steps from the round's global model; the new weights and the loss."""
    inputs = _prepare(msg, context)
    site, exchange, model, tokens, config = (inputs.site, inputs.exchange, inputs.model,
                                             inputs.tokens, inputs.config)
    cfg = LocalTraining(config_int(config, "local-steps"), config_int(config, "batch-size"),
                        config_int(config, "seq-len"), config_float(config, "lr"),
                        config_float(config, "proximal-mu", 0.0),
                        seed=config_int(config, "seed") + config_int(config, "server-round", 0))
    result = train_locally(model, tokens.train, cfg)
    metrics: dict[str, int | float] = {
        "num-examples": int(tokens.train.numel()),
        "train-loss": float(result.final_loss),
        "train-seconds": float(result.seconds),
        "escalations": tokens.escalations,
    }
    site_record = ConfigRecord({"name": site.name})
    # dict(metrics): FitRes and MetricRecord each take a dict of their own (wider) value type.
    if inputs.legacy:
        state = exchanged_state(model, exchange)
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
            [state[n].numpy() for n in state]), 1, dict(metrics))  # 1: sites weigh the same
        reply = fitres_to_recorddict(fitres, keep_input=True)
        reply["site"] = site_record
        return Message(reply, reply_to=msg)
    return Message(RecordDict({
        "arrays": ArrayRecord(exchanged_state(model, exchange)),
        "metrics": MetricRecord(dict(metrics)),
        "site": site_record,
    }), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The round's global model on the site's held-out documents."""
    inputs = _prepare(msg, context)
    site, model, config = inputs.site, inputs.model, inputs.config
    nll, n = heldout_loss(model, inputs.tokens.heldout, config_int(config, "eval-seq-len"))
    threshold = prompt_loss_quantile(model, inputs.tokenizer, site.heldout,
                                     config_float(config, "calibration-quantile"))
    metrics: dict[str, int | float] = {"num-examples": n, "eval-loss": nll,
                                       "eval-ppl": math.exp(nll),
                                       "difficulty-quantile": threshold}
    if inputs.legacy:
        res = EvaluateRes(Status(Code.OK, ""), nll, n, dict(metrics))
        reply = evaluateres_to_recorddict(res)
    else:
        reply = RecordDict({"metrics": MetricRecord(dict(metrics))})
    reply["site"] = ConfigRecord({"name": site.name})
    return Message(reply, reply_to=msg)
