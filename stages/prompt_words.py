"""How prompts say counts: number words and English plurals of class words (torch- and model-free)."""
from __future__ import annotations

NUMBER_WORDS = ("a", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def plural(word: str) -> str:
    """English plural of a class word: circle -> circles, cross -> crosses, bus -> buses, city -> cities."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def count_words(count: int, word: str) -> tuple[str, str]:
    """(article or number, class word in number): (a, circle), (two, circles)."""
    if count <= 1:
        return "a", word
    return (NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)), plural(word)
