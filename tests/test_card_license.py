"""Model cards take their license from what the model derives from, never a fixed string (issue 29, item 2)."""

import pytest

from diffusers_selftrans import hub


def write_card(folder, front_matter: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(f"---\n{front_matter}\n---\n\n# a model\n")
    return folder


def test_a_fine_tune_or_student_inherits_its_bases_license(tmp_path):
    base = write_card(tmp_path / "base", "license: other\nlicense_name: stabilityai-ai-community\n"
                                         "license_link: LICENSE.md")
    assert hub.card_license([str(base)], dataset="ILSVRC/imagenet-1k") == {
        "license": "other", "license_name": "stabilityai-ai-community", "license_link": "LICENSE.md"}
    no_card = tmp_path / "no_card"
    no_card.mkdir()
    mit = write_card(tmp_path / "mit", "license: mit")
    assert hub.card_license([None, str(no_card), str(mit)]) == {"license": "mit"}  # the first card with one


@pytest.mark.parametrize("dataset, expected", [("ILSVRC/imagenet-1k", hub.IMAGENET_LICENSE),
                                               (None, hub.UNKNOWN_LICENSE)])
def test_a_model_trained_from_scratch_names_its_datas_terms(dataset, expected):
    assert hub.card_license([], dataset=dataset) == expected


def test_the_rendered_card_carries_the_derived_license(tmp_path):
    base = write_card(tmp_path / "base", "license: openrail")
    hub.render_model_card(tmp_path / "out", template="stage2.md", hyperparameters={}, command="accelerate launch x",
                          repo_id="me/x", base_model=str(base), license_from=[str(base)])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: openrail" in card and "apache-2.0" not in card
    hub.render_model_card(tmp_path / "in1k", template="stage1.md", hyperparameters={}, command="accelerate launch x",
                          repo_id="me/y", dataset="ILSVRC/imagenet-1k")
    card = (tmp_path / "in1k" / "README.md").read_text()
    assert "license: other" in card and "license_name: imagenet-terms-of-access" in card
