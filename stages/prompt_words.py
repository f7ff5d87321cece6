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


def count_phrase(count: int, attribute: str | None, word: str, style: str = "number"
                 ) -> tuple[str, list[tuple[int, int]]]:
    """The words asking for ``count`` objects of a class and the character spans of its class word in them.

    ``number``: 'a red circle', 'two red circles'; ``repeat``: 'a red circle and a red circle' (for a
    tokenizer that has the class word but not its plural: the bundled model's splits 'circles' into pieces
    it never saw grounded). The one place the sampler and the pre-flight length check phrase a class.
    """
    lead = f"{attribute} " if attribute else ""
    if count > 1 and style == "number":
        number, word = count_words(count, word)
        text = f"{number} {lead}"
        return text + word, [(len(text), len(text) + len(word))]
    text, spans = "", []
    for j in range(max(count, 1)):
        text += (" and " if j else "") + f"a {lead}"
        spans.append((len(text), len(text) + len(word)))
        text += word
    return text, spans


def grouped_positions(positions_of, groups: list[list[tuple[int, int]]]) -> list[list[int]]:
    """Per group of character spans (a class's words), the sorted union of the token positions
    ``positions_of(spans)`` gives each span (one tokenizer call for all spans): 'a ring and a ring' -> both rings."""
    hits = positions_of([span for group in groups for span in group])
    out, at = [], 0
    for group in groups:
        out.append(sorted({p for hit in hits[at:at + len(group)] for p in hit}))
        at += len(group)
    return out
