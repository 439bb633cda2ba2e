"""The round protocol is chosen once from the config, and a wrapper adds only its own part:
site-level DP asks the sites to clip whatever it wraps; around plain FedAvg it refuses a
round with a failed site and adds the server's noise, around SecAgg+ (distributed DP) the
sites add the noise, so it does neither."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedcpt.config import FederationConfig, PrivacyConfig, RunConfig, SecAggConfig, SiteConfig
from fedcpt.runfolder.records import Summary
from fedcpt.server.protocols import round_protocol
from fedcpt.server.protocols.distributed_dp import DistributedSiteDP
from fedcpt.server.protocols.fedavg import PlainFedAvg
from fedcpt.server.protocols.secagg import SecAggPlus
from fedcpt.server.protocols.site_dp import SiteLevelDP
from fedcpt.server.round_loop import Collected


def _cfg(secagg: bool, user_level: bool) -> RunConfig:
    return RunConfig(sites=tuple(SiteConfig(name=s, data=("unused",)) for s in "abc"),
                     federation=FederationConfig(max_update_norm=2.0),
                     privacy=PrivacyConfig(user_level=user_level, user_clipping_norm=0.5,
                                           user_noise_multiplier=2.0),
                     secagg=SecAggConfig(mode="on" if secagg else "off"))


@pytest.mark.parametrize(("secagg", "user_level", "kinds"), [
    (False, False, (PlainFedAvg,)),
    (False, True, (SiteLevelDP, PlainFedAvg)),
    (True, False, (SecAggPlus,)),
    (True, True, (DistributedSiteDP, SecAggPlus)),
])
def test_the_config_chooses_the_protocol_and_its_wrapper(secagg, user_level, kinds):
    protocol = round_protocol(_cfg(secagg, user_level))
    assert type(protocol) is kinds[0]
    if len(kinds) == 2:
        assert type(protocol.inner) is kinds[1]
        assert protocol.aggregator is protocol.inner.aggregator
    asks_clipping = KEY_CLIPPING_NORM in protocol.configure(ConfigRecord({"run-id": "r"}))
    assert asks_clipping == user_level


def test_only_central_site_level_dp_refuses_a_failed_site_and_adds_noise():
    failed = Collected(errors=1)
    zeros = ArrayRecord({"w": Array(np.zeros(1000, np.float32))})
    central, distributed = (round_protocol(_cfg(s, True)) for s in (False, True))
    assert "site-level DP" in central.refusal(failed)
    np.random.seed(0)
    noised = central.postprocess(zeros, 2)["w"].numpy()
    assert noised.std() == pytest.approx(2.0 * 0.5 / 2, rel=0.15)  # σ·C/n
    assert distributed.refusal(failed) is None
    assert distributed.postprocess(zeros, 2) is zeros  # the sites added the noise
    assert round_protocol(_cfg(False, False)).refusal(failed) is None


def test_a_wrappers_report_section_follows_the_one_it_wraps():
    summary = Summary(name="x", model="m", num_sites=3, rounds=2, rounds_aggregated=2,
                      general_loss={}, domain_loss={}, forgetting=0.0,
                      forgetting_standard_error=0.0, adaptation=None, general_ece={},
                      eval_tokens={}, bytes_up_per_client_round=0, full_model_bytes=0,
                      upload_fraction=None, failures=0, wall_time_s=0.0,
                      secagg={"enabled": True, "protocol": "SecAgg+", "num_shares": 3,
                              "threshold": 2, "clipping_range": 8.0,
                              "quantization_range": 2**22},
                      privacy_user_level={"epsilon": 1.0, "delta": 1e-5, "rounds": 2,
                                          "noise_multiplier": 1.0, "clipping_norm": 0.5,
                                          "accountant": "rdp", "mechanism": "DDG"})
    lines = round_protocol(_cfg(True, True)).report_lines(summary)
    titles = [line for line in lines if line.startswith("## ")]
    assert titles == ["## Secure aggregation", "## Site-level privacy (DP-FedAvg)"]
    assert round_protocol(_cfg(False, False)).report_lines(summary) == []
