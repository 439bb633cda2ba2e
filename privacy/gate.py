"""The release gate's table: for every key a site's reply may carry, in every mode, whether
it is accounted, public by construction, released without DP by the site's own policy, or
not sent. Deny by default: a key not in the table is never sent.

The table is the one source for both the site (:mod:`fedcpt.client.gate` applies it to
every reply before it leaves) and the privacy report (:func:`release_rows`, listed in
:mod:`fedcpt.privacy.report`), so the report cannot list something the gate does not do.

A :class:`Mode` holds only public inputs: what the server asked for (the run config) and
the site's own policy — never anything computed from the site's data. Every decision is a
function of the mode alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedcpt.core import protocol as p
from fedcpt.privacy.secagg.site import STATE as SECAGG_STATE

ACCOUNTED = "accounted"
"""Spent in the site's ledger before it is released (noised; covered by ε)."""
PUBLIC = "public"
"""A function of public parameters only (the run config, the site's policy, its name)."""
UNPROTECTED = "released without DP"
"""Depends on the data and is not noised: sent only where the site's policy has no DP for
this release (its explicit choice), and listed as not covered by ε."""
NOT_SENT = "not sent"
CLASSES = (ACCOUNTED, PUBLIC, UNPROTECTED, NOT_SENT)

TRAIN, MASKED_TRAIN = "train", "masked-train"
EVALUATE, MASKED_EVALUATE = "evaluate", "masked-evaluate"
QUERY, SECAGG_STAGE = "query", "secagg-stage"
REPLIES = (TRAIN, MASKED_TRAIN, EVALUATE, MASKED_EVALUATE, QUERY, SECAGG_STAGE)


@dataclass(frozen=True)
class Mode:
    """What one reply is, from public inputs only."""

    reply: str
    dp_sgd: bool = False
    """The update is trained with unit-level DP-SGD under the site's ledger."""
    site_dp: bool = False
    """The site clips and noises its update itself (distributed DP under SecAgg+)."""
    eval_release: str = "nothing"
    """The site's ``eval_release`` policy."""
    salted: bool = True
    """The site keeps a ledger, so its attestation's unit hashes are keyed with its salt."""

    @property
    def protected(self) -> bool:
        """Whether the training release is noised at the site (so nothing else about the
        training data may leave in the clear)."""
        return self.dp_sgd or self.site_dp

    def label(self) -> str:
        dp = "+".join(n for n, on in (("DP-SGD", self.dp_sgd), ("distributed DP",
                                                                 self.site_dp)) if on)
        extra = f", eval-release={self.eval_release}" if "evaluate" in self.reply else ""
        return f"{self.reply} ({dp or 'no DP'}{extra})"


Decide = Callable[[Mode], tuple[str, str]]


@dataclass(frozen=True)
class Entry:
    """One key of a reply: the record it sits in, its name in that record (None: the
    record itself, e.g. an adapter whose tensor names are the update), and its decision."""

    record: str
    key: str | None
    what: str
    decide: Decide

    @property
    def path(self) -> str:
        return self.record if self.key is None else f"{self.record}.{self.key}"


def _only(*replies: str) -> Callable[[Decide], Decide]:
    """A decision that holds for ``replies``; any other reply does not send the key."""
    def wrap(decide: Decide) -> Decide:
        return lambda m: decide(m) if m.reply in replies else (NOT_SENT, "not this reply")
    return wrap


def _public(why: str) -> Decide:
    return lambda m: (PUBLIC, why)


@_only(TRAIN)
def _adapter(m: Mode) -> tuple[str, str]:
    if m.dp_sgd:
        return ACCOUNTED, "trained with DP-SGD; every step in the ledger before release"
    return UNPROTECTED, "the site trains without DP (its policy); NOT covered by ε"


