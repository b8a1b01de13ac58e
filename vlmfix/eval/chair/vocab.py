"""CHAIR vocabulary: caption words and phrases mapped to the 80 COCO categories.

The table is vlmfix's own, written for the singular forms produced by
:func:`vlmfix.eval.chair.text.singularize`. It follows the conventions of the original
CHAIR vocabulary (Rohrbach et al., "Object Hallucination in Image Captioning",
EMNLP 2018) where they decide what counts as a mention, because ground-truth files in
the field (including ``coco2014_gt_objects.json``) were built with them: "table" and
"desk" are a *dining table*, "seat" and "stool" a *chair*, "ball" a *sports ball*,
"computer" a *laptop*, "monitor" a *tv*, "phone" a *cell phone*, every word for a
human a *person*. Deliberate differences are listed in ``docs/eval.md``.

Two- and three-token phrases are merged into one token before lookup (``PHRASES``); a
phrase maps either to a category word or to a plain word that stops its parts from being
read as objects (e.g. "baby elephant" is an elephant, not a person and an elephant;
"train track" and "home plate" are no object, as in the original pipeline;
``NON_OBJECT_COMPOUNDS``, ``POSSESSIVE_COMPOUNDS``).
"""

from __future__ import annotations

__all__ = [
    "COCO_CATEGORIES",
    "SYNONYMS",
    "PHRASES",
    "NON_OBJECT_COMPOUNDS",
    "POSSESSIVE_COMPOUNDS",
    "WORD_TO_CATEGORY",
    "category_of",
]

# category -> comma-separated words (singular, lowercase) that mention it. The
# category's own name is always included.
_TABLE: dict[str, str] = {
    "person": (
        "person, people, man, woman, boy, girl, child, kid, baby, toddler, infant, adult, teenager, teen, "
        "lady, gentleman, guy, male, female, mother, father, mom, dad, sister, brother, daughter, son, "
        "bride, groom, chef, baker, worker, passenger, rider, biker, bicyclist, cyclist, driver, player, "
        "pitcher, batter, catcher, umpire, skier, snowboarder, skater, skateboarder, surfer, policeman, "
        "cop, officer, soldier, cowboy, doctor, nurse, student, tourist, traveler, shopper, customer, "
        "vendor, spectator, crowd, athlete, hiker, camper, walker, hunter, fisherman, farmer, patient, "
        "grandmother, grandfather, grandchild, teacher, audience, businessman, fireman"
    ),
    "bicycle": "bicycle, bike, unicycle, minibike, trike, tricycle",
    "car": (
        "car, automobile, van, minivan, sedan, suv, hatchback, cab, taxi, taxicab, jeep, coupe, limo, "
        "limousine, convertible"
    ),
    "motorcycle": "motorcycle, motorbike, scooter, moped, dirtbike",
    "airplane": "airplane, aeroplane, plane, jet, jetliner, aircraft, airliner, airbus, biplane, seaplane, monoplane",
    "bus": "bus, minibus, trolley, trolleybus",
    "train": "train, locomotive, tram, tramway, caboose, streetcar",
    "truck": "truck, pickup, lorry, hauler, firetruck, semi",
    "boat": (
        "boat, ship, sailboat, motorboat, speedboat, powerboat, canoe, kayak, yacht, dinghy, skiff, "
        "ferry, ferryboat, barge, tugboat, rowboat, houseboat, catamaran, pontoon, vessel, trawler, "
        "schooner, lifeboat, steamboat, riverboat, freighter, battleship, steamship, paddleboat, "
        "watercraft, raft"
    ),
    "traffic light": "traffic light, traffic signal, stoplight, streetlight",
    "fire hydrant": "fire hydrant, hydrant",
    "stop sign": "stop sign",
    "parking meter": "parking meter, meter",
    "bench": "bench, pew",
    "bird": (
        "bird, seagull, gull, pigeon, duck, goose, swan, owl, parrot, sparrow, crow, raven, eagle, hawk, "
        "falcon, pelican, heron, egret, flamingo, ostrich, peacock, rooster, hen, robin, finch, "
        "hummingbird, woodpecker, kingfisher, mallard, gosling, duckling, cormorant, vulture, condor, "
        "macaw, cockatoo, parakeet, bluebird, blackbird, songbird, seabird, waterfowl, fowl, puffin, "
        "magpie, pheasant, quail, sandpiper, osprey, loon, warbler, oriole"
    ),
    "cat": "cat, kitten, kitty, feline, tabby",
    "dog": (
        "dog, puppy, pup, doggie, doggy, canine, hound, mutt, terrier, retriever, labrador, poodle, "
        "bulldog, pug, beagle, chihuahua, dachshund, collie, sheepdog, husky, greyhound, corgi, spaniel, "
        "schnauzer, rottweiler, doberman, pitbull, dalmatian, whippet"
    ),
    "horse": "horse, pony, foal, colt, mare, stallion, racehorse, equine, mustang, bronco, clydesdale, palomino",
    "sheep": "sheep, lamb, ram, ewe, goat",
    "cow": "cow, cattle, calf, bull, ox, oxen, heifer, buffalo, bison, holstein, zebu",
    "elephant": "elephant",
    "bear": "bear, grizzly",
    "zebra": "zebra",
    "giraffe": "giraffe",
    "backpack": "backpack, knapsack, rucksack",
    "umbrella": "umbrella, parasol",
    "handbag": "handbag, purse, wallet, briefcase",
    "tie": "tie, necktie, bowtie",
    "suitcase": "suitcase, luggage, suit case",
    "frisbee": "frisbee",
    "skis": "skis, ski",
    "snowboard": "snowboard",
    "sports ball": "sports ball, ball, soccer ball",
    "kite": "kite",
    "baseball bat": "baseball bat",
    "baseball glove": "baseball glove, baseball mitt, mitt",
    "skateboard": "skateboard",
    "surfboard": "surfboard, longboard, shortboard, skimboard, wakeboard",
    "tennis racket": "tennis racket, tennis racquet, racket, racquet",
    "bottle": "bottle",
    "wine glass": "wine glass",
    "cup": "cup",
    "fork": "fork",
    "knife": "knife, pocketknife",
    "spoon": "spoon",
    "bowl": "bowl",
    "banana": "banana",
    "apple": "apple",
    "sandwich": "sandwich, burger, hamburger, cheeseburger, sub, panini",
    "orange": "orange",
    "broccoli": "broccoli",
    "carrot": "carrot",
    "hot dog": "hot dog, hotdog",
    "pizza": "pizza",
    "donut": "donut, doughnut, bagel",
    "cake": "cake, cupcake, cheesecake, shortcake, pancake",
    "chair": "chair, seat, stool, armchair",
    "couch": "couch, sofa, loveseat, futon, settee, recliner",
    "potted plant": "potted plant, houseplant, house plant",
    "bed": "bed",
    "dining table": "dining table, table, desk",
    "toilet": "toilet, urinal, commode, lavatory, potty",
    "tv": "tv, television, televison, monitor",
    "laptop": "laptop, computer, notebook, netbook, macbook",
    "mouse": "mouse",
    "remote": "remote",
    "keyboard": "keyboard",
    "cell phone": "cell phone, cellphone, mobile phone, phone, smartphone, telephone, iphone",
    "microwave": "microwave",
    "oven": "oven, stove, stovetop",
    "toaster": "toaster",
    "sink": "sink",
    "refrigerator": "refrigerator, fridge, freezer",
    "book": "book, novel",
    "clock": "clock",
    "vase": "vase",
    "scissors": "scissors",
    "teddy bear": "teddy bear, teddybear, teddy",
    "hair drier": "hair drier, hair dryer, hairdryer, blow dryer, blowdryer",
    "toothbrush": "toothbrush",
}

