from pathlib import Path

import pytest

from ehr_diffusers.data.ehr.icd import (
    GemMapper,
    GemOptions,
    category_title,
    icd9_code_titles,
    icd10_code_titles,
    normalize_code,
    read_gem,
)


@pytest.fixture(scope="module")
def mapper() -> GemMapper:
    return GemMapper()


@pytest.mark.parametrize(
    "icd9, category",
    [("25000", "E11"), ("4019", "I10"), ("4280", "I50"), ("41401", "I25"), ("250.00", "E11"), ("401.9", "I10")],
)
def test_issue_examples_map_to_their_category(mapper, icd9, category):
    assert mapper.categories(icd9) == (category,)
    assert mapper.status(icd9) == "mapped"


def test_no_map_row_yields_nothing_never_a_placeholder(mapper):
    gem = read_gem()
    no_map = gem.filter(gem["no_map"])
    assert no_map.height > 0 and set(no_map["icd10"].to_list()) == {"NODX"}
    code = no_map["icd9"][0]
    assert mapper.categories(code) == ()
    assert mapper.status(code) == "no_map"
    categories = set(mapper.table["category"].to_list())
    assert not {"NOD", "NoD", "NODX"} & categories
    assert all(category_title(c) is not None for c in categories), "every mapped category is an official one"


def test_unknown_code_is_reported_not_fatal(mapper):
    assert mapper.categories("99999X") == ()
    assert mapper.status("99999X") == "not_in_gem"


def test_combination_policies():
    # 0730 (ornithosis with pneumonia) is a GEM combination entry: A70 and J17 are both required.
    assert GemMapper(GemOptions(combination="first_scenario")).categories("0730") == ("A70", "J17")
    skipped = GemMapper(GemOptions(combination="skip"))
    assert skipped.categories("0730") == ()
    assert skipped.status("0730") == "combination_skipped"


def test_alternatives_and_approximate_policies():
    # 0340 (streptococcal sore throat) has two alternative targets, J020 and J0300.
    assert GemMapper(GemOptions(alternatives="all")).categories("0340") == ("J02", "J03")
    assert GemMapper(GemOptions(alternatives="first")).categories("0340") == ("J02",)
    exact = GemMapper(GemOptions(include_approximate=False))
    assert exact.categories("4019") == ()  # 4019 -> I10 is flagged approximate
    assert exact.status("4019") == "approximate_excluded"
    assert exact.categories("5849") == ("N17",)  # 5849 -> N179 is exact


def test_bad_option_names_the_option():
    with pytest.raises(ValueError, match="combination"):
        GemOptions(combination="union")


def test_cms_text_format_is_read(tmp_path: Path):
    gem = tmp_path / "2018_I9gem.txt"
    gem.write_text("25000 E119      10000\n36570 NoDx      11000\n")
    mapper = GemMapper(gem_path=gem)
    assert mapper.categories("25000") == ("E11",)
    assert mapper.status("36570") == "no_map"
    gem.write_text("garbage line\n")
    with pytest.raises(ValueError, match="2018_I9gem.txt:1"):
        read_gem(gem)


def test_normalisation_and_titles():
    assert normalize_code(" i50.9 ") == "I509"
    assert category_title("I50") == "Heart failure"
    assert category_title("E11") == "Type 2 diabetes mellitus"
    assert category_title("ZZZ") is None
    assert icd9_code_titles()["4019"].lower().startswith("unspecified essential hypertension")
    assert "I10" in icd10_code_titles()