@_only(MASKED_TRAIN)
def _masked_update(m: Mode) -> tuple[str, str]:
    if m.protected:
        return ACCOUNTED, ("masked; " + ("DP-SGD" if m.dp_sgd else "site-level noise added "
                                         "at the site") + ", in the ledger before release")
    return UNPROTECTED, ("masked, released only as a sum with the other sites' (once per "
                         "run, round and adapter); NOT covered by ε")


@_only(TRAIN, MASKED_TRAIN)
def _train_clear(m: Mode) -> tuple[str, str]:
    if m.protected:
        return NOT_SENT, "computed on the protected data, so not sent under DP"
    return UNPROTECTED, "the site trains without DP (its policy); NOT covered by ε"


@_only(TRAIN, MASKED_TRAIN)
def _privacy_metrics(m: Mode) -> tuple[str, str]:
    if m.dp_sgd:
        return NOT_SENT, ("depends on N, the number of training units (q = batch / N; σ, δ and "
                          "ε follow from it): the site's ε stays in its own ledger")
    return NOT_SENT, "no DP-SGD at this site"


@_only(TRAIN, MASKED_TRAIN)
def _attestation(m: Mode) -> tuple[str, str]:
    if m.salted:
        return PUBLIC, ("a commitment keyed with the site's secret salt: independent of "
                        "the data to anyone without it (it states no unit count)")
    return UNPROTECTED, ("unsalted (no ledger): anyone holding a candidate unit set can test "
                         "whether it is exactly the site's; NOT covered by ε")


def _eval(decide: Callable[[Mode], tuple[str, str]]) -> Decide:
    @_only(EVALUATE)
    def wrapped(m: Mode) -> tuple[str, str]:
        if m.eval_release == "noised":
            return decide(m)
        if m.eval_release == "plain":
            return UNPROTECTED, "eval-release=plain (the site's policy): NOT covered by ε"
        return NOT_SENT, f"eval-release={m.eval_release}: no evaluation in the clear"
    return wrapped


@_only(MASKED_EVALUATE)
def _masked_eval(m: Mode) -> tuple[str, str]:
    if m.eval_release == "nothing":
        return NOT_SENT, "eval-release=nothing"
    if m.eval_release == "noised":
        return ACCOUNTED, "noised values in the ledger before release, then masked"
    return UNPROTECTED, ("masked, released only as a sum with the other sites', once per "
                         "adapter version; the sum is NOT covered by ε")


@_only(TRAIN, MASKED_TRAIN, EVALUATE, MASKED_EVALUATE, QUERY)
def _site_name(m: Mode) -> tuple[str, str]:
    return PUBLIC, "the site's identity"


@_only(TRAIN, MASKED_TRAIN)
def _unit_kind(m: Mode) -> tuple[str, str]:
    return PUBLIC, "the site's policy: what one unit is"


_stage = _only(SECAGG_STAGE)(_public("random keys, public certificates, encrypted shares "
                                     "and signatures: independent of the data"))
_train_examples = _only(TRAIN, MASKED_TRAIN)(_public("local steps × batch size"))


@_only(TRAIN, MASKED_TRAIN)
def _seconds(m: Mode) -> tuple[str, str]:
    if m.protected:
        return PUBLIC, "sent as 0 under DP (the time depends on the data)"
    return UNPROTECTED, "wall-clock seconds; NOT covered by ε"


@_only(EVALUATE)
def _eval_examples(m: Mode) -> tuple[str, str]:
    if m.eval_release == "noised":
        return PUBLIC, "the query's units × (block size − 1)"
    return _eval(lambda _: (NOT_SENT, ""))(m)