SYNONYMS: dict[str, tuple[str, ...]] = {
    category: tuple(w.strip() for w in words.split(",")) for category, words in _TABLE.items()
}

COCO_CATEGORIES: tuple[str, ...] = tuple(SYNONYMS)

_ANIMALS = (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
    "goat",
    "lamb",
    "calf",
    "duck",
    "chick",
)

# Two-word phrases, merged into one token before lookup (after singularization).
# The value is the merged token: a key of WORD_TO_CATEGORY, or a non-object word.
PHRASES: dict[str, str] = {
    **{name: name for words in SYNONYMS.values() for name in words if " " in name},
    # an animal's age is not a person
    **{f"baby {a}": a for a in _ANIMALS},
    **{f"adult {a}": a for a in _ANIMALS},
    "passenger jet": "jet",
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",
    "toilet bowl": "toilet",
    "toilet paper": "toilet paper",
    "laptop computer": "laptop",
    "desktop computer": "computer",
    "computer monitor": "monitor",
    "computer mouse": "mouse",
    "computer keyboard": "keyboard",
    "motor bike": "motorbike",
    "motor cycle": "motorcycle",
    "dirt bike": "dirtbike",
    "air plane": "airplane",
    "street light": "streetlight",
    "stop light": "stoplight",
    "fire truck": "firetruck",
    "pickup truck": "truck",
    "tv monitor": "tv",
    "television set": "tv",
    "cell phone": "cell phone",
    "teddy bear": "teddy bear",
    "polar bear": "bear",
    "brown bear": "bear",
    "black bear": "bear",
    "grizzly bear": "bear",
}

# Compounds whose first word is an object word but which name something else: a place or
# a part that is there without the object. Each merges into one token that is no object.
# The original CHAIR pipeline keeps "home plate" and "train track" this way; vlmfix adds
# the rails ("train rail") and cabins of cable and street tramways, for which COCO has no
# category (neither a train nor a car). Stations and stops ("train station", "bus stop")
# stay mentions, as in every reference: on the reference captions the vehicle is in the
# image for 88 of 102 "train station" and 19 of 19 "bus stop/station" mentions.
NON_OBJECT_COMPOUNDS: tuple[str, ...] = (
    "home plate",
    "train track",
    "train rail",
    "tram car",
    "tramway car",
    "cable car",
    "trolley car",
    "gondola car",
    "funicular car",
)

# Possessive compounds "X 's Y" (as tokenized) whose possessor classifies the thing rather
# than owning it: no X need be present. The value is the merged token: a vocabulary word
# when Y is itself an object ("catcher's mitt" is a baseball glove, not a person), else
# a non-object token.
POSSESSIVE_COMPOUNDS: dict[str, str] = {
    "catcher 's mitt": "mitt",
    "catcher 's glove": "baseball glove",
    "chef 's knife": "knife",
    "farmer 's market": "farmer's market",
    "man 's room": "men's room",
    "woman 's room": "women's room",
    "man 's restroom": "men's room",
    "woman 's restroom": "women's room",
    "bird 's eye": "bird's eye",
    "bird 's nest": "bird's nest",
    "baker 's dozen": "baker's dozen",
}
PHRASES.update({c: c for c in NON_OBJECT_COMPOUNDS})
PHRASES.update(POSSESSIVE_COMPOUNDS)

WORD_TO_CATEGORY: dict[str, str] = {word: category for category, words in SYNONYMS.items() for word in words}


def category_of(word: str) -> str | None:
    """Return the COCO category a normalized word or merged phrase names, else None.

    Example:
        >>> category_of("puppy"), category_of("table"), category_of("tree")
        ('dog', 'dining table', None)
    """
    return WORD_TO_CATEGORY.get(word)
