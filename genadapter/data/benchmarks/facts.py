"""`facts`: knowledge injection about fictional people, organisations and places.

An episode's context is a stream of documents (encyclopedia entries, news snippets, letters,
interviews, profiles), each about one invented entity; questions ask about a few of them, so
the rest act as distractors. Episodes run from one document (~200 tokens) to hundreds.

What the test split holds out, so that a score measures reading rather than memorising:
- entities: names hash into train/validation/test (`common.split_of`), so no test entity
  (nor person-valued answer such as a founder) ever appears in train or validation;
- phrasings: the last `N_TEST_PHRASINGS` fact sentences and question forms of every
  attribute are used only in test; train and validation use the others;
- attribute types: `HELD_OUT` (a person's instrument, an organisation's product, a place's
  festival) never appear in train or validation, only in test.
Validation therefore matches train's distribution on unseen entities; test is the harder,
out-of-distribution set. Values (cities, jobs, years) come from shared pools: only the
entity-value pairing is random.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from genadapter.data.episodes import QA, QAEpisode

from .common import NameMaker, article, check_split, estimate_tokens, rng_for

N_TEST_PHRASINGS = 4
N_OPTIONS = 8  # candidate answers per question (chance = 1/8)


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.strip().splitlines() if line.strip())


@dataclass(frozen=True)
class Attribute:
    """One attribute type: value sampler, fact sentences ({e} entity, {v}/{av} value) and questions."""

    kind: str
    name: str
    value: Callable[[NameMaker, str], str]  # (names, entity) -> value
    facts: tuple[str, ...]
    questions: tuple[str, ...]
    held_out: bool = False

    def fact_templates(self, split: str) -> tuple[str, ...]:
        return _phrasings(self, self.facts, split)

    def question_templates(self, split: str) -> tuple[str, ...]:
        return _phrasings(self, self.questions, split)


def _phrasings(attr: Attribute, templates: tuple[str, ...], split: str) -> tuple[str, ...]:
    if attr.held_out:
        return templates if split == "test" else ()
    return templates[-N_TEST_PHRASINGS:] if split == "test" else templates[:-N_TEST_PHRASINGS]


# ----------------------------------------------------------------------------- value pools

CITIES = _lines(
    """