GATE: tuple[Entry, ...] = (
    Entry(p.ARRAYS, None, "adapter update", _adapter),
    Entry(p.MASKED, None, "masked vector (update or evaluation statistics)",
          lambda m: _masked_update(m) if m.reply == MASKED_TRAIN else _masked_eval(m)),
    Entry(p.METRICS, p.NUM_EXAMPLES, "num-examples",
          lambda m: _train_examples(m) if m.reply in (TRAIN, MASKED_TRAIN)
          else _eval_examples(m)),
    Entry(p.METRICS, p.TRAIN_SECONDS, "train-seconds", _seconds),
    Entry(p.METRICS, p.TRAIN_LOSS, "training loss", _train_clear),
    *(Entry(p.METRICS, k, f"privacy accounting: {k}", _privacy_metrics)
      for k in p.PRIVACY_METRICS),
    Entry(p.METRICS, p.DOMAIN_LOSS, "held-out domain loss",
          _eval(lambda m: (ACCOUNTED, "discrete Gaussian mechanism (OpenDP, exact integer "
                                      "noise), in the ledger before release"))),
    Entry(p.METRICS, p.DOMAIN_BASE_LOSS, "held-out base-model loss",
          _eval(lambda m: (ACCOUNTED, "discrete Gaussian mechanism (OpenDP, exact integer "
                                      "noise), in the ledger before release"))),
    Entry(p.METRICS, p.DOMAIN_ECE, "held-out ECE",
          _eval(lambda m: (ACCOUNTED, "discrete Gaussian mechanism (OpenDP, exact integer "
                                      "noise), in the ledger before release"))),
    Entry(p.METRICS, p.DATA_DRIFT, "data drift (base loss minus earlier runs' mean)",
          _eval(lambda m: (ACCOUNTED, "post-processing of noised, accounted releases"))),
    Entry(p.SITE, "name", "site name", _site_name),
    Entry(p.SITE, "unit", "kind of privacy unit", _unit_kind),
    *(Entry(p.ATTESTATION, k, f"training attestation: {k}", _attestation)
      for k in ("statement", "signature", "certificate")),
    *(Entry(SECAGG_STATE, k, f"SecAgg+ stage: {k}", _stage)
      for k in ("pk1", "pk2", "signature", "cert", "dst", "sealed", "nodes", "shares")),
)
_BY_PATH = {e.path: e for e in GATE}


def decide(record: str, key: str | None, mode: Mode) -> tuple[str, str]:
    """The class of ``record.key`` (``key`` None: the whole record) in ``mode`` and why;
    a key the table does not list is not sent."""
    entry = _BY_PATH.get(record if key is None else f"{record}.{key}")
    if entry is None:
        return NOT_SENT, "not in the release gate's table (deny by default)"
    return entry.decide(mode)


def is_whole_record(record: str) -> bool:
    """Whether ``record`` is released (or not) as one unit, its inner names not keys."""
    return record in _BY_PATH


@dataclass(frozen=True)
class Row:
    """One line of the release list: a key in a mode, its class and why."""

    mode: str
    path: str
    what: str
    cls: str
    why: str

    def line(self) -> str:
        return f"{self.what} (`{self.path}`), {self.mode}: {self.cls} — {self.why}"


def release_rows(mode: Mode, *, sent_only: bool = True) -> list[Row]:
    """The release list of one mode, straight from the gate's table."""
    rows = [Row(mode.label(), e.path, e.what, *e.decide(mode)) for e in GATE]
    return [r for r in rows if r.cls != NOT_SENT or not sent_only]


def site_modes(dp_sgd: bool, site_dp: bool, eval_release: str,
               salted: bool = True) -> tuple[Mode, ...]:
    """Every reply a site with these settings can send."""
    return tuple(Mode(reply, dp_sgd=dp_sgd, site_dp=site_dp and reply == MASKED_TRAIN,
                      eval_release=eval_release, salted=salted) for reply in REPLIES)


def released_paths(modes: tuple[Mode, ...]) -> dict[str, set[str]]:
    """``record.key`` → the classes it is released under across ``modes`` (sent only)."""
    out: dict[str, set[str]] = {}
    for mode in modes:
        for row in release_rows(mode):
            out.setdefault(row.path, set()).add(row.cls)
    return out
