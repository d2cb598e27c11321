"""Which committed rows `diffrl sweep --skip-recorded` counts as a trial's run (`sweep._same_config`)."""

from __future__ import annotations

from diffrl.sweep import ADDED_FIELDS, _same_config


def test_a_field_the_row_lacks_matches_only_when_listed_as_added_and_run_at_the_listed_value():
    assert ADDED_FIELDS["q_action"] == "chain"
    added = {"q_action": "chain"}
    want = {"steps": 100, "gamma": 0.99, "q_action": "chain"}
    assert _same_config({"steps": 100, "gamma": 0.99}, want, added, {})  # added since, at its old behaviour
    assert not _same_config({"steps": 100, "gamma": 0.99}, want, {}, {})  # not vouched for in this command
    assert not _same_config({"steps": 100, "gamma": 0.99}, {**want, "q_action": "pred_start"}, added, {})
    assert not _same_config({"steps": 100, "gamma": 0.99}, {**want, "unlisted": False}, added, {})
    assert not _same_config({"gamma": 0.99, "q_action": "chain"}, want, added, {})
    assert not _same_config({**want, "gone": 1}, want, added, {})  # a field that no longer exists
    assert not _same_config({**want, "gamma": 0.9}, want, added, {})
    assert _same_config(dict(want), want, added, {})


def test_a_field_under_the_sweeps_root_matches_by_the_path_below_the_root():
    want = {"policy": "runs/sweeps/pre/trials/a-s0", "seed": 0}
    rooted = {"policy": "/pre/trials/a-s0"}
    for recorded in ("runs/sweeps/pre/trials/a-s0", "/home/me/diffrl/runs/sweeps/pre/trials/a-s0"):
        assert _same_config({"policy": recorded, "seed": 0}, want, {}, rooted)
    assert not _same_config({"policy": "/home/me/diffrl/runs/sweeps/pre/trials/b-s0", "seed": 0}, want, {}, rooted)
    assert not _same_config({"seed": 0}, want, {}, rooted)


def test_every_added_field_is_some_commands_default_and_counts_only_where_it_is_the_default():
    # the table's value must be what a command runs at its default (the old behaviour): a stale or mistyped entry
    # fails here; where a command's default differs (PPO's adam_eps) the entry does not apply to its rows
    import dataclasses

    from diffrl import registry
    from diffrl.config import to_dict

    at_default = set()
    for name in registry.names():
        for command in registry.get(name).commands:
            for cls in command.configs.values():
                for f in dataclasses.fields(cls):
                    if f.name in ADDED_FIELDS and to_dict(f.default) == ADDED_FIELDS[f.name]:
                        at_default.add(f.name)
    assert at_default == set(ADDED_FIELDS)
