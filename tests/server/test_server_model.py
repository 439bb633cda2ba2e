"""The server's model is a handle (``server/run.py:ServerModel``): a server step or the EWC
Fisher holding it cannot touch the weights while a general evaluation left pending still
reads them; their first read waits for it and records it, in that order."""

from __future__ import annotations

import copy
import threading

from fedcpt.server.run import ServerModel


class SlowGeneral:
    """A general evaluation that finishes only once ``release`` is set."""

    def __init__(self, order: list) -> None:
        self.release = threading.Event()
        self.order = order

    def evaluate(self, lm):
        assert self.release.wait(timeout=30)
        self.order.append("evaluated")
        return "report"


def test_reading_the_model_through_the_handle_waits_for_the_pending_evaluation(fresh_lm):
    order: list = []
    general = SlowGeneral(order)
    model = ServerModel(fresh_lm)
    model.defer(model.evaluate(general, fresh_lm.initial_adapter),
                lambda report: order.append(("recorded", report)))
    threading.Timer(0.2, general.release.set).start()
    weights = model.model  # what a step reads first (``self.lm.model``)
    order.append("used")
    assert weights is fresh_lm.model
    assert order == ["evaluated", ("recorded", "report"), "used"]
    model.settle()  # nothing pending any more: recorded once
    assert order.count(("recorded", "report")) == 1


def test_a_handle_without_a_pending_evaluation_is_the_model(fresh_lm):
    model = ServerModel(fresh_lm)
    assert model.use() is fresh_lm and model.device == fresh_lm.device
    assert copy.copy(model).use() is fresh_lm  # copying asks for no model attribute
    ServerModel(None).settle()  # a run without a server model (the loop's fakes)
