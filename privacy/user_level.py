"""User-level (site-level) DP: Flower's DP-FedAvg wrapper with client-side fixed clipping.

Each site's adapter update is clipped to ``user_clipping_norm`` at the site (Flower's
``fixedclipping_mod``) and the server adds Gaussian noise of std σ·C/n to the average of
the n sampled sites (``DifferentialPrivacyClientSideFixedClipping``; McMahan et al., 2018,
https://arxiv.org/abs/1710.06963). This protects a whole site's contribution, not just a
record, and is reported separately from record-level ε. Flower's own accountant refuses
strategies that override ``aggregate_train``, so ε is computed here with RDP and no
sampling amplification (every round counts as a full Gaussian release), which can only
over-report.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedcpt.config import PrivacyConfig
from fedcpt.privacy.accounting import epsilon


def wrap_user_level(strategy: Strategy, privacy: PrivacyConfig,
                    sites_per_round: int) -> Strategy:
    """``strategy`` with server-side noise on the average of client-clipped updates."""
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=privacy.user_noise_multiplier,
        clipping_norm=privacy.user_clipping_norm, num_sampled_clients=sites_per_round)


def user_level_epsilon(privacy: PrivacyConfig, rounds: int) -> float:
    """Site-level ε after ``rounds`` noisy aggregations (RDP, no amplification)."""
    return epsilon([(privacy.user_noise_multiplier, 1.0, rounds)], privacy.user_delta, "rdp")


def clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: apply Flower's ``fixedclipping_mod`` to training messages whose config
    carries a clipping norm (sent only when user-level DP is on); pass others through."""
    config = msg.content.config_records.get("config") if msg.has_content() else None
    if (msg.metadata.message_type == MessageType.TRAIN and config is not None
            and KEY_CLIPPING_NORM in config):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
