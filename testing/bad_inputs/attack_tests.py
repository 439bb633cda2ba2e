"""Issue 25's attacks (its "Why" list, items 1–7) and where each is tried, with its outcome:
the catalogue's own entries (those whose ``attack`` names the item) and the attack test
that runs it as the attacker would, whole. A test is named here, not run by the catalogue
(nor by ``benchmarks/faults.py``), where the attack needs what a catalogue entry cannot
drive cheaply: several sites and the server's unmasking under SecAgg+, many releases and a
statistical test, trained DP replies of several sites. ``tests/reliability/
test_bad_inputs.py`` checks that every item is covered and every named test exists."""

from __future__ import annotations

from dataclasses import dataclass

from fedcpt.testing.bad_inputs.judge import ACCOUNTED, REFUSED

WHY = {  # issue 25, "Why": each attack as demonstrated against the earlier code
    "1": "the server's token cap, cut in unit order, re-cuts other units",
    "2": "the noised evaluation leaks through floating point",
    "3": "the server switches DP off",
    "4a": "a noised site's free refusals give its held-out unit counts",
    "4b": "q and the error text give the unit and block counts",
    "4c": "under site-level DP, norm refusals give the update norm; the masked reply "
          "carries loss and seconds",
    "5a": "secure evaluations of one adapter over different groups give each site's loss",
    "5b": "a training round re-sent without one site gives its update by subtraction",
    "6a": "the server picks the text column",
    "6b": "the server picks the model path; the errors tell which paths exist",
    "6c": "a minimum query counts blocks, not units",
    "7a": "a δ the server proposes once is kept in the ledger",
    "7b": "a δ of 1e-30 crashes the handler",
    "7c": "a certificate verified once is accepted after it expires",
    "7d": "fake participant ids coarsen the noise grid",
    "7e": "one colluder unmasks a victim at the default threshold",
}


@dataclass(frozen=True)
class AttackTest:
    """The test that runs attack ``attack`` whole (``tests/….py::function``), the outcome
    there, and what it drives beyond the catalogue's entries."""

    attack: str
    test: str
    outcome: str  # refused or accounted
    drives: str


_SITE = "tests/privacy/test_site_inputs.py::"
_BOUNDARY = "tests/privacy/test_site_boundary_attacks.py::"
_FLOOR = "tests/privacy/test_secagg_site_floor.py::"

ATTACK_TESTS = [
    AttackTest("1", _SITE + "test_the_servers_cap_removes_no_unit_but_the_removed_one",
               ACCOUNTED, "two DP rounds under a cap, with and without one unit: only its "
               "blocks differ, so unit-level DP-SGD accounts the capped round"),
    AttackTest("1", "tests/core/test_unit_neighbours.py::"
               "test_removing_one_unit_changes_only_its_blocks", ACCOUNTED,
               "the neighbour property over every unit kind, cap and block size"),
    AttackTest("2", "tests/privacy/test_discrete_noise.py::"
               "test_the_float_remainder_no_longer_tells_neighbouring_datasets_apart",
               ACCOUNTED, "the float-remainder test over many releases of two neighbours"),
    AttackTest("2", "tests/privacy/test_discrete_noise.py::"
               "test_the_ledger_never_under_reports_the_discrete_gaussian", ACCOUNTED,
               "the ledger's σ' against OpenDP's privacy map"),
    AttackTest("3", _BOUNDARY + "test_a_site_with_a_budget_and_ledger_refuses_a_run_without_dp",
               REFUSED, "also the site's own opt-out"),
    AttackTest("4a", _BOUNDARY + "test_a_noised_sites_answers_do_not_depend_on_how_many_"
               "heldout_units_it_holds", ACCOUNTED, "a bisection over query sizes"),
    AttackTest("4b", "tests/privacy/test_unit_count_attacks.py::"
               "test_the_servers_readings_of_a_dp_reply_give_no_unit_count", REFUSED,
               "trained DP replies of sites that differ in N: no q, ε or σ is sent"),
    AttackTest("4c", _BOUNDARY + "test_norm_refusals_under_site_level_dp_reveal_nothing_"
               "about_the_update", REFUSED, "SecAgg+ stage 3 of five sites, retried with "
               "other norm bounds"),
    AttackTest("4c", _BOUNDARY + "test_the_masked_reply_under_site_level_dp_carries_no_loss_"
               "or_time", REFUSED, "SecAgg+ stage 3 of five sites under site-level DP"),
    AttackTest("5a", _BOUNDARY + "test_secure_evaluations_of_one_adapter_over_different_"
               "groups_give_one_sum", REFUSED, "four secure evaluations over groups of "
               "three simulated sites"),
    AttackTest("5b", _BOUNDARY + "test_a_training_round_resent_without_one_site_gives_"
               "nothing_to_subtract", REFUSED, "a SecAgg+ round of four simulated sites, "
               "re-sent without one"),
    AttackTest("5b", _FLOOR + "test_a_server_repeating_the_round_under_new_run_ids_is_"
               "counted_by_the_site", ACCOUNTED, "under site-level DP each repeat is a "
               "release in the site's own record"),
    AttackTest("6a", _SITE + "test_the_server_cannot_choose_which_column_is_read", REFUSED,
               "after an honest round; nothing read"),
    AttackTest("6b", _SITE + "test_the_server_cannot_open_a_model_path_nor_learn_which_exist",
               REFUSED, "the same answer for a path that exists"),
    AttackTest("6c", _SITE + "test_a_minimum_query_covers_the_minimum_of_held_out_units",
               REFUSED, "a query of the floor's size covers that many units, however "
               "unequal their lengths"),
    AttackTest("7a", "tests/privacy/test_delta_attacks.py::"
               "test_a_delta_the_server_proposes_once_holds_for_that_run_only", ACCOUNTED,
               "the later run is accounted at the site's δ"),
    AttackTest("7b", "tests/privacy/test_delta_attacks.py::"
               "test_an_uncomputable_delta_is_refused_before_any_spend", REFUSED,
               "after an honest round"),
    AttackTest("7c", "tests/privacy/test_secagg_identity.py::"
               "test_a_neighbours_certificate_is_refused_from_the_moment_it_expires",
               REFUSED, "SecAgg+ key sharing of five sites, the neighbour's keys replayed "
               "after its certificate expired"),
    AttackTest("7d", _FLOOR + "test_fake_participants_that_coarsen_the_noise_grid_are_refused",
               REFUSED, "what the fakes buy: ε nearly tripled"),
    AttackTest("7e", _FLOOR + "test_a_default_site_assumes_one_colluder_and_the_default_"
               "threshold_meets_it", REFUSED, "SecAgg+ stage 3 of five sites"),
    AttackTest("7e", "tests/privacy/test_secagg_collusion.py::"
               "test_the_default_threshold_holds_against_one_colluder", REFUSED,
               "every split of the honest sites, against the real site stages"),
]
