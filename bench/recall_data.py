"""The recall benchmark's data: a seeded generator of multi-session conversations with
planted facts, and the JSON dataset format it reads and writes.

Dataset format (``--dataset file.json``; ``--save-dataset file.json`` writes the
generated one in the same format)::

    {"users": [
      {"user_id": "u1",
       "sessions": [
         {"session_id": "s1",
          "turns": [{"id": "u1-s1-t1", "user": "Hi, I grew up in Tromsø.",
                     "assistant": "optional, not replayed"}, ...]},
         ...],
       "questions": [
         {"id": "u1-q1", "type": "place", "question": "Where did I grow up?",
          "evidence": ["u1-s1-t1"], "answer": "Tromsø"}, ...]}]}

- ``user_id``, ``session_id``: any strings; the replay maps them to tiermem ids
  (``[A-Za-z0-9._-]``, see ``tiermem_ids``). Sessions are replayed in list order,
  one tiermem session each; turn ``i`` of a session (1-based, list order) becomes
  tiermem turn ``i``.
- turn ``id``: unique within the user; only questions refer to it. ``user`` is the
  message posted; ``assistant`` is ignored by the replay (the reply comes from the
  benchmark's LLM) and may be left out.
- question ``type``: a free label (the tables group by it); ``evidence``: the ids of
  the turns that answer it (a hit is any one of them retrieved); ``answer`` is
  informational. A question must have at least one evidence turn.

Generated question types (``TYPES``):
- ``name``: a person's or pet's name ("my sister is called Ottilie").
- ``date``: a day of an event.
- ``place``: where something is or happened.
- ``changed_preference``: a preference stated two or three times across sessions
  with different values; the question asks for the current one and the evidence is
  the latest statement only.
- ``distant_fact``: stated once in the first batch of the first session, asked
  after every later turn.
- ``paraphrase``: the question shares no content word with the evidence turn
  (checked by ``content_words``; stop words aside).
- ``keyword``: only an exact rare token matches (a tracking code, a booking
  reference); other turns have the same wording with other codes.

Near misses (``DISTRACTORS``, ``distractors`` rounds, one by default): for each
fact, turns on the same subject that answer nothing ("my colleague's sister is
called ...", "the dentist told me to floss more"), at most half of the turns in
all. Everything else is filler: everyday requests built from templates and word
pools.
Each session's length is a multiple of the archive threshold by default, so every
turn ends up in L3 (see bench/recall.py on tails).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TYPES = (
    "name",
    "date",
    "place",
    "changed_preference",
    "distant_fact",
    "paraphrase",
    "keyword",
)


@dataclass
class DTurn:
    id: str
    user: str
    assistant: str = ""


@dataclass
class DSession:
    session_id: str
    turns: list[DTurn]


@dataclass
class DQuestion:
    id: str
    type: str
    question: str
    evidence: list[str]
    answer: str = ""


@dataclass
class DUser:
    user_id: str
    sessions: list[DSession]
    questions: list[DQuestion] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------


def load_dataset(path: Path) -> list[DUser]:
    raw = json.loads(Path(path).read_text())
    users: list[DUser] = []
    for u in raw["users"]:
        sessions = [
            DSession(
                str(s["session_id"]),
                [
                    DTurn(str(t["id"]), str(t["user"]), str(t.get("assistant") or ""))
                    for t in s["turns"]
                ],
            )
            for s in u["sessions"]
        ]
        questions = [
            DQuestion(
                str(q["id"]),
                str(q.get("type") or "untyped"),
                str(q["question"]),
                [str(e) for e in q["evidence"]],
                str(q.get("answer") or ""),
            )
            for q in u.get("questions", [])
        ]
        users.append(DUser(str(u["user_id"]), sessions, questions))
    validate(users)
    return users


def dump_dataset(users: list[DUser], path: Path) -> None:
    data = {
        "users": [
            {
                "user_id": u.user_id,
                "sessions": [
                    {
                        "session_id": s.session_id,
                        "turns": [{"id": t.id, "user": t.user} for t in s.turns],
                    }
                    for s in u.sessions
                ],
                "questions": [
                    {
                        "id": q.id,
                        "type": q.type,
                        "question": q.question,
                        "evidence": q.evidence,
                        "answer": q.answer,
                    }
                    for q in u.questions
                ],
            }
            for u in users
        ]
    }
    Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False))


def validate(users: list[DUser]) -> None:
    seen_users: set[str] = set()
    for u in users:
        if u.user_id in seen_users:
            raise ValueError(f"user {u.user_id!r} twice")
        seen_users.add(u.user_id)
        ids: set[str] = set()
        sids: set[str] = set()
        for s in u.sessions:
            if s.session_id in sids:
                raise ValueError(f"user {u.user_id!r}: session {s.session_id!r} twice")
            sids.add(s.session_id)
            for t in s.turns:
                if t.id in ids:
                    raise ValueError(f"user {u.user_id!r}: turn id {t.id!r} twice")
                if not t.user.strip():
                    raise ValueError(f"user {u.user_id!r}: turn {t.id!r} has no user text")
                ids.add(t.id)
        for q in u.questions:
            if not q.evidence:
                raise ValueError(f"question {q.id!r} has no evidence")
            missing = [e for e in q.evidence if e not in ids]
            if missing:
                raise ValueError(f"question {q.id!r}: evidence {missing} not among the turns")


# --------------------------------------------------------------------------------------
# words
# --------------------------------------------------------------------------------------

_STOP = """a about after again all am an and any are as at be been before being but by can
    could did do does doing for from had has have having he her here hers him his how i
    i'm i've if in into is it its it's just me my myself no not now of on once only or
    our ours out over own same she should so some such than that the their them then
    there these they this those to too under until up very was we were what when where
    which while who whom why will with would you your yours lately recently these days
    got get"""
STOPWORDS = frozenset(_STOP.split())
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


FIRST_NAMES = [
    "Marguerite", "Oskar", "Ingrid", "Tobias", "Leonie", "Rafael", "Yusuf", "Annika",
    "Dmitri", "Soledad", "Hiroshi", "Beatrix", "Casimir", "Ottilie", "Lorcan", "Svetlana",
    "Anselm", "Priyanka", "Emeric", "Fenella", "Bartholomew", "Ximena", "Thaddeus",
    "Rosalind", "Gunnar", "Imogen", "Wendelin", "Zofia", "Cormac", "Henrietta",
]  # fmt: skip
PET_NAMES = [
    "Biscuit", "Pickles", "Juniper", "Waffles", "Pepper", "Mochi", "Ziggy", "Noodle",
    "Clementine", "Radish", "Sprocket", "Tofu",
]  # fmt: skip
PLACES = [
    "Tromsø", "Brest", "Ljubljana", "Valparaíso", "Galway", "Trieste", "Bergen", "Porto",
    "Kraków", "Hobart", "Tallinn", "Nantes", "Salzburg", "Aarhus", "Cádiz", "Bruges",
    "Kyoto", "Halifax", "Dubrovnik", "Innsbruck", "Oaxaca", "Tbilisi", "Matera", "Luang Prabang",
]  # fmt: skip
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]  # fmt: skip

# (relation key, statement, question, pool)
NAME_FACTS = [
    ("sister", "My sister is called {v}, she is coming to stay with us next month.",
     "What is my sister's name?", FIRST_NAMES),
    ("dog", "We adopted a rescue dog last spring and named him {v}.",
     "What did we name our dog?", PET_NAMES),
    ("manager", "My new manager at work is {v}, she seems fair so far.",
     "Who is my manager at work?", FIRST_NAMES),
    ("neighbour", "Our neighbour {v} lent us a ladder for the gutters.",
     "What is our neighbour's name?", FIRST_NAMES),
    ("friend", "My oldest friend {v} is getting married in the summer.",
     "Which friend of mine is getting married?", FIRST_NAMES),
    ("cat", "The kitten we took in is called {v}; she climbs everything.",
     "What is the kitten called?", PET_NAMES),
    ("mentor", "My thesis supervisor was Professor {v}, very demanding.",
     "Who supervised my thesis?", FIRST_NAMES),
]  # fmt: skip
DATE_FACTS = [
    ("birthday", "My daughter's birthday is on {v}, she turns eight.",
     "When is my daughter's birthday?"),
    ("dentist", "The dentist moved my appointment to {v}.",
     "What date is my dentist appointment?"),
    ("anniversary", "Our wedding anniversary is on {v}, ten years this time.",
     "When is our wedding anniversary?"),
    ("passport", "My passport expires on {v}, I need to renew it.",
     "When does my passport expire?"),
    ("exam", "My driving test is scheduled for {v}.",
     "When is my driving test?"),
    ("move", "We get the keys to the new flat on {v}.",
     "On what date do we get the keys to the new flat?"),
]  # fmt: skip
PLACE_FACTS = [
    ("hometown", "I grew up in {v}, a small place by the water.", "Where did I grow up?"),
    ("cabin", "We booked a cabin near {v} for the holidays.",
     "Where is the holiday cabin we booked?"),
    ("brother", "My brother just moved to {v} for a new job.",
     "Which city did my brother move to?"),
    ("boat", "I keep my little sailboat moored in {v}.", "Where is my sailboat moored?"),
    ("conference", "The conference I'm speaking at this year is in {v}.",
     "Where is the conference I'm speaking at?"),
    ("honeymoon", "We spent our honeymoon in {v} and loved it.",
     "Where did we go on honeymoon?"),
]  # fmt: skip
# (key, values, statements (first, updates...), question)
PREFERENCES = [
    ("coffee", ["flat white", "oat latte", "cortado", "black filter coffee", "iced americano"],
     ["I always order a {v} in the morning.",
      "I've switched, it's a {v} for me every morning now.",
      "Changed my mind again: these days my morning coffee is a {v}."],
     "What coffee do I drink in the morning now?"),
    ("exercise", ["running", "swimming", "bouldering", "rowing", "cycling", "yoga"],
     ["My main exercise is {v}, three times a week.",
      "I stopped that and took up {v} instead.",
      "My exercise these days is {v}, I really enjoy it."],
     "What is my main exercise at the moment?"),
    ("car", ["Volvo estate", "Renault Zoe", "Toyota Yaris", "Skoda Octavia", "Fiat Panda"],
     ["I drive a {v}, it's old but reliable.",
      "We sold the old one and bought a {v}.",
      "Traded cars again, now I drive a {v}."],
     "What car do I drive now?"),
    ("music", ["jazz piano", "Brazilian bossa nova", "baroque cello", "Afrobeat", "synth pop"],
     ["I'm listening to a lot of {v} at the moment.",
      "My music phase now is {v}.",
      "Lately my playlist is all {v}."],
     "What music am I into these days?"),
    ("diet", ["vegetarian", "pescatarian", "vegan", "low-carb", "gluten-free"],
     ["I eat {v} at the moment.",
      "I've moved to a {v} diet.",
      "My diet now is {v}, please keep that in mind for recipes."],
     "What diet am I following now?"),
    ("editor", ["Vim", "Emacs", "VS Code", "Sublime Text", "Helix"],
     ["I write all my code in {v}.",
      "I moved my coding setup over to {v}.",
      "I code in {v} these days."],
     "Which code editor do I use now?"),
]  # fmt: skip
DISTANT_FACTS = [
    ("allergy", ["penicillin", "shellfish", "peanuts", "latex", "bee stings"],
     "Important for later: I'm allergic to {v}.", "What am I allergic to?"),
    ("study", ["marine biology", "medieval history", "civil engineering", "linguistics"],
     "I studied {v} at university.", "What was my subject at university?"),
    ("firstjob", ["lifeguard", "bicycle courier", "bakery apprentice", "cinema projectionist"],
     "My first job was as a {v}.", "What was my first job?"),
    ("blood", ["O negative", "A positive", "B negative", "AB positive"],
     "For the record, my blood type is {v}.", "What is my blood type?"),
    ("instrument", ["accordion", "oboe", "harp", "trombone"],
     "As a kid I played the {v} in the school band.",
     "Which instrument did I play in the school band?"),
]  # fmt: skip
# Near misses, placed among the filler: turns on the same subject as a fact
# (same relation, same event, often a value of the same kind), which answer
# nothing. ``{v}`` is another value from the fact's pool.
DISTRACTORS: dict[str, list[str]] = {
    "sister": ["My colleague's sister is called {v}.",
               "My sister keeps asking me for advice about her garden."],
    "dog": ["Our neighbours have a dog named {v} who barks all night.",
            "The dog needs a new lead, the old one snapped."],
    "manager": ["My previous manager, {v}, moved to another company.",
                "My manager wants the report by Friday."],
    "neighbour": ["The neighbour across the street, {v}, is moving out.",
                  "Our neighbour's hedge is blocking the path again."],
    "friend": ["My friend {v} just started a new job in sales.",
               "An old friend of mine is planning a wedding abroad."],
    "cat": ["My aunt's cat is called {v}.", "The kitten knocked a glass off the table."],
    "mentor": ["Professor {v} taught my statistics course.",
               "I still have nightmares about my thesis defence."],
    "birthday": ["My nephew's birthday is on {v}.",
                 "Any ideas for my daughter's birthday present?"],
    "dentist": ["My partner's dentist appointment is on {v}.",
                "The dentist told me to floss more."],
    "anniversary": ["My parents celebrate their anniversary on {v}.",
                    "What's a good anniversary gift for ten years?"],
    "passport": ["My partner's passport expires on {v}.",
                 "Where do I find the passport renewal form?"],
    "exam": ["My friend passed her driving test on {v}.",
             "Driving lessons are so expensive these days."],
    "move": ["Our friends moved into their flat on {v}.",
             "We still need boxes for moving to the new flat."],
    "hometown": ["My partner grew up in {v}.", "I miss the town where I grew up."],
    "cabin": ["Last year we rented a cabin near {v}.", "The holiday cabin has no wifi."],
    "brother": ["My brother visited {v} last year on holiday.",
                "My brother is nervous about his new job."],
    "boat": ["A friend keeps his boat in {v}.", "The sailboat needs new sails this year."],
    "conference": ["Last year's conference was in {v}.",
                   "I'm still writing the talk for the conference."],
    "honeymoon": ["My sister went to {v} on her honeymoon.",
                  "Our honeymoon photos are still not printed."],
    "coffee": ["My partner always orders a {v}.", "The coffee machine at work is broken."],
    "exercise": ["My brother swears by {v}.", "I skipped my exercise this week."],
    "car": ["My neighbour just bought a {v}.", "The car needs new tyres before winter."],
    "music": ["My teenager only listens to {v}.", "Can you recommend headphones for music?"],
    "diet": ["My sister went {v} last year.", "Diet advice online is so contradictory."],
    "editor": ["My colleague swears by {v}.", "My editor setup needs a better theme."],
    "allergy": ["My son is allergic to {v}.", "Allergy season is starting early this year."],
    "study": ["My partner studied {v}.", "I sometimes miss university life."],
    "firstjob": ["My brother's first job was as a {v}.",
                 "I was so nervous in my first job."],
    "blood": ["My father's blood type is {v}.", "I should donate blood again soon."],
    "instrument": ["My niece plays the {v}.", "The school band is giving a concert."],
}  # fmt: skip

# (evidence wording, question wording, answer): no content word in common.
PARAPHRASES = [
    ("I have started taking cello lessons on Tuesday evenings.",
     "Which stringed instrument am I learning to play?", "cello"),
    ("Our basement flooded after the storm and the carpet is ruined.",
     "What happened to the downstairs room when it rained heavily?", "it flooded"),
    ("I quit smoking three weeks ago and feel great.",
     "Have I given up cigarettes?", "yes, three weeks ago"),
    ("My grandmother turned one hundred last Sunday.",
     "How old is my gran?", "100"),
    ("I got promoted to team lead yesterday.",
     "Did my career advance?", "promoted to team lead"),
    ("The vet said our cat needs a special kidney diet.",
     "What food did the animal doctor recommend for my kitty?", "a kidney diet"),
    ("I broke my wrist skiing in January.",
     "Which injury did I suffer on the slopes?", "a broken wrist"),
    ("My landlord is raising the rent by two hundred euros.",
     "Is my housing going to cost more?", "yes, +200 EUR"),
    ("I'm terrified of flying, so I take trains everywhere.",
     "Why do I avoid aeroplanes?", "fear of flying"),
    ("We planted tomatoes and basil on the balcony.",
     "Which vegetables and herbs am I growing outside?", "tomatoes and basil"),
    ("I have been sleeping badly since the new baby arrived.",
     "Why am I so tired?", "the new baby"),
    ("My laptop screen cracked when I dropped it on the train.",
     "What damaged my computer's display?", "dropped on the train"),
    ("I sold my old motorbike to a collector.",
     "Who bought the two-wheeler I owned?", "a collector"),
    ("My son was accepted into the conservatory.",
     "Which school admitted my boy?", "the conservatory"),
    ("Our wedding will be a small ceremony at the lighthouse.",
     "Where are we getting hitched?", "at the lighthouse"),
    ("I lost my wallet at the football stadium.",
     "Where did I misplace my purse?", "the football stadium"),
]  # fmt: skip
# (statement, question, items): several statements of one form, codes differ.
KEYWORD_FACTS = [
    ("The tracking code for the {item} parcel is {code}.",
     "Which parcel has tracking code {code}?",
     ["standing desk", "espresso machine", "hiking boots", "bookshelf", "monitor arm",
      "blender", "garden hose", "drill"]),
    ("My booking reference for the {item} is {code}.",
     "What did I book under reference {code}?",
     ["ferry to Bergen", "hotel in Porto", "rental car", "concert tickets",
      "train to Vienna", "yoga retreat", "museum tour", "campsite"]),
    ("The warranty number on the {item} is {code}.",
     "Which purchase has warranty number {code}?",
     ["winter coat", "dishwasher", "lawn mower", "television", "e-bike", "fridge",
      "vacuum cleaner", "coffee grinder"]),
]  # fmt: skip

# Filler: everyday requests, built from templates and pools.
FILLER_TEMPLATES = [
    "Can you help me plan a {adj} dinner for {n} people on a tight budget?",
    "What's a good way to keep a {plant} alive indoors over the winter?",
    "I need a short email to my team about the {project} deadline slipping a week.",
    "Could you explain how {concept} works in simple terms?",
    "Suggest three podcasts about {topic} for my commute.",
    "How long should I boil {food} for?",
    "Write a haiku about {nature}.",
    "What are the pros and cons of {a} versus {b}?",
    "Give me a stretching routine for {body} pain after long days at the desk.",
    "How do I get a {stain} stain out of a cotton shirt?",
    "Can you summarise the main arguments for and against {debate}?",
    "I'm trying to learn {skill}; what should I practise first?",
    "What's a polite way to decline an invitation to {event}?",
    "Help me draft a shopping list for a week of {adj} lunches.",
    "How do I convert {n} cups of flour to grams?",
    "Recommend a board game for {n} players that is not too long.",
    "What should I pack for a weekend of {activity}?",
    "Can you check this sentence for grammar: 'the {project} report were late'?",
    "Give me a {adj} idea for a Sunday afternoon with kids.",
    "What is the difference between {a} and {b}?",
    "How can I make my {room} feel less cluttered?",
    "Any tips for a job interview at a {company} company?",
    "Tell me a fun fact about {animal}.",
    "How often should I water {plant} in summer?",
    "Plan a {n}-day itinerary for a city break somewhere warm.",
    "What's a good beginner recipe with {food}?",
    "Explain {concept} like I'm twelve.",
    "Make a to-do list for cleaning the {room} this weekend.",
    "Which is healthier, {food} or {food2}?",
    "Write two lines for a birthday card for a colleague who loves {topic}.",
]  # fmt: skip
POOLS: dict[str, list[str]] = {
    "adj": ["cosy", "quick", "spicy", "healthy", "festive", "simple", "colourful", "cheap"],
    "n": ["2", "3", "4", "5", "6", "8"],
    "plant": ["basil plant", "fern", "fiddle-leaf fig", "orchid", "cactus", "monstera"],
    "project": ["budget", "migration", "onboarding", "quarterly", "website", "audit"],
    "concept": ["compound interest", "photosynthesis", "a TCP handshake", "inflation",
                "the tides", "a heat pump", "noise cancelling", "carbon dating"],
    "topic": ["astronomy", "economics", "design", "football", "history", "cooking"],
    "food": ["eggs", "lentils", "quinoa", "potatoes", "broccoli", "chickpeas", "rice"],
    "food2": ["pasta", "couscous", "bread", "oats", "noodles"],
    "nature": ["autumn rain", "a quiet lake", "the first snow", "morning fog", "a windy beach"],
    "a": ["renting", "a gas hob", "an e-reader", "a standing desk", "public transport"],
    "b": ["buying", "an induction hob", "paper books", "a normal desk", "a car"],
    "body": ["lower back", "neck", "shoulder", "wrist", "hip"],
    "stain": ["red wine", "coffee", "grass", "ink", "tomato sauce"],
    "debate": ["a four-day work week", "school uniforms", "nuclear power", "remote work"],
    "skill": ["chess", "touch typing", "watercolour painting", "Spanish", "juggling"],
    "event": ["a networking evening", "a stag party", "a work barbecue", "a book club"],
    "activity": ["camping", "hiking", "city sightseeing", "a music festival"],
    "room": ["hallway", "kitchen", "home office", "garage", "bedroom"],
    "company": ["logistics", "software", "healthcare", "retail", "shipping"],
    "animal": ["octopuses", "crows", "axolotls", "honeybees", "sloths"],
}  # fmt: skip
_LEAD_INS = ["", "", "By the way, ", "Oh, and ", "Quick note: ", "Unrelated, but "]


def _fill(rng: random.Random, template: str) -> str:
    def sub(m: re.Match[str]) -> str:
        return rng.choice(POOLS[m.group(1)])

    return re.sub(r"\{(\w+)\}", sub, template)


def filler(rng: random.Random) -> str:
    return _fill(rng, rng.choice(FILLER_TEMPLATES))


def _code(rng: random.Random, used: set[str]) -> str:
    while True:
        code = "".join(rng.choice("BCDFGHJKMNPQRSTVWXZ") for _ in range(2)) + str(
            rng.randrange(10_000, 100_000)
        )
        if code not in used:
            used.add(code)
            return code


def _date(rng: random.Random) -> str:
    return f"{rng.randrange(1, 29)} {rng.choice(MONTHS)}"


# --------------------------------------------------------------------------------------
# the generator
# --------------------------------------------------------------------------------------


@dataclass
class _Plant:
    """A planted statement: its text, where it goes, which question it answers."""

    text: str
    slot: tuple[int, int] | None = None  # (session index, turn index 0-based)


def generate(
    users: int,
    sessions: int,
    turns_per_session: int,
    seed: int,
    per_type: int | None = None,
    distractors: int = 1,
) -> list[DUser]:
    """``users`` users, each with ``sessions`` sessions of ``turns_per_session`` turns,
    facts planted among filler, and questions about them. Same arguments, same data."""
    if sessions < 1 or turns_per_session < 1 or users < 1:
        raise ValueError("users, sessions and turns per session must be at least 1")
    out = []
    for ui in range(users):
        rng = random.Random(f"{seed}:{ui}")
        uid = f"user{ui + 1:03d}"
        out.append(_user(rng, uid, sessions, turns_per_session, per_type, distractors))
    validate(out)
    return out


def _user(
    rng: random.Random,
    uid: str,
    n_sessions: int,
    tps: int,
    per_type: int | None,
    distractors: int,
) -> DUser:
    total = n_sessions * tps
    # How many facts of each type: about one per 60 turns, at least one, at most
    # what the pools hold.
    k = per_type if per_type is not None else max(1, min(6, total // 60))
    slots = [(s, t) for s in range(n_sessions) for t in range(tps)]
    free = set(slots)
    texts: dict[tuple[int, int], str] = {}
    questions: list[tuple[str, str, tuple[int, int], str]] = []  # type, q, slot, answer

    def take(candidates: list[tuple[int, int]]) -> tuple[int, int]:
        options = [c for c in candidates if c in free]
        if not options:
            options = sorted(free)
        if not options:
            raise ValueError("not enough turns for the planted facts; use more turns")
        c = rng.choice(options)
        free.discard(c)
        return c

    def place(
        text: str, candidates: list[tuple[int, int]] | None = None, pad: bool = True
    ) -> tuple[int, int]:
        slot = take(candidates or slots)
        lead = rng.choice(_LEAD_INS)
        keep_case = text.split()[0] in ("I", "I'm", "I've") or not lead
        body = lead + (text if keep_case else text[0].lower() + text[1:])
        if pad and rng.random() < 0.4:  # a fact inside a turn about something else
            body = f"{body} {filler(rng)}"
        texts[slot] = body
        return slot

    used_names: set[str] = set()

    def pick(pool: list[str]) -> str:
        options = [v for v in pool if v not in used_names] or pool
        v = rng.choice(options)
        used_names.add(v)
        return v

    # Distant facts: the first batch (10 turns) of the first session.
    early = [(0, t) for t in range(min(10, tps))]
    near: list[tuple[str, list[str]]] = []  # (fact key, wrong values)
    for key, values, statement, question in rng.sample(DISTANT_FACTS, min(k, len(DISTANT_FACTS))):
        v = rng.choice(values)
        questions.append(("distant_fact", question, place(statement.format(v=v), early), v))
        near.append((key, [x for x in values if x != v]))
    # Preferences that change: first statement in the first half, the updates
    # later, the last one after every earlier one.
    for key, values, statements, question in rng.sample(PREFERENCES, min(k, len(PREFERENCES))):
        n = rng.choice([2, 3])
        vals = rng.sample(values, n)
        near.append((key, [x for x in values if x not in vals]))
        bounds = [int(total * i / n) for i in range(n + 1)]
        slot = (0, 0)
        for i, v in enumerate(vals):
            part = slots[bounds[i] : bounds[i + 1]]
            if i > 0:
                part = [p for p in part if p > slot] or part
            slot = place(statements[min(i, len(statements) - 1)].format(v=v), part)
        questions.append(("changed_preference", question, slot, vals[-1]))
    for key, statement, question, pool in rng.sample(NAME_FACTS, min(k, len(NAME_FACTS))):
        v = pick(pool)
        questions.append(("name", question, place(statement.format(v=v)), v))
        near.append((key, [x for x in pool if x != v]))
    for key, statement, question in rng.sample(DATE_FACTS, min(k, len(DATE_FACTS))):
        v = _date(rng)
        questions.append(("date", question, place(statement.format(v=v)), v))
        near.append((key, [d for d in (_date(rng) for _ in range(4)) if d != v]))
    for key, statement, question in rng.sample(PLACE_FACTS, min(k, len(PLACE_FACTS))):
        v = pick(PLACES)
        questions.append(("place", question, place(statement.format(v=v)), v))
        near.append((key, [x for x in PLACES if x != v]))
    for evidence, question, answer in rng.sample(PARAPHRASES, min(k, len(PARAPHRASES))):
        slot = place(evidence, pad=False)
        shared = content_words(texts[slot]) & content_words(question)
        if shared:
            raise AssertionError(f"paraphrase shares {shared}: {texts[slot]!r} / {question!r}")
        questions.append(("paraphrase", question, slot, answer))
    # Keywords: several statements of the same form, only the code tells them apart;
    # a question for some of them, the others stay as decoys.
    codes: set[str] = set()
    item_pools = [rng.sample(items, len(items)) for _s, _q, items in KEYWORD_FACTS]
    for i in range(min(2 * k, sum(len(p) for p in item_pools))):
        statement, question, _items = KEYWORD_FACTS[i % len(KEYWORD_FACTS)]
        item = item_pools[i % len(KEYWORD_FACTS)].pop()
        code = _code(rng, codes)
        slot = place(statement.format(item=item, code=code))
        if i < k:
            questions.append(("keyword", question.format(code=code), slot, item))

    # Near misses, while there is room: each fact's two, as often as ``distractors``.
    for _round in range(distractors):
        for key, wrong in near:
            for template in DISTRACTORS.get(key, []):
                if len(free) <= total // 2:
                    break
                place(template.format(v=rng.choice(wrong) if wrong else "someone"))

    sessions: list[DSession] = []
    for s in range(n_sessions):
        sid = f"s{s + 1:02d}"
        turns = [
            DTurn(f"{uid}-{sid}-t{t + 1:03d}", texts.get((s, t)) or filler(rng)) for t in range(tps)
        ]
        sessions.append(DSession(sid, turns))
    dq = []
    for i, (qtype, q, (s, t), answer) in enumerate(questions):
        dq.append(DQuestion(f"{uid}-q{i + 1:03d}", qtype, q, [sessions[s].turns[t].id], answer))
    return DUser(uid, sessions, dq)


def summary_line(users: list[DUser]) -> str:
    turns = sum(len(s.turns) for u in users for s in u.sessions)
    sessions = sum(len(u.sessions) for u in users)
    questions = sum(len(u.questions) for u in users)
    return f"{len(users)} users, {sessions} sessions, {turns} turns, {questions} questions"


def as_dict(users: list[DUser]) -> dict[str, Any]:
    return {"users": len(users), "summary": summary_line(users)}
