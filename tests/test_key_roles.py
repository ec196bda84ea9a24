"""Each config key's role (changes results / per run / may differ on resume / bookkeeping) lives in
one table (schema.ROLES); pareto's arm grouping and resume's checks follow it, so they agree."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from moebench import checkpoint, pareto, schema
from moebench.build import conf_dir


def config_keys() -> set[str]:
    """Every dotted key of the composed configs, over the routers and model groups."""
    keys = set()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        for overrides in (["router=soft"], ["router=tokens_choice"], ["router=experts_choice"], ["router=dense"],
                          ["model=timm"]):
            cfg = compose("train", overrides=overrides)
            keys |= set(schema.flatten(schema_container(cfg)))
    return keys


def schema_container(cfg) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=False)


KEYS = config_keys()


def test_every_role_names_a_key_that_exists():
    for key in schema.ROLES:  # e.g. a data.cache_dir listed as neutral but never in any config
        assert any(k == key or k.startswith(key + ".") for k in KEYS), key


@pytest.mark.parametrize("key", sorted(KEYS))
def test_pareto_and_resume_agree_with_the_keys_role(key):
    role = schema.role(key)
    neutral = pareto._under(key, pareto.NEUTRAL_KEYS)  # left out of arms and setups
    assert neutral == (role in (schema.PER_RUN, schema.BOOKKEEPING)), (key, role)
    assert checkpoint.may_differ(key) == (role in (schema.LENGTH, schema.BOOKKEEPING)), (key, role)


def test_the_roles_of_the_keys_the_issue_found_disagreeing():
    for key in ("seed", "train.skip_nonfinite_steps"):  # one arm over them, but a resume keeps them
        assert schema.role(key) == schema.PER_RUN and not checkpoint.may_differ(key), key
        assert pareto._under(key, pareto.NEUTRAL_KEYS), key
    assert schema.role("train.epochs") == schema.LENGTH and checkpoint.may_differ("train.epochs")
    assert not pareto._under("train.epochs", pareto.NEUTRAL_KEYS)  # 2 and 4 epochs are different arms
    for key in ("cost.repeats", "deterministic", "wandb.mode", "data.root"):
        assert checkpoint.may_differ(key) and pareto._under(key, pareto.NEUTRAL_KEYS), key
    for key in ("router.num_experts", "train.lr", "data.batch_size", "model.moe.n", "precision"):
        assert schema.role(key) == schema.RESULT and not checkpoint.may_differ(key), key
