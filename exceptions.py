"""Errors fedcpt raises for problems a user can fix. The CLI turns each into one line and exit 2."""


class FedcptError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(FedcptError):
    """A configuration key or value is unknown or invalid."""


class DataError(FedcptError):
    """A data source is missing, empty or of an unsupported type."""


class ModelError(FedcptError):
    """A model cannot be found or loaded."""


class UpdateRejected(FedcptError):
    """A client's adapter update failed validation and must not be aggregated."""


class SimulationFailed(FedcptError):
    """Flower's simulation runtime (SuperLink, Ray) stopped without a result or an account
    of why; the run folder keeps its ``run.log``, which holds the runtime's own messages."""


class RoundFailed(FedcptError):
    """A round stayed below ``federation.min_sites`` valid updates after its retries."""
