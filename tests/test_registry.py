import pytest

from genrobust.registry import Registry, UnknownNameError


@pytest.fixture
def widgets():
    reg = Registry("widget")

    @reg.register("alpha", description="first")
    def alpha(size=1):
        return ("alpha", size)

    reg.register("alpha-2")(lambda: "alpha-2")
    reg.register("beta", colour="blue")(lambda: "beta")
    return reg


def test_register_create_and_list(widgets):
    assert widgets.create("alpha", size=3) == ("alpha", 3)
    assert widgets.create("beta") == "beta"
    assert widgets.list() == ["alpha", "alpha-2", "beta"]
    assert widgets.list("alpha*") == ["alpha", "alpha-2"]
    assert widgets.list("*-2") == ["alpha-2"]
    assert widgets.list("gamma*") == []
    assert "beta" in widgets and "gamma" not in widgets


def test_register_returns_the_function_unchanged(widgets):
    def gamma():
        return "g"
    assert widgets.register("gamma")(gamma) is gamma


def test_info_is_a_copy(widgets):
    assert widgets.info("beta") == {"colour": "blue"}
    widgets.info("beta")["colour"] = "red"
    assert widgets.info("beta") == {"colour": "blue"}


def test_duplicate_registration_is_an_error(widgets):
    with pytest.raises(KeyError, match="widget 'alpha' is already registered"):
        widgets.register("alpha")(lambda: None)
    assert widgets.create("alpha") == ("alpha", 1)  # the first entry survives


def test_unknown_name_lists_valid_names_and_suggests(widgets):
    with pytest.raises(UnknownNameError) as e:
        widgets.create("alpah")
    msg = str(e.value)
    assert msg.startswith("unknown widget 'alpah' (did you mean 'alpha'")
    assert msg.endswith("; choose from: alpha, alpha-2, beta")
    assert isinstance(e.value, KeyError)  # callers catching KeyError still work


def test_unknown_name_without_close_match_has_no_hint(widgets):
    with pytest.raises(UnknownNameError) as e:
        widgets.info("zzzzzz")
    assert str(e.value) == "unknown widget 'zzzzzz'; choose from: alpha, alpha-2, beta"


def test_shipped_registries():
    from genrobust.augment import AUGMENTATIONS
    from genrobust.data import DATASETS
    from genrobust.evaluate import EVAL_SETS
    from genrobust.generate import GENERATORS, STRATEGIES

    assert DATASETS.list() == ["digits-fonts", "digits-mnist", "digits-uci"]
    assert GENERATORS.list() == ["class-conditional", "digits-ddpm", "image-variation", "img2img", "text2img"]
    assert STRATEGIES.list() == ["captions", "class", "image", "image-label", "label", "templates"]
    assert AUGMENTATIONS.list() == ["augmix", "augmix-jsd", "autoaugment", "cutmix", "mixup", "noise2net", "none",
                                    "randaugment", "standard", "trivialaugment"]
    assert EVAL_SETS.list() == ["digits-fonts/unseen", "digits-mnist/test", "digits-uci", "imagenet-a",
                                "imagenet-r", "imagenet-sketch", "imagenet-v2", "imagenet-val", "objectnet"]
