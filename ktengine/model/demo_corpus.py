"""Training text for the demo model's tokenizer: a few paragraphs written for ktengine, plus
sentences generated deterministically from small word lists (with regular inflections), so the
byte-level BPE has enough distinct words to learn a few thousand merges.
"""
from __future__ import annotations

import random


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


PARAGRAPHS = """\
The harbour wakes before the sun. Fishing boats slide out past the lighthouse, their engines
humming, while gulls argue over the nets. By seven the bakery has opened and the smell of warm
bread drifts along the quay. Children run to school; old men sit on benches and talk about the
weather, the tides, and the price of fuel.

A small library stands at the top of the hill. Its shelves hold maps of the coast, books about
birds and stars, and a long row of notebooks in which the keepers of the lighthouse wrote down
every storm for a hundred years. On rainy afternoons the reading room is full, and the only sound
is the turning of pages.

In the workshop behind the station, an engineer repairs a water pump. She measures each part,
writes the numbers in a notebook, and checks them twice. "Measure first, then cut," she tells her
apprentice. The pump was built long ago, but with new seals and a careful hand it will run for
another twenty years.

Cooking is mostly patience. Chop the onions, warm the oil, and let them soften slowly until they
turn golden. Add garlic, tomatoes and a pinch of salt. Stir, taste, and wait. A good soup cannot be
hurried, and the best meals are often the simplest ones, shared at a long table with friends.

Computers follow instructions exactly. A program reads its input, keeps some state in memory, and
writes an answer. When the answer is wrong, the programmer reads the code again, adds a test, and
finds the mistake. Small functions with clear names are easier to read, to test and to change.

The mountain path climbs through pine forest, crosses a stream on flat stones, and reaches a meadow
where cows graze in summer. From the top you can see three valleys, a lake like a mirror, and on a
clear day the distant line of the sea. Bring water, a warm coat, and something to eat.

Questions help us learn. Why is the sky blue? How do bees find their way home? What happens to a
river when it reaches the ocean? Each answer leads to a new question, and curiosity, more than
cleverness, is what keeps a mind young.

Hello! How are you today? I am fine, thank you. Could you help me with a question? Of course,
I would be glad to help. Please explain it step by step. Sure: first we read the problem, then we
make a plan, then we check the result. Thanks, that was very helpful. You are welcome.
"""

