"""The experiments' toy world: entities that each hold a digit (the knowledge), questions over
several of them answered by the last digit of the sum of their digits, worked step by step in
one of two thinking patterns, posed in one of two wordings, and a word-level vocabulary of more
than 512 words (so a top-k of 16 is a small part of it, as with a real model's).

Thinking pattern "forward" (the student's) looks the entities up in order and keeps a running sum:

    "bako is 3 . dile is 5 . 3 plus 5 is 8 . sumo is 4 . 8 plus 4 is 2 . answer 2"

"backward" gets the same answer with other words, the lookups first, in reverse order:

    "sumo = 4 ; dile = 5 ; bako = 3 ; 4 + 5 = 9 ; 9 + 3 = 2 ; result 2"

A teacher trained on "backward" has never seen a "forward" prefix: on the student's rollouts it
is off its training distribution from the first token. The answer is the response's last
number, so task.check_reference (the checker of prompt files) grades it exactly.

The models are trained here by SFT on first use and cached under a folder named by the hash of
everything they are made from, their SFT data included, as the embedded demonstration's are
(demo.py). The student is taught the digits of the "known" share of the entities only: in its
SFT data every other entity's digit is drawn at random in each question (the worked sum is
consistent with the drawn digit), so it learns that it does not know them, its distribution over
their digit near uniform, as a model is unsure of a fact it was never taught (a student that had
never seen those names guessed one digit confidently, and reverse KL barely moves a confident
mistake). A teacher taught every digit can teach the rest; a teacher trained on the student's
own data cannot (experiment new-knowledge).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass

from ..demo import ModelSpec, sft_and_save
from ..tokenizer import build_word_tokenizer

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
# The prompt wordings: the teachers are trained on "teacher" only, the student on both (a general
# model, robust to wording; a post-trained teacher knows its own template).
TEMPLATES = {"teacher": "question : last digit of the total of {prompt} ? answer :",
             "student": "sum {prompt} mod ten ="}
# Room past the longest worked solution in generation.
EXTRA_TOKENS = 4
PATTERN_WORDS = {"forward": ("is", ".", "plus", "answer"), "backward": ("=", ";", "+", "result")}


@dataclass(frozen=True)
class WorldSpec:
    entities: int = 192
    known_fraction: float = 0.6   # the share of the entities the student's SFT data names
    numbers: int = 300            # number words 0 .. numbers-1 (the digits and sums use 0..9)
    items: tuple = (2, 3, 4)      # entities per question in the SFT, OPD and held-out sets
    sft_questions: int = 20000
    opd_questions: int = 2048
    cold_start_questions: int = 512
    eval_questions: int = 256
    seed: int = 7


@dataclass(frozen=True)
class Recipe:
    """How a model of the world is made: its size and SFT, on which entities, pattern, wordings."""
    model: ModelSpec
    taught: str            # whose digits the SFT data states: "known" (the student's share) or "all"
    pattern: str           # a key of PATTERN_WORDS
    templates: tuple       # keys of TEMPLATES, drawn uniformly per SFT example


# One model size for all, SFT'd to convergence on its data (after 600 to 1600 steps the copying of
# the names and the sums were not always learnt yet, and a hidden-96 teacher still miscopied names
# after 2400): a student's and a teacher's difference is then only which digits they were taught.
MODEL = ModelSpec(hidden_size=64, layers=2, heads=4, sft_steps=2400, sft_batch=32, sft_lr=3e-3)
RECIPES = {
    "student": Recipe(MODEL, "known", "forward", ("teacher", "student")),
    "teacher": Recipe(MODEL, "all", "forward", ("teacher",)),
    "teacher-backward": Recipe(MODEL, "all", "backward", ("teacher",)),
    # the student's recipe: its questions and taught digits, its own draws of the wordings and the
    # untaught digits, its own initialization
    "teacher-same-data": Recipe(MODEL, "known", "forward", ("teacher", "student")),
}


@dataclass(frozen=True)
class Question:
    names: tuple     # entity names, in the order asked
    answer: str      # the last digit of the sum of their digits


class World:
    def __init__(self, spec: WorldSpec = WorldSpec()):
        if not 0 < spec.known_fraction < 1:
            raise ValueError(f"known_fraction must be in (0, 1), got {spec.known_fraction}")
        self.spec = spec
        rng = random.Random(spec.seed)
        syllables = [c + v for c in CONSONANTS for v in VOWELS]
        pool = [a + b for a in syllables for b in syllables]
        if spec.entities > len(pool):
            raise ValueError(f"entities: at most {len(pool)} names, got {spec.entities}")
        self.names = rng.sample(pool, spec.entities)
        self.digit = {name: rng.randrange(10) for name in self.names}
        self.known = self.names[:round(spec.known_fraction * spec.entities)]
        connectives = [w for words in PATTERN_WORDS.values() for w in words]
        connectives += [w for t in TEMPLATES.values() for w in t.split() if w != "{prompt}"]
        self.tokenizer = build_word_tokenizer(self.names + [str(n) for n in range(spec.numbers)] + connectives)

    def _draw(self, purpose: str, count: int, entities: str, items: tuple, exclude: set) -> list:
        """``count`` distinct questions not in ``exclude`` (which grows by them), a seeded draw of
        ``purpose``: the same list on every call."""
        rng = random.Random(f"{self.spec.seed}-{purpose}")
        pool = self.known if entities == "known" else self.names
        out = []
        while len(out) < count:
            names = tuple(rng.sample(pool, rng.choice(items)))
            if names not in exclude:
                exclude.add(names)
                out.append(Question(names, str(sum(self.digit[n] for n in names) % 10)))
        return out

    def question_sets(self, items: tuple = ()) -> dict:
        """Pairwise disjoint question sets of ``items`` entities each (default: the spec's):
        "eval" (held out, over all entities), "benchmark" (held out, over the known ones only),
        "opd", "cold_start" and "sft"."""
        items, seen, spec = items or self.spec.items, set(), self.spec
        plan = (("eval", spec.eval_questions, "all"), ("benchmark", spec.eval_questions, "known"),
                ("opd", spec.opd_questions, "all"), ("cold_start", spec.cold_start_questions, "all"),
                ("sft", spec.sft_questions, "all"))
        return {purpose: self._draw(f"{purpose}-{items}", count, entities, items, seen)
                for purpose, count, entities in plan}

    def solution(self, question: Question, pattern: str, digit: dict = None) -> str:
        """The worked response in ``pattern``, ending in the answer, of the entities' digits
        ``digit`` (default: the true ones)."""
        is_, stop, plus, final = PATTERN_WORDS[pattern]
        names = question.names if pattern == "forward" else question.names[::-1]
        digits = [(digit or self.digit)[n] for n in names]
        lookups = [f"{n} {is_} {d} {stop}" for n, d in zip(names, digits)]
        sums, total = [], digits[0]
        for d in digits[1:]:
            sums.append(f"{total} {plus} {d} {is_} {(total + d) % 10} {stop}")
            total = (total + d) % 10
        if pattern == "forward":  # each sum right after the lookup it adds
            steps = [lookups[0]] + [s for pair in zip(lookups[1:], sums) for s in pair]
        else:
            steps = lookups + sums
        return " ".join(steps + [f"{final} {total}"])

    @staticmethod
    def prompt(question: Question) -> str:
        """The question without its wording (a prompt file's "prompt"; the run's template adds it)."""
        return " ".join(question.names)

    def max_new_tokens(self, items: tuple = ()) -> int:
        """The longest solution of questions of ``items`` entities, its end of sequence, and room
        past it: a rambling model is cut off, not graded forever."""
        n = max(items or self.spec.items)
        return len(self.solution(Question(tuple(self.names[:n]), "0"), "forward").split()) + 1 + EXTRA_TOKENS

    def sft_data(self, name: str, recipe: Recipe) -> tuple:
        """(prompts, responses) of the SFT of model ``name``: each prompt in one of the recipe's
        wordings, each response with the digits the recipe teaches and random ones elsewhere."""
        rng = random.Random(f"{self.spec.seed}-{name}-sft")
        taught = set(self.known if recipe.taught == "known" else self.names)
        prompts, responses = [], []
        for q in self.question_sets()["sft"]:
            prompts.append(TEMPLATES[rng.choice(recipe.templates)].format(prompt=self.prompt(q)))
            digit = {n: self.digit[n] if n in taught else rng.randrange(10) for n in q.names}
            responses.append(self.solution(q, recipe.pattern, digit))
        return prompts, responses

    def model_dir(self, name: str, cache_dir: str, recipe: Recipe) -> str:
        """The folder of model ``name`` of ``recipe``, trained now by SFT unless it is cached."""
        prompts, responses = self.sft_data(name, recipe)
        blob = json.dumps({"recipe": dataclasses.asdict(recipe), "prompts": prompts, "responses": responses})
        key = hashlib.sha256(blob.encode()).hexdigest()[:12]
        path = os.path.join(os.path.expanduser(cache_dir), f"world-{name}-{key}")
        if not os.path.exists(os.path.join(path, "config.json")):
            longest = max(len(p.split()) for p in prompts) + self.max_new_tokens()
            sft_and_save(path, recipe.model, self.tokenizer, prompts, responses, max_positions=longest,
                         init_seed=int(key, 16) % 2**31, seed=self.spec.seed, desc=f"sft {name}")
        return path
