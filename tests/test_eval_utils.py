"""Metric functions against hand-computed cases."""

import math

import pytest

from qlora.checks.scoring import (extract_final_answer, final_number, last_boxed, math_answer_correct, normalize_math_answer,
                        normalize_squad_answer, perplexity, squad_exact_match, squad_f1)


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{3} then \\boxed{14}.", "14"),  # the last one counts
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("The answer is \\boxed{x^{2}+1}", "x^{2}+1"),
    ("no box here 12", None),
    ("unclosed \\boxed{12", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_final_answer_falls_back_to_the_last_number():
    assert final_number("18 - 4 = 14, so 14 stamps.") == "14"
    assert final_number("it costs 1,250 dollars, or -3.5 net") == "-3.5"
    assert extract_final_answer("Ada has 18 and gives 4. Now 14") == "14"
    assert extract_final_answer("\\boxed{7} although 9 appears later") == "7"
    assert extract_final_answer("no digits at all") is None


@pytest.mark.parametrize("raw, expected", [
    ("14", "14"), (" 14. ", "14"), ("14.0", "14"), ("$14$", "14"), ("1,250", "1250"), ("\\text{14}", "14"),
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{3}{4}", "0.75"), ("1/2", "0.5"), ("-3", "-3"), ("x + 1", "x+1"),
])
def test_normalize_math_answer(raw, expected):
    assert normalize_math_answer(raw) == expected


def test_math_answer_correct():
    assert math_answer_correct("18 - 4 = 14. The answer is \\boxed{14}.", "14")
    assert math_answer_correct("The answer is \\boxed{14.00}", "14")
    assert not math_answer_correct("The answer is \\boxed{15}", "14")
    assert not math_answer_correct("I do not know", "14")
    assert math_answer_correct("... so she has 14", "14")  # no box: final number


def test_squad_normalization_is_v1_1():
    assert normalize_squad_answer("The  Glass Bridge!") == "glass bridge"
    assert normalize_squad_answer("an old mill, a river") == "old mill river"
    assert normalize_squad_answer("Theatre") == "theatre"  # 'the' only as a word


def test_squad_exact_match_and_f1_hand_computed():
    assert squad_exact_match("the lighthouse.", ["Lighthouse"]) == 1.0
    assert squad_exact_match("a lighthouse tower", ["lighthouse"]) == 0.0
    # pred tokens [glass, bridge, over, river], ref [old, glass, bridge]: common 2, P=2/4, R=2/3 -> F1=4/7
    assert squad_f1("the glass bridge over river", ["an old glass bridge"]) == pytest.approx(4 / 7)
    # best reference counts: F1 with "1887" is 1, with "in 1887" is 2/3
    assert squad_f1("1887", ["in 1887", "1887"]) == 1.0
    assert squad_f1("Ada", ["Ben"]) == 0.0
    assert squad_f1("anything", []) == 0.0


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(14.0)) == pytest.approx(14.0)
    assert perplexity(None) is None
    assert perplexity(1000.0) == math.inf