NAMES = _words("""
Anna Ben Clara David Elena Farid Grace Hugo Iris Jonas Kira Leo Maya Noah Olga Pablo Quinn
Rosa Samir Tara Umar Vera Wen Xavier Yara Zoe
""")
NOUNS = _words("""
apple basket bicycle bird boat book bottle bridge candle castle chair cloud coat computer
cup door dragon engine farmer field flower forest garden gate guitar hammer hat horse house
island jacket kettle key kitchen ladder lamp letter machine market mirror mountain needle
ocean orange painter pencil piano planet pocket river road rocket school scientist shadow
ship singer soldier song station stone street student table teacher telescope theatre tower
town train tree valley village wagon wall window winter wizard worker writer yard number
answer question story program signal value matrix vector tensor layer expert router token
model server client request memory airport anchor animal artist autumn baby balloon banana
beach bean bell blanket blossom board bone branch brick brother brush bucket butter button
cabin cake camera camp canal captain card carpet carrot cat cave cellar chain cheese cherry
chicken chimney circle city clock coin collar corner cotton country cousin cow crowd crown
curtain daughter desert diamond dinner doctor dog doll dress drum duck eagle egg elephant
evening factory family feather fence finger fire fish flag floor fog fork fountain fox frog
fruit furnace glass glove goat gold grape grass hall harbour hill honey hospital hotel
insect iron jewel journey judge jungle kingdom knife lake leaf lemon library lion lizard
lock magnet map meadow medal melon merchant metal minute monkey moon morning mouse museum
music nest net night nurse oak office onion owl palace paper parcel parrot path pearl pepper
picture pillow pilot pipe plate pond potato prince princess puzzle queen rabbit rain ribbon
ring robot roof room rope rose sailor salt sand saucer season seed sheep shell shirt shoe
shop silver sister sky snake snow sock spider spoon spring square stair star stove sugar
summer sun sword tail tent thread ticket tiger tomato tool toy tunnel umbrella uncle vase
violin volcano watch water whale wheel whistle wind wing wolf wool world zebra
""")
VERBS = _words("""
open close paint clean cook fix follow help jump kick learn listen look move need order
plant play pull push reach repair start stop talk test travel turn visit walk want wash
watch work climb count cross dream explain fill finish gather guard hunt join laugh mark mix
obey offer pick pour print record remember rescue search share sort spell train trust wander
whisper wonder compute measure compare store load accept admire agree allow answer arrive
attack bake balance borrow bounce brush calculate camp carry change chase check cheer
collect connect cover crash cycle dance decide deliver design destroy develop discover
divide drag dress drop enjoy enter escape examine expect fetch float fold form gaze glow
grab guess hammer hand happen heat hope hover imagine improve inform invent invite kiss
knock land last launch lift like live lock manage march marry match melt mend miss note
notice paddle park pass pause plan point polish post prepare present prevent promise protect
punish question race rain relax remove repeat reply report return rush sail save scrub
settle sign smile sniff sound spark squeeze stamp stay step stretch suggest supply support
surprise switch tap taste thank tick touch trace trick try unlock use vanish wait warn wave
welcome whistle wish yawn zoom
""")
ADJECTIVES = _words("""
bright calm clean cold dark deep fast fresh gentle great green happy hard heavy kind large
light long loud new old plain quick quiet rich rough sharp short slow small smooth soft
strong sweet tall thick thin warm weak wild young brave broad busy cheap clever close cool
crisp damp dear dull eager easy empty fair faint fine firm flat fond free full glad grand
grim high huge keen lazy lean loose lovely low mild neat noble odd pale polite proud pure
rare ripe safe shy silly simple steep stiff strange swift tidy tight tiny tough ugly vast
wide wise
""")
PLACES = (
    "near the river",
    "behind the station",
    "under the old bridge",
    "inside the castle",
    "across the valley",
    "on the island",
    "at the market",
    "beside the lake",
    "in the kitchen",
    "along the coast",
    "over the hills",
    "through the forest",
)
TEMPLATES = (
    "{name} {verb_ed} the {adj} {noun} {place}.",
    "The {nouns} were {verb_ing} {place} while {name} {verb_s} a {adj_er} {noun2}.",
    "Why does {name} {verb} the {noun} so {adj_ly}?",
    "{Adj} {nouns} {verb} {place}; the {adj2_est} one is {number} years old.",
    "\"{Name2}, please {verb} the {noun},\" said {name}.",
    "In {year}, {number} {nouns} and {number2} {nouns2} {verb_ed} together.",
    "- {Verb} the {noun}\n- {Verb2} the {noun2}\n",
    "{name}: I {verb_ed} {number} {nouns}. {name2}: Really? That is {adj}!",
    "The {adj_ness} of the {noun} made {name} feel un{adj2}, so she {verb_ed} it again.",
    "A {verb_er} never {verb_s} without {adj_ness}; re{verb_ing} is {adj2_er} than {verb2_ing}.",
    "{Nouns}, {nouns2} and {adj_er} {nouns3}: {name} {verb2_s} them all, {adj2_ly}.",
)


def _add_suffix(word: str, suffix: str) -> str:
    """Regular English spelling: try -> tries/tried, busy -> busier, bake -> baked/baking."""
    if word.endswith("y") and word[-2] not in "aeiou" and suffix != "ing":
        return word[:-1] + "i" + ("es" if suffix == "s" else suffix)
    if word.endswith("e") and suffix[0] in "aeiu":
        return word[:-1] + suffix
    if suffix == "s" and word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    return word + suffix


def _sentence(rng: random.Random) -> str:
    words = {f"name{i}": rng.choice(NAMES) for i in ("", "2")}
    words.update({f"place{i}": rng.choice(PLACES) for i in ("",)})
    words.update(number=str(rng.randint(2, 999)), number2=str(rng.randint(2, 99)),
                 year=str(rng.randint(1800, 2099)))
    for i in ("", "2", "3"):
        noun = rng.choice(NOUNS)
        words.update({f"noun{i}": noun, f"nouns{i}": _add_suffix(noun, "s")})
    for i in ("", "2"):
        adj, verb = rng.choice(ADJECTIVES), rng.choice(VERBS)
        words.update({f"adj{i}": adj, f"verb{i}": verb})
        words.update({f"adj{i}_{x}": _add_suffix(adj, x) for x in ("er", "est", "ly", "ness")})
        words.update({f"verb{i}_{x}": _add_suffix(verb, x) for x in ("s", "ed", "ing", "er")})
    words.update({k.capitalize(): v.capitalize() for k, v in list(words.items())})
    return rng.choice(TEMPLATES).format(**words)


def demo_corpus(num_sentences: int = 4000) -> list[str]:
    """The tokenizer's training text, one string per paragraph or generated line."""
    rng = random.Random(0)
    lines = PARAGRAPHS.split("\n\n")
    lines += [_sentence(rng) for _ in range(num_sentences)]
    lines += [" ".join(_add_suffix(n, "s") for n in NOUNS), " ".join(NAMES)]
    return lines