Lyon Porto Krakow Valencia Tampere Ghent Bologna Leipzig Cork Brno Graz Aarhus Bergen
Utrecht Seville Turin Dresden Malmo Riga Tallinn Ljubljana Zagreb Plovdiv Cluj Nantes
Bilbao Salzburg Basel Lucerne Galway Perth Hobart Dunedin Halifax Quebec Tucson Boise
Oaxaca Cusco Mendoza Recife Fez Kumasi Arusha Pune Kochi Hue Sapporo Busan Tainan
""".replace(" ", "\n")
)
PROFESSIONS = _lines("""
architect
baker
carpenter
dentist
electrician
engineer
florist
geologist
journalist
librarian
locksmith
marine biologist
nurse
optician
pharmacist
pilot
plumber
surveyor
tailor
translator
veterinarian
watchmaker
zoologist
accountant
""")
FOODS = _lines("""
lasagne
mushroom risotto
lentil soup
fish tacos
beef stew
pad thai
potato dumplings
paella
goulash
ramen
apple pie
falafel
shepherd's pie
butter chicken
pierogi
moussaka
sushi
chili con carne
ratatouille
pancakes
""")
PETS = _lines("""
cat
dog
parrot
rabbit
hamster
tortoise
ferret
goldfish
canary
lizard
pony
goat
snake
hedgehog
guinea pig
cockatoo
""")
HOBBIES = _lines("""
birdwatching
rock climbing
pottery
chess
knitting
kayaking
gardening
origami
fencing
stamp collecting
baking
astronomy
calligraphy
woodworking
salsa dancing
archery
photography
juggling
beekeeping
sailing
""")
INSTRUMENTS = _lines("""
cello
violin
trumpet
piano
flute
harp
saxophone
clarinet
banjo
accordion
drums
bassoon
mandolin
ukulele
trombone
harmonica
viola
""")
UNIVERSITIES = _lines("""
Leiden University
Uppsala University
McGill University
Kyoto University
Ghent University
Aarhus University
Monash University
Tufts University
Rice University
Keio University
Bocconi University
Charles University
Lund University
Bilkent University
Makerere University
Yonsei University
""")
INDUSTRIES = _lines("""
shipbuilding
renewable energy
publishing
logistics
textiles
pharmaceuticals
video games
agriculture
robotics
insurance
tourism
telecommunications
furniture
aerospace
food processing
cosmetics
mining
banking
""")
PRODUCTS = _lines("""
solar panels
board games
electric bicycles
hearing aids
garden tools
sailing boats
smart thermostats
canned soup
running shoes
office chairs
drones
water filters
fountain pens
ceramic tiles
baby strollers
wind turbines
""")
COUNTRIES = _lines("""
Portugal
Norway
Chile
Kenya
Vietnam
Canada
Poland
Ireland
Morocco
Peru
Finland
Greece
Ghana
Uruguay
Croatia
Mongolia
Austria
Nepal
Iceland
Tunisia
""")
FESTIVALS = _lines("""
Lantern Festival
Harvest Fair
Midsummer Regatta
Festival of Kites
Winter Light Parade
Blossom Week
Night of the Drums
Apple Carnival
Paper Boat Race
Honey Days
Frost Fair
Copper Bell Festival
Fiddlers' Gathering
Festival of Masks
""")
ORG_SUFFIXES = _lines("""
Industries
Holdings
Labs
Works
Group
Systems
Collective
Trading Company
Foundry
Partners
Cooperative
Manufacturing
""")
PLACE_ENDINGS = ["", "", "ford", "mere", "holm", "vale", "stad", "ton", "wick", "burg", "by"]


def _pool(pool: tuple[str, ...]) -> Callable[[NameMaker, str], str]:
    return lambda names, entity: names.rng.choice(pool)


def _org_name(names: NameMaker) -> str:
    r = names.rng
    return names.unique(lambda: f"{names.word(r.choice((2, 3)))} {r.choice(ORG_SUFFIXES)}")


def _place_name(names: NameMaker) -> str:
    return names.unique(lambda: names.word(2) + names.rng.choice(PLACE_ENDINGS))


def _person(names: NameMaker, entity: str) -> str:
    return names.person()


def _sibling(names: NameMaker, entity: str) -> str:
    return names.person(surname=entity.split()[-1])


def _number(lo: int, hi: int) -> Callable[[NameMaker, str], str]:
    return lambda names, entity: f"{names.rng.randint(lo, hi):,}"


def _year(lo: int, hi: int) -> Callable[[NameMaker, str], str]:
    return lambda names, entity: str(names.rng.randint(lo, hi))


# ----------------------------------------------------------------------------- attributes
# Each list: 12 phrasings; the last N_TEST_PHRASINGS are test-only (all of them if held out).

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "person",
        "birthplace",
        _pool(CITIES),
        _lines("""
            {e} was born in {v}.
            {e} was born in the city of {v}.
            The birthplace of {e} is {v}.
            {e} grew up in {v}, the city of their birth.
            {e} comes originally from {v}, where they were born.
            Records list {v} as the place where {e} was born.
            {e} is a native of {v}.
            It was in {v} that {e} was born.
            {e} first saw the light of day in {v}.
            {v} is the hometown where {e} entered the world.
            Before anything else, {e} was a child of {v}, having been born there.
            {e} hails by birth from {v}.
        """),
        _lines("""
            Where was {e} born?
            What is the birthplace of {e}?
            In which city was {e} born?
            What city does {e} come from originally?
            Which city is {e}'s birthplace?
            Where is {e} originally from?
            In what city was {e} born?
            What is {e}'s place of birth?
            Name the city where {e} entered the world.
            {e} was born in which city?
            Which town saw the birth of {e}?
            Where did {e} come into the world?
        """),
    ),
    Attribute(
        "person",
        "profession",
        _pool(PROFESSIONS),
        _lines("""
            {e} works as {av}.
            {e} is {av} by profession.
            By trade, {e} is {av}.
            The profession of {e} is that of {av}.
            {e} earns a living as {av}.
            {e} has spent many years working as {av}.
            {e}'s job is that of {av}.
            {e} trained as {av} and still practises the trade.
            Colleagues know {e} as a dedicated {v}.
            {e} makes ends meet by working as {av}.
            For a career, {e} chose to be {av}.
            {e} pursues the occupation of {v}.
        """),
        _lines("""
            What does {e} do for a living?
            What is {e}'s profession?
            What is the job of {e}?
            What does {e} work as?
            What profession does {e} have?
            What is {e} by trade?
            What kind of work does {e} do?
            What is {e}'s occupation?
            How does {e} earn a living?
            Which career did {e} choose?
            {e} is employed in what profession?
            What line of work is {e} in?
        """),
    ),
    Attribute(
        "person",
        "employer",
        lambda names, entity: _org_name(names),
        _lines("""
            {e} works for {v}.
            {e} is employed by {v}.
            The employer of {e} is {v}.
            {e} has a job at {v}.
            {e} joined {v} several years ago and still works there.
            {e} is on the payroll of {v}.
            {e} is a staff member at {v}.
            Currently, {e} works at {v}.
            {e} draws a salary from {v}.
            Every weekday, {e} reports to the offices of {v}.
            {v} counts {e} among its workforce.
            {e} holds a position with {v}.
        """),
        _lines("""
            Who does {e} work for?
            Who employs {e}?
            Which company is {e}'s employer?
            Where does {e} work?
            What organisation is {e} employed by?
            At which company does {e} have a job?
            Who is the employer of {e}?
            Which firm does {e} work at?
            From which organisation does {e} draw a salary?
            {e} holds a position with which organisation?
            Which company counts {e} among its staff?
            Name the employer of {e}.
        """),
    ),
    Attribute(
        "person",
        "birth_year",
        _year(1931, 2006),
        _lines("""
            {e} was born in the year {v}.
            {e}'s year of birth is {v}.
            {e} was born back in {v}.
            The birth year of {e} is {v}.
            Born in {v}, {e} belongs to that generation.
            {e} has been alive since {v}, the year of their birth.
            Records give {v} as the year {e} was born.
            {e}'s birth took place in {v}.
            The calendar read {v} when {e} was born.
            {e} entered life in the year {v}.
            {v} marks the year {e} first drew breath.
            {e} is someone whose birth dates to {v}.
        """),
        _lines("""
            In what year was {e} born?
            When was {e} born?
            What is {e}'s year of birth?
            What year was {e} born in?
            What is the birth year of {e}?
            In which year was {e} born?
            {e} was born in what year?
            Tell me the year {e} was born.
            In what year did {e} first draw breath?
            When did {e} enter life?
            What year does {e}'s birth date to?
            What was the calendar year of {e}'s birth?
        """),
    ),
    Attribute(
        "person",
        "favourite_food",
        _pool(FOODS),
        _lines("""
            {e}'s favourite food is {v}.
            {e} loves eating {v} more than anything.
            The favourite dish of {e} is {v}.
            If asked, {e} will always choose {v} for dinner.
            {e} could eat {v} every single day.
            Nothing makes {e} happier than a plate of {v}.
            {e} names {v} as a favourite meal.
            Friends know that {e} adores {v}.
            Above all other foods, {e} prefers {v}.
            {e} never turns down a serving of {v}.
            When {e} goes out to eat, the order is always {v}.
            The meal {e} craves most is {v}.
        """),
        _lines("""
            What is {e}'s favourite food?
            What does {e} like to eat most?
            What is the favourite dish of {e}?
            Which food does {e} love most?
            What would {e} choose for dinner?
            What is {e}'s favourite meal?
            Which dish does {e} adore?
            What food could {e} eat every day?
            Which food does {e} prefer above all others?
            What does {e} always order when eating out?
            What meal does {e} crave most?
            What dish will {e} never turn down?
        """),
    ),
    Attribute(
        "person",
        "pet",
        _pool(PETS),
        _lines("""
            {e} has a pet {v}.
            {e} owns {av}.
            {e} lives with a pet {v}.
            The family pet of {e} is {av}.
            {e} keeps {av} as a pet.
            {e}'s pet is {av}.
            {e} takes care of a pet {v} at home.
            At home, {e} looks after {av}.
            {e} shares the house with a beloved {v}.
            {av} is the animal companion of {e}.
            {e} is never seen without a pet {v} nearby.
            {e} adopted {av} from a shelter.
        """),
        _lines("""
            What pet does {e} have?
            What kind of animal is {e}'s pet?
            What animal does {e} keep as a pet?
            What is {e}'s pet?
            Which animal lives with {e}?
            What kind of pet does {e} own?
            What animal does {e} look after at home?
            Which pet does {e} take care of?
            What animal is {e}'s companion?
            Which animal keeps {e} company?
            {e} shares a home with what animal?
            What species is the pet of {e}?
        """),
    ),
    Attribute(
        "person",
        "hobby",
        _pool(HOBBIES),
        _lines("""
            {e}'s hobby is {v}.
            In their free time, {e} enjoys {v}.
            {e} spends weekends on {v}.
            The favourite pastime of {e} is {v}.
            {e} is passionate about {v}.
            {e} relaxes with {v} after work.
            For fun, {e} turns to {v}.
            {e} took up {v} as a hobby years ago.
            {e} devotes every spare hour to {v}.
            Away from work, {e} is absorbed in {v}.
            To unwind, {e} likes nothing better than {v}.
            {e} belongs to a local club for {v}.
        """),
        _lines("""
            What is {e}'s hobby?
            What does {e} enjoy doing in their free time?
            What is the favourite pastime of {e}?
            How does {e} spend the weekends?
            What hobby does {e} have?
            What is {e} passionate about?
            What does {e} do for fun?
            Which hobby did {e} take up?
            What does {e} devote spare hours to?
            How does {e} like to unwind?
            What activity is {e} absorbed in away from work?
            What leisure activity does {e} pursue?
        """),
    ),
    Attribute(
        "person",
        "sibling",
        _sibling,
        _lines("""
            {e} has a sibling named {v}.
            {v} is the sibling of {e}.
            {e}'s sibling is called {v}.
            {e} grew up alongside a sibling, {v}.
            The only sibling of {e} is {v}.
            {e} and {v} are siblings.
            {e} often visits {v}, a sibling who lives nearby.
            {e} has one sibling, whose name is {v}.
            {v} and {e} were raised together as siblings.
            Family photos show {e} next to {v}, a sibling.
            {e} calls a sibling, {v}, every Sunday.
            The sibling {e} is closest to is {v}.
        """),
        _lines("""
            What is the name of {e}'s sibling?
            Who is {e}'s sibling?
            What is {e}'s sibling called?
            Who did {e} grow up with as a sibling?
            Name the sibling of {e}.
            Who is the sibling of {e}?
            Which sibling does {e} have?
            What is the sibling of {e} named?
            Who was raised alongside {e} as a sibling?
            Who is {e}'s brother or sister?
            In {e}'s family, who is the sibling?
            Which person is {e}'s sibling?
        """),
    ),
    Attribute(
        "person",
        "university",
        _pool(UNIVERSITIES),
        _lines("""
            {e} studied at {v}.
            {e} is a graduate of {v}.
            {e} earned a degree from {v}.
            {e} attended {v}.
            The alma mater of {e} is {v}.
            {e} went to university at {v}.
            {e} completed their studies at {v}.
            As a student, {e} was enrolled at {v}.
            {e} holds a diploma awarded by {v}.
            {v} is where {e} spent their student years.
            {e} is an alumnus of {v}.
            Lecture halls at {v} were once home to {e}.
        """),
        _lines("""
            Where did {e} study?
            Which university did {e} attend?
            What is {e}'s alma mater?
            Where did {e} go to university?
            From which university did {e} graduate?
            At which university was {e} a student?
            Where did {e} earn a degree?
            Which university is {e} a graduate of?
            Which institution awarded {e}'s diploma?
            Where did {e} spend their student years?
            {e} is an alumnus of which university?
            What university counts {e} among its alumni?
        """),
    ),
    Attribute(
        "person",
        "instrument",
        _pool(INSTRUMENTS),
        _lines("""
            {e} plays the {v}.
            {e}'s instrument is the {v}.
            {e} has played the {v} since childhood.
            The instrument {e} plays is the {v}.
            {e} performs on the {v} in a local orchestra.
            {e} practises the {v} every evening.
            In the band, {e} is the one on the {v}.
            {e} learned to play the {v} as a teenager.
            {e} is an accomplished {v} player.
            Music lovers know {e} for playing the {v}.
            {e} owns a fine {v} and plays it daily.
            Give {e} a {v} and a concert can start.
        """),
        _lines("""
            What instrument does {e} play?
            Which musical instrument does {e} play?
            What is {e}'s instrument?
            Which instrument is {e} known for playing?
            On which instrument does {e} perform?
            What instrument did {e} learn to play?
            What instrument does {e} practise?
            Which instrument is {e}'s?
            What musical instrument is {e} skilled at?
            What does {e} play musically?
            Name the instrument {e} plays.
            {e} plays which instrument?
        """),
        held_out=True,
    ),
    Attribute(
        "organisation",
        "founder",
        _person,
        _lines("""
            {e} was founded by {v}.
            The founder of {e} is {v}.
            {v} founded {e}.
            {v} started {e} from scratch.
            {e} owes its existence to its founder, {v}.
            {e} was established by {v}.
            {v} set up {e} and led it in the early years.
            It was {v} who founded {e}.
            {e} began life as the brainchild of {v}.
            {v} launched {e} as a small venture.
            The person who created {e} is {v}.
            {e} traces its origins to the entrepreneur {v}.
        """),
        _lines("""
            Who founded {e}?
            Who is the founder of {e}?
            Who established {e}?
            By whom was {e} founded?
            Who started {e}?
            Who set up {e}?
            Name the founder of {e}.
            Which person founded {e}?
            Whose brainchild was {e}?
            Who created {e}?
            Who launched {e}?
            To whom does {e} trace its origins?
        """),
    ),
    Attribute(
        "organisation",
        "headquarters",
        _pool(CITIES),
        _lines("""
            {e} is headquartered in {v}.
            The headquarters of {e} are in {v}.
            {e} has its head office in {v}.
            {e} is based in {v}.
            {e} runs its operations from {v}.
            The main office of {e} is located in {v}.
            {v} is home to the headquarters of {e}.
            {e} keeps its central offices in {v}.
            Visitors to {e} head to its main campus in {v}.
            {e} chose {v} as the seat of its management.
            The corporate home of {e} lies in {v}.
            Decisions at {e} are made at its base in {v}.
        """),
        _lines("""
            Where is {e} headquartered?
            In which city are the headquarters of {e}?
            Where is the head office of {e}?
            Where is {e} based?
            Which city is home to {e}'s headquarters?
            In which city does {e} have its main office?
            Where are {e}'s central offices?
            What city is {e} based in?
            Where is the main campus of {e}?
            Which city is the seat of {e}'s management?
            Where is the corporate home of {e}?
            In what city does {e} make its decisions?
        """),
    ),
    Attribute(
        "organisation",
        "founding_year",
        _year(1820, 2021),
        _lines("""
            {e} was founded in {v}.
            {e} was established in the year {v}.
            The founding year of {e} is {v}.
            {e} has existed since {v}.
            {e} opened its doors in {v}.
            Since its founding in {v}, {e} has grown steadily.
            {e} dates back to {v}.
            {e} began operating in {v}.
            The story of {e} starts in {v}.
            {e} was incorporated back in {v}.
            {v} saw the birth of {e} as an organisation.
            {e} celebrates its anniversary counting from {v}.
        """),
        _lines("""
            When was {e} founded?
            In what year was {e} established?
            What is the founding year of {e}?
            Since when has {e} existed?
            In which year did {e} open its doors?
            What year was {e} founded?
            How far back does {e} date?
            When did {e} begin operating?
            In what year does the story of {e} start?
            When was {e} incorporated?
            In which year was {e} born as an organisation?
            From which year does {e} count its anniversaries?
        """),
    ),
    Attribute(
        "organisation",
        "industry",
        _pool(INDUSTRIES),
        _lines("""
            {e} operates in the {v} industry.
            {e} is a company in the {v} sector.
            The industry of {e} is {v}.
            {e} does business in {v}.
            {e} makes its money in {v}.
            {e} is active in the field of {v}.
            {e} competes in the {v} market.
            Analysts place {e} in the {v} industry.
            {e} built its reputation in {v}.
            The line of business of {e} is {v}.
            The trade that {e} is known for is {v}.
            Within {v}, {e} is a familiar name.
        """),
        _lines("""
            What industry does {e} operate in?
            Which sector is {e} in?
            What is the industry of {e}?
            What business is {e} in?
            In which field is {e} active?
            Which market does {e} compete in?
            What industry is {e} part of?
            What kind of company is {e}?
            In which industry did {e} build its reputation?
            What is the line of business of {e}?
            What trade is {e} known for?
            {e} belongs to which industry?
        """),
    ),
    Attribute(
        "organisation",
        "ceo",
        _person,
        _lines("""
            The CEO of {e} is {v}.
            {v} is the chief executive of {e}.
            {e} is led by its CEO, {v}.
            {v} runs {e} as chief executive officer.
            {e} appointed {v} as CEO.
            At the top of {e} sits its CEO, {v}.
            {v} serves as the CEO of {e}.
            {e} is managed by chief executive {v}.
            {v} holds the top job at {e}.
            Day-to-day leadership of {e} rests with {v}.
            {e} answers to {v}, its current boss.
            Heading {e} today is {v}.
        """),
        _lines("""
            Who is the CEO of {e}?
            Who is the chief executive of {e}?
            Who leads {e}?
            Who runs {e}?
            Who was appointed CEO of {e}?
            Who serves as the CEO of {e}?
            Who manages {e}?
            Name the chief executive of {e}.
            Who holds the top job at {e}?
            With whom does leadership of {e} rest?
            Who is the boss of {e}?
            Who heads {e} today?
        """),
    ),
    Attribute(
        "organisation",
        "product",
        _pool(PRODUCTS),
        _lines("""
            {e} makes {v}.
            {e} is best known for its {v}.
            The main product of {e} is {v}.
            {e} manufactures {v}.
            {e} sells {v} around the world.
            Most of the revenue of {e} comes from {v}.
            {e} designs and builds {v}.
            Customers buy {v} from {e}.
            {e}'s flagship product line is {v}.
            {e} produces {v} in large numbers.
            The factories of {e} turn out {v}.
            If you own {v}, they may well be made by {e}.
        """),
        _lines("""
            What does {e} make?
            What product is {e} known for?
            What is the main product of {e}?
            What does {e} manufacture?
            What does {e} sell?
            What is {e}'s flagship product?
            What does {e} produce?
            Which product brings {e} most of its revenue?
            What do the factories of {e} turn out?
            What products does {e} design?
            What goods come from {e}?
            Name the product of {e}.
        """),
        held_out=True,
    ),
    Attribute(
        "organisation",
        "employees",
        _number(12, 90_000),
        _lines("""
            {e} has {v} employees.
            {e} employs {v} people.
            The workforce of {e} numbers {v}.
            {v} people work at {e}.
            {e} has a staff of {v}.
            The number of employees at {e} is {v}.
            {e} gives work to {v} people.
            At last count, {e} had {v} staff members.
            The payroll of {e} lists {v} workers.
            {e} provides jobs for {v} men and women.
            Some {v} employees keep {e} running.
            A headcount at {e} comes to {v}.
        """),
        _lines("""
            How many employees does {e} have?
            How many people does {e} employ?
            How large is the workforce of {e}?
            How many people work at {e}?
            How big is the staff of {e}?
            What is the number of employees at {e}?
            How many staff members does {e} have?
            What is the size of {e}'s workforce?
            How many workers are on the payroll of {e}?
            How many jobs does {e} provide?
            What is the headcount at {e}?
            How many employees keep {e} running?
        """),
    ),
    Attribute(
        "place",
        "country",
        _pool(COUNTRIES),
        _lines("""
            {e} is in {v}.
            {e} is a town in {v}.
            {e} lies within the borders of {v}.
            {e} is located in {v}.
            The country of {e} is {v}.
            {e} belongs to {v}.
            {e} is part of {v}.
            Travellers find {e} in {v}.
            {e} sits inside {v}.
            To visit {e}, one must travel to {v}.
            {v} is the nation that {e} is found in.
            On a map, {e} appears within {v}.
        """),
        _lines("""
            In which country is {e}?
            What country is {e} in?
            Where is {e} located?
            Which country does {e} belong to?
            In what country does {e} lie?
            What is the country of {e}?
            {e} is part of which country?
            Which nation is {e} in?
            Which country must one travel to in order to visit {e}?
            Inside which country does {e} sit?
            In which nation is {e} found?
            On a map, which country contains {e}?
        """),
    ),
    Attribute(
        "place",
        "population",
        _number(800, 2_500_000),
        _lines("""
            {e} has a population of {v}.
            {v} people live in {e}.
            The population of {e} is {v}.
            {e} is home to {v} residents.
            {e} has {v} inhabitants.
            According to the census, {e} counts {v} people.
            Some {v} people call {e} home.
            The number of people living in {e} is {v}.
            A total of {v} souls reside in {e}.
            {e} houses {v} residents in all.
            The latest tally puts the population of {e} at {v}.
            {e} is a community of {v} people.
        """),
        _lines("""
            What is the population of {e}?
            How many people live in {e}?
            How many residents does {e} have?
            How many inhabitants does {e} have?
            How populous is {e}?
            What is {e}'s population?
            How many people call {e} home?
            According to the census, how many people live in {e}?
            How many souls reside in {e}?
            What does the latest tally put {e}'s population at?
            How big is the community of {e}?
            How many people are counted in {e} in total?
        """),
    ),
    Attribute(
        "place",
        "river",
        lambda names, entity: names.unique(lambda: names.word(2)),
        _lines("""
            The {v} River flows through {e}.
            {e} lies on the {v} River.
            {e} is built on the banks of the {v} River.
            The river of {e} is the {v}.
            {e} sits beside the {v} River.
            The {v} River runs through the middle of {e}.
            {e} grew up around the {v} River.
            The main river in {e} is the {v}.
            Boats on the {v} River pass right through {e}.
            Bridges in {e} cross the {v} River.
            The waters of the {v} River wash past {e}.
            {e} takes its drinking water from the {v} River.
        """),
        _lines("""
            Which river flows through {e}?
            What river does {e} lie on?
            On which river is {e} built?
            What is the river of {e}?
            Which river runs through {e}?
            What is the main river in {e}?
            What river is {e} beside?
            Name the river of {e}.
            Which river do the bridges in {e} cross?
            What river passes through {e}?
            From which river does {e} take its water?
            Which river do boats take through {e}?
        """),
    ),
    Attribute(
        "place",
        "mayor",
        _person,
        _lines("""
            The mayor of {e} is {v}.
            {v} is the mayor of {e}.
            {e} is governed by mayor {v}.
            {v} was elected mayor of {e}.
            {e} elected {v} as its mayor.
            {v} serves as mayor of {e}.
            City hall in {e} is run by {v}.
            {e} has {v} as its mayor.
            {v} holds the office of mayor in {e}.
            The people of {e} chose {v} to lead their town hall.
            {e}'s current mayor goes by the name {v}.
            Local government in {e} is headed by {v}.
        """),
        _lines("""
            Who is the mayor of {e}?
            Who governs {e}?
            Who was elected mayor of {e}?
            Who serves as mayor of {e}?
            Who runs city hall in {e}?
            What is the name of {e}'s mayor?
            Who is {e}'s mayor?
            Which person is mayor of {e}?
            Who holds the office of mayor in {e}?
            Whom did the people of {e} choose to lead the town hall?
            Who heads the local government of {e}?
            Who is in charge of {e} as mayor?
        """),
    ),
    Attribute(
        "place",
        "famous_dish",
        _pool(FOODS),
        _lines("""
            {e} is famous for {v}.
            The signature dish of {e} is {v}.
            Visitors to {e} must try {v}.
            {e} is known throughout the region for its {v}.
            The local speciality in {e} is {v}.
            Every restaurant in {e} serves {v}.
            The dish that {e} is proud of is {v}.
            The most famous food from {e} is {v}.
            No trip to {e} is complete without a taste of {v}.
            Cooks in {e} have perfected {v} over generations.
            {e} gave the world its beloved {v}.
            The culinary pride of {e} is {v}.
        """),
        _lines("""
            What dish is {e} famous for?
            What is the signature dish of {e}?
            What food must visitors to {e} try?
            What is {e} known for in the kitchen?
            What is the local speciality in {e}?
            Which dish does every restaurant in {e} serve?
            What dish is {e} proud of?
            What is the most famous food from {e}?
            What must you taste on a trip to {e}?
            Which dish have cooks in {e} perfected?
            What is the culinary pride of {e}?
            Which food is {e} celebrated for?
        """),
    ),
    Attribute(
        "place",
        "altitude",
        _number(3, 3200),
        _lines("""
            {e} lies {v} metres above sea level.
            The altitude of {e} is {v} metres.
            {e} is situated at an elevation of {v} metres.
            {e} sits at {v} metres above the sea.
            The town of {e} stands {v} metres high.
            At {v} metres, {e} is well above sea level.
            {e} is located at an altitude of {v} metres.
            The elevation of {e} measures {v} metres.
            Climbers note that {e} rests {v} metres above the coast.
            Surveyors put the height of {e} at {v} metres.
            {e} perches {v} metres over the level of the sea.
            Measured from the ocean, {e} is {v} metres up.
        """),
        _lines("""
            At what altitude does {e} lie?
            What is the altitude of {e}?
            How high above sea level is {e}?
            What is the elevation of {e}?
            How many metres above sea level is {e}?
            At what elevation is {e} situated?
            How high is {e}?
            What is {e}'s altitude in metres?
            How far above the coast does {e} rest?
            What height do surveyors give for {e}?
            How many metres over the sea does {e} perch?
            Measured from the ocean, how high up is {e}?
        """),
    ),
    Attribute(
        "place",
        "festival",
        _pool(FESTIVALS),
        _lines("""
            {e} hosts the {v} every year.
            The best-known festival in {e} is the {v}.
            Each summer, {e} celebrates the {v}.
            Crowds flock to {e} for the {v}.
            The {v} is held annually in {e}.
            {e} is famous for its yearly {v}.
            Locals in {e} look forward to the {v} all year.
            The {v} brings music and colour to {e}.
            {e} throws a big party called the {v}.
            Tourists plan trips to {e} around the {v}.
            Every year the streets of {e} fill up for the {v}.
            The festival calendar of {e} is headlined by the {v}.
        """),
        _lines("""
            Which festival does {e} host every year?
            What is the best-known festival in {e}?
            What festival is held annually in {e}?
            What do crowds flock to {e} for?
            What is {e}'s yearly festival?
            Which celebration is {e} famous for?
            What festival do locals in {e} look forward to?
            What festival brings music and colour to {e}?
            Which annual event takes place in {e}?
            What yearly party does {e} throw?
            What festival headlines the calendar of {e}?
            Name the festival of {e}.
        """),
        held_out=True,
    ),
)
KINDS = ("person", "organisation", "place")
HELD_OUT = tuple(f"{a.kind}.{a.name}" for a in ATTRIBUTES if a.held_out)


def attributes(kind: str, split: str) -> list[Attribute]:
    """Attribute types of one entity kind that may appear in a split."""
    return [a for a in ATTRIBUTES if a.kind == kind and (split == "test" or not a.held_out)]


# ----------------------------------------------------------------------------- documents

_FILLER = {
    "person": _lines("""
        Acquaintances describe {e} as thoughtful and patient.
        Little else is publicly known about {e}.
        {e} rarely gives interviews and prefers a quiet life.
        Neighbours say {e} is friendly and always ready to help.
        {e} keeps a small notebook of ideas for future projects.
        Those who have met {e} remember a warm sense of humour.
    """),
    "organisation": _lines("""
        {e} did not respond to a request for comment.
        {e} publishes an annual report each spring.
        Industry observers expect further changes at {e} next year.
        A spokesperson for {e} declined to share more details.
        {e} recently redesigned its logo and its website.
        Former staff describe the culture at {e} as informal.
    """),
    "place": _lines("""
        {e} has a small railway station and a weekly market.
        Summers in {e} are mild, and the winters are long.
        The old quarter of {e} is popular with walkers.
        {e} has a public library and two schools.
        A regional bus connects {e} with the surrounding villages.
        Many streets in {e} are lined with old chestnut trees.
    """),
}


def _encyclopedia(r, e, kind, facts, filler, names):
    return f"{e}\n\n" + " ".join(facts + filler)


def _news(r, e, kind, facts, filler, names):
    head = r.choice(("In brief", "Local news", "Around the region", "This week", "Update"))
    return f"{head}: {e}\n\n" + " ".join(facts + filler) + " More details are expected soon."


def _letter(r, e, kind, facts, filler, names):
    if r.random() < 0.5:
        day = r.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"))
        return f"Dear diary, {day}.\n\nToday I learned a few things about {e}. " + " ".join(
            facts + filler
        )
    to, sender = names.unique(names.first_name), names.unique(names.first_name)
    body = " ".join(facts + filler)
    return f"Dear {to},\n\nYou asked me about {e}, so here is what I know. {body}\n\nWarm wishes,\n{sender}"


def _interview(r, e, kind, facts, filler, names):
    prompts = (
        f"What can you tell us about {e}?",
        "Anything else?",
        "Interesting. Go on.",
        "What else should our readers know?",
        "And?",
    )
    lines = [f"Interviewer: {prompts[0]}"]
    for i, sentence in enumerate(facts + filler):
        if i:
            lines.append(f"Interviewer: {r.choice(prompts[1:])}")
        lines.append(f"Guest: {sentence}")
    return "\n".join(lines)


def _profile(r, e, kind, facts, filler, names):
    title = {"person": "Profile", "organisation": "Company profile", "place": "Place profile"}
    return f"{title[kind]}: {e}\n" + "\n".join(f"- {s}" for s in facts + filler)


STYLES = {
    "encyclopedia": _encyclopedia,
    "news": _news,
    "letter": _letter,
    "interview": _interview,
    "profile": _profile,
}


def _render(template: str, e: str, v: str) -> str:
    s = template.format(e=e, v=v, av=f"{article(v)} {v}")
    return s[0].upper() + s[1:]


@dataclass
class _Entity:
    kind: str
    name: str
    facts: dict[str, str]  # attribute name -> value


def _entity(r, names: NameMaker, split: str, n_facts: int) -> _Entity:
    kind = r.choice(KINDS)
    if kind == "person":
        name = names.person()
    else:
        name = _org_name(names) if kind == "organisation" else _place_name(names)
    allowed = attributes(kind, split)
    chosen = r.sample(allowed, min(n_facts, len(allowed)))
    return _Entity(kind, name, {a.name: a.value(names, name) for a in chosen})


_BY_KEY = {(a.kind, a.name): a for a in ATTRIBUTES}


def _document(r, ent: _Entity, split: str, names: NameMaker) -> str:
    facts = [
        _render(r.choice(_BY_KEY[ent.kind, a].fact_templates(split)), ent.name, v)
        for a, v in ent.facts.items()
    ]
    filler = [_render(t, ent.name, "") for t in r.sample(_FILLER[ent.kind], r.randint(1, 3))]
    style = STYLES[r.choice(list(STYLES))]
    return style(r, ent.name, ent.kind, facts, filler, names)


def make_facts(
    split: str,
    n_episodes: int,
    docs_per_episode: int | tuple[int, int] = (1, 8),
    target_tokens: int | None = None,
    seed: int = 0,
    n_questions: int = 4,
    facts_per_entity: tuple[int, int] = (3, 5),
    tokenizer=None,
) -> list[QAEpisode]:
    """Generate `facts` episodes for one split.

    Length is set either by `docs_per_episode` (an int, or a (lo, hi) range drawn per
    episode) or, if given, by `target_tokens`: documents are added until the context reaches
    it (estimated as 1.3 x words, or counted exactly with `tokenizer`). Questions go to
    `n_questions` facts spread over distinct entities anywhere in the stream.
    """
    check_split(split)
    r = rng_for("facts", split, seed, target_tokens, docs_per_episode)
    episodes = []
    for i in range(n_episodes):
        names = NameMaker(r, split)
        if isinstance(docs_per_episode, int):
            n_docs = docs_per_episode
        else:
            n_docs = r.randint(*docs_per_episode)
        entities, docs, tokens = [], [], 0
        while (tokens < target_tokens) if target_tokens else (len(docs) < n_docs):
            ent = _entity(r, names, split, r.randint(*facts_per_entity))
            entities.append(ent)
            docs.append(_document(r, ent, split, names))
            tokens += estimate_tokens(docs[-1], tokenizer)
        asked = r.sample(entities, min(n_questions, len(entities)))
        while len(asked) < n_questions:  # few entities: ask several things about one
            asked.append(r.choice(entities))
        qas, seen, episode_id = [], set(), f"facts-{split}-s{seed}-{i:05d}"
        for ent in asked:
            left = [a for a in ent.facts if (ent.name, a) not in seen]
            if not left:
                continue
            a = r.choice(left)
            seen.add((ent.name, a))
            attr = _BY_KEY[ent.kind, a]
            q = _render(r.choice(attr.question_templates(split)), ent.name, "")
            key = f"{episode_id}/{len(qas)}"
            qas.append(QA(q, [ent.facts[a]], answer_options(attr, ent, entities, split, key)))
        episodes.append(QAEpisode(episode_id, docs, qas))
    return episodes


def answer_options(
    attr: Attribute, ent: _Entity, entities: list[_Entity], split: str, key: str, k: int = N_OPTIONS
) -> list[str]:
    """`k` candidates of the asked attribute's type: the gold value, the values the context
    gives other entities for it (distractors that were read too), then fresh values.

    Drawn from their own generator (seeded by `key`), so episodes are the same with or without."""
    gold = ent.facts[attr.name]
    in_context = [
        e.facts[attr.name] for e in entities if e.kind == ent.kind and attr.name in e.facts
    ]
    options = list(dict.fromkeys([gold, *in_context]))[:k]
    r = random.Random(f"options/{key}")
    names = NameMaker(r, split)
    for _ in range(20 * k):
        if len(options) == k:
            break
        value = attr.value(names, ent.name)
        if value not in options:
            options.append(value)
    r.shuffle(options)
    return options
