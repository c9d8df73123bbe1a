"""Scoring generated answers: GSM8K-style numbers, A-E letters, and word choices (true/false, solution1...)."""

from __future__ import annotations

import re
import signal

from .errors import UsageError

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+"
_MARKERS = (
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"answer is[:\s]*\$?\\?\(?\s*(?:\\boxed\{)?(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
)
_ANY_NUMBER = re.compile(_NUMBER)


def parse_number(text: str) -> float | None:
    """'$1,234.50' -> 1234.5; None when ``text`` holds no number."""
    cleaned = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    """The final numeric answer of a worked solution: '#### N', then 'The answer is N', then \\boxed{N},
    then the last number in the text. Commas, '$' and decimals are handled."""
    for pattern in _MARKERS:
        found = pattern.findall(text)
        if found:
            value = parse_number(found[-1])
            if value is not None:
                return value
    numbers = _ANY_NUMBER.findall(text)
    for candidate in reversed(numbers):
        value = parse_number(candidate)
        if value is not None:
            return value
    return None


def numbers_equal(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def extract_letter(text: str) -> str | None:
    """A-E answer of a multiple-choice math item ('The answer is (D)', '(B)', last standalone letter)."""
    found = re.findall(r"answer is[:\s]*\(?([A-E])\b", text)
    if not found:
        found = re.findall(r"\(([A-E])\)", text) or re.findall(r"\b([A-E])\b", text)
    return found[-1] if found else None


_CHOICE = re.compile(r"\b(true|false|solution[12]|answer[1-5]|option[12]|ending[1-4])\b", re.IGNORECASE)


def extract_choice(text: str) -> str | None:
    """The LLM-Adapters commonsense choice word ('the correct answer is solution1'): the last one named."""
    marked = re.findall(r"correct answer is[:\s]*(\w+)", text, re.IGNORECASE)
    for word in reversed(marked):
        if _CHOICE.fullmatch(word):
            return word.lower()
    found = _CHOICE.findall(text)
    return found[-1].lower() if found else None


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


SCORERS = ("exact", "math-verify")


def math_verify_score(generated: str, gold: str) -> tuple[str | None, bool] | None:
    """(prediction, correct?) by Hugging Face's math-verify (LaTeX, fractions, symbolic equivalence:
    ``\\boxed{\\frac12}`` equals ``0.5``); None when ``gold`` is not a mathematical answer."""
    import threading

    try:
        from math_verify import parse, verify
    except ImportError:
        raise UsageError("eval.scorer=math-verify needs the math-verify package: pip install 'qmoe[math]'") from None
    # math-verify bounds its work with SIGALRM, which exists in the main thread only (the UI evaluates in others)
    timeout = 5 if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM") else None
    gold_parsed = parse(gold, parsing_timeout=timeout)
    if not gold_parsed:
        return None
    predicted = parse(generated, parsing_timeout=timeout)
    prediction = str(predicted[-1]) if predicted else None  # math-verify's [sympy value, matched text]
    return prediction, bool(predicted) and verify(gold_parsed, predicted, timeout_seconds=timeout)


def score(kind: str, generated: str, gold: str, scorer: str = "exact") -> tuple[str | None, bool]:
    """(extracted prediction, correct?) for a task kind: numeric | letter | choice | exact. ``scorer``
    math-verify compares numeric and mathematical exact answers with math-verify; letters and choices are
    extracted the same either way."""
    if scorer not in SCORERS:
        raise UsageError(f"eval.scorer={scorer!r} is invalid: one of {', '.join(SCORERS)}")
    if scorer == "math-verify" and kind in ("numeric", "exact"):
        verified = math_verify_score(generated, gold)
        if verified is not None:
            return verified
    if kind == "numeric":
        value = extract_number(generated)
        return (None if value is None else f"{value:g}"), numbers_equal(value, parse_number(gold) if gold else None)
    if kind == "letter":
        letter = extract_letter(generated)
        return letter, letter is not None and letter == gold.strip().upper()
    if kind == "choice":
        choice = extract_choice(generated)
        return choice, choice is not None and choice == gold.strip().lower()
    prediction = normalize_text(generated)
    gold_number = parse_number(gold)
    if gold_number is not None:  # numeric free-form answers: compare as numbers
        value = extract_number(generated)
        return (None if value is None else f"{value:g}"), numbers_equal(value, gold_number)
    return prediction, prediction == normalize_text(gold)
