"""One rule for model names and aliases (core.names), the same in the configs, the registry and a sweep."""

from __future__ import annotations

import pytest

from core.config import TrackingConfig
from core.errors import UsageError
from core.names import check_alias, check_model_name
from core.registry import RegistryError, parse_model_ref


@pytest.mark.parametrize("alias", ["latest", "V10", "9lives", "with space", "", "my.alias"])
def test_an_alias_refused_anywhere_is_refused_everywhere(alias):
    with pytest.raises(UsageError):
        check_alias(alias)
    with pytest.raises(ValueError, match="alias"):
        TrackingConfig(alias=alias)
    with pytest.raises(RegistryError, match="alias"):
        parse_model_ref(f"shakespeare-gpt@{alias}" if alias else "shakespeare-gpt@")


def test_good_aliases_and_names_pass_unchanged():
    assert check_alias("champion") == "champion" and check_alias("_best-2") == "_best-2"
    assert check_model_name(" bard ") == "bard" and TrackingConfig(register_as="bard.v2").register_as == "bard.v2"


def test_a_new_name_is_stricter_than_an_existing_one():
    # Another MLflow client may have registered "My Model": it can be looked up, but the studio never creates it.
    assert check_model_name("My Model", new=False) == "My Model"
    assert parse_model_ref("My Model/2").name == "My Model"
    with pytest.raises(UsageError, match="model name 'My Model' is invalid"):
        check_model_name("My Model")
    with pytest.raises(ValueError, match="model name 'My Model' is invalid"):
        TrackingConfig(register_as="My Model")
    for bad in ("a/b", "a@b", "a'b"):
        with pytest.raises(UsageError, match="cannot contain"):
            check_model_name(bad, new=False)
