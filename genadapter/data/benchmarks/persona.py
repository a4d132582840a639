"""`persona`: remember what a user said about themself across chat sessions.

An episode is several user-assistant sessions of small talk; here and there the user mentions
a fact about themself (pet's name, home town, job, allergy, ...) and, as distractors, facts
about other people ("My neighbour's dog is called ..."). Questions come after all sessions:
"What is my dog's name?".

Held out from train, as in `facts`:
- values: invented values (the user's name, pets', relatives' names, home towns, bands) hash
  into train/validation/test, so a test answer never occurs in train or validation;
- phrasings: the last `N_TEST_PHRASINGS` mention and question forms of every attribute are
  used only in test.
Pooled values (jobs, allergies, sports, ...) are shared; only their pairing is random.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from genadapter.data.episodes import QA, ConversationEpisode

from .common import NameMaker, article, check_split, rng_for
from .facts import PROFESSIONS, _lines, _place_name

N_TEST_PHRASINGS = 2

ALLERGIES = _lines("""
peanuts
shellfish
cats
pollen
penicillin
strawberries
gluten
bee stings
latex
dust mites
sesame
kiwi fruit
""")
CARS = _lines("""
Volvo
Toyota
Skoda
Fiat
Subaru
Peugeot
Kia
Mazda
Renault
Honda
Audi
Opel
""")
SPORTS = _lines("""
badminton
tennis
rugby
volleyball
squash
handball
water polo
table tennis
basketball
hockey
netball
cricket
""")
LANGUAGES = _lines("""
Portuguese
Japanese
Italian
Korean
Dutch
Greek
Swahili
Turkish
Polish
Arabic
Finnish
Hindi
""")
MONTHS = _lines("""
January
February
March
April
May
June
July
August
September
October
November
December
""")
BAND_ADJECTIVES = _lines("""
Velvet
Paper
Silver
Midnight
Electric
Hollow
Golden
Broken
Neon
Wandering
Quiet
Crimson
Frozen
Lucky
Restless
Copper
""")
BAND_NOUNS = _lines("""
Lanterns
Foxes
Sparrows
Engines
Tides
Giants
Mirrors
Orchards
Comets
Harbours
Pilots
Wolves
Ghosts
Rivers
Satellites
Kites
""")
PET_SPECIES = ("dog", "cat", "rabbit", "parrot", "hamster", "tortoise")
SIBLINGS = ("sister", "brother")
PARTNERS = ("wife", "husband", "partner")


@dataclass(frozen=True)
class PersonaAttribute:
    """A fact about the user: value sampler, optional relation word {s}, mentions, questions."""

    name: str
    value: Callable[[NameMaker], str]
    mentions: tuple[str, ...]  # {v} value, {av} "a/an value", {s} relation, {as} "a/an relation"
    questions: tuple[str, ...]
    relations: tuple[str, ...] = ("",)

    def mention_templates(self, split: str) -> tuple[str, ...]:
        return _phrasings(self.mentions, split)

    def question_templates(self, split: str) -> tuple[str, ...]:
        return _phrasings(self.questions, split)


def _phrasings(templates: tuple[str, ...], split: str) -> tuple[str, ...]:
    return templates[-N_TEST_PHRASINGS:] if split == "test" else templates[:-N_TEST_PHRASINGS]


def _pool(pool: tuple[str, ...]) -> Callable[[NameMaker], str]:
    return lambda names: names.rng.choice(pool)


def _first_name(names: NameMaker) -> str:
    return names.unique(names.first_name)


def _band(names: NameMaker) -> str:
    r = names.rng

    def make() -> str:
        adjective, noun = r.choice(BAND_ADJECTIVES), r.choice(BAND_NOUNS)
        if r.random() < 0.5:
            return f"The {adjective} {noun}"
        return f"{names.word(2)} and the {adjective} {noun}"

    return names.unique(make)


# Each list: the last N_TEST_PHRASINGS are test-only.
ATTRIBUTES: tuple[PersonaAttribute, ...] = (
    PersonaAttribute(
        "name",
        _first_name,
        _lines("""
            By the way, my name is {v}.
            I'm {v}, nice to meet you.
            You can call me {v}.
            Oh, I never introduced myself. I'm {v}.
            Everyone knows me as {v}.
            {v} here, by the way.
            The name's {v}, in case you were wondering.
            Just so you know who you're talking to, I'm called {v}.
        """),
        _lines("""
            What is my name?
            What's my name?
            Do you remember my name?
            What did I say my name was?
            What am I called?
            Who am I? Tell me my name.
        """),
    ),
    PersonaAttribute(
        "pet_name",
        _first_name,
        _lines("""
            My {s} is called {v}.
            I have {as} named {v}.
            Sorry, my {s} {v} just jumped on the keyboard.
            I need to take {v}, my {s}, to the vet tomorrow.
            {v}, that's my {s}, has been so lazy today.
            Our {s}, {v}, turned three last week.
            I just bought a new bed for {v}, my {s}.
            Nobody at home is as spoiled as my {s}, whose name is {v}.
        """),
        _lines("""
            What is my {s}'s name?
            What's the name of my {s}?
            What did I say my {s} is called?
            Do you remember what my {s} is called?
            What name does my {s} go by?
            My {s}, what's it called again?
        """),
        relations=PET_SPECIES,
    ),
    PersonaAttribute(
        "home_town",
        _place_name,
        _lines("""
            I grew up in {v}.
            I'm originally from {v}.
            Back in {v}, where I'm from, it's probably raining.
            My home town is {v}.
            I was born and raised in {v}.
            This reminds me of {v}, the town I grew up in.
            Everyone in {v}, my home town, knows each other.
            I spent my whole childhood in {v}.
        """),
        _lines("""
            Where did I grow up?
            What is my home town?
            Where am I originally from?
            Which town am I from?
            Where did I spend my childhood?
            What town was I raised in?
        """),
    ),
    PersonaAttribute(
        "job",
        _pool(PROFESSIONS),
        _lines("""
            I work as {av}.
            I'm {av} by profession.
            Work was busy. Being {av} is never boring.
            As {av}, I often work long hours.
            My job? I'm {av}.
            I've been {av} for about ten years now.
            I earn my living as {av}.
            In my line of work (I'm {av}) weekends are rare.
        """),
        _lines("""
            What is my job?
            What do I do for a living?
            What's my profession?
            What do I work as?
            How do I earn my living?
            What is my line of work?
        """),
    ),
    PersonaAttribute(
        "allergy",
        _pool(ALLERGIES),
        _lines("""
            I'm allergic to {v}.
            I have to avoid {v} because of my allergy.
            My allergy to {v} has been acting up.
            Just so you know, {v} gives me a terrible allergic reaction.
            I carry medicine everywhere because I'm allergic to {v}.
            The doctor confirmed I have an allergy to {v}.
            I can't go near {v}; my body reacts badly.
            One thing I must stay away from is {v}, due to an allergy.
        """),
        _lines("""
            What am I allergic to?
            What is my allergy?
            What do I have to avoid because of my allergy?
            What gives me an allergic reaction?
            What must I stay away from for health reasons?
            Which thing does my body react badly to?
        """),
    ),
    PersonaAttribute(
        "sibling_name",
        _first_name,
        _lines("""
            My {s}'s name is {v}.
            I have a younger {s}, {v}.
            {v}, my {s}, is visiting this weekend.
            I talked to my {s} {v} on the phone yesterday.
            My {s} {v} just got engaged.
            I'm meeting my {s}, {v}, for lunch.
            Growing up, my {s} {v} and I shared a room.
            You'd like my {s}; the name is {v}.
        """),
        _lines("""
            What is my {s}'s name?
            What's my {s} called?
            What is the name of my {s}?
            Who is my {s}?
            What name does my {s} have?
            Remind me, what is my {s} called?
        """),
        relations=SIBLINGS,
    ),
    PersonaAttribute(
        "partner_name",
        _first_name,
        _lines("""
            My {s} {v} says hello.
            {v}, my {s}, thinks I spend too much time online.
            My {s} is named {v}.
            I'm planning a surprise for my {s}, {v}.
            Me and my {s} {v} went hiking on Sunday.
            My {s}, whose name is {v}, works nights.
            Tonight {v} (my {s}) and I are watching a film.
            It's our anniversary soon; {v} is the best {s} ever.
        """),
        _lines("""
            What is my {s}'s name?
            Who is my {s}?
            What's the name of my {s}?
            Do you remember my {s}'s name?
            Tell me the name of my {s}.
            By what name do you know my {s}?
        """),
        relations=PARTNERS,
    ),
    PersonaAttribute(
        "favourite_band",
        _band,
        _lines("""
            My favourite band is {v}.
            I've been listening to {v} all week.
            I saw {v} live last year, they're my favourite band.
            Nobody beats {v}, my favourite band.
            I know every song by {v}.
            {v} is the band I love most.
            If I could meet one band, it would be {v}.
            My playlist is basically just {v} on repeat.
        """),
        _lines("""
            What is my favourite band?
            Which band do I love most?
            What band did I say is my favourite?
            Who is my favourite band?
            What band do I like best?
            Which group tops my music list?
        """),
    ),
    PersonaAttribute(
        "car",
        _pool(CARS),
        _lines("""
            I drive {av}.
            My car is {av}.
            My old {v} broke down again.
            I just washed my {v}.
            I've had my {v} for six years.
            The {v} I drive is great on fuel.
            I commute every day in my trusty {v}.
            Parking my {v} downtown is a nightmare.
        """),
        _lines("""
            What car do I drive?
            What kind of car do I have?
            What is my car?
            Which car brand do I own?
            What do I commute in?
            Which make of car is mine?
        """),
    ),
    PersonaAttribute(
        "sport",
        _pool(SPORTS),
        _lines("""
            I play {v} every week.
            My favourite sport is {v}.
            I'm on a {v} team.
            I hurt my knee playing {v}.
            The sport I love is {v}.
            I've been playing {v} since school.
            Nothing relaxes me like a good game of {v}.
            Our local {v} club trains on Thursdays, and I never miss it.
        """),
        _lines("""
            What sport do I play?
            What is my favourite sport?
            Which sport do I love?
            What sport do I do?
            Which game relaxes me most?
            What sport do I train for?
        """),
    ),
    PersonaAttribute(
        "language",
        _pool(LANGUAGES),
        _lines("""
            I'm learning {v}.
            I've started taking {v} lessons.
            My {v} teacher says I'm improving.
            I practise {v} with an app every morning.
            Learning {v} is harder than I expected.
            I want to be fluent in {v} by next year.
            I spend my evenings studying {v} grammar.
            My new year's resolution was to pick up {v}.
        """),
        _lines("""
            What language am I learning?
            Which language am I studying?
            What language am I taking lessons in?
            Which language do I practise?
            What language do I want to pick up?
            Which foreign language am I working on?
        """),
    ),
    PersonaAttribute(
        "birth_month",
        _pool(MONTHS),
        _lines("""
            My birthday is in {v}.
            I was born in {v}.
            My birthday comes up every {v}.
            I always celebrate my birthday in {v}.
            Since I'm a {v} baby, I love that time of year.
            My birthday falls in {v}.
            Every {v}, I get a year older.
            My friends throw me a party each {v} for my birthday.
        """),
        _lines("""
            When is my birthday?
            In which month is my birthday?
            What month was I born in?
            When do I celebrate my birthday?
            In what month do I get a year older?
            Which month brings my birthday?
        """),
    ),
)

# Facts about other people: same kinds of values, so a reader must track whose fact it is.
DISTRACTORS = _lines("""
    My friend has {as} called {x}.
    My neighbour's {s} is named {x}.
    My colleague grew up in {town}.
    My cousin is allergic to {allergy}.
    My best friend drives {acar}.
    My flatmate is learning {language}.
    My boss's favourite band is {band}.
    My friend {x} works as {ajob}.
""")

SMALL_TALK = (
    (
        "Any ideas for a quick dinner tonight?",
        "A vegetable stir-fry with rice takes about twenty minutes and uses whatever is in the fridge.",
    ),
    (
        "What's a good way to fall asleep faster?",
        "Keep a regular bedtime, dim the lights an hour before, and put the phone away.",
    ),
    (
        "Can you recommend a podcast about history?",
        "Look for a narrative series that covers one era per season; they are easy to follow.",
    ),
    (
        "The weather has been so strange lately.",
        "It really has been changeable. Layers are your friend this time of year.",
    ),
    (
        "How do I keep basil alive on a windowsill?",
        "Give it plenty of sun, water when the top of the soil is dry, and pinch off the flowers.",
    ),
    (
        "What's the difference between baking soda and baking powder?",
        "Baking powder already contains an acid; baking soda needs one from the recipe.",
    ),
    (
        "I'm trying to drink more water. Any tips?",
        "Keep a bottle in sight and drink a glass with every meal.",
    ),
    (
        "Can you help me plan a weekend trip?",
        "Sure. Pick a place within three hours, book one night, and leave a free afternoon.",
    ),
    ("Tell me a fun fact about octopuses.", "An octopus has three hearts and blue blood."),
    ("How long should I boil an egg?", "About seven minutes for a jammy yolk, ten for a firm one."),
    (
        "I can't decide which book to read next.",
        "Try the one you have put off longest; sometimes it is the right moment.",
    ),
    (
        "Is it worth learning to touch-type?",
        "Yes. A few weeks of short daily practice pays off for years.",
    ),
    (
        "What should I bring to a picnic?",
        "A blanket, water, something sweet, something salty, and a bag for rubbish.",
    ),
    (
        "My houseplants keep dying.",
        "Overwatering is the usual culprit. Check that the pots drain well.",
    ),
    (
        "Any tips for a job interview?",
        "Prepare three short stories about your work and ask them one real question.",
    ),
    (
        "How do I get better at remembering names?",
        "Repeat the name back when you hear it and link it to something memorable.",
    ),
)
OPENERS = ("Hi!", "Hello again.", "Hey, I'm back.", "Good morning!", "Evening! Got a minute?")
GREETINGS = ("Hello! How can I help today?", "Welcome back! What's on your mind?", "Hi there!")
PREFIXES = ("", "", "Oh, and ", "By the way, ", "Random thought: ", "Anyway, ")
ACKS = (
    "Thanks for telling me!",
    "Good to know.",
    "That's nice to hear.",
    "I'll keep that in mind.",
    "Got it.",
    "Noted, thanks for sharing.",
    "How lovely!",
)
CLOSERS = (("Thanks, talk later!", "Anytime. Have a great day!"), ("That's all for now.", "Bye!"))


def _fill(template: str, **slots: str) -> str:
    """Fill {key} slots; {akey} is the value with its article ("an iguana")."""
    slots |= {f"a{k}": f"{article(v)} {v}" for k, v in slots.items() if v}
    s = template.format(**slots)
    return s[0].upper() + s[1:]


def _distractor(r, names: NameMaker) -> str:
    template = r.choice(DISTRACTORS)
    makers = {
        "s": lambda: r.choice(PET_SPECIES),
        "x": lambda: _first_name(names),
        "town": lambda: _place_name(names),
        "allergy": lambda: r.choice(ALLERGIES),
        "car": lambda: r.choice(CARS),
        "language": lambda: r.choice(LANGUAGES),
        "band": lambda: _band(names),
        "job": lambda: r.choice(PROFESSIONS),
    }
    used = {
        k: make() for k, make in makers.items() if f"{{{k}}}" in template or f"{{a{k}}}" in template
    }
    return _fill(template, **used)


def make_persona(
    split: str,
    n_episodes: int,
    n_sessions: int | tuple[int, int] = (3, 6),
    seed: int = 0,
    facts_per_episode: tuple[int, int] = (4, 8),
    distractors_per_session: tuple[int, int] = (0, 2),
) -> list[ConversationEpisode]:
    """Generate `persona` episodes for one split: one QA per fact the user told about themself."""
    check_split(split)
    r = rng_for("persona", split, seed, n_sessions)
    episodes = []
    for i in range(n_episodes):
        names = NameMaker(r, split)
        n_s = n_sessions if isinstance(n_sessions, int) else r.randint(*n_sessions)
        chosen = r.sample(ATTRIBUTES, min(r.randint(*facts_per_episode), len(ATTRIBUTES)))
        # each session: user lines (facts, distractors) to bury in small talk
        planned: list[list[str]] = [[] for _ in range(n_s)]
        qas = []
        for attr in chosen:
            value, rel = attr.value(names), r.choice(attr.relations)
            template = r.choice(attr.mention_templates(split))
            mention = _fill(template, v=value, s=rel)
            if template.startswith(("My ", "Our ")):  # small-talk lead-in, as people do
                mention = r.choice(PREFIXES) + mention[0].lower() + mention[1:]
            planned[r.randrange(n_s)].append(mention)
            question = _fill(r.choice(attr.question_templates(split)), s=rel)
            qas.append(QA(question, [value]))
        sessions = []
        for facts in planned:
            facts += [_distractor(r, names) for _ in range(r.randint(*distractors_per_session))]
            r.shuffle(facts)
            turns = [("user", r.choice(OPENERS)), ("assistant", r.choice(GREETINGS))]
            chat = r.sample(SMALL_TALK, r.randint(1, 3) + max(0, 2 - len(facts)))
            for item in [(f, True) for f in facts] + [(c, False) for c in chat]:
                pos = r.randint(2, len(turns)) // 2 * 2  # insert between exchanges
                if item[1]:
                    pair = [("user", item[0]), ("assistant", r.choice(ACKS))]
                else:
                    pair = [("user", item[0][0]), ("assistant", item[0][1])]
                turns[pos:pos] = pair
            turns += list(zip(("user", "assistant"), r.choice(CLOSERS), strict=True))
            sessions.append([{"role": role, "content": text} for role, text in turns])
        episodes.append(ConversationEpisode(f"persona-{split}-s{seed}-{i:05d}", sessions, qas))
    return episodes
