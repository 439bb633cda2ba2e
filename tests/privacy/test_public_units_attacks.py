"""A hostile server reads a site's number of training units N from what the reply cannot
hide: the noise scale of its update and the round at which it refuses (issue 25), run as
the attacker would run it against the real site handler.

The update's noise is σ·C/batch per step, with σ planned from the budget at q = batch / N,
and the budget refusal is decided on ε at that q. Two sites that differ only in N and
declare the same ``public-units`` plan σ, and refuse, from public values only: the same σ
reaches Opacus and the same round is refused. Without ``public-units`` (the control) both
differ, so the test has teeth. The ledger still holds the real q, and its ε is the
accountant's at the real q, below the public bound the site decided on.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from user_notes import user_notes

import fedcpt.client.app as client_app
import fedcpt.privacy.dpsgd as dpsgd
from fedcpt.config import RunConfig, load_config
from fedcpt.core.model import load_adapted_model
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.testing.site_round import site_context, task_identity, train_message

SITES = {"clinic": 40, "ward": 25}  # users per site: the same policy, different N
PUBLIC_UNITS = 20  # at most either site's N (2% of users are held out, by salted hash)
HELDOUT = "0.02"


class Seen:
    """What Opacus was handed in each round at a site: its optimizer and unit sampler."""

    def __init__(self) -> None:
        self.optimizers: list = []
        self.samplers: list = []

    @contextmanager
    def watching(self):
        seen = self

        class SpyEngine(PrivacyEngine):
            def make_private(self, **kwargs):
                out = super().make_private(**kwargs)
                seen.optimizers.append(out[1])
                seen.samplers.append(kwargs["data_loader"].batch_sampler)
                return out

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dpsgd, "PrivacyEngine", SpyEngine)
            yield


def _site(tmp: Path, cfg: RunConfig, site: str, users: int, public: bool, run: str):
    """Send rounds 1, 2, … ``cfg.federation.rounds`` of ``run`` to the site's real train
    handler until it refuses; returns the first refused round (None: none), what Opacus
    used, and the site's ledger."""
    folder = tmp / f"{site}-{'public' if public else 'plain'}-{run}"
    folder.mkdir()
    ledger = folder / f"{site}.ledger.json"
    policy = {"heldout-fraction": HELDOUT}
    if public:
        policy["public-units"] = str(PUBLIC_UNITS)
    context = site_context(str(user_notes(folder, users)), ledger, name=site, unit="field:user_id",
                           **policy)
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    seen, refused = Seen(), None
    with seen.watching(), task_identity():
        for server_round in range(1, cfg.federation.rounds + 1):
            reply = client_app.train(train_message(cfg, run, server_round, initial), context)
            if reply.has_error():
                refused = server_round
                break
    return refused, seen, PrivacyLedger.load(ledger)


def _noise_scale(optimizer) -> float:
    """The std of the Gaussian noise in one step's averaged gradient: σ·C / batch."""
    return optimizer.noise_multiplier * optimizer.max_grad_norm / optimizer.expected_batch_size


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One round of smoke-dp (σ planned by each site from its budget), with and without
    public-units."""
    tmp = tmp_path_factory.mktemp("public-sigma")
    cfg = load_config("smoke-dp", overrides=["federation.rounds=1",
                                             f"data.heldout_fraction={HELDOUT}"])
    assert cfg.privacy.noise_multiplier == 0  # σ is planned by the site
    return cfg, {(site, public): _site(tmp, cfg, site, users, public, "run-sigma")
                 for site, users in SITES.items() for public in (True, False)}


# The attacker fixes σ and a lower budget (both are its to propose) and asks for round
# after round of two steps: the first refused round bounds q from both sides.
ATTACK = ["privacy.noise_multiplier=1.0", "privacy.target_epsilon=3.0",
          "train.local_steps=2", "federation.rounds=8", f"data.heldout_fraction={HELDOUT}"]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("public-refusal")
    cfg = load_config("smoke-dp", overrides=ATTACK)
    return cfg, {(site, public): _site(tmp, cfg, site, users, public, "run-refuse")
                 for site, users in SITES.items() for public in (True, False)}


def _true_n(ledger: PrivacyLedger, cfg: RunConfig) -> int:
    return round(cfg.train.batch_size / ledger.entries[0].sample_rate)


def test_sites_of_different_n_get_the_same_noise_under_public_units(planned):
    cfg, out = planned
    assert [refused for refused, _, _ in out.values()] == [None] * 4  # every site trained
    (_, seen_a, ledger_a), (_, seen_b, ledger_b) = out["clinic", True], out["ward", True]
    assert _true_n(ledger_a, cfg) != _true_n(ledger_b, cfg)
    [opt_a], [opt_b] = seen_a.optimizers, seen_b.optimizers
    assert opt_a.noise_multiplier == opt_b.noise_multiplier  # the σ Opacus noised with
    assert _noise_scale(opt_a) == _noise_scale(opt_b)


def test_control_without_public_units_the_noise_tells_the_sites_apart(planned):
    cfg, out = planned
    (_, seen_a, ledger_a), (_, seen_b, ledger_b) = out["clinic", False], out["ward", False]
    assert _true_n(ledger_a, cfg) > _true_n(ledger_b, cfg)
    [opt_a], [opt_b] = seen_a.optimizers, seen_b.optimizers
    assert opt_a.noise_multiplier < opt_b.noise_multiplier  # more units, less noise
    assert _noise_scale(opt_a) != _noise_scale(opt_b)


def test_sites_of_different_n_refuse_the_same_round_under_public_units(refusals):
    cfg, out = refusals
    (round_a, _, ledger_a), (round_b, _, ledger_b) = out["clinic", True], out["ward", True]
    assert _true_n(ledger_a, cfg) != _true_n(ledger_b, cfg)
    assert round_a is not None and round_a == round_b
    for ledger in (ledger_a, ledger_b):  # the refused round spent nothing
        assert len(ledger.entries) == round_a - 1


def test_control_without_public_units_the_refusal_round_tells_the_sites_apart(refusals):
    cfg, out = refusals
    (round_a, _, _), (round_b, _, _) = out["clinic", False], out["ward", False]
    assert round_b is not None
    assert round_a is None or round_a > round_b  # the larger site pays less per round


def _pld(history, delta: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        acc.compose(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("fixture", ["planned", "refusals"])
def test_the_ledger_reports_epsilon_at_the_real_q_never_below_the_truth(fixture, request):
    """The ledger's ε is the accountant's at the q the sampler really used, never below
    dp-accounting's PLD there, and at most the public bound the site decided on."""
    cfg, out = request.getfixturevalue(fixture)
    for site in SITES:
        _, seen, ledger = out[site, True]
        truth = [(opt.noise_multiplier, sampler.sample_rate, sampler.steps)
                 for opt, sampler in zip(seen.optimizers, seen.samplers, strict=True)]
        assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries] == truth
        assert all(q <= cfg.train.batch_size / PUBLIC_UNITS for _, q, _ in truth)
        acc = create_accountant(mechanism="prv")
        acc.history = truth
        assert ledger.epsilon() == pytest.approx(acc.get_epsilon(delta=ledger.delta))
        assert ledger.epsilon() >= _pld(truth, ledger.delta)
        assert ledger.epsilon() <= ledger.epsilon_bound() <= cfg.privacy.target_epsilon
